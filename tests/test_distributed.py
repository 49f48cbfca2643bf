"""Analyses on two gloo processes under torchrun.

One torchrun job (this file run as a script, :func:`_worker`; one job because starting processes is most of the
cost) computes data-parallel products and runs every analysis data-parallel and sharded on copies of one tiny run;
the tests compare what it wrote with the same computations in this single process: data-parallel products to
rounding (float64, relative 1e-10), sharded results files value for value. The job ends with a command-line
analysis in which one process fails: the whole job must fail with that process's message, and a re-run resume
from what was written.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from landscape.curvature.loss import LossFunction
from landscape.analyses.distributed import (
    Distributed,
    check_shard,
    contiguous_range,
    processes_attrs,
    round_robin,
    split_evaluation_set,
)
from landscape.analyses.hessian import HessianSettings, run_hessian_analysis
from landscape.analyses.results import read_results
from landscape.analyses.sharpness import SharpnessSettings, run_sharpness_analysis
from landscape.analyses.surface import SurfaceSettings, run_surface_analysis
from landscape.checkpoints import save_checkpoint
from landscape.errors import ConfigError, LandscapeError
from landscape.models import create_model
from landscape.runs import Run
from landscape.curvature.products import hessian_vector_product, hessian_vector_product_double_backward

MODEL = "vit_tiny_patch16_224"
KWARGS = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2)
HESSIAN = HessianSettings(top_k=2, trace=True, trace_matvecs=8, density=True, density_probes=2, density_steps=4,
                          density_grid_size=40, samples=40, dtype="float64", batch_size=64)
SHARPNESS = SharpnessSettings(rhos=(0.05,), steps=3, m=10, draws=2, samples=40, dtype="float64", batch_size=64)
SURFACE = SurfaceSettings(directions="random", dims=2, points=4, samples=40, dtype="float64", batch_size=64)
BROKEN_COMMAND = ["analyze", "hessian", "--shard", "checkpoints", "--device", "cpu", "--samples", "16", "--top-k", "1",
                  "--dtype", "float64"]
SURFACE_FILE = "surface-random-2d"
TIMING_ATTRS = ("created", "updated", "host", "processes", "parallelism")
ROOT = Path(__file__).resolve().parents[1]


# -- fixtures -----------------------------------------------------------------------------------------------------
def make_run(root: Path, *, broken: int | None = None) -> Run:
    """A run on the embedded digits with two checkpoints drifting from a seeded init; checkpoint ``broken`` (an
    epoch) lacks a parameter, so that loading it fails."""
    run = Run.create(root)
    run.save_config({"model": {"name": MODEL, "kwargs": KWARGS}, "data": {"name": "digits", "img_size": None},
                     "seed": 0})
    torch.manual_seed(0)
    model = create_model(MODEL, **KWARGS)
    for epoch in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        state = model.state_dict()
        if epoch == broken:
            state = {k: v for k, v in state.items() if k != "head.weight"}
        save_checkpoint(run.checkpoint_path(epoch=epoch), state, model=MODEL, model_kwargs=KWARGS, epoch=epoch,
                        step=10 * epoch)
    return run


def product_problem():
    """A float64 tiny ViT and 13 examples (split 6 + 7 over two processes, batches of 4: short batches everywhere)."""
    torch.manual_seed(0)
    model = create_model(MODEL, **KWARGS).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (13,), generator=g)
    vectors = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=g, dtype=torch.float64)
    return model, x, y, vectors


IGNORING = torch.nn.CrossEntropyLoss(ignore_index=-100)


def ignored_targets(y: torch.Tensor) -> torch.Tensor:
    """``y`` with five of its 13 targets ignored (-100), unevenly over the batches of either process."""
    y = y.clone()
    y[[0, 1, 2, 7, 12]] = -100
    return y


def products(loss: LossFunction, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    value, gradient = loss.loss_and_gradient()
    evaluation = loss.evaluate()
    return {
        "loss": torch.tensor(value, dtype=torch.float64),
        "evaluate": torch.tensor(evaluation, dtype=torch.float64),
        "gradient": gradient,
        "hvp": hessian_vector_product(loss, vectors),
        "hvp_single": hessian_vector_product(loss, vectors[:, 0]),
        "hvp_double_backward": hessian_vector_product_double_backward(loss, vectors[:, 1]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 ARGS`` on this interpreter, one thread per process, on a free port."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Runs the worker job once, and the single-process reference analyses: ``{name: Run}``, the output folder and
    the finished job."""
    root = tmp_path_factory.mktemp("distributed")
    runs = {name: make_run(root / name) for name in ("reference", "data-parallel", "sharded", "grid")}
    runs["broken"] = make_run(root / "broken", broken=2)  # its second checkpoint is dealt to the second process
    out = root / "out"
    out.mkdir()
    job = torchrun(str(Path(__file__).resolve()), "worker", str(root))
    statuses = {r: (out / f"rank{r}.txt").read_text() if (out / f"rank{r}.txt").exists() else "no status"
                for r in (0, 1)}
    assert all(s == "ok" for s in statuses.values()), f"{statuses}\n{job.stderr[-4000:]}"
    reference = runs["reference"]
    run_hessian_analysis(reference, HESSIAN, device="cpu")
    run_sharpness_analysis(reference, SHARPNESS, device="cpu")
    run_surface_analysis(reference, SURFACE, checkpoints="all", device="cpu")
    return runs, out, job


