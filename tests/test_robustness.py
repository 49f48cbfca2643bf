"""The run directory under the machine's failures: two processes, a full disk, a read-only folder, a crash.

Tests run as root here, where ``chmod 555`` does not stop a write; a read-only folder or a full disk is simulated
by a write that raises ``OSError(EROFS/ENOSPC)``, or made real for a subprocess by a file-size limit
(``RLIMIT_FSIZE``: every write past it fails with ``EFBIG`` inside torch, safetensors and h5py alike).
"""

import errno
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from landscape.checkpoints import save_checkpoint
from landscape.cli import cli
from landscape.config import save_yaml
from landscape.io import RunLock, remove_stale_temporaries
from landscape.models import create_model
from landscape.runs import Run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
KWARGS = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2)
TINY_TRAINING = ["epochs=2", "data.train_size=64", "batch_size=32", "model.kwargs.depth=1",
                 "model.kwargs.embed_dim=16", "every=steps:1"]
HESSIAN = ["--samples", "16", "--top-k", "1", "--tol", "1e-2", "--device", "cpu"]


def make_run(root: Path, epochs=(1, 2, 3)) -> Run:
    """A run made by hand: config and checkpoints of a tiny ViT on digits, no metrics, no state."""
    run = Run.create(root)
    save_yaml({"model": {"name": "vit_tiny_patch16_224", "kwargs": KWARGS},
               "data": {"name": "digits", "img_size": 8}, "seed": 0}, run.config_path)
    for epoch in epochs:
        torch.manual_seed(epoch)
        model = create_model("vit_tiny_patch16_224", **KWARGS)
        save_checkpoint(run.checkpoint_path(epoch=epoch), model.state_dict(), model="vit_tiny_patch16_224",
                        model_kwargs=KWARGS, epoch=epoch, step=5 * epoch)
    return run


