"""Scalars to TensorBoard: the event files in the run directory hold the numbers of metrics.csv and analysis/."""

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tensorboard")

from landscape.cli import cli  # noqa: E402
from landscape.runs import Run  # noqa: E402


def read_events(folder):
    """``{tag: {step: value}}`` of every event file in ``folder``, read back as TensorBoard reads them."""
    from tensorboard.backend.event_processing import event_accumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("logging") / "run"
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--epochs", "2", "--out", str(out), "--no-progress",
                                      "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    return Run.open(out)


def test_training_event_files_hold_the_numbers_of_metrics_csv(trained):
    events = read_events(trained.root)
    table = trained.read_metrics()
    numeric = [c for c in table.columns if c not in ("epoch", "step") and np.issubdtype(table[c].dtype, np.number)]
    assert "train_loss" in numeric and "val_top1" in numeric
    compared = 0
    for column in numeric:
        for step, value in zip(table["step"], table[column]):
            if np.isfinite(value):
                assert events[f"train/{column}"][int(step)] == pytest.approx(float(value), rel=1e-6), column
                compared += 1
    assert compared >= 2 * len(table)  # every row, several columns each


def test_analysis_event_files_hold_the_results_of_each_checkpoint(trained):
    result = CliRunner().invoke(cli, ["analyze", "sharpness", str(trained.root), "--samples", "16", "--rho", "0.05,0.1",
                                      "--steps", "2", "--draws", "0", "--checkpoints", "last", "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    from landscape.summary import load_run

    ds = next(r.dataset for r in load_run(trained.root).results if r.kind == "sharpness")
    events = read_events(trained.root)
    step = int(ds["step"].values[-1])
    worst = ds["worst_case"].isel(checkpoint=-1).values
    sharpness_tags = [t for t in events if t.startswith("sharpness") and t.endswith("/worst_case/rho0.05")]
    assert len(sharpness_tags) == 1
    assert events[sharpness_tags[0]][step] == pytest.approx(float(worst[0]), rel=1e-6)
    name = sharpness_tags[0].split("/")[0]
    assert events[f"{name}/worst_case/rho0.1"][step] == pytest.approx(float(worst[1]), rel=1e-6)
    assert events[f"{name}/loss"][step] == pytest.approx(float(ds["loss"].isel(checkpoint=-1)), rel=1e-6)


def test_wandb_without_the_package_is_one_sentence(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = CliRunner().invoke(cli, ["train", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "run"),
                                      "--log", "wandb"])
    assert result.exit_code == 1
    assert "needs the wandb package" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was made
