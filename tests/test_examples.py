"""The scripts in examples/ run as a user runs them, and print what they promise."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return done.stdout


def numbers(line: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+\.\d*(?:e[-+]?\d+)?", line)]


@pytest.mark.slow
def test_timm_example_prints_eigenvalues_sharpness_and_draws_the_surface(tmp_path):
    out = run_example("timm_vit.py", "--out", str(tmp_path / "surface.png"))
    eigen = next(line for line in out.splitlines() if line.startswith("top eigenvalues"))
    values = numbers(eigen.split("trace")[0])
    assert len(values) == 3 and values == sorted(values, reverse=True)
    assert "m-sharpness" in out and (tmp_path / "surface.png").stat().st_size > 1000


@pytest.mark.slow
def test_huggingface_example_measures_a_vit_for_image_classification():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install -e '.[compare]')")
    out = run_example("huggingface_vit.py")
    assert re.search(r"attention Hessian over \d+ parameters", out)
    assert numbers(out.splitlines()[1].split(":")[-1])[0] >= 0  # worst-case sharpness is a rise of the loss


@pytest.mark.slow
def test_cnn_regression_example_uses_the_mse_loss():
    out = run_example("cnn_regression.py")
    mse = float(re.search(r"MSE (\S+);", out).group(1))
    assert 0 < mse < 0.01  # trained: far below the variance of the targets' untrained fit
    along = numbers(out.split("random direction:")[1])
    assert len(along) == 11 and min(along) == pytest.approx(mse, rel=0.2)
