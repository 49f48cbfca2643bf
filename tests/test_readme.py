"""Every command the README shows, run as a user types it: in a pseudo-terminal, so that stdin, stdout and stderr
are terminals and the progress bars are drawn.

The commands are read from README.md itself (the "Commands" table, the typical session and the torchrun examples)
and shrunk to tiny settings by :func:`tiny` (digits data, two epochs, a small ViT, a few evaluation examples), so a
README command that no test here runs, or that stops working, fails this module. Each run must exit 0, print no
traceback, show a progress bar with a total and the time left where the work is long, and write the files the
README promises.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# Progress with a total and the time left: tqdm's "n/total [elapsed<remaining".
BAR_WITH_TIME_LEFT = re.compile(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d")

# A small ViT for 8x8 digits (patch 4: four tokens) and a training set small enough for seconds per epoch.
TINY_MODEL = ["--model-arg", "embed_dim=16", "--model-arg", "depth=2", "--model-arg", "num_heads=2",
              "--set", "data.train_size=128", "--set", "data.val_size=64", "--batch-size", "32"]
TINY_ANALYSIS = {
    "hessian": ["--samples", "16"],
    "sharpness": ["--samples", "16", "--steps", "2", "--draws", "1"],
    "surface": ["--samples", "16"],
}


# == the README's commands ====================================================================================
def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def table_commands(text: str | None = None) -> list[str]:
    """The subcommands of the "Commands" table: ``demo``, ``train``, ``analyze hessian``, ..."""
    text = text or readme_text()
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    names = []
    for match in re.finditer(r"^\| `landscape ([a-z-]+)(?: ([a-z-]+))?", section, flags=re.M):
        first, second = match.groups()
        names.append(f"{first} {second}" if first == "analyze" and second else first)
    return names


def code_lines(text: str, after: str) -> list[str]:
    """The command lines of the first ``bash`` block after the line ``after`` (comments and blanks left out)."""
    block = text.split(after, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def typical_session(text: str | None = None) -> list[str]:
    return code_lines(text or readme_text(), "A typical session:")


def torchrun_examples(text: str | None = None) -> list[str]:
    return [line for line in code_lines(text or readme_text(), "## Analyses on several GPUs or nodes")
            if line.startswith("torchrun ")]


def subcommand(command: str) -> str:
    """``analyze hessian`` of ``torchrun ... -m landscape analyze hessian RUN``; ``train`` of ``landscape train``."""
    words = shlex.split(command)
    words = words[words.index("landscape") + 1:]
    return " ".join(words[:2]) if words[0] == "analyze" else words[0]


def tiny(command: str) -> list[str]:
    """A README command line as argv with tiny settings: digits instead of real data, two epochs instead of a
    hundred, two CPU processes instead of eight GPUs, a few evaluation examples, 5 grid points a side."""
    argv = shlex.split(command)
    for i, word in enumerate(argv):
        if word == "fashion-mnist" and argv[i - 1] == "--data":
            argv[i] = "digits"
        elif word.startswith("epochs=") and argv[i - 1] == "--set":
            argv[i] = "epochs=2"
        elif word == "--nproc-per-node":
            argv[i + 1] = "2"
        elif word == "--points":
            argv[i + 1] = "5"
    kind = subcommand(command)
    if kind == "train":
        argv += TINY_MODEL
    if kind.startswith("analyze ") and kind != "analyze dynamics":
        argv += TINY_ANALYSIS[kind.split()[1]]
        if kind == "analyze surface" and "--points" not in argv:
            argv += ["--points", "5"]
        if argv[0] == "torchrun":
            argv += ["--device", "cpu"] if "--device" not in argv else []
    return [executable(argv[0]), *argv[1:]]


def executable(name: str) -> str:
    """The console script installed next to this Python (``landscape``, ``torchrun``), else the one on PATH."""
    local = BIN / name
    return str(local) if local.exists() else (shutil.which(name) or name)


# == running in a terminal ====================================================================================
def run_in_terminal(argv: list[str], cwd: Path, timeout: float = 900) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr; return its exit code and all it wrote."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "160"}
    env.pop("LANDSCAPE_DATA_DIR", None)  # digits only: the commands must not need the real files
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                tail = b"".join(chunks).decode(errors="replace")[-3000:]
                raise AssertionError(f"{shlex.join(argv)} ran longer than {timeout:.0f} s:\n{tail}")
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def run_ok(argv: list[str], cwd: Path, timeout: float = 900) -> str:
    """Run in a terminal; the command must exit 0 without a traceback. Returns what it printed."""
    code, output = run_in_terminal(argv, cwd, timeout)
    shown = f"{shlex.join(argv)} (exit {code}):\n{output[-4000:]}"
    assert code == 0, shown
    assert "Traceback" not in output, shown
    return output


COVERED: set[str] = set()


def covers(*names: str):
    """Mark a test as the one that runs these README table commands in a terminal."""
    COVERED.update(names)
    return lambda test: test


# == the README itself (fast) =================================================================================
def test_readme_lists_the_commands_this_module_knows():
    names = table_commands()
    assert {"demo", "train", "analyze hessian", "analyze sharpness", "analyze surface", "analyze dynamics", "figures",
            "report", "import", "compare", "models", "datasets", "inspect"} <= set(names)
    session = typical_session()
    assert session and all(line.startswith("landscape ") for line in session)
    assert len(torchrun_examples()) >= 2


def test_every_readme_table_command_is_run_in_a_terminal_by_a_test():
    missing = sorted(set(table_commands()) - COVERED)
    assert not missing, f"README commands without a terminal test in {Path(__file__).name}: {missing}"


def test_every_torchrun_example_runs_an_analysis_this_module_shrinks():
    for line in torchrun_examples():
        kind = subcommand(line)
        assert kind in ("analyze hessian", "analyze sharpness", "analyze surface"), line
        argv = tiny(line)
        assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[argv.index("--device") + 1] == "cpu"


def test_tiny_keeps_every_readme_flag_and_only_shrinks_sizes():
    argv = tiny("landscape analyze surface runs/NAME --dims 2 --points 101 --shard grid")
    assert argv[1:] == ["analyze", "surface", "runs/NAME", "--dims", "2", "--points", "5", "--shard", "grid",
                        "--samples", "16"]
    argv = tiny("landscape train --model m --data fashion-mnist --out runs/x --set epochs=100")
    assert argv[1:7] == ["train", "--model", "m", "--data", "digits", "--out"] and "epochs=2" in argv


@covers("datasets")
def test_datasets_in_a_terminal_lists_digits_as_found(tmp_path):
    output = run_ok([executable("landscape"), "datasets"], tmp_path, timeout=300)
    assert re.search(r"^digits\b.*\byes\b", output, flags=re.M | re.I), output


# == one tiny trained pair of runs, shared ====================================================================
@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    """A folder where the typical session's two ``landscape train`` lines have run (runs/base, runs/grouped)."""
    root = tmp_path_factory.mktemp("session")
    for line in typical_session():
        if subcommand(line) == "train":
            output = run_ok(tiny(line), root)
            assert re.search(r"epoch \d+/2", output), f"no epoch progress bar in:\n{output[-2000:]}"
            assert "Run written to" in output
    return root


