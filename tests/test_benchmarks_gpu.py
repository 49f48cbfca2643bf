"""benchmarks/gpu.py: the tiny run on the CPU goes through every part and writes a table with every row."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

EVERY_ROW = [
    "matmul peak",
    "baseline, eager",
    "GroupedMLP, eager",
    "ShallowMLP, eager",
    "baseline, torch.compile",
    "| 2. inference | baseline",
    "| 2. inference | GroupedMLP",
    "| 2. inference | ShallowMLP",
    "baseline, peak training memory",
    "GroupedMLP, peak training memory",
    "ShallowMLP, peak training memory",
    "trainer steps on its images",
]
EVERY_HESSIAN_ROW = [
    "ours: Lanczos top 5 to 1e-3",
    "PyHessian: power iteration top 5",
    "PyHessian: Hutchinson trace",
    "ours: Hutchinson deflated by the Lanczos basis",
    "top 5 and trace together",
]


def run_script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_tiny_run_writes_a_table_with_every_row_for_both_hessian_states(tmp_path):
    md = tmp_path / "table.md"
    # a budget no part reaches on a loaded CPU; PyHessian's looser tolerance and two batches of 16 images keep the
    # power iteration short
    result = run_script("--tiny", "--device", "cpu", "--budget", "3000", "--samples", "32", "--pyhessian-tol", "1e-3",
                        "--md", str(md), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    text = md.read_text()
    assert text == "# GPU benchmark\n\n" + result.stdout
    assert "SMOKE TEST" in text and "not results" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    for name in EVERY_ROW:
        assert sum(name in row for row in rows) == 1, name
    for state in ("3. Hessian, initialisation", "3. Hessian, after 5 steps"):
        for name in EVERY_HESSIAN_ROW:
            assert sum(row.startswith(f"| {state} | {name}") for row in rows) == 1, (state, name)
    # PyHessian stops at a multiple of our time (on a loaded CPU it may reach it): such a row is a lower bound
    capped = [row for row in rows if "stopped at its cap" in row]
    assert all(row.split(" | ")[3].startswith("> ") for row in capped), capped
    ratios = [row.split(" | ")[3] for row in rows if "top 5 and trace together" in row]
    assert all(r.endswith("x") and float(r.strip("> x")) > 0 for r in ratios), ratios
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_budget_is_one_sentence_and_a_nonzero_exit():
    result = run_script("--tiny", "--budget", "-5")
    assert result.returncode == 2
    assert "--budget must be positive" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cuda_asked_for_without_a_gpu_is_one_sentence(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_script("--tiny", "--device", "cuda", "--md", str(tmp_path / "t.md"))
    assert result.returncode == 1
    assert result.stderr.strip() == "--device cuda was asked for, but torch sees no CUDA device here."
    assert not (tmp_path / "t.md").exists()
