import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def data_dir() -> Path:
    """The folder with the official MNIST / Fashion-MNIST files; tests needing it skip when it is not set."""
    root = os.environ.get("LANDSCAPE_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("LANDSCAPE_DATA_DIR is not set to a folder with the official dataset files")
    return Path(root)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, a shared 2-core machine is oversubscribed by them,
    and the distributed and resume tests compare sums that must be formed in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