def assert_is_run(path: Path, epochs: int) -> None:
    assert (path / "config.yaml").is_file() and (path / "metrics.csv").is_file() and (path / "state" / "last.pt").is_file()
    assert sorted(p.name for p in (path / "checkpoints").glob("*.safetensors"))[-1] == f"epoch-{epochs:04d}.safetensors"


@pytest.mark.slow
@covers("train", "analyze hessian", "analyze sharpness", "analyze surface", "analyze dynamics", "figures", "report")
def test_typical_session_runs_line_by_line_in_a_terminal(session_dir):
    runs = {}
    for line in typical_session():
        kind = subcommand(line)
        if kind == "train":
            out = Path(shlex.split(line)[shlex.split(line).index("--out") + 1])
            assert_is_run(session_dir / out, epochs=2)
            runs[out.name] = session_dir / out
            continue
        output = run_ok(tiny(line), session_dir)
        if kind in ("analyze hessian", "analyze sharpness", "analyze surface"):
            assert BAR_WITH_TIME_LEFT.search(output), f"{line}: no progress bar with the time left:\n{output[-2000:]}"
            name = {"analyze hessian": "hessian.nc",
                    "analyze sharpness": "sharpness-adaptive.nc" if "--adaptive" in line else "sharpness.nc",
                    "analyze surface": "surface-random-2d.nc"}[kind]
            assert (session_dir / "runs/base/analysis" / name).is_file(), output
            assert "Results in" in output
        elif kind == "analyze dynamics":
            assert all((run / "analysis" / "dynamics.nc").is_file() for run in runs.values())
        elif kind == "figures":
            assert BAR_WITH_TIME_LEFT.search(output), f"{line}: no progress bar with the time left:\n{output[-2000:]}"
            pngs, pdfs = list((session_dir / "figures").glob("*.png")), list((session_dir / "figures").glob("*.pdf"))
            assert pngs and {p.stem for p in pngs} == {p.stem for p in pdfs}
        elif kind == "report":
            assert (session_dir / "report.md").is_file() and "H1" in (session_dir / "report.md").read_text()


