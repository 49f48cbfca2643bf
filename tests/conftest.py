import os
from pathlib import Path

import pytest


@pytest.fixture
def data_dir() -> Path:
    """The folder with the official MNIST / Fashion-MNIST files; tests needing it skip when it is not set."""
    root = os.environ.get("LANDSCAPE_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("LANDSCAPE_DATA_DIR is not set to a folder with the official dataset files")
    return Path(root)
