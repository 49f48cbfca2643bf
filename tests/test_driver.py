"""The one loop over a run's checkpoints: an analysis that says only what it measures gets planning, resuming,
force, the results file and its attrs from the driver; settings are checked once, when they are made."""

import json
import os
from pathlib import Path
from dataclasses import dataclass

import pytest
import torch
import xarray as xr
from conftest import TINY_VIT, make_tiny_run

from landscape.analyses.driver import Analysis, analyze
from landscape.analyses.results import read_results
from landscape.analyses.settings import EvaluationSettings
from landscape.errors import ConfigError, LandscapeError


@dataclass
class LossSettings(EvaluationSettings):
    """A test-only analysis's settings: the loss on the evaluation set, times ``scale``."""

    scale: float = 1.0

    def validate(self) -> None:
        if self.scale <= 0:
            raise ConfigError(f"scale must be positive, not {self.scale}.")
        self.check_evaluation()


class ScaledLoss(Analysis):
    """A new analysis in one small class: the mean cross-entropy of each checkpoint times ``scale``."""

    name = "scaled-loss"

    def __init__(self, settings, done=lambda run, info: True):
        super().__init__(settings)
        self.measured: list[str] = []
        self.done = done

    def complete(self, run, info):
        return self.done(run, info)

    def measure(self, job, info, model, callback):
        self.measured.append(info.name)
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(job.x.to(job.device, job.dtype)), job.y.to(job.device))
        return xr.Dataset({"loss": ((), float(loss) * self.settings.scale)})


@pytest.fixture
def run(tmp_path):
    return make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)


def test_a_new_analysis_gets_every_checkpoint_written_with_its_settings_in_the_attrs(run):
    analysis = ScaledLoss(LossSettings(samples=8, scale=2.0))
    ds = analyze(run, analysis, device="cpu")
    assert analysis.measured == ["epoch-0001", "epoch-0002", "epoch-0003"]
    on_disk = read_results(run.analysis_path("scaled-loss"))
    assert on_disk["step"].values.tolist() == [10, 20, 30]
    assert on_disk["loss"].values.tolist() == ds["loss"].values.tolist()
    assert on_disk.attrs["analysis"] == "scaled-loss"
    assert json.loads(on_disk.attrs["settings"])["scale"] == 2.0
    assert on_disk.attrs["parallelism"] == "single process"


def test_the_driver_resumes_measures_only_new_checkpoints_and_force_measures_again(run):
    planned = []
    first = ScaledLoss(LossSettings(samples=8))
    analyze(run, first, checkpoints="epochs:1,2", device="cpu")
    again = ScaledLoss(LossSettings(samples=8))
    ds = analyze(run, again, device="cpu", on_plan=planned.append)
    assert again.measured == ["epoch-0003"] and planned == [1]
    assert ds.sizes["checkpoint"] == 3
    forced = ScaledLoss(LossSettings(samples=8))
    analyze(run, forced, checkpoints="last", device="cpu", force=True)
    assert forced.measured == ["epoch-0003"]


def test_a_checkpoint_that_is_not_complete_is_measured_again(run):
    analyze(run, ScaledLoss(LossSettings(samples=8)), device="cpu")
    missing = ScaledLoss(LossSettings(samples=8), done=lambda run, info: info.name != "epoch-0002")
    analyze(run, missing, device="cpu")
    assert missing.measured == ["epoch-0002"]


def test_other_settings_are_refused_without_force_and_the_file_is_kept(run):
    analyze(run, ScaledLoss(LossSettings(samples=8, scale=1.0)), checkpoints="last", device="cpu")
    before = run.analysis_path("scaled-loss").read_bytes()
    with pytest.raises(LandscapeError, match="other settings"):
        analyze(run, ScaledLoss(LossSettings(samples=8, scale=3.0)), checkpoints="last", device="cpu")
    assert run.analysis_path("scaled-loss").read_bytes() == before


def test_settings_are_checked_when_they_are_made():
    with pytest.raises(ConfigError, match="scale must be positive"):
        LossSettings(scale=-1.0)
    with pytest.raises(ConfigError, match="--samples must be at least 1"):
        LossSettings(samples=0)


def test_a_shard_mode_the_analysis_does_not_have_is_one_sentence(run):
    with pytest.raises(ConfigError, match="cannot be sharded by 'grid'"):
        analyze(run, ScaledLoss(LossSettings(samples=8)), device="cpu", shard="grid")



def test_model_facts_are_built_once_per_architecture_and_follow_the_checkpoint(tmp_path, monkeypatch):
    from conftest import TINY_VIT, make_tiny_run

    import landscape.analyses.evaluation as evaluation
    import landscape.models as models

    runs = [make_tiny_run(tmp_path, "a", "vit_pico_patch4_32", TINY_VIT, 0),
            make_tiny_run(tmp_path, "b", "vit_pico_patch4_32", TINY_VIT, 1),
            make_tiny_run(tmp_path, "c", "vit_pico_patch4_32", dict(TINY_VIT, num_classes=5), 0)]
    monkeypatch.setattr(evaluation, "_MODEL_FACTS", {})
    built = []
    real = models.create_model
    monkeypatch.setattr(models, "create_model", lambda name, **kw: built.append(name) or real(name, **kw))
    first = evaluation.run_model_facts(runs[0])
    assert first == {"model_in_chans": 1, "model_img_size": 8, "model_classes": 10}
    first["model_classes"] = -1  # the caller's own copy
    assert evaluation.run_model_facts(runs[1]) == {"model_in_chans": 1, "model_img_size": 8, "model_classes": 10}
    assert evaluation.run_model_facts(runs[2])["model_classes"] == 5
    assert built == ["vit_pico_patch4_32", "vit_pico_patch4_32"]  # one per architecture


def test_an_analysis_whose_results_cannot_be_written_is_refused_before_it_measures(tmp_path, monkeypatch):
    import errno

    from conftest import TINY_VIT, make_tiny_run

    from landscape.analyses.driver import analyze
    from landscape.analyses.hessian import HessianAnalysis, HessianSettings
    from landscape.io import WriteError

    run = make_tiny_run(tmp_path, "ro", "vit_pico_patch4_32", TINY_VIT, 0)
    (run.root / "analysis").mkdir(exist_ok=True)
    measured = []
    monkeypatch.setattr(HessianAnalysis, "measure", lambda self, *a: measured.append(a) or None)

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # as on a read-only mount (chmod does not stop root)
        if flags & os.O_CREAT and Path(path).parent == run.root / "analysis":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WriteError, match="Cannot write in .*analysis.*read-only.*nothing was computed"):
        analyze(run, HessianAnalysis(HessianSettings(top_k=1, samples=8)), checkpoints="last")
    assert measured == []
    assert [p.name for p in (run.root / "analysis").iterdir()] == []