def _worker(root: Path) -> None:
    """What each of the two processes does (``python tests/test_distributed.py worker ROOT`` under torchrun)."""
    from landscape.analyses import distributed

    torch.set_num_threads(1)
    world, _ = distributed.join("cpu")
    status = "failed"
    try:
        model, x, y, vectors = product_problem()
        x_slice, y_slice, data_parallel = split_evaluation_set(x, y, world)
        loss = LossFunction(model, x_slice, y_slice, batch_size=4, data_parallel=data_parallel)
        torch.save(products(loss, vectors), root / "out" / f"products-rank{world.rank}.pt")
        x_slice, y_slice, data_parallel = split_evaluation_set(x, ignored_targets(y), world)
        loss = LossFunction(model, x_slice, y_slice, batch_size=4, data_parallel=data_parallel, criterion=IGNORING)
        torch.save(products(loss, vectors), root / "out" / f"ignored-rank{world.rank}.pt")

        parallel, sharded, grid = (root / name for name in ("data-parallel", "sharded", "grid"))
        run_hessian_analysis(parallel, HESSIAN, device="cpu")
        run_sharpness_analysis(parallel, SHARPNESS, device="cpu")
        run_surface_analysis(parallel, SURFACE, checkpoints="all", device="cpu")
        returned = run_hessian_analysis(sharded, HESSIAN, device="cpu", shard="checkpoints")
        assert (returned is None) == (world.rank != 0), "only the first process returns the results"
        run_sharpness_analysis(sharded, SHARPNESS, device="cpu", shard="checkpoints")
        run_surface_analysis(sharded, SURFACE, checkpoints="all", device="cpu", shard="checkpoints")
        run_surface_analysis(grid, SURFACE, checkpoints="all", device="cpu", shard="grid")
        status = "ok"
    except BaseException:
        status = traceback.format_exc()
        raise
    finally:
        (root / "out" / f"rank{world.rank}.txt").write_text(status)
    from landscape.cli import cli

    cli.main(args=[*BROKEN_COMMAND, str(root / "broken")], prog_name="landscape")  # exits 1 on both processes


# -- comparisons ----------------------------------------------------------------------------------------------------
def _without_timing(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.drop_vars("seconds")
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in TIMING_ATTRS}
    return ds


def assert_same_file(path: Path, reference: Path) -> None:
    """Identical data variables, coordinates and attributes, value for value, but for the wall time and the
    attributes naming times, host and processes."""
    xr.testing.assert_identical(_without_timing(read_results(path)), _without_timing(read_results(reference)))