@pytest.mark.slow
@covers("compare", "inspect")
def test_compare_and_inspect_in_a_terminal(session_dir):
    output = run_ok([executable("landscape"), "compare", "runs/base", "runs/grouped", "--out", "compare.csv"], session_dir)
    assert (session_dir / "compare.csv").is_file() and "runs/grouped" in output
    output = run_ok([executable("landscape"), "inspect", "runs/base"], session_dir)
    assert "metrics" in output.lower() and "epoch" in output
    output = run_ok([executable("landscape"), "inspect", "runs/base/checkpoints/epoch-0002.safetensors"], session_dir)
    assert "epoch" in output


@pytest.mark.slow
@covers("models")
def test_models_in_a_terminal_lists_the_variants(tmp_path):
    output = run_ok([executable("landscape"), "models"], tmp_path, timeout=600)
    assert "vit_pico_patch4_32_grouped_mlp" in output and "mlit_xxs" in output


@pytest.mark.slow
@covers("import")
def test_import_of_a_timm_file_in_a_terminal_writes_a_run(tmp_path):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, embed_dim=32,
                              depth=2, num_heads=2)
    torch.save(model.state_dict(), tmp_path / "foreign.pth")
    output = run_ok([executable("landscape"), "import", "foreign.pth", "--out", "runs/imported",
                     "--model-arg", "num_heads=2"], tmp_path)
    assert "runs/imported" in output
    assert len(list((tmp_path / "runs/imported/checkpoints").glob("*.safetensors"))) == 1
    assert (tmp_path / "runs/imported/config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("line", torchrun_examples())
def test_torchrun_example_with_two_cpu_processes(session_dir, tmp_path, line):
    # the trained run only: the typical session's analyses of it (other settings) must not be in the way
    shutil.copytree(session_dir / "runs" / "base", tmp_path / "runs" / "NAME",
                    ignore=shutil.ignore_patterns("analysis"))
    output = run_ok(tiny(line), tmp_path)
    assert BAR_WITH_TIME_LEFT.search(output), f"no progress bar with the time left:\n{output[-2000:]}"
    assert "Results in" in output
    analysis = tmp_path / "runs/NAME/analysis"
    kind = subcommand(line).split()[1]
    assert list(analysis.glob(f"{kind}*.nc")), sorted(p.name for p in analysis.iterdir())


@pytest.mark.slow
@covers("demo")
def test_demo_at_smoke_size_in_a_terminal_writes_report_and_figures(tmp_path):
    started = time.monotonic()
    output = run_ok([executable("landscape"), "demo", "--smoke", "--seeds", "1", "--jobs", "1"], tmp_path)
    assert BAR_WITH_TIME_LEFT.search(output), f"no study progress with the time left:\n{output[-2000:]}"
    demo = tmp_path / "runs" / "demo"
    assert (demo / "report.md").is_file() and list((demo / "figures").glob("*.png"))
    assert len(list((demo / "runs").iterdir())) == 5
    print(f"smoke demo: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
@covers("study")
def test_study_file_at_smoke_size_in_a_terminal_writes_report_and_figures(tmp_path):
    import yaml

    demo = yaml.safe_load((ROOT / "landscape" / "studies" / "demo-digits.yaml").read_text())
    study = {
        "name": "tiny", "data": "digits", "recipe": demo["recipe"], "seeds": 1,
        "variants": demo["variants"][:2],  # the baseline and its GroupedMLP
        "overrides": {**demo["overrides"], "epochs": 1, "data.train_size": 128, "data.val_size": 64},
        "analysis": {"samples": 16, "top_k": 1, "trace_matvecs": 2, "density_probes": 1, "density_steps": 4,
                     "rhos": [0.05], "adaptive_rhos": [0.5], "sharpness_steps": 1, "sharpness_draws": 1,
                     "surface_points": 5, "surface_points_2d": 3},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    output = run_ok([executable("landscape"), "study", "tiny.yaml", "--out", "runs/tiny", "--jobs", "1"], tmp_path)
    assert BAR_WITH_TIME_LEFT.search(output), f"no study progress with the time left:\n{output[-2000:]}"
    out = tmp_path / "runs" / "tiny"
    assert (out / "report.md").is_file() and list((out / "figures").glob("*.png")) and (out / "study.yaml").is_file()
