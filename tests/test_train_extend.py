"""Extending a run: `landscape train --resume RUN --extend-to N` trains on to N epochs with the schedule of the new
total, records the extension, and refuses what it cannot honour in one sentence."""

import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from landscape.cli import cli
from landscape.errors import ConfigError
from landscape.runs import Run
from landscape.trainers import build_config, train

# Two updates per epoch (64 images, batches of 32) and a one-block model: a run of a few epochs takes seconds.
TINY = ["epochs=2", "data.train_size=64", "data.val_size=32", "model.kwargs.depth=1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-epoch run, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(build_config("digits", overrides=TINY), out, progress=False)
    return out


def copy_of(run, tmp_path, name="run"):
    return shutil.copytree(run, tmp_path / name)


def scheduled_lr(config: dict, epochs: int, updates_per_epoch: int, after_updates: int) -> float:
    """The learning rate timm's scheduler sets for the update after ``after_updates`` updates, for a schedule of
    ``epochs`` epochs: an independent construction of what the loop must follow."""
    from timm.scheduler import create_scheduler_v2

    optim, sched = config["optim"], config["schedule"]
    scale = config["batch_size"] / optim["lr_base_batch"] if optim.get("lr_base_batch") else 1.0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim["lr"] * scale)
    scheduler, _ = create_scheduler_v2(optimizer, sched=sched["sched"], num_epochs=epochs,
                                       warmup_epochs=sched["warmup_epochs"], warmup_lr=sched["warmup_lr"],
                                       min_lr=sched["min_lr"], step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    scheduler.step_update(after_updates)
    return optimizer.param_groups[0]["lr"]


def test_extend_trains_to_the_new_total_with_a_checkpoint_and_a_metrics_row_per_epoch(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    result = train(None, run_dir, resume=True, extend_to=4, progress=False)
    run = Run(run_dir)
    assert [info.epoch for info in run.checkpoints()] == [1, 2, 3, 4]
    metrics = run.read_metrics()
    assert metrics["epoch"].tolist() == [1, 2, 3, 4]
    assert metrics["schedule_epochs"].tolist() == [2, 2, 4, 4]
    assert [row["epoch"] for row in result.rows] == [1, 2, 3, 4]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["epochs"], config["extended_from"]) == (4, 2)
    assert config["extended_at"]  # when, as an ISO timestamp
    # the first two epochs are the finished run's, untouched
    before = Run(finished_run).read_metrics()
    assert metrics.loc[:1, ["step", "train_loss", "val_loss", "lr"]].equals(before[["step", "train_loss", "val_loss", "lr"]])


def test_first_new_epoch_follows_the_schedule_recomputed_for_the_new_total(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    rows = train(None, run_dir, resume=True, extend_to=4, progress=False).rows
    config = Run(run_dir).load_config()
    updates_per_epoch = rows[0]["step"]
    first_new = rows[2]
    assert first_new["epoch"] == 3
    # a row's lr is the rate of its last update, set after the update before it
    expected = scheduled_lr(config, 4, updates_per_epoch, first_new["step"] - 1)
    assert first_new["lr"] == pytest.approx(expected, rel=1e-12)
    assert first_new["lr"] != pytest.approx(scheduled_lr(config, 2, updates_per_epoch, first_new["step"] - 1))
    assert rows[3]["lr"] == pytest.approx(scheduled_lr(config, 4, updates_per_epoch, rows[3]["step"] - 1), rel=1e-12)


def test_extension_killed_before_its_first_save_resumes_on_the_new_schedule(finished_run, tmp_path):
    reference = train(None, copy_of(finished_run, tmp_path, "reference"), resume=True, extend_to=4,
                      progress=False).rows
    run_dir = copy_of(finished_run, tmp_path)

    def stop(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # after config.yaml says 4 epochs, before any state of the new schedule
        train(None, run_dir, resume=True, extend_to=4, progress=False, on_update=stop)
    assert Run(run_dir).load_config()["epochs"] == 4
    # the same command again continues the extension under way (it was refused: "must be more than the 4 epochs")
    rows = train(None, run_dir, resume=True, extend_to=4, progress=False).rows
    assert Run(run_dir).load_config()["extended_from"] == 2
    timing = ("wall_time", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in reference]


def test_extend_to_no_more_than_the_run_has_is_refused(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    with pytest.raises(ConfigError, match="--extend-to 2 must be more than the 2 epochs"):
        train(None, run_dir, resume=True, extend_to=2, progress=False)
    assert Run(run_dir).load_config()["epochs"] == 2
    assert Run(run_dir).load_config().get("extended_from") is None


@pytest.mark.parametrize("args, message", [
    (["--extend-to", "4"], "--extend-to raises the epochs of an existing run; give it with --resume RUN."),
    (["--epochs", "4"], "drop --epochs (for more epochs give --extend-to N)."),
    (["--extend-to", "4", "--lr", "0.1"], "drop --lr."),
    (["--extend-to", "1"], "--extend-to 1 must be more than the 2 epochs"),
])
def test_extend_refusals_are_one_sentence_and_change_nothing(finished_run, tmp_path, args, message):
    run_dir = copy_of(finished_run, tmp_path)
    resume = [] if args == ["--extend-to", "4"] else ["--resume", str(run_dir)]
    before = (run_dir / "config.yaml").read_text()
    result = CliRunner().invoke(cli, ["train", *resume, *args, "--no-progress"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert (run_dir / "config.yaml").read_text() == before


def test_a_dry_run_of_a_resume_prints_the_config_it_would_train_with_and_writes_nothing(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    extended = CliRunner().invoke(cli, ["train", "--resume", str(run_dir), "--extend-to", "4", "--dry-run"])
    assert extended.exit_code == 0, extended.output
    shown = yaml.safe_load(extended.stdout)
    assert (shown["epochs"], shown["extended_from"]) == (4, 2) and shown["extended_at"]
    plain = CliRunner().invoke(cli, ["train", "--resume", str(run_dir), "--dry-run"])
    assert plain.exit_code == 0, plain.output
    assert yaml.safe_load(plain.stdout) == yaml.safe_load((run_dir / "config.yaml").read_text())
    too_few = CliRunner().invoke(cli, ["train", "--resume", str(run_dir), "--extend-to", "2", "--dry-run"])
    assert too_few.exit_code == 1 and "--extend-to 2 must be more than the 2 epochs" in too_few.output
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before  # nothing trained
    # what the resume refuses, the dry run refuses alike (it printed a config for them)
    edited = copy_of(finished_run, tmp_path, "edited")
    (edited / "config.yaml").write_text((edited / "config.yaml").read_text().replace("seed: 0", "seed: 5"))
    stateless = copy_of(finished_run, tmp_path, "stateless")
    (stateless / "state" / "last.pt").unlink()
    for run, words in ((edited, "was changed after"), (stateless, "its training state")):
        for extend in ([], ["--extend-to", "4"]):
            refused = CliRunner().invoke(cli, ["train", "--resume", str(run), *extend, "--dry-run"])
            assert refused.exit_code == 1 and words in refused.output, refused.output


@pytest.mark.parametrize("total", ["1000001", str(2 ** 64)])
def test_a_total_no_run_can_have_is_refused_before_the_config_is_rewritten(finished_run, tmp_path, total):
    run_dir = copy_of(finished_run, tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    result = CliRunner().invoke(cli, ["train", "--resume", str(run_dir), "--extend-to", total])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: --extend-to {total}: epochs must be between 1 and 1,000,000."
    assert (run_dir / "config.yaml").read_bytes() == before
    again = CliRunner().invoke(cli, ["train", "--resume", str(run_dir)])  # the run is as it was: finished
    assert again.exit_code == 0, again.output


def test_the_extension_record_is_not_a_setting_and_an_empty_recipe_is_no_recipe(tmp_path):
    from landscape.trainers.recipes import RECIPE_DIR

    recipe = tmp_path / "extended.yaml"  # a recipe file (or a study's overrides) recorded it for a new run
    recipe.write_text((RECIPE_DIR / "digits.yaml").read_text() + "\nextended_at: 2026-01-01\n")
    for args, message in ((["--set", "extended_from=5"], "extended_from is a record --resume RUN --extend-to N "
                                                         "writes, not a setting"),
                          (["--recipe", str(recipe)], "extended_at is a record --resume RUN --extend-to N writes"),
                          (["--recipe", ""], "--recipe is empty; give a recipe name")):
        result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "run"), *args])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "run").exists()
