"""The trainer: config resolution, checkpoint schedules, the run directory, exact resume, failures, DDP."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from landscape.checkpoints import build_model, load_checkpoint
from landscape.cli import cli
from landscape.errors import CheckpointError, ConfigError, LandscapeError
from landscape.models import encoder_state_dict
from landscape.runs import Run
from landscape.trainers import build_config, checkpoint_steps, checkpoints_to_delete, log_spaced_steps, train
from landscape.trainers.batches import TrainBatches, epoch_order, random_shift, validation_batches
from landscape.trainers.distributed import Distributed
from landscape.trainers.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]

# Every source of randomness the loop has: shifts, MixUp/CutMix (NumPy), random erasing (Python and torch),
# drop-path (torch), EMA; checkpoints every 10 updates so that a kill lands in the middle of an epoch.
RANDOM_RECIPE = [
    "epochs=3", "crop=pad", "crop_padding=1", "mixup=0.4", "cutmix=1.0", "re_prob=0.25",
    "model.drop_path=0.1", "every=steps:10", "model.kwargs.depth=2",
]


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def columns_without_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "images_per_s")} for r in rows]


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    for weights in ("raw", "ema"):
        _, a = load_checkpoint(path_a, weights=weights)
        _, b = load_checkpoint(path_b, weights=weights)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{weights} weights differ in {different[:5]}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run that the interrupted ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(build_config("digits", overrides=RANDOM_RECIPE), out, progress=False)
    return result


# -- schedules and config --------------------------------------------------------------------------------------
def test_checkpoint_schedules_give_the_documented_steps():
    assert checkpoint_steps("epoch", updates_per_epoch=5, epochs=3) == [5, 10, 15]
    assert checkpoint_steps("epochs:2", updates_per_epoch=5, epochs=5) == [10, 20, 25]
    assert checkpoint_steps("steps:4", updates_per_epoch=5, epochs=2) == [4, 8, 10]
    assert checkpoint_steps("epoch+steps:3", updates_per_epoch=5, epochs=1) == [3, 5]
    log = checkpoint_steps("log:6", updates_per_epoch=100, epochs=10)
    assert log == [1, 4, 16, 63, 251, 1000]
    gaps = [b - a for a, b in zip(log, log[1:])]
    assert gaps == sorted(gaps), "log spacing must be dense early and sparse late"
    assert log_spaced_steps(50, 10) == list(range(1, 11))
    for total, n in ((37, 40), (37, 90), (1000, 1500), (1000, 2999)):  # more points than steps: one pass over
        # the steps gives the points' own steps (log:1000000000 looped a billion times)
        ratio = math.log(total) / (n - 1)
        assert log_spaced_steps(n, total) == sorted({round(math.exp(i * ratio)) for i in range(n)})
    assert log_spaced_steps(10 ** 9, 5000) == list(range(1, 5001))
    with pytest.raises(ConfigError, match="Unknown checkpoint schedule 'weekly'"):
        checkpoint_steps("weekly", updates_per_epoch=5, epochs=1)


def test_keep_policy_removes_all_but_the_last_k():
    assert checkpoints_to_delete("all", [1, 2, 3]) == []
    assert checkpoints_to_delete("last:2", [1, 2, 3, 4]) == [1, 2]
    with pytest.raises(ConfigError, match="keep policy"):
        checkpoints_to_delete("last:0", [1])


def test_config_layers_apply_in_order_and_short_keys_resolve():
    config = build_config(
        "digits", model="vit_pico_patch4_32", model_kwargs={"depth": 2}, options={"epochs": 3, "lr": 0.01},
        overrides=["lr=2e-3", "mixup=0.2", "every=log:10", "model.kwargs.embed_dim=16"],
    )
    assert config.model.name == "vit_pico_patch4_32"
    assert config.model.kwargs == {"depth": 2, "embed_dim": 16}, "the recipe's kwargs belong to the recipe's model"
    assert config.epochs == 3 and config.optim.lr == 2e-3, "--set overrides the first-class options"
    assert config.augment.mixup == 0.2 and config.checkpoint.every == "log:10"
    assert config.batch_size == 32, "fields not overridden come from the recipe"


@pytest.mark.parametrize("override, message", [
    ("name=x", "ambiguous; write one of model.name, data.name"),
    ("lrr=1", "Unknown config field"),
    ("wieght_decay=1", "Unknown config field 'wieght_decay'; did you mean optim.weight_decay"),
    ("lr=fast", "optim.lr must be a number"),
    ("every=weekly", "Unknown checkpoint schedule"),
    ("amp=fp32", "amp must be auto, bf16, fp16 or off"),
    # values torch or timm took and then failed on (a traceback), or trained on silently (a negative clip norm
    # turned every update around; 0 froze the weights)
    ("optim.grad_clip=-1", "optim.grad_clip must be a positive finite gradient norm"),
    ("optim.grad_clip=0", "optim.grad_clip must be a positive finite gradient norm"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("seed=100000000000000000000", "seed must be a whole number between"),
    ("augment.auto_augment=nosuch", "'nosuch' is not a timm policy"),
    ("augment.interpolation=nosuch", "augment.interpolation must be bilinear"),
    ("augment.crop_scale=[0.5]", "augment.crop_scale must be two areas"),
    ("augment.re_mode=nosuch", "augment.re_mode must be const, rand or pixel"),
    ("data.num_workers=-1", "data.num_workers must be 0 or more"),
    ("model.drop_path=1.5", r"model.drop_path must be in \[0, 1\)"),
    ("optim.momentum=1", r"optim.momentum must be in \[0, 1\)"),
    ("augment.hflip=2", r"augment.hflip must be in \[0, 1\]"),
    ("data.train_size=-5", "data.train_size must be a number of images, 1 or more"),  # trained on all of them
    ("data.val_size=0", "data.val_size must be a number of images, 1 or more"),
    ("epochs=1e9", "epochs must be between 1 and 1,000,000"),  # a MemoryError listing the checkpoint steps
    ("optim.momentum=0", "for plain SGD give --set optim.opt=momentum"),  # with opt sgd below
    # trained without a word: no blocks, MLPs of width 0, a "decay" that raised the learning rate a thousandfold
    ("model.kwargs.depth=0", "model.kwargs.depth must be at least 1 block, not 0"),
    ("model.kwargs.mlp_ratio=0", "model.kwargs.mlp_ratio must be more than 0"),
    ("schedule.min_lr=1", "schedule.min_lr 1 is above the peak learning rate"),
])
def test_bad_overrides_are_one_sentence_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("digits", overrides=[override, *(["optim.opt=sgd"] if "momentum=0" in override else [])])


@pytest.mark.parametrize("args, message", [
    (["--set", "data.train_size=10000"], "data.train_size 10000 is more than the 1437 training images of digits"),
    (["--set", "data.val_size=361"], "data.val_size 361 is more than the 360 validation images of digits"),
    (["--data", "synthetic", "--set", "data.train_size=2000"], "generate more with --set data.options.count=2000"),
])
def test_a_subset_larger_than_the_split_is_refused_before_the_run_is_made(tmp_path, args, message):
    # it was recorded in config.yaml and the whole (smaller) split trained
    from click.testing import CliRunner

    from landscape.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data", "digits", *args, "--set", "epochs=1", "--no-progress",
                                      "--out", str(out)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not out.exists()


def test_synthetic_training_data_is_generated_at_its_size_and_the_advice_to_use_it_works(tmp_path):
    # --img-size 16 passed the size check and crashed in the loop (8x8 images generated), data.options.img_size
    # crashed on a duplicate argument; the advice "--data synthetic (takes the model's shape)" was refused by train
    from click.testing import CliRunner

    from landscape.cli import cli
    from landscape.runs import Run

    base = ["train", "--data", "synthetic", "--model", "vit_pico_patch4_32", "--model-arg", "depth=1", "--set",
            "epochs=1", "--set", "data.options.count=64", "--batch-size", "16", "--no-progress"]
    for i, size in enumerate((["--img-size", "16"], ["--set", "data.options.img_size=16"])):
        done = CliRunner().invoke(cli, [*base, *size, "--out", str(tmp_path / f"s{i}")])
        assert done.exit_code == 0, done.output
        assert Run(tmp_path / f"s{i}").checkpoints()[-1].model_kwargs["img_size"] == 16
    refused = CliRunner().invoke(cli, [*base[:2], "digits", *base[3:7], "--model-arg", "num_classes=100", "--out",
                                       str(tmp_path / "x")])
    advice = refused.output.split("to fit, use ")[1].strip().rstrip(".")
    assert advice.startswith("--data synthetic --set data.options."), refused.output
    followed = CliRunner().invoke(cli, [*base[:2], *advice.split()[1:2], *base[3:], "--model-arg", "num_classes=100",
                                        *advice.split()[2:], "--out", str(tmp_path / "y")])
    assert followed.exit_code == 0, followed.output


@pytest.mark.parametrize("arg, message", [
    ("num_classes=5", "The model takes 1-channel 8x8 images of 5 classes, but digits gives 1-channel 8x8 images of 10"),
    ("img_size=30", "to fit, use --img-size 30"),
    ("in_chans=3", "The model takes 3-channel"),
    ("patch_size=16", "patch_size 16 is larger than the 8x8 images"),
])
def test_model_arguments_that_do_not_fit_the_data_are_refused_before_the_run_is_made(tmp_path, arg, message):
    # they failed inside the loop with a traceback, leaving config.yaml and an empty checkpoints/ behind
    from click.testing import CliRunner

    from landscape.cli import cli

    out = tmp_path / "runs" / "x"
    for dry in ([], ["--dry-run"]):
        result = CliRunner().invoke(cli, ["train", "--data", "digits", "--model", "vit_pico_patch4_32", "--model-arg",
                                          "depth=1", "--model-arg", arg, "--set", "epochs=1", "--no-progress",
                                          "--out", str(out), *dry])
        assert result.exit_code == 1 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.slow
def test_a_model_whose_name_sets_a_patch_larger_than_the_images_is_refused_before_the_run_is_made(tmp_path):
    # the patch of 16 comes from the name, not from --model-arg: the first step failed with a traceback
    from click.testing import CliRunner

    from landscape.cli import cli

    out = tmp_path / "runs" / "x"
    for dry in ([], ["--dry-run"]):
        result = CliRunner().invoke(cli, ["train", "--data", "digits", "--model", "vit_small_patch16_224", "--set",
                                          "epochs=1", "--no-progress", "--out", str(out), *dry])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: vit_small_patch16_224 cannot take the 1-channel 8x8 images of "
                                        "digits (") and "give --model-arg patch_size=2" in result.output
    assert not out.exists()
    fits = CliRunner().invoke(cli, ["train", "--data", "digits", "--model", "mlit_xxs", "--dry-run"])
    assert fits.exit_code == 0, fits.output  # a mixture's routing the meta device cannot run: one image on the CPU
    # a masked autoencoder's masking cannot run on the meta device either; its patch of 3 did not divide 8 and the
    # first step failed with a traceback after the run was made
    mae = ["train", "--data", "digits", "--model", "mae_mlit_xxs", "--recipe", "mae-pretrain", "--img-size", "8",
           "--model-arg", "embed_dim=12", "--model-arg", "depth=3", "--set", "epochs=1", "--no-progress", "--out",
           str(out)]
    for dry in ([], ["--dry-run"]):
        result = CliRunner().invoke(cli, mae + dry)
        assert result.exit_code == 1 and "its patch of 3 does not divide the images; give a --model-arg patch_size " \
            "that divides 8" in result.output, result.output
    assert not out.exists()
    assert CliRunner().invoke(cli, mae[:8] + ["9"] + mae[9:] + ["--dry-run"]).exit_code == 0


def test_paper_recipe_is_the_published_one():
    c = build_config("paper-a-imagenet")
    assert (c.batch_size, c.epochs, c.seed, c.model.drop_path) == (1024, 300, 42, 0.1)
    assert (c.optim.opt, c.optim.lr, c.optim.weight_decay, c.optim.lr_base_batch) == ("adamw", 1e-3, 0.05, None)
    assert (c.schedule.sched, c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr) == ("cosine", 5, 1e-5, 0)
    a = c.augment
    assert (a.label_smoothing, a.mixup, a.cutmix, a.switch_prob, a.re_prob, a.repeated_aug) == (0.1, 0.8, 1.0, 0.5, 0.25, 3)
    assert a.auto_augment == "rand-m9-mstd0.5-inc1" and c.ema.decay == 0.9998 and c.amp == "auto"


# -- data order --------------------------------------------------------------------------------------------------
def test_random_shift_is_a_translated_copy_filled_at_the_border():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = random_shift(x, 2, fill, torch.Generator().manual_seed(3))
    padded = torch.cat([fill.view(1, 3, 1, 1).expand(2, 3, 9, 9)], 0).clone()
    padded[:, :, 2:7, 2:7] = x
    for i in range(2):
        crops = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) for c in crops)


def test_repeated_augmentation_repeats_each_image_within_an_epoch():
    order = epoch_order(12, seed=0, epoch=1, repeats=3)
    assert len(order) == 12 and all((order == i).sum() in (0, 3) for i in range(12))
    assert not torch.equal(order, epoch_order(12, seed=0, epoch=2, repeats=3))


def test_image_by_image_batches_depend_on_position_only():
    config = build_config("digits", overrides=["auto_augment=rand-m9-mstd0.5-inc1", "crop=rrc", "data.train_size=256"])
    serial = TrainBatches(config, Distributed())
    first = list(serial.epoch(2))
    from_update_3 = list(serial.epoch(2, start=3))
    config.data.num_workers = 1
    parallel = list(TrainBatches(config, Distributed()).epoch(2))
    for a, b in zip(first[3:], from_update_3):
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
    for a, b in zip(first, parallel):
        assert torch.equal(a[0][0], b[0][0])


# -- the run directory -------------------------------------------------------------------------------------------
def test_digits_run_is_complete_and_its_checkpoints_reproduce_their_metrics(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--epochs", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = Run.open(out)
    config = run.load_config()
    assert config["model"]["kwargs"]["num_classes"] == 10 and config["data"]["name"] == "digits"
    metrics = run.read_metrics()
    assert list(metrics.columns[:14]) == [
        "epoch", "step", "images_seen", "train_loss", "val_loss", "val_top1", "val_top5", "ema_val_loss",
        "ema_val_top1", "ema_val_top5", "lr", "grad_norm", "wall_time", "images_per_s"]
    assert list(metrics["epoch"]) == [1, 2] and run.state_path.exists()
    infos = run.checkpoints()
    assert [i.epoch for i in infos] == [1, 2] and all(i.has_ema for i in infos)
    # The checkpoint alone rebuilds the model, and it scores what the metrics row says.
    info, state = load_checkpoint(infos[-1].path, weights="ema")
    model = build_model(info, state)
    cfg = build_config("digits")
    scores = evaluate(model, validation_batches(cfg, Distributed()), torch.device("cpu"))
    assert scores["val_top1"] == pytest.approx(metrics["ema_val_top1"].iloc[-1], abs=1e-9)
    assert scores["val_loss"] == pytest.approx(metrics["ema_val_loss"].iloc[-1], rel=1e-5)
    assert metrics["val_top1"].iloc[-1] > 50, "the demo recipe must learn the digits"


def test_existing_run_directory_is_refused_without_resume_or_overwrite(tmp_path):
    from conftest import TINY_VIT, make_tiny_run

    run = make_tiny_run(tmp_path, "run", "vit_pico_patch4_32", TINY_VIT, 0)
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file() and p.name != ".lock"}
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--out", str(run.root)])
    assert result.exit_code == 1, result.output
    assert "already exists; continue it with --resume or replace it with --overwrite" in result.output
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_keep_last_k_and_initial_checkpoint(tmp_path):
    config = build_config("digits", overrides=["epochs=1", "data.train_size=256", "every=steps:2", "keep=last:2",
                                               "checkpoint.initial=true"])
    result = train(config, tmp_path / "run", progress=False)
    assert [p.name for p in result.checkpoints] == ["step-00000006.safetensors", "epoch-0001.safetensors"]
    assert result.rows[0]["step"] == 0 and result.rows[0]["epoch"] == 0
    assert [r["step"] for r in result.rows] == [0, 2, 4, 6, 8]


def test_gradient_accumulation_takes_the_steps_of_one_large_batch(tmp_path):
    base = ["epochs=1", "data.train_size=256", "batch_size=64", "model.kwargs.depth=2"]
    whole = train(build_config("digits", overrides=base), tmp_path / "whole", progress=False)
    split = train(build_config("digits", overrides=base + ["optim.accum_steps=4"]), tmp_path / "split", progress=False)
    for column in ("train_loss", "val_loss", "ema_val_loss", "grad_norm"):
        assert math.isclose(whole.final[column], split.final[column], rel_tol=1e-5), column
    _, a = load_checkpoint(whole.checkpoints[-1])
    _, b = load_checkpoint(split.checkpoints[-1])
    # Adam divides by the gradient's own scale, so a tensor whose gradient is pure rounding noise (the key bias,
    # to which softmax is invariant) takes noise-driven steps that the summation order changes; every other
    # tensor agrees to 1e-6.
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if "qkv.bias" not in k)


# -- exact resume ----------------------------------------------------------------------------------------------
def test_resume_after_an_interruption_mid_epoch_is_bit_identical(tmp_path, reference_run):
    out = tmp_path / "run"

    def interrupt(step):
        if step == 27:  # mid-epoch, 7 updates after the last checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(build_config("digits", overrides=RANDOM_RECIPE), out, progress=False, on_update=interrupt)
    assert Run(out).read_metrics()["step"].max() == 20
    resumed = train(None, out, resume=True, progress=False)
    assert_same_weights(reference_run.checkpoints[-1], resumed.checkpoints[-1])
    assert columns_without_timing(resumed.rows) == columns_without_timing(reference_run.rows)
    steps = list(Run(out).read_metrics()["step"])
    assert steps == sorted(set(steps)), "resumed history must not repeat rows"


def test_a_run_stopped_right_after_saving_its_initial_weights_resumes_without_a_second_row_0(tmp_path):
    # the resumed run evaluated the initial weights again and metrics.csv held step 0 twice
    overrides = ["epochs=1", "data.train_size=128", "model.kwargs.depth=1", "checkpoint.initial=true"]
    whole = train(build_config("digits", overrides=overrides), tmp_path / "whole", progress=False)

    def stop(row):
        if row["step"] == 0:  # called once the row, the checkpoint and state/last.pt are written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(build_config("digits", overrides=overrides), tmp_path / "run", progress=False, on_row=stop)
    assert list(Run(tmp_path / "run").read_metrics()["step"]) == [0]
    resumed = train(None, tmp_path / "run", resume=True, progress=False)
    assert list(Run(tmp_path / "run").read_metrics()["step"]) == [r["step"] for r in whole.rows] == [0, 4]
    assert columns_without_timing(resumed.rows) == columns_without_timing(whole.rows)
    assert_same_weights(whole.checkpoints[-1], resumed.checkpoints[-1])


@pytest.mark.parametrize("how", ["resume", "same command", "analysed, then resume"])
def test_a_run_killed_between_its_first_checkpoint_and_its_first_state_trains_again(tmp_path, monkeypatch, how):
    # it could be neither resumed (no training state) nor started again (a checkpoint was there)
    import landscape.trainers.loop as loop

    overrides = ["epochs=2", "data.train_size=128", "model.kwargs.depth=1"]
    whole = train(build_config("digits", overrides=overrides), tmp_path / "whole", progress=False)

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(loop, "save_state", killed)
        with pytest.raises(Killed):
            train(build_config("digits", overrides=overrides), tmp_path / "run", progress=False)
    run = Run(tmp_path / "run")
    assert [i.epoch for i in run.checkpoints()] == [1] and not run.state_path.exists()
    if how == "analysed, then resume":  # its analysis must not be kept over weights a retraining may change
        from landscape.analyses.hessian import HessianSettings, run_hessian_analysis

        run_hessian_analysis(run, HessianSettings(top_k=1, samples=16), progress=False)
        analysed = (run.analysis_dir / "hessian.nc").read_bytes()
        with pytest.raises(CheckpointError, match="was analysed since, so it cannot be resumed.*Move .*analysis"):
            train(None, run.root, resume=True, progress=False)
        assert (run.analysis_dir / "hessian.nc").read_bytes() == analysed  # nothing changed
        run.analysis_dir.rename(tmp_path / "kept-analysis")  # what the sentence advises
    if how == "same command":
        again = train(build_config("digits", overrides=overrides), run.root, progress=False)
    else:
        again = train(None, run.root, resume=True, progress=False)
    assert columns_without_timing(again.rows) == columns_without_timing(whole.rows)
    assert_same_weights(whole.checkpoints[-1], again.checkpoints[-1])


def test_resuming_a_run_killed_before_its_first_checkpoint_says_to_start_it_again(tmp_path, monkeypatch):
    # it was refused as "analysed since", naming an analysis folder the run does not have
    import landscape.trainers.loop as loop

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    config = build_config("digits", overrides=["epochs=1", "data.train_size=64", "model.kwargs.depth=1"])
    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", killed)
        with pytest.raises(Killed):
            train(config, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"stopped before saving any state; it holds no checkpoint, so start it "
                                              r"again with the same train command \(without --resume\)") as refused:
        train(None, tmp_path / "run", resume=True, progress=False)
    assert "analys" not in str(refused.value)
    (tmp_path / "run" / "analysis").mkdir()  # a dynamics result (it reads metrics.csv only): still no checkpoint
    (tmp_path / "run" / "analysis" / "dynamics.nc").write_bytes(b"")
    with pytest.raises(CheckpointError, match="it holds no checkpoint, so start it again"):
        train(None, tmp_path / "run", resume=True, progress=False)
    (tmp_path / "run" / "analysis" / "dynamics.nc").unlink()
    assert train(config, tmp_path / "run", progress=False).checkpoints  # as the sentence says


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, reference_run):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "landscape", "train", "--data", "digits", "--out", str(out), "--no-progress"]
    for override in RANDOM_RECIPE:
        args += ["--set", override]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV)
    second = out / "checkpoints" / "step-00000020.safetensors"
    deadline = time.time() + 120
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = Run(out).read_metrics()["step"].max()
    assert killed_at < reference_run.rows[-1]["step"]
    resumed = train(None, out, resume=True, progress=False)
    assert_same_weights(reference_run.checkpoints[-1], resumed.checkpoints[-1])
    assert columns_without_timing(Run(out).read_metrics().to_dict("records")) == \
        columns_without_timing(reference_run.run.read_metrics().to_dict("records"))


# -- failures ----------------------------------------------------------------------------------------------------
def test_a_diverged_run_calls_good_only_a_checkpoint_whose_validation_loss_is_finite(monkeypatch):
    # with a checkpoint every step, the last one kept already had a NaN validation loss and was called "good"
    from types import SimpleNamespace

    import landscape.trainers.loop as loop

    losses = {"step-00000001.safetensors": 2.3, "step-00000002.safetensors": float("nan"),
              "step-00000003.safetensors": float("inf")}
    monkeypatch.setattr(loop, "read_checkpoint_info", lambda p: SimpleNamespace(metrics={"val_loss": losses[p.name]}))
    saved = {i: Path(f"step-{i:08d}.safetensors") for i in (1, 2, 3)}
    text = loop._divergence_message(float("nan"), 1.0, 4, 1, saved)
    assert ("step-00000003.safetensors already has a non-finite validation loss: step-00000001.safetensors is the "
            "last good one") in text
    assert "every checkpoint kept already has a non-finite" in loop._divergence_message(float("nan"), 1.0, 4, 1,
                                                                                       {2: saved[2], 3: saved[3]})
    assert "the last good checkpoint step-00000001.safetensors is kept" in loop._divergence_message(
        float("nan"), 1.0, 4, 1, {1: saved[1]})


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = build_config("digits", overrides=["epochs=3", "data.train_size=256"])
    model_holder = {}

    def poison(step):
        if step == 12:  # after the checkpoint of epoch 1 (8 updates per epoch)
            for p in model_holder["model"].parameters():
                p.data.fill_(float("nan"))
                break

    import landscape.trainers.loop as loop

    original = loop._create_model

    def remember(name, kwargs):
        model_holder["model"] = original(name, kwargs)
        return model_holder["model"]

    loop._create_model = remember
    try:
        with pytest.raises(LandscapeError, match=r"diverged at step 13 \(epoch 2\).*epoch-0001.safetensors is kept"):
            train(config, tmp_path / "run", progress=False, on_update=poison)
    finally:
        loop._create_model = original
    run = Run(tmp_path / "run")
    assert [i.step for i in run.checkpoints()] == [8]
    _, state = load_checkpoint(run.checkpoints()[0].path)
    assert all(torch.isfinite(t).all() for t in state.values())
    assert list(run.read_metrics()["step"]) == [8]


def test_divergence_exits_nonzero_with_one_sentence(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--lr", "1e6", "--set", "optim.opt=sgd",
                                      "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 1
    assert "Training diverged at step" in result.output and "Traceback" not in result.output


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    import safetensors.torch

    config = build_config("digits", overrides=["epochs=2", "data.train_size=256"])
    real_save = safetensors.torch.save_file
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*epoch-0001.safetensors is intact"):
        train(config, tmp_path / "run", progress=False)
    run = Run(tmp_path / "run")
    assert [i.epoch for i in run.checkpoints()] == [1]
    assert not list(run.checkpoints_dir.glob(".*"))


# -- MAE pre-training, fine-tuning from a run, the MoE loss ---------------------------------------------------------
MLIT_TINY = ["model.kwargs.patch_size=2", "model.kwargs.embed_dim=24", "model.kwargs.depth=3",
             "model.kwargs.num_heads=2", "model.kwargs.num_kv_heads=1", "model.kwargs.hidden_first=16",
             "model.kwargs.hidden_last=8", "data.train_size=256", "data.num_workers=0", "epochs=1", "batch_size=64"]


def test_mae_pretraining_then_fine_tuning_starts_from_the_encoder(tmp_path):
    pre = train(build_config("mae-pretrain", data="digits", options={"img_size": 8},
                             overrides=MLIT_TINY + ["model.kwargs.decoder_dim=16", "model.kwargs.decoder_num_heads=2"]),
                tmp_path / "mae", progress=False)
    assert pre.final["val_loss"] > 0 and pre.final["val_top1"] is None
    fine = train(build_config("digits", model="mlit_xxs", overrides=MLIT_TINY + [
        f"init={tmp_path / 'mae'}", "checkpoint.initial=true"]), tmp_path / "fine", progress=False)
    _, mae_state = load_checkpoint(pre.checkpoints[-1])
    _, start = load_checkpoint(fine.checkpoints[0])
    encoder = encoder_state_dict(mae_state)
    assert len(encoder) > 10 and "head.weight" in start and "head.weight" not in encoder
    different = [k for k in encoder if not torch.equal(encoder[k], start[k])]
    assert not different, f"weights not taken from the pre-trained encoder: {different[:5]}"
    assert fine.final["moe_aux_loss"] > 0, "an mLiT reports its load-balancing loss"


def test_init_from_another_architecture_is_refused_before_the_run_is_made(tmp_path):
    # only head.bias fitted (1 of 44 tensors) and the run trained from scratch without a word
    from conftest import TINY_VIT

    from landscape.checkpoints import save_checkpoint
    from landscape.models import create_model
    from landscape.trainers.loop import load_init_weights

    small = create_model("vit_pico_patch4_32", **{**TINY_VIT, "embed_dim": 16, "depth": 1})
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, small.state_dict(), model="vit_pico_patch4_32", model_kwargs={}, epoch=1, step=1)
    large = create_model("vit_pico_patch4_32", **{**TINY_VIT, "embed_dim": 32, "depth": 3})
    before = {k: v.clone() for k, v in large.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"Only 1 of the model's \d+ tensors \(0\.\d% of its weights\) fit"):
        load_init_weights(large, path)
    assert all(torch.equal(v, before[k]) for k, v in large.state_dict().items())
    headless = {k: v for k, v in small.state_dict().items() if not k.startswith("head.")}  # a new head: fine
    save_checkpoint(path, headless, model="vit_pico_patch4_32", model_kwargs={}, epoch=1, step=1)
    same = create_model("vit_pico_patch4_32", **{**TINY_VIT, "embed_dim": 16, "depth": 1})
    assert sorted(load_init_weights(same, path)["skipped"]) == ["head.bias", "head.weight"]


# -- data parallel ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path):
    overrides = ["epochs=2", "batch_size=64", "data.train_size=512", "model.kwargs.depth=2"]
    single = train(build_config("digits", overrides=overrides), tmp_path / "single", progress=False)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "landscape", "train", "--data", "digits", "--out", str(tmp_path / "ddp"), "--no-progress",
            "--device", "cpu"]
    for override in overrides:
        args += ["--set", override]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = Run(tmp_path / "ddp").read_metrics()
    assert list(ddp["step"]) == [r["step"] for r in single.rows]
    # Same global batches and averaged gradients: only the floating-point summation order differs.
    for column in ("train_loss", "val_loss", "ema_val_loss"):
        for a, b in zip(ddp[column], (r[column] for r in single.rows)):
            assert math.isclose(a, b, rel_tol=1e-6), (column, a, b)


def test_a_folder_of_other_files_is_named_as_such_and_left_as_it_was(tmp_path):
    # the advice was --resume or --overwrite (both refused), and each refusal left a .lock in the user's folder
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    for args in ([], ["--overwrite"]):
        result = CliRunner().invoke(cli, ["train", "--out", str(folder), "--no-progress", *args])
        assert result.exit_code == 1, result.output
        assert result.output.strip() == (f"Error: {folder} already holds files that are not a landscape run; choose "
                                          "another --out folder.")
    result = CliRunner().invoke(cli, ["train", "--resume", str(folder)])
    assert result.exit_code == 1 and "is not a run to resume" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_the_dry_run_builds_the_optimizer_and_schedule_as_the_run_will():
    # an unknown name passed the dry run; then wsd on a short run was refused for the stand-in's single update
    # per epoch; and Adan given two betas ended in timm's IndexError
    wsd = CliRunner().invoke(cli, ["train", "--data", "digits", "--epochs", "3", "--set", "schedule.sched=wsd",
                                   "--dry-run"])
    assert wsd.exit_code == 0, wsd.output
    adan = CliRunner().invoke(cli, ["train", "--data", "digits", "--set", "optim.opt=adan", "--set",
                                    "optim.betas=[0.9, 0.99]", "--dry-run"])
    assert adan.exit_code == 1 and adan.output.startswith("Error: timm refused the optimizer settings 'adan'")
    assert "leave optim.betas out" in adan.output and len(adan.output.strip().splitlines()) == 1