def one_sentence(result) -> str:
    """The error a command printed, checked to be one line with no traceback and exit code 1."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.output
    return lines[-1]


# -- two processes -------------------------------------------------------------------------------------------------
def test_a_second_training_into_a_locked_run_is_one_sentence_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunLock(out, create=True):  # stands for a training in another process (flock is per open file)
        result = CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(out)])
        message = one_sentence(result)
        assert f"is in use by another landscape process (pid {os.getpid()}); wait for it to finish" in message
        assert sorted(p.name for p in out.iterdir()) == [".lock"], "the refused training wrote into the run"


def test_an_analysis_of_a_run_being_trained_is_refused_and_analyses_may_share_it(tmp_path):
    run = make_run(tmp_path / "run", epochs=(1,))
    with RunLock(run.root):
        message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN]))
        assert "is in use by another landscape process" in message
    with RunLock(run.root, shared=True):  # another analysis: both may compute
        result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN])
        assert result.exit_code == 0, result.output
    # a training with --overwrite has removed the checkpoints: the analysis said the run had none
    with RunLock(run.root):
        for path in run.checkpoints_dir.iterdir():
            path.unlink()
        message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN]))
        assert "is in use by another landscape process" in message, message


def test_a_refusal_names_the_live_holders_of_a_shared_lock_not_one_that_left(tmp_path):
    # each analysis overwrote the one pid in .lock: when the later one ended first, a training was told to wait
    # for a process that no longer existed, and never of the one that held the run
    import subprocess
    import sys

    run = make_run(tmp_path / "run", epochs=(1,))
    hold = ("import sys, time; from landscape.io import RunLock; lock = RunLock(sys.argv[1], shared=True); "
            "print('held', flush=True); time.sleep(60)")
    long = subprocess.Popen([sys.executable, "-c", hold, str(run.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert long.stdout.readline().strip() == "held"
        short = subprocess.run([sys.executable, "-c", hold.replace("time.sleep(60)", "pass"), str(run.root)],
                               capture_output=True, text=True, timeout=60)
        assert short.returncode == 0 and short.stdout.strip() == "held"
        message = one_sentence(CliRunner().invoke(cli, ["train", "--resume", str(run.root)]))
        assert f"in use by another landscape process (pid {long.pid})" in message, message
        with RunLock(run.root, shared=True):  # a third, in this process: both live holders are named
            assert set(map(int, (run.root / ".lock").read_text().split())) == {long.pid, os.getpid()}
        # a listed pid taken over by an unrelated live process was named as a landscape process
        other = subprocess.Popen(["sleep", "60"])
        try:
            with (run.root / ".lock").open("a") as f:
                f.write(f"{other.pid}\n")
            message = one_sentence(CliRunner().invoke(cli, ["train", "--resume", str(run.root)]))
            assert f"in use by another landscape process (pid {long.pid})" in message, message
        finally:
            other.kill()
            other.wait()
    finally:
        long.kill()
        long.wait()


def test_a_lock_left_to_the_forked_workers_of_an_ended_process_says_so(tmp_path):
    # a killed training's DataLoader workers hold its lock a few seconds: the refusal named the dead trainer, to
    # "wait for or stop" a process that no longer existed
    from landscape.errors import LandscapeError

    code = (f"import os, time; from landscape.io import RunLock; lock = RunLock({str(tmp_path)!r}); "
            "pid = os.fork(); time.sleep(10) if pid == 0 else None; os._exit(0)")  # the worker ends by itself
    subprocess.run([sys.executable, "-c", code], timeout=60)
    with pytest.raises(LandscapeError, match="in use by the worker processes of a landscape process that has just "
                                             "ended"):
        RunLock(tmp_path, shared=True)


# -- folders left by failures -----------------------------------------------------------------------------------------
def test_resume_without_a_training_state_refuses_and_deletes_nothing(tmp_path):
    run = make_run(tmp_path / "run", epochs=(1, 2))
    before = sorted(p.name for p in run.checkpoints_dir.iterdir())
    message = one_sentence(CliRunner().invoke(cli, ["train", "--resume", str(run.root)]))
    assert "cannot be resumed because its training state" in message and "nothing was changed" in message
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == before


def test_a_training_state_with_damaged_fields_is_refused_before_anything_changes(tmp_path):
    # a negative step deleted every checkpoint; no rows rewrote metrics.csv without them; others were tracebacks
    # after config.yaml had been rewritten for the extension; a pipe blocked the resume forever
    import shutil

    source = tmp_path / "source"
    trained = CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(source), "--no-progress", "--set",
                                       "data.train_size=64", "--epochs", "1", "--model-arg", "embed_dim=8"])
    assert trained.exit_code == 0, trained.output
    state = torch.load(source / "state" / "last.pt", weights_only=True)
    model = state["model"]
    for i, (changes, words) in enumerate([({"step": -5}, "its step is -5, not a count"),
                                          ({"rows": []}, "no metrics rows"),
                                          ({"config_hash": None}, "no config hash"),
                                          ({"epoch": "two"}, "its epoch is 'two', not a count"),
                                          ({"rng": "x"}, "no random-number generator states"),
                                          ({"model": {k: v.to(torch.complex64) for k, v in model.items()}},
                                           "model weights that are not real tensors"),
                                          ({"model": {k: v[..., :1] for k, v in model.items()}},
                                           "does not fit the run's model and optimizer")]):
        run = tmp_path / f"run{i}"
        shutil.copytree(source, run)
        torch.save({**state, **changes}, run / "state" / "last.pt")
        kept = {p: p.read_bytes() for p in [run / "config.yaml", run / "metrics.csv", *run.glob("checkpoints/*")]}
        message = one_sentence(CliRunner().invoke(cli, ["train", "--resume", str(run), "--no-progress"]))
        assert words in message, message
        assert {p: p.read_bytes() for p in kept} == kept
    (run / "state" / "last.pt").unlink()
    os.mkfifo(run / "state" / "last.pt")
    assert "is a named pipe" in one_sentence(CliRunner().invoke(cli, ["train", "--resume", str(run)]))


@pytest.mark.parametrize("args", [["--set", "optim.opt=nosuchopt"], ["--init", "/nonexistent/run"]])
def test_a_training_refused_by_its_settings_leaves_no_folder(tmp_path, args):
    out = tmp_path / "run"
    one_sentence(CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(out), "--no-progress",
                                          "--set", "data.train_size=64", *args]))
    assert not out.exists()


def test_folders_holding_nothing_of_value_are_reused_and_runs_with_checkpoints_are_not(tmp_path):
    killed_in_config_write = tmp_path / "a"
    killed_in_config_write.mkdir()
    (killed_in_config_write / ".config.yaml.999999999.abc.tmp").write_text("model: {na")
    Run.create(killed_in_config_write)
    assert not list(killed_in_config_write.glob(".*.tmp"))

    failed_before_first_checkpoint = tmp_path / "b"
    failed_before_first_checkpoint.mkdir()
    (failed_before_first_checkpoint / "config.yaml").write_text("epochs: 1\n")
    Run.create(failed_before_first_checkpoint)
    assert not (failed_before_first_checkpoint / "config.yaml").exists()

    with pytest.raises(Exception, match="already exists"):
        Run.create(make_run(tmp_path / "c", epochs=(1,)).root)


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    run = make_run(tmp_path / "run", epochs=(1,))
    (run.root / ".git").mkdir()
    (run.root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (run.root / ".notes.md").write_text("my notes")
    Run.create(run.root, overwrite=True)
    assert (run.root / ".git" / "HEAD").exists() and (run.root / ".notes.md").read_text() == "my notes"
    assert not run.config_path.exists() and not list(run.checkpoints_dir.iterdir())


def test_stale_temporary_files_of_dead_processes_go_and_a_live_writers_stay(tmp_path):
    live = subprocess.Popen(["sleep", "30"])
    try:
        dead = tmp_path / ".metrics.csv.999999999.abcd.tmp"
        old_style = tmp_path / ".hessian.nc.k3j2h1.tmp"
        alive = tmp_path / f".hessian.nc.{live.pid}.abcd.tmp"
        for p in (dead, old_style, alive):
            p.write_bytes(b"partial")
        copied = tmp_path / ".epoch-0004.safetensors.1.abcd.tmp"  # pid 1 lives, but the file is a day old: a
        copied.write_bytes(b"partial")  # run copied from another machine, or a reused pid
        os.utime(copied, (time.time() - 86400, time.time() - 86400))
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted([dead, old_style, copied]) and alive.exists()
    finally:
        live.kill()
        live.wait()


def test_writing_a_file_again_removes_what_killed_writers_of_it_left(tmp_path):
    # a study's figures and a report --out folder are no run: no sweep of the run reached them
    from landscape.io import atomic_write_bytes

    live = subprocess.Popen(["sleep", "30"])
    try:
        dead = tmp_path / ".peak_to_final_drop.pdf.999999999.abcd.tmp"
        other = tmp_path / ".accuracy_curves.pdf.999999999.abcd.tmp"  # another file's: left to its own writer
        alive = tmp_path / f".peak_to_final_drop.pdf.{live.pid}.abcd.tmp"
        for p in (dead, other, alive):
            p.write_bytes(b"")
        atomic_write_bytes(tmp_path / "peak_to_final_drop.pdf", b"%PDF")
        assert not dead.exists() and other.exists() and alive.exists()
        assert (tmp_path / "peak_to_final_drop.pdf").read_bytes() == b"%PDF"
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("where", ["atomic_write", "check_writable"])
def test_an_interrupt_landing_just_after_a_temporary_file_is_created_leaves_no_file(tmp_path, monkeypatch, where):
    """SIGTERM is raised as an exception between two bytecodes: it can land after the file exists but before the
    writer knows its name."""
    import landscape.io as lio

    real_open = os.open

    def open_then_interrupt(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_CREAT:
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(lio.os, "open", open_then_interrupt)
    (tmp_path / "metrics.csv").write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        if where == "atomic_write":
            lio.atomic_write_text(tmp_path / "metrics.csv", "new\n")
        else:
            lio.check_writable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
    assert (tmp_path / "metrics.csv").read_text() == "old\n"


def test_resume_applies_the_keep_policy_and_clears_temporaries_a_kill_left(tmp_path, monkeypatch):
    """A kill between the state write and the keep policy leaves one checkpoint too many; the resume removes it,
    along with the temporary files of the killed process."""
    import landscape.trainers.loop as loop
    from landscape.trainers import build_config, train

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "checkpoints_to_delete", lambda keep, steps: [])  # killed before each policy step
    train(build_config("digits", overrides=[*TINY_TRAINING, "keep=last:3"]), out, progress=False)
    monkeypatch.undo()
    run = Run(out)
    assert len(run.checkpoints()) == 4
    stale = [out / ".metrics.csv.999999999.ab.tmp", out / "checkpoints" / ".step-00000003.safetensors.999999999.c.tmp",
             out / "analysis" / ".hessian.nc.999999999.d.tmp"]
    for p in stale:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    train(None, out, resume=True, progress=False)
    assert [i.step for i in run.checkpoints()] == [2, 3, 4]
    assert not any(p.exists() for p in stale)


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_more_samples_than_the_dataset_holds_is_refused(tmp_path):
    run = make_run(tmp_path / "run", epochs=(1,))
    message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), "--samples", "100000",
                                                    "--top-k", "1"]))
    assert "--samples 100000 is more than the" in message
    assert not run.analysis_path("hessian").exists()


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"", b"epoch,step,val_top1\nfirst,1,50.0\n"])
def test_a_damaged_metrics_file_is_one_sentence(tmp_path, content):
    run = make_run(tmp_path / "run", epochs=(1,))
    run.metrics_path.write_bytes(content)
    for command in (["inspect", str(run.root)], ["analyze", "dynamics", str(run.root)]):
        message = one_sentence(CliRunner().invoke(cli, command))
        assert "metrics.csv is damaged" in message, message


# -- a read-only folder, a full disk -------------------------------------------------------------------------------------
def test_a_read_only_folder_for_figures_and_report_is_one_sentence(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", epochs=(1, 2))
    run.write_metrics([{"epoch": e, "step": 5 * e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "val_top1": 40.0 + e,
                        "ema_val_top1": 39.0 + e} for e in (1, 2)])
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if tmp_path / "out" in (self, *self.parents):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    for command in (["figures", str(run.root), "--out", str(tmp_path / "out" / "figures")],
                    ["report", str(run.root), "--no-figures", "--out", str(tmp_path / "out" / "report.md")]):
        message = one_sentence(CliRunner().invoke(cli, command))
        assert "Read-only file system" in message, message


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _landscape(args, limit=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "landscape", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, preexec_fn=_file_size_limit(limit) if limit else None, timeout=600, **kwargs)


@pytest.mark.slow
def test_a_full_disk_during_training_and_analysis_is_one_sentence_with_nothing_lost(tmp_path):
    """Real failed writes (a file-size limit): torch.save of the state during training, h5py's netCDF during an
    analysis (which used to crash with a segmentation fault); no temporary file stays and the earlier files do."""
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--out", str(out), "--no-progress"]
    for override in TINY_TRAINING[:-1] + ["model.kwargs.embed_dim=32"]:
        args += ["--set", override]
    # the checkpoints (~0.1 MB) fit under the limit, the training state (~0.25 MB) does not
    done = _landscape(args, limit=150_000)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("Error: Could not write") and "last.pt" in lines[-1], done.stderr
    assert not list(out.rglob(".*.tmp")) and Run(out).checkpoints()

    run = make_run(tmp_path / "analysed", epochs=(1, 2))
    first = _landscape(["analyze", "hessian", str(run.root), *HESSIAN, "--checkpoints", "epochs:1"])
    assert first.returncode == 0, first.stderr
    before = run.analysis_path("hessian").read_bytes()
    full = _landscape(["analyze", "hessian", str(run.root), *HESSIAN], limit=len(before))  # the new file is larger
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert full.stderr.strip().splitlines()[-1].startswith("Error: Could not write"), full.stderr
    assert run.analysis_path("hessian").read_bytes() == before
    assert not list(run.analysis_dir.glob(".*.tmp"))



@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_interpreter_shuts_down_after_a_command_prints_no_traceback(sig):
    # the command has finished; the signal lands in an exit handler, where nothing is left to catch a `Stopped`
    code = ("import atexit, os, signal, sys\n"
            f"signal.signal({int(sig)}, signal.SIG_DFL)\n"  # as a terminal gives it (nohup would pass it ignored)
            f"atexit.register(lambda: os.kill(os.getpid(), {int(sig)}))\n"
            "sys.argv = ['landscape', '--version']\n"
            "from landscape.cli import main\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert "landscape" in done.stdout
    assert done.stderr == "", done.stderr  # it was "Exception ignored in atexit callback ... Stopped"
    assert done.returncode == -sig  # ended by the signal's default action, as a program without handlers is


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_a_closed_terminal_end_training_in_one_sentence_and_it_resumes(tmp_path, sig):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "landscape", "train", "--data", "digits", "--out", str(out), "--no-progress",
            "--set", "epochs=4", "--set", "every=steps:5"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))  # as a terminal gives it
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "checkpoints").glob("*.safetensors"))) < 3:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # it was killed silently by the default action
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"Stopped by {signal.Signals(sig).name}: everything saved before stays as it was; continue the run with "
        "landscape train --resume RUN."), err
    assert not list(out.rglob(".*.tmp"))
    saved = len(Run(out).checkpoints())
    done = _landscape(["train", "--resume", str(out)])
    assert done.returncode == 0, done.stderr
    assert len(Run(out).checkpoints()) > saved

# -- analyses at once, analyses killed ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_analyses_of_one_run_at_once_keep_every_checkpoint(tmp_path):
    run = make_run(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-m", "landscape", "analyze", "hessian", str(run.root), *HESSIAN,
                               "--checkpoints", which], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for which in ("epochs:1,2", "epochs:3")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    with xr.open_dataset(run.analysis_path("hessian")) as ds:
        assert list(ds["checkpoint"].values) == ["epoch-0001", "epoch-0002", "epoch-0003"]


@pytest.mark.slow
def test_an_analysis_killed_at_random_moments_resumes_to_the_uninterrupted_results(tmp_path):
    epochs = range(1, 7)
    reference = make_run(tmp_path / "reference", epochs=epochs)
    start = time.monotonic()
    done = _landscape(["analyze", "hessian", str(reference.root), *HESSIAN, "--trace"])
    took = time.monotonic() - start  # the kills fall inside a whole analysis's time on this machine, however fast
    assert done.returncode == 0, done.stderr
    run = make_run(tmp_path / "killed", epochs=epochs)
    command = [sys.executable, "-m", "landscape", "analyze", "hessian", str(run.root), *HESSIAN, "--trace"]
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4, 0.9) * took)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "every analysis finished before it could be killed"
    again = _landscape(["analyze", "hessian", str(run.root), *HESSIAN, "--trace"])
    assert again.returncode == 0, again.stderr
    assert not list(run.analysis_dir.glob(".*.tmp"))
    with xr.open_dataset(reference.analysis_path("hessian")) as a, xr.open_dataset(run.analysis_path("hessian")) as b:
        assert list(a["checkpoint"].values) == list(b["checkpoint"].values)
        for name in ("eigenvalue_largest", "trace"):
            assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name


def test_an_analysis_of_a_checkpoint_whose_header_asks_for_downloads_never_calls_timm_with_them(tmp_path, monkeypatch):
    import timm

    run = make_run(tmp_path / "run", epochs=())
    model = create_model("vit_tiny_patch16_224", **KWARGS)
    forged = {**KWARGS, "pretrained": True, "pretrained_cfg_overlay": {"url": "https://example.com/w.pth"}}
    save_checkpoint(run.checkpoint_path(epoch=1), model.state_dict(), model="vit_tiny_patch16_224",
                    model_kwargs=forged, epoch=1, step=5)
    real = timm.create_model
    calls = []

    def recording(name, **kwargs):
        calls.append(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN]))
    assert "not architecture arguments" in message
    assert not any("pretrained" in k or "pretrained_cfg_overlay" in k for k in calls)


# -- hostile values and files: one sentence each ----------------------------------------------------------------
def test_repeated_radii_nan_tolerance_and_weight_loading_model_arguments_are_refused():
    from landscape.analyses.hessian import HessianSettings
    from landscape.analyses.sharpness import SharpnessSettings
    from landscape.errors import ConfigError
    from landscape.models import create_model

    with pytest.raises(ConfigError, match="distinct radii"):
        SharpnessSettings(rhos=(0.05, 0.05))
    with pytest.raises(ConfigError, match="--tol"):
        HessianSettings(tol=float("nan")).validate()
    for argument in ("checkpoint_path", "pretrained", "pretrained_cfg_overlay"):
        with pytest.raises(ConfigError, match=f"{argument} would load weights"):
            create_model("vit_pico_patch4_32", **{argument: "/etc/passwd"})
    with pytest.raises(ConfigError, match="cannot be built"):
        create_model("vit_pico_patch4_32", depth=-3)
    from landscape.config import TrainConfig
    from landscape.trainers.recipes import validate

    config = TrainConfig()
    config.optim.lr = float("inf")
    with pytest.raises(ConfigError, match="optim.lr must be a positive finite number"):
        validate(config)
    from click.testing import CliRunner

    from landscape.cli import cli
    from landscape.errors import CheckpointError
    from landscape.runs import select_checkpoints

    with pytest.raises(CheckpointError, match="Unknown checkpoint selection 'epochs:'"):
        select_checkpoints([object()], "epochs:")
    result = CliRunner().invoke(cli, ["analyze", "sharpness", "no-such-run", "--rho", "0.1,,0.2"])
    assert result.exit_code == 2 and "comma-separated list of numbers" in result.output
    config = TrainConfig()
    config.data.img_size = 0
    with pytest.raises(ConfigError, match="data.img_size must be at least 1"):
        validate(config)


def test_non_finite_products_damaged_configs_headers_metrics_and_results_are_one_sentence(tmp_path):
    import json

    from conftest import TINY_VIT, make_tiny_run
    from landscape.analyses.dynamics import run_dynamics
    from landscape.checkpoints import read_checkpoint_info
    from landscape.config import load_yaml
    from landscape.curvature.lanczos import top_eigenvalues
    from landscape.errors import CheckpointError, ConfigError, LandscapeError
    from landscape.summary import gather_results

    A = np.diag([3.0, 2.0, 1.0, np.nan])
    with pytest.raises(LandscapeError, match="not finite"):
        top_eigenvalues(A, 1)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(binary)

    run = make_tiny_run(tmp_path, "r", "vit_pico_patch4_32", TINY_VIT, 0)
    run.config_path.write_text("")
    with pytest.raises(LandscapeError, match="is empty"):
        run.load_config()

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = run.checkpoints()[-1].path
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["metrics"] = json.dumps("not a mapping")
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        read_checkpoint_info(path)

    metrics = run.root / "metrics.csv"
    text = metrics.read_text().splitlines()
    column = text[0].split(",").index("val_top1")
    row = text[1].split(",")
    row[column] = "abc"
    metrics.write_text("\n".join([text[0], ",".join(row), *text[2:]]) + "\n")
    with pytest.raises(LandscapeError, match="not numbers"):
        run_dynamics(run)

    import xarray as xr

    run.analysis_dir.mkdir(exist_ok=True)
    fake = xr.Dataset({"trace": (("checkpoint",), [1.0])}, coords={"checkpoint": ["epoch-0001"]})
    fake.attrs["analysis"] = "sharpness"
    fake.to_netcdf(run.analysis_dir / "hessian.nc", engine="h5netcdf")
    with pytest.raises(LandscapeError, match="says it holds sharpness results but has no 'rho'"):
        gather_results(run)


@pytest.mark.slow
def test_pipes_and_headers_or_configs_nested_past_any_parser_are_one_sentence(tmp_path):
    # a named pipe would block the reader forever (safetensors' native open is beyond Ctrl-C's reach)
    from conftest import TINY_VIT, make_tiny_run
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = make_tiny_run(tmp_path, "r", "vit_pico_patch4_32", TINY_VIT, 0)
    os.mkfifo(tmp_path / "pipe.safetensors")
    os.mkfifo(tmp_path / "pipe.pth")
    os.mkfifo(run.root / "checkpoints" / "epoch-0009.safetensors")
    for args in (["inspect", str(tmp_path / "pipe.safetensors")], ["inspect", str(run.root)],
                 ["import", str(tmp_path / "pipe.pth"), "--out", str(tmp_path / "imported")]):
        done = _landscape(args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "is a named pipe (FIFO), not a" in done.stderr.strip().splitlines()[-1], done.stderr
        if args[1].endswith(".safetensors"):  # a pipe named like a checkpoint is not called "not a run directory"
            assert "not a checkpoint file or a run directory" in done.stderr, done.stderr
    (run.root / "checkpoints" / "epoch-0009.safetensors").unlink()

    path = run.checkpoints()[-1].path
    original = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["extra"] = "[" * 100_000 + "]" * 100_000  # valid JSON, nested past the decoder's recursion limit
    save_file(load_file(str(path)), str(path), metadata=meta)
    deep = _landscape(["inspect", str(path)])
    assert deep.returncode == 1 and "corrupt metadata" in deep.stderr and "Traceback" not in deep.stderr, deep.stderr
    path.write_bytes(original)
    config = run.config_path.read_text()
    run.config_path.write_text(config + "nested: " + "[" * 50_000 + "]" * 50_000 + "\n")
    nested = _landscape(["inspect", str(run.root)])
    assert nested.returncode == 1 and "not valid YAML (RecursionError)" in nested.stderr, nested.stderr[-2000:]


def test_damaged_eigenvector_files_and_results_attributes_are_one_sentence(tmp_path):
    import xarray as xr
    from safetensors.torch import save_file

    from landscape.analyses.eigenvectors import load_eigenvectors
    from landscape.analyses.results import AnalysisResults
    from landscape.errors import LandscapeError

    bad = tmp_path / "epoch-0001.safetensors"
    for meta in ({"format": "landscape-hessian-eigenvectors/1", "eigenvalues": "{", "parameters": "[]"},
                 {"format": "landscape-hessian-eigenvectors/1", "eigenvalues": "{}", "parameters": "[[1, 2, 3]]"},
                 {"format": "landscape-hessian-eigenvectors/1", "eigenvalues": "{}", "parameters": "[]",
                  "settings": "[" * 100_000 + "]" * 100_000}):
        save_file({"largest": torch.zeros(1, 3)}, str(bad), metadata=meta)
        with pytest.raises(LandscapeError, match="is not a readable Hessian eigenvector file"):
            load_eigenvectors(bad)
    results = tmp_path / "hessian.nc"
    xr.Dataset(attrs={"analysis": "hessian", "settings": "[" * 5000, "seed": "abc"}).to_netcdf(results,
                                                                                              engine="h5netcdf")
    with pytest.raises(LandscapeError, match="was computed with other settings"):
        AnalysisResults(results, "hessian", {"top_k": 1}, 0)


def test_a_billion_laughs_config_and_tampered_header_values_are_one_sentence(tmp_path):
    import json

    from conftest import TINY_VIT, make_tiny_run
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from landscape.checkpoints import build_model, load_checkpoint
    from landscape.config import load_yaml
    from landscape.errors import CheckpointError, ConfigError, LandscapeError
    from landscape.models import create_model

    bomb = tmp_path / "bomb.yaml"
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefghi", "bcdefghij"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb.write_text("model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in levels))  # 9^10 values, 1 KB
    with pytest.raises(ConfigError, match="expands to more than 1,000,000 values"):
        load_yaml(bomb)

    run = make_tiny_run(tmp_path, "r", "vit_pico_patch4_32", TINY_VIT, 0)
    path = run.checkpoints()[-1].path
    original = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    for key, value, sentence in (
            ("step", json.dumps(2 ** 70), r"corrupt metadata in its header \(step"),
            ("aliases", json.dumps({"x": "nonexistent"}), r"corrupt metadata in its header \(aliases"),
            ("aliases", json.dumps({"x": ["a"]}), r"corrupt metadata in its header \(aliases"),
            ("model_kwargs", json.dumps({**json.loads(meta["model_kwargs"]), "mlp_ratio": 1e6}),
             "mlp_ratio=1000000.0, which no network of the")):
        path.write_bytes(original)
        save_file(load_file(str(path)), str(path), metadata={**meta, key: value})
        with pytest.raises(CheckpointError, match=sentence):
            build_model(*load_checkpoint(path))  # the header is read, then the model built from it
    with pytest.raises(LandscapeError):  # a zero head count: a sentence, not a ZeroDivisionError
        create_model("vit_pico_patch4_32", **{**TINY_VIT, "num_heads": 0})


@pytest.mark.slow
def test_damaged_tables_configs_results_and_diverged_weights_are_one_sentence_not_wrong_numbers(tmp_path):
    import xarray as xr
    from conftest import TINY_VIT, make_tiny_run

    from landscape.analyses.dynamics import run_dynamics
    from landscape.analyses.results import AnalysisResults
    from landscape.checkpoints import load_checkpoint, save_checkpoint
    from landscape.errors import LandscapeError
    from landscape.summary import gather_results

    run = make_tiny_run(tmp_path, "r", "vit_pico_patch4_32", TINY_VIT, 0)
    metrics = run.root / "metrics.csv"
    good = metrics.read_text()
    header, *rows = good.splitlines()
    for text, sentence in (
            (good.replace("val_loss", "val_top1", 1), "its column 'val_top1' is named twice"),  # pandas renamed it
            ("\n".join([header, *(r + ",1,2,3" for r in rows)]) + "\n", "line 2 has"),  # pandas shifted columns
            (good.replace(rows[0].split(",")[3], "1\x002", 1), "holds values that are not numbers"),
            # the last row's epoch and step again with another top-1: the later row in the file won, silently
            (good + rows[-1].replace(rows[-1].split(",")[4], "12.0") + "\n", r"epoch 3, step 30 appears in two rows")):
        metrics.write_text(text)
        with pytest.raises(LandscapeError, match=sentence):
            run_dynamics(run)
    metrics.write_text(good + rows[-1] + "\n")  # the same row twice (a copy) is the row once
    assert len(run.read_metrics()) == len(rows)
    metrics.write_text("\n".join([header, *rows[::-1]]) + "\n")  # rows out of order: the epoch's last by step
    assert list(run_dynamics(run)["epoch"].values) == [1, 2, 3]
    metrics.write_text(good)
    config = run.config_path.read_text()
    for change, sentence in (("model: vit_pico_patch4_32", "its model section is"), ("seed: zero", "its seed is"),
                             (f"seed: {2 ** 70}", "its seed is"), ("epochs: three", "its epochs is")):
        key = change.split(":")[0]
        lines = [line for line in config.splitlines() if not line.startswith(key + ":")]
        if key == "model":  # the section and its indented settings
            lines = [line for line in config.splitlines() if not line.startswith(("model:", "  "))]
        run.config_path.write_text("\n".join([*lines, change]) + "\n")
        with pytest.raises(LandscapeError, match=sentence):
            run.load_config()
    run.config_path.write_text(config)

    run.analysis_dir.mkdir(exist_ok=True)
    foreign = run.analysis_dir / "sharpness.nc"
    xr.Dataset({"x": ("n", [1.0])}, attrs={"title": "another tool's file"}).to_netcdf(foreign, engine="h5netcdf")
    with pytest.raises(LandscapeError, match="is not a landscape sharpness results file"):
        AnalysisResults(foreign, "sharpness", {}, 0)
    odd = xr.Dataset({"rho": ("rho", [0.1]), "worst_case": (("foo", "bar"), [[1.0]])},
                     attrs={"analysis": "sharpness", "settings": "{}", "seed": 0})
    odd.to_netcdf(foreign, engine="h5netcdf")
    with pytest.raises(LandscapeError, match=r"has 'worst_case' over \('foo', 'bar'\), which no sharpness"):
        gather_results(run)
    # no radii, radii as text, complex values: tracebacks in report, figures and compare
    for rho, worst, message in ((np.zeros(0), np.zeros((1, 0)), "has no entries along 'rho'"),
                                (np.array(["0.1"]), np.ones((1, 1)), "holds 'rho' as text, not as real numbers"),
                                (np.array([0.1]), np.ones((1, 1)) + 1j, "holds 'worst_case' as complex128")):
        xr.Dataset({"worst_case": (("checkpoint", "rho"), worst)}, coords={"rho": rho},
                   attrs={"analysis": "sharpness", "settings": "{}", "seed": 0}).to_netcdf(foreign, engine="h5netcdf")
        with pytest.raises(LandscapeError, match=message):
            gather_results(run)
    # data kept in another file (HDF5 external storage): a pipe there blocked every reader forever
    import h5py

    (tmp_path / "elsewhere").write_bytes(bytes(80))
    with h5py.File(foreign, "w") as f:
        f.attrs["analysis"] = "sharpness"
        f.create_dataset("rho", shape=(10,), dtype="f8", external=[(str(tmp_path / "elsewhere"), 0, 80)])
    with pytest.raises(LandscapeError, match=r"keeps its 'rho' in other files \(HDF5 external storage\)"):
        gather_results(run)
    foreign.unlink()
    # a link to nowhere where a results file, the metrics or the config should be was read as absent, silently
    from landscape.summary import load_run

    for path in (foreign, run.metrics_path, run.config_path):
        kept = path.read_bytes() if path.exists() else None
        path.unlink(missing_ok=True)
        path.symlink_to(path.name + ".gone")
        if path == run.metrics_path:  # the run's other results still count: said among its problems
            assert any("is there but cannot be read (a symbolic link to nowhere" in p
                       for p in load_run(run.root).problems)
        else:
            with pytest.raises(LandscapeError, match="is there but cannot be read .a symbolic link to nowhere"):
                load_run(run.root)
        path.unlink()
        if kept is not None:
            path.write_bytes(kept)
    text = run.config_path.read_text()  # model.kwargs a list: a TypeError traceback in every reader
    run.config_path.write_text(text.replace("kwargs:", "kwargs: [1, 2]\n  old_kwargs:", 1))
    with pytest.raises(LandscapeError, match=r"its model.kwargs is \[1, 2\], not a mapping"):
        load_run(run.root)
    run.config_path.write_text("x: " + "a" * (2 << 20))  # 100 MB took minutes to parse
    with pytest.raises(LandscapeError, match="holds 2 MB; a config is a few kilobytes"):
        run.load_config()
    run.config_path.write_text(text)

    info = run.checkpoints()[-1]
    _, state = load_checkpoint(info.path)
    state = {k: v.clone() for k, v in state.items()}
    next(v for v in state.values() if v.is_floating_point())[0] = float("nan")
    save_checkpoint(info.path, state, model=info.model, model_kwargs=info.model_kwargs, epoch=info.epoch,
                    step=info.step)
    done = _landscape(["analyze", "sharpness", str(run.root), "--checkpoints", "last", "--samples", "8",
                       "--steps", "1", "--draws", "1", "--device", "cpu"])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "has NaN or infinite raw weights" in done.stderr and "--checkpoints" in done.stderr, done.stderr
    # the surface skipped both checks: an all-NaN surface with exit 0, a traceback for integer weights
    surface = ["analyze", "surface", str(run.root), "--checkpoints", "last", "--samples", "8", "--dims", "1",
               "--points", "3", "--force"]
    assert "has NaN or infinite raw weights" in one_sentence(CliRunner().invoke(cli, surface))
    state = {k: v.round().long() if k == next(iter(state)) else v.nan_to_num() for k, v in state.items()}
    save_checkpoint(info.path, state, model=info.model, model_kwargs=info.model_kwargs, epoch=info.epoch,
                    step=info.step)
    message = one_sentence(CliRunner().invoke(cli, surface))
    assert f"hold {next(iter(state))} as int64, where the model takes real floating-point values" in message, message

    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    looped = _landscape(["inspect", str(tmp_path / "loop-a")])
    assert looped.returncode == 1 and "(a symbolic link to nowhere: a loop or a missing target)" in looped.stderr


def test_forged_header_sizes_another_model_a_dry_run_and_a_damaged_metrics_file_in_a_report(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def forge(run, **changes):
        path = run.checkpoints()[-1].path
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
        meta.update({k: json.dumps(v) for k, v in changes.items()})
        save_file(load_file(str(path)), str(path), metadata=meta)

    # a layer count or a size the file's tensors cannot hold is refused before timm builds it (depth 10**6 took
    # minutes); the refusal names the setting and what the file holds
    for changes, words in [({"model_kwargs": {**KWARGS, "depth": 10**6}}, "depth=1000000 but"),
                           ({"model_kwargs": {**KWARGS, "embed_dim": 2**20}}, "embed_dim=1048576 but")]:
        run = make_run(tmp_path / f"sizes{len(words)}", epochs=(1,))
        forge(run, **changes)
        started = time.perf_counter()
        message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN]))
        assert words in message and "header is damaged" in message, message
        assert time.perf_counter() - started < 30
    # a checkpoint of another model than config.yaml trains is not measured as this run's
    run = make_run(tmp_path / "other", epochs=(1,))
    forge(run, model="mlit_xxs")
    message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN]))
    assert "holds a mlit_xxs but" in message and "trains a vit_tiny_patch16_224" in message, message
    # another run's checkpoint of the same model name (another depth, or another seed) was measured as this run's
    import shutil

    from conftest import TINY_VIT, make_tiny_run

    mine = make_tiny_run(tmp_path / "mine", "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    deeper = make_tiny_run(tmp_path / "deeper", "baseline", "vit_pico_patch4_32", {**TINY_VIT, "depth": 1}, 0)
    last = mine.checkpoints()[-1].path
    kept = last.read_bytes()
    shutil.copyfile(deeper.checkpoints()[-1].path, last)
    message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(mine.root), *HESSIAN]))
    assert "with depth=1 but" in message and "trains one with depth=2" in message, message
    assert not (mine.analysis_dir / "hessian.nc").exists()  # refused before its earlier checkpoints were measured
    last.write_bytes(kept)
    metrics = mine.metrics_path.read_text().splitlines()  # a same-architecture run's: its losses are not these
    row = metrics[-1].split(",")
    column = metrics[0].split(",").index("train_loss")
    row[column] = repr(float(row[column]) + 0.01)
    mine.metrics_path.write_text("\n".join(metrics[:-1] + [",".join(row)]) + "\n")
    message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(mine.root), *HESSIAN]))
    assert "was saved with train_loss" in message and f"records {float(row[column]):.6g} at its step" in message
    assert "belongs to another run" in message

    # --dry-run checks the names and the model's arguments (built on the meta device), not only the YAML
    for args, words in [(["--model", "nosuch"], "Unknown model 'nosuch'"), (["--data", "nosuch"], "Unknown dataset"),
                        (["--model-arg", "num_heads=7"], "divisible by num_heads"),
                        (["--set", "schedule.sched=nope"], "Unknown scheduler 'nope'"),
                        (["--set", "optim.opt=nope"], "Optimizer nope not found")]:
        message = one_sentence(CliRunner().invoke(cli, ["train", *args, "--dry-run"]))
        assert words in message, message
    result = CliRunner().invoke(cli, ["train", "--dry-run"])
    assert result.exit_code == 0 and "model:" in result.output
    message = one_sentence(CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "missing")]))
    assert "does not exist" in message, message

    # a run whose metrics.csv is damaged (and has no dynamics.nc) is reported with the gap said, not silent dashes
    run = make_run(tmp_path / "damaged", epochs=(1,))
    run.metrics_path.write_bytes(bytes(range(256)) * 4)
    result = CliRunner().invoke(cli, ["report", str(run.root), "--out", str(tmp_path / "r.md"), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "Warning: " in result.output and "metrics.csv is damaged" in result.output
    text = (tmp_path / "r.md").read_text()
    assert "Read with care" in text and "metrics.csv is damaged" in text


def test_every_error_a_study_worker_can_raise_comes_back_whole_through_pickle():
    # a worker's exception is pickled back to the study; one that cannot be unpickled became a 60-line traceback
    import errno
    import pickle

    from landscape.errors import CheckpointError, ConfigError, DataError, LandscapeError
    from landscape.io import RunBusy, WriteError, write_error

    error = write_error("/ro/runs/a/analysis/hessian.nc", OSError(errno.EROFS, "Read-only file system"))
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is WriteError and str(back) == str(error) and "Read-only file system" in str(back)
    assert (back.path, back.errno, back.strerror) == (error.path, errno.EROFS, "Read-only file system")
    for cls in (LandscapeError, CheckpointError, ConfigError, DataError, RunBusy):
        back = pickle.loads(pickle.dumps(cls("one sentence.")))
        assert type(back) is cls and str(back) == "one sentence."


def test_a_run_keeps_what_it_was_trained_on_and_its_analyses_refuse_other_data(tmp_path):
    # with LANDSCAPE_DATA_DIR pointing at other files, analyses measured other data silently (same config, same hash)
    import json

    from click.testing import CliRunner
    from test_data import write_tiny_mnist

    from landscape.analyses.dynamics import run_dynamics
    from landscape.cli import cli
    from landscape.runs import Run

    write_tiny_mnist(tmp_path / "data" / "mnist", n_train=32, n_val=12, seed=0)
    write_tiny_mnist(tmp_path / "other" / "mnist", n_train=32, n_val=12, seed=1)
    out = tmp_path / "runs" / "m"
    trained = CliRunner().invoke(cli, [
        "train", "--data", "mnist", "--data-dir", str(tmp_path / "data"), "--model", "vit_pico_patch4_32",
        "--model-arg", "depth=1", "--model-arg", "embed_dim=8", "--model-arg", "num_heads=2", "--model-arg",
        "patch_size=7", "--recipe", "digits", "--set", "epochs=1", "--batch-size", "16", "--no-progress",
        "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    record = json.loads((out / "data.json").read_text())
    assert record["name"] == "mnist" and record["splits"]["train"]["examples"] == 32
    assert record["splits"]["val"]["examples"] == 12 and len(record["splits"]["val"]["sha256"]) == 64
    assert run_dynamics(Run(out)).attrs["val_size"] == 12  # the split it had, not the registry's 10,000
    analyse = ["analyze", "hessian", str(out), "--top-k", "1", "--samples", "8", "--tol", "1e-2"]
    same = CliRunner().invoke(cli, [*analyse, "--data-dir", str(tmp_path / "data")])
    assert same.exit_code == 0, same.output
    other = CliRunner().invoke(cli, [*analyse, "--data-dir", str(tmp_path / "other"), "--force"])
    assert other.exit_code == 1 and "The train split of mnist found now (32 examples) is not the one" in other.output
    assert "point --data-dir or LANDSCAPE_DATA_DIR at the data it was trained on" in other.output
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(out), "--extend-to", "2", "--data-dir",
                                       str(tmp_path / "other"), "--no-progress"])
    assert resumed.exit_code == 1 and "is not the one" in resumed.output and len(Run(out).checkpoints()) == 1
    (out / "data.json").write_text("{")  # damaged: one sentence
    damaged = CliRunner().invoke(cli, [*analyse, "--data-dir", str(tmp_path / "data"), "--force"])
    assert damaged.exit_code == 1 and "data.json is damaged" in damaged.output


@pytest.mark.parametrize("device, message", [
    ("", "Unknown device ''"), (" ", "Unknown device ' '"), ("cuda:x", "Unknown device 'cuda:x'"),
    ("gpu", "Unknown device 'gpu'")])
def test_a_device_that_names_none_is_one_sentence_for_training_and_analysis(tmp_path, device, message):
    # '' was taken for auto, and 'cuda:x' passed to torch (a traceback where a GPU is present)
    run = make_run(tmp_path / "run", epochs=(1,))
    assert message in one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN[:-2],
                                                            "--device", device]))
    out = tmp_path / "new"
    assert message in one_sentence(CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(out),
                                                            "--no-progress", "--device", device]))
    assert not out.exists() and not run.analysis_dir.exists()


def test_params_that_select_every_parameter_continue_the_file_of_no_params(tmp_path):
    run = make_run(tmp_path / "run", epochs=(1, 2))
    first = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN, "--params", "",
                                     "--checkpoints", "epochs:1"])
    assert first.exit_code == 0, first.output
    for params in ([], ["--params", "*"], ["--params", "  "]):
        result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN, *params])
        assert result.exit_code == 0, result.output
    assert [p.name for p in run.analysis_dir.glob("*.nc")] == ["hessian.nc"]
    with xr.open_dataset(run.analysis_dir / "hessian.nc") as ds:
        assert ds.sizes["checkpoint"] == 2


def test_a_new_run_folder_with_a_control_character_in_its_name_is_refused_before_it_is_made(tmp_path):
    # a newline in a run's name broke every table, log line and figure legend that names the run
    for name in ("a\nb", "tab\there", os.fsdecode(b"latin\xe9")):
        out = tmp_path / name
        message = one_sentence(CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(out),
                                                        "--no-progress", "--set", "data.train_size=64"]))
        assert ("has a control character (a newline, a tab) in its name" in message
                or "has bytes in its name that are not UTF-8 text" in message)
        assert not out.exists()
    source = make_run(tmp_path / "source", epochs=(1,)).checkpoints()[-1].path
    out = tmp_path / "imported\nrun"
    message = one_sentence(CliRunner().invoke(cli, ["import", str(source), "--out", str(out)]))
    assert "has a control character" in message and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    # a folder made before (empty) passed the check: the run trained into it
    for command in (["train", "--data", "digits", "--no-progress", "--set", "data.train_size=64"],
                    ["import", str(source)]):
        out = tmp_path / "made\nbefore"
        out.mkdir()
        message = one_sentence(CliRunner().invoke(cli, [*command, "--out", str(out)]))
        assert "has a control character" in message and not any(out.iterdir())
        out.rmdir()
    # a study's folder: refused only after its study.yaml and environment.yaml were written
    from landscape.study import STUDIES_DIR

    out = tmp_path / "study\nfolder"
    message = one_sentence(CliRunner().invoke(cli, ["study", str(STUDIES_DIR / "demo-digits.yaml"), "--out", str(out)]))
    assert "has a control character" in message and not out.exists()


def test_shard_in_one_process_is_named_and_a_job_environment_that_is_none_is_one_sentence(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", epochs=(1, 2))
    result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN, "--shard", "checkpoints"])
    assert result.exit_code == 0, result.output
    assert "Note: --shard checkpoints shares the work between the processes torchrun starts" in result.output
    for env, words in (({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment is not a whole number"),
                       ({"WORLD_SIZE": "2", "RANK": "5"}, "The environment describes no process of a job "
                                                           "(WORLD_SIZE=2, RANK=5, LOCAL_RANK=0)"),
                       ({"WORLD_SIZE": "2", "RANK": "1"}, "WORLD_SIZE=2 in the environment asks for a job of several "
                                                          "processes, but MASTER_ADDR and MASTER_PORT are not set")):
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            message = one_sentence(CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), *HESSIAN,
                                                            "--force"]))
        assert words in message, message
    with xr.open_dataset(run.analysis_dir / "hessian.nc") as ds:  # the forced re-run stopped before any change
        assert ds.sizes["checkpoint"] == 2


def test_a_warm_up_longer_than_the_run_is_named_and_the_run_trains(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(out), "--no-progress", "--epochs", "1",
                                      "--set", "data.train_size=64", "--set", "schedule.warmup_epochs=3"])
    assert result.exit_code == 0, result.output
    assert "Note: the warm-up (3 epochs) is longer than the run (1)" in result.output
    import pandas as pd
    import yaml

    peak = yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"]
    assert 0 < pd.read_csv(out / "metrics.csv")["lr"].max() < peak / 2  # a third of the warm-up: a third of the peak
    plain = CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(tmp_path / "plain"), "--no-progress",
                                     "--epochs", "1", "--set", "data.train_size=64"])
    assert plain.exit_code == 0 and "warm-up" not in plain.output
    dry = CliRunner().invoke(cli, ["train", "--data", "digits", "--epochs", "1", "--set", "schedule.warmup_epochs=3",
                                   "--dry-run"])  # what the run would be, its note included
    assert dry.exit_code == 0 and "Note: the warm-up (3 epochs) is longer than the run (1)" in dry.output


@pytest.mark.slow
def test_a_closed_stderr_does_not_stop_a_training(tmp_path):
    # `2>&-` made sys.stderr None: the command exited 1 without a word and left a half-made run
    out = tmp_path / "run"
    done = subprocess.run(f"{sys.executable} -m landscape train --data digits --epochs 1 --set data.train_size=64 "
                          f"--out {out} 2>&-", shell=True, capture_output=False, stdout=subprocess.PIPE, text=True,
                          env=ENV, timeout=240)
    assert done.returncode == 0 and f"Run written to {out}" in done.stdout, done.stdout
    assert len(list((out / "checkpoints").glob("*.safetensors"))) == 1


def test_non_ascii_target_runs_name_results_files_apart():
    # every non-ASCII name became "_": interpolate:é and interpolate:数据 shared one file, and the --force the
    # refusal advised deleted the other's results
    from landscape.analyses.surface import _safe

    names = ["é", "数据", "模型", "run-é", "run-è"]
    assert len({_safe(n) for n in names}) == len(names)
    assert _safe("baseline-s0") == "baseline_s0" and _safe("runB_3") == "runB_3"  # ASCII names keep their files
    # but for an '@', which marks the epoch in a file name (the folder runB@3 and epoch 3 of runB shared one file)
    assert _safe("runB@3").startswith("runB_3_") and _safe("runB@3") != _safe("runB_3")
    from landscape.analyses.surface import parse_directions

    long = [parse_directions(f"plane:{'r' * 119}a,{'r' * 119}{end}").slug() for end in "bc"]
    assert long[0] != long[1] and all(len(slug) <= 120 for slug in long)  # a file name the file system takes


def test_an_interrupt_before_the_run_exists_does_not_advise_resuming_it(tmp_path, monkeypatch):
    import landscape.trainers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(landscape.trainers, "train", interrupted)
    out = tmp_path / "new"
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(out), "--no-progress"])
    assert result.exit_code == 130 and "no training state was saved yet, so run the same command again" in result.output
    run = make_run(tmp_path / "run", epochs=(1,))  # a config and a checkpoint, no state: --resume would refuse
    result = CliRunner().invoke(cli, ["train", "--resume", str(run.root), "--no-progress"])
    assert result.exit_code == 130 and "run the same command again" in result.output
    (run.root / "state").mkdir()
    (run.root / "state" / "last.pt").write_bytes(b"state")
    result = CliRunner().invoke(cli, ["train", "--resume", str(run.root), "--no-progress"])
    assert result.exit_code == 130 and "continue the run with landscape train --resume RUN" in result.output


def test_a_library_that_cannot_be_loaded_is_one_sentence(monkeypatch):
    # under `ulimit -v` below what torch maps, its import failed with a 25-line traceback
    monkeypatch.setitem(sys.modules, "landscape.trainers", None)  # its import now raises ImportError
    message = one_sentence(CliRunner().invoke(cli, ["train", "--data", "digits", "--dry-run"]))
    assert message.startswith("Error: a library could not be loaded (") and "ulimit -v" in message


def test_names_the_file_system_takes_stay_writable_whatever_their_temporaries(tmp_path):
    # the temporary beside a file adds about 27 characters: a 248-character report name or a 235-character import
    # folder failed with "File name too long" (naming a hidden folder the user never asked for)
    from landscape.io import atomic_write_text

    targets = [tmp_path / ("q" * 245 + ".md"), tmp_path / ("数" * 80 + ".md"), tmp_path / ("é" * 120 + ".md")]
    for target in targets:  # 248 characters; 243 bytes of 83 characters; 243 bytes of 123
        atomic_write_text(target, "kept")
        assert target.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.name for t in targets)
    source = make_run(tmp_path / "source", epochs=(1,)).checkpoints()[-1].path
    out = tmp_path / ("m" * 235)
    result = CliRunner().invoke(cli, ["import", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "config.yaml").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_follow_their_launcher_and_a_launcher_that_is_process_1_is_alive(monkeypatch):
    # torchrun as a container's entry point is process 1: its workers took that for a dead launcher and stopped
    import ctypes

    import landscape.trainers.distributed as distributed

    class FakeLibc:
        def prctl(self, *args):
            asked.append(args[:2])
            return 0

    asked, killed = [], []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    for parents, stops in (([1, 1], False), ([4242, 4242], False), ([4242, 1], True)):
        sequence = iter(parents)
        monkeypatch.setattr(os, "getppid", lambda: next(sequence))
        killed.clear()
        distributed.end_with_launcher()
        assert asked[-1] == (1, int(signal.SIGTERM)) and bool(killed) == stops


def test_a_masked_autoencoder_run_is_refused_by_the_analyses_in_one_sentence(tmp_path):
    # its model reconstructs patches: the cross-entropy failed deep inside with an IndexError traceback
    run = make_run(tmp_path / "run", epochs=(1,))
    config = run.load_config()
    save_yaml({**config, "task": "mae"}, run.config_path)
    for analysis in (["hessian", *HESSIAN], ["sharpness", "--samples", "16"]):
        message = one_sentence(CliRunner().invoke(cli, ["analyze", *analysis[:1], str(run.root), *analysis[1:]]))
        assert "is a masked-autoencoder pre-training run" in message
    assert not run.analysis_dir.exists() or not list(run.analysis_dir.glob("*.nc"))


def test_an_interrupt_inside_a_writer_whose_clean_up_fails_ends_as_the_interrupt(tmp_path):
    # SIGHUP inside torch.save: the zip writer's exit raised "unexpected pos" over it, a traceback and exit 1
    from landscape.io import atomic_write

    class Writer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 400832 vs 400724")

    def write(tmp):
        with Writer():
            raise KeyboardInterrupt  # what a SIGTERM or SIGHUP handler raises, mid-write

    (tmp_path / "state.pt").write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "state.pt", write)
    assert (tmp_path / "state.pt").read_bytes() == b"previous" and sorted(tmp_path.iterdir()) == [tmp_path / "state.pt"]