def assert_close_file(path: Path, reference: Path, rtol: float = 1e-8) -> None:
    got, want = _without_timing(read_results(path)), _without_timing(read_results(reference))
    assert got.attrs == want.attrs and set(got.data_vars) == set(want.data_vars)
    for name in want.data_vars:
        scale = float(np.nanmax(np.abs(want[name].values))) if want[name].size else 0.0
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=rtol, atol=rtol * scale,
                                   err_msg=name)


# -- tests on two processes -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_data_parallel_products_equal_the_single_process_ones_to_1e_10(launched):
    _, out, _ = launched
    model, x, y, vectors = product_problem()
    single = products(LossFunction(model, x, y, batch_size=4), vectors)
    parallel = torch.load(out / "products-rank0.pt", weights_only=True)
    for name, want in single.items():
        error = float((parallel[name] - want).norm() / want.norm())
        assert error <= 1e-10, f"{name}: relative error {error:.2e}"


@pytest.mark.slow
def test_a_mean_over_the_counted_targets_is_split_over_processes_exactly(launched):
    # with ignore_index each batch weighs its share of the whole set's kept targets, on every process alike
    _, out, _ = launched
    model, x, y, vectors = product_problem()
    y = ignored_targets(y)
    whole = products(LossFunction(model, x, y, batch_size=None, criterion=IGNORING), vectors)
    parallel = torch.load(out / "ignored-rank0.pt", weights_only=True)
    assert float(whole["loss"]) == pytest.approx(float(IGNORING(model.eval()(x), y).detach()), rel=1e-12)
    for name, want in whole.items():
        error = float((parallel[name] - want).norm() / want.norm())
        assert error <= 1e-10, f"{name}: relative error {error:.2e}"


@pytest.mark.slow
def test_every_process_gets_bitwise_the_same_sums(launched):
    _, out, _ = launched
    first, second = (torch.load(out / f"products-rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hessian", "sharpness", SURFACE_FILE])
def test_checkpoints_sharded_over_processes_give_the_single_process_file_value_for_value(launched, name):
    runs, _, _ = launched
    assert_same_file(runs["sharded"].analysis_path(name), runs["reference"].analysis_path(name))


@pytest.mark.slow
def test_grid_points_sharded_over_processes_give_the_single_process_surface_value_for_value(launched):
    runs, _, _ = launched
    assert_same_file(runs["grid"].analysis_path(SURFACE_FILE), runs["reference"].analysis_path(SURFACE_FILE))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hessian", "sharpness", SURFACE_FILE])
def test_data_parallel_runs_match_the_single_process_file_to_rounding(launched, name):
    runs, _, _ = launched
    assert_close_file(runs["data-parallel"].analysis_path(name), runs["reference"].analysis_path(name))


@pytest.mark.slow
def test_m_sharpness_batches_dealt_to_processes_are_computed_exactly_as_alone(launched):
    runs, _, _ = launched
    got = read_results(runs["data-parallel"].analysis_path("sharpness"))
    want = read_results(runs["reference"].analysis_path("sharpness"))
    assert np.array_equal(got["m_sharpness"].values, want["m_sharpness"].values)


@pytest.mark.slow
def test_results_record_the_processes_that_computed_them(launched):
    runs, _, _ = launched
    attrs = {name: read_results(runs[name].analysis_path("hessian")).attrs for name in ("reference", "sharded")}
    assert (attrs["reference"]["processes"], attrs["reference"]["parallelism"]) == (1, "single process")
    assert (attrs["sharded"]["processes"], attrs["sharded"]["parallelism"]) == (2, "sharded checkpoints")
    grid = read_results(runs["grid"].analysis_path(SURFACE_FILE)).attrs
    assert grid["parallelism"] == "sharded grid"


@pytest.mark.slow
def test_a_failing_process_fails_the_job_with_its_message_and_a_rerun_resumes(launched, tmp_path):
    runs, _, job = launched
    run = runs["broken"]
    assert job.returncode != 0
    assert "Process 1 of 2 failed" in job.stderr and "head.weight" in job.stderr, job.stderr[-3000:]
    written = read_results(run.analysis_path("hessian"))
    assert [str(c) for c in written["checkpoint"].values] == ["epoch-0001"]  # the first process's checkpoint

    make_run(tmp_path / "fixed")  # the checkpoint repaired, then the same analysis resumed in one process
    fixed = tmp_path / "fixed" / "checkpoints" / "epoch-0002.safetensors"
    (run.root / "checkpoints" / "epoch-0002.safetensors").write_bytes(fixed.read_bytes())
    settings = HessianSettings(top_k=1, samples=16, dtype="float64")
    resumed = run_hessian_analysis(run, settings, device="cpu")
    assert [str(c) for c in resumed["checkpoint"].values] == ["epoch-0001", "epoch-0002"]
    assert float(resumed["seconds"][0]) == float(written["seconds"][0])  # kept, not recomputed


@pytest.mark.slow
def test_workers_stop_when_torchrun_is_killed_and_leave_the_run_free(tmp_path):
    # torchrun starts each worker in a session of its own: after a SIGKILL of torchrun they ran on, holding the lock
    import signal
    import time

    from landscape.io import RunLock

    run = make_run(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "landscape", "analyze", "hessian", str(run.root),
               "--device", "cpu", "--samples", "40", "--top-k", "2", "--density", "--density-probes", "100000",
               "--density-steps", "4"]  # work for hours (a trace budget past the parameters is their number)
    launcher = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def children() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher.pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return found

    started = time.monotonic()
    while len(children()) < 2 and time.monotonic() - started < 120:
        time.sleep(0.5)
    workers = children()
    assert len(workers) == 2, launcher.stderr.read().decode()[-2000:] if launcher.poll() is not None else "no workers"
    time.sleep(10)  # into their work (a worker killed before it asks to follow torchrun stops itself too)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 120

    def alive(pid: int) -> bool:
        try:
            return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False

    try:
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "the workers outlived torchrun"
            time.sleep(0.5)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    with RunLock(run.root):  # a training could take the run now
        pass


# -- helpers on one process -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,size", [(13, 2), (5, 4), (8, 8), (1000, 3)])
def test_contiguous_ranges_cover_every_item_once_in_order(n, size):
    ranges = [contiguous_range(n, r, size) for r in range(size)]
    assert [i for part in ranges for i in part] == list(range(n))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    dealt = [round_robin(list(range(n)), Distributed(rank=r, world_size=size)) for r in range(size)]
    assert sorted(i for part in dealt for i in part) == list(range(n))


def test_one_process_keeps_the_whole_evaluation_set_and_too_many_processes_are_refused():
    x, y = torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.int64)
    assert split_evaluation_set(x, y, Distributed())[2] is None
    x_slice, _, parallel = split_evaluation_set(x, y, Distributed(rank=1, world_size=2))
    assert len(x_slice) == 2 and parallel.num_examples == 3
    with pytest.raises(LandscapeError, match="fewer than the 4 processes"):
        split_evaluation_set(x, y, Distributed(rank=0, world_size=4))
    assert processes_attrs(Distributed(), None) == {"processes": 1, "parallelism": "single process"}


def test_grid_sharding_is_refused_for_an_analysis_without_a_grid(tmp_path):
    assert check_shard("grid", ("checkpoints", "grid"), "surface") == "grid"
    with pytest.raises(ConfigError, match="cannot be sharded by 'grid'"):
        check_shard("grid", ("checkpoints",), "hessian")
    with pytest.raises(ConfigError, match="cannot be sharded"):
        run_hessian_analysis(make_run(tmp_path / "run"), HESSIAN, device="cpu", shard="grid")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]))
