"""A study from variants to report: the demo's definition and a tiny end-to-end study that resumes."""

import pytest

from landscape.errors import ConfigError, LandscapeError
from landscape.study import (
    AnalysisSettings,
    StudySpec,
    StudyVariant,
    demo_study,
    run_study,
)

TINY = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=4, class_token=False, global_pool="avg")


def test_demo_refuses_unknown_data_and_zero_seeds():
    with pytest.raises(ConfigError, match="digits or fashion-mnist"):
        demo_study("cifar10")
    with pytest.raises(ConfigError, match="at least one seed"):
        demo_study(seeds=0)
    spec = demo_study(seeds=2)
    assert len(spec.run_names()) == 10
    assert {v.name for v in spec.variants} == {"baseline", "grouped-g2", "shallow-sliced", "shallow-random", "mlit"}


def _tiny_spec() -> StudySpec:
    return StudySpec(
        variants=[StudyVariant("baseline", "vit_pico_patch4_32", dict(TINY)),
                  StudyVariant("grouped-g2", "vit_pico_patch4_32_grouped_mlp", dict(TINY, group_size=2))],
        seeds=[0], data="digits", recipe="digits",
        overrides={"epochs": 2, "batch_size": 128, "ema.decay": 0.9, "augment.crop": "none", "optim.lr": 3e-3,
                   "data.train_size": 256, "schedule.warmup_epochs": 0},
        analysis=AnalysisSettings(samples=16, trace_matvecs=4, density_steps=4, rhos=(0.05,), adaptive_rhos=(0.5,),
                                  sharpness_steps=1, sharpness_draws=1, surface_points=5, surface_points_2d=3),
    )


def test_a_second_study_in_a_busy_folder_is_refused_before_it_writes_anything(tmp_path):
    # it rewrote study.yaml with its own settings under the first study's results, then was refused
    from landscape.io import folder_lock

    with folder_lock(tmp_path / "study", "running a study in"):  # stands for a study in another process
        with pytest.raises(LandscapeError, match="is in use by another landscape process; wait for it to finish "
                                                 "before running a study in it"):
            run_study(_tiny_spec(), tmp_path / "study", jobs=1)
        assert not any((tmp_path / "study").iterdir())


def test_a_study_into_a_training_run_is_refused_before_it_writes_anything(tmp_path):
    # it wrote study.yaml, a report, figures and a nested runs/ into the run's folder
    from conftest import TINY_VIT, make_tiny_run

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    for out in (run.root, run.root / "analysis"):
        with pytest.raises(LandscapeError, match="(is a training run|inside the training run .*); give the study its own folder"):
            run_study(_tiny_spec(), out, jobs=1)
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before


@pytest.mark.slow
def test_tiny_study_writes_every_result_and_resumes_without_recomputing(tmp_path):
    events = []
    outcome = run_study(_tiny_spec(), tmp_path, jobs=1, on_event=events.append, formats=("png",))
    for name in ("baseline-s0", "grouped-g2-s0"):
        analysis = tmp_path / "runs" / name / "analysis"
        for result in ("hessian", "hessian-density", "sharpness", "sharpness-adaptive", "surface-random-1d",
                       "surface-random-2d", "dynamics"):
            assert (analysis / f"{result}.nc").is_file(), result
    assert {"accuracy_curves", "hessian_vs_epoch", "sharpness_vs_rho", "surface_2d", "flatness_vs_drop"} <= set(
        outcome.figures)
    text = outcome.report.read_text()
    for key in ("H1", "H2", "H3", "H4"):
        assert f"## {key}:" in text
    assert outcome.report.with_suffix(".html").is_file()

    hessian = tmp_path / "runs" / "baseline-s0" / "analysis" / "hessian.nc"
    stamp = hessian.stat().st_mtime_ns
    again = []
    run_study(_tiny_spec(), tmp_path, jobs=1, on_event=again.append, formats=("png",))
    assert [e.message for e in again if e.stage == "train"] == ["already trained"] * 2
    assert hessian.stat().st_mtime_ns == stamp
    figure = tmp_path / "figures" / "accuracy_curves.png"
    assert [e.message.endswith("(already drawn from these results)") for e in again if e.stage == "figures"] == [True]
    stamp = figure.stat().st_mtime_ns
    figure.unlink()  # one figure gone: the gallery is drawn again
    third = []
    run_study(_tiny_spec(), tmp_path, jobs=1, on_event=third.append, formats=("png",))
    assert figure.is_file() and not any("already drawn" in e.message for e in third)
    assert (tmp_path / "figures" / "hessian_vs_epoch.png").stat().st_mtime_ns > stamp
    for stage in ("hessian", "sharpness", "surface"):  # not told as if measured again
        assert [e.message.endswith("(already measured: read from the results files)")
                for e in again if e.stage == stage] == [True] * 2, stage
        assert not any(e.message.endswith("(already measured: read from the results files)")
                       for e in events if e.stage == stage), stage

    # a folder of results, its checkpoints not kept (as committed in results/): never trained again over its
    # analyses (it was wiped and retrained), its report drawn again from what it holds
    import shutil

    report = outcome.report.read_text()
    for name in ("baseline-s0", "grouped-g2-s0"):
        shutil.rmtree(tmp_path / "runs" / name / "checkpoints")
        shutil.rmtree(tmp_path / "runs" / name / "state")
    kept = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("analysis/*.nc")}
    fourth = []
    run_study(_tiny_spec(), tmp_path, jobs=1, on_event=fourth.append, formats=("png",))
    assert [e.message for e in fourth if e.stage == "train"] == ["already trained"] * 2
    assert {e.message for e in fourth if e.stage in ("hessian", "sharpness", "surface")} == {
        "checkpoints not kept: read from the results files"}
    assert {p: p.read_bytes() for p in (tmp_path / "runs").rglob("analysis/*.nc")} == kept
    assert outcome.report.read_text() == report
    with pytest.raises(LandscapeError, match="keeps its results but not its checkpoints, so --force cannot"):
        run_study(_tiny_spec(), tmp_path, jobs=1, force=True, formats=("png",))


@pytest.mark.slow
def test_study_workers_see_the_environment_of_the_moment_not_that_of_their_server_start(monkeypatch):
    import os

    from landscape.study import _process_context, _worker_pool

    context = _process_context()
    monkeypatch.setenv("LANDSCAPE_STUDY_PROBE", "now")
    with _worker_pool(context, 1) as (pool, _):
        assert pool.submit(os.getenv, "LANDSCAPE_STUDY_PROBE").result() == "now"
        assert pool.submit(os.getcwd).result() == os.getcwd()


@pytest.mark.slow
def test_an_interrupt_stops_every_process_the_study_started_even_one_the_pool_never_listed():
    # a Ctrl-C during a worker's start left a process the pool did not know of: it outlived the study and printed
    # a FileNotFoundError traceback (it could not open the removed event queue) below the study's last sentence
    import time

    from landscape.io import pid_alive
    from landscape.study import _process_context, _worker_pool

    context = _process_context()
    stray = context.Process(target=time.sleep, args=(120,))  # stands for the worker whose start was interrupted
    stray.start()
    with pytest.raises(KeyboardInterrupt):
        with _worker_pool(context, 1) as (pool, _):
            assert pool.submit(abs, -1).result() == 1
            raise KeyboardInterrupt
    stray.join(timeout=10)
    assert not pid_alive(stray.pid) or stray.exitcode is not None, "the unlisted process outlived the interrupt"


@pytest.mark.slow
def test_a_study_in_worker_processes_equals_the_same_study_in_this_process(tmp_path, monkeypatch):
    """Workers (forked from a server that imported everything once) train, analyse, read the results and draw the
    figures; they work in this process's directory (a relative --out) and see its environment as it is now."""
    import numpy as np

    from landscape.analyses.results import read_results

    from landscape.study import _process_context

    _process_context()  # the workers' server starts here, in another directory and environment
    one = run_study(_tiny_spec(), tmp_path / "one", jobs=1, formats=("png",))
    monkeypatch.chdir(tmp_path)
    two = run_study(_tiny_spec(), "two", jobs=2, formats=("png",))
    assert [p.name for p in two.runs] == [p.name for p in one.runs]
    assert list(two.figures) == list(one.figures)
    assert all(p.is_file() and p.resolve().parent == (tmp_path / "two" / "figures").resolve()
               for paths in two.figures.values() for p in paths)
    for run in ("baseline-s0", "grouped-g2-s0"):
        for name in ("hessian", "sharpness", "surface-random-2d"):
            a = read_results(tmp_path / "one" / "runs" / run / "analysis" / f"{name}.nc")
            b = read_results(tmp_path / "two" / "runs" / run / "analysis" / f"{name}.nc")
            assert sorted(a.data_vars) == sorted(b.data_vars)
            for var in a.data_vars:
                if np.issubdtype(a[var].dtype, np.number) and "seconds" not in var:
                    np.testing.assert_allclose(b[var].values, a[var].values, rtol=1e-6, err_msg=f"{run} {var}")
    assert (tmp_path / "two" / "report.md").read_text().count("## H") == 4


def test_a_run_directory_with_other_settings_is_refused(tmp_path):
    from landscape.errors import LandscapeError
    from landscape.runs import Run

    run = Run.create(tmp_path / "runs" / "baseline-s0")
    run.save_config({"model": {"name": "vit_pico_patch4_32", "kwargs": {"embed_dim": 64}}, "seed": 0, "epochs": 9})
    with pytest.raises(LandscapeError, match="other settings"):
        run_study(_tiny_spec(), tmp_path, jobs=1)


def test_a_run_trained_with_any_other_training_setting_is_refused_and_named(tmp_path):
    # a study file edited after its runs were trained (another data subset, EMA, warm-up) must not reuse them
    import copy

    from landscape.config import config_differences, to_dict
    from landscape.errors import LandscapeError
    from landscape.runs import Run
    from landscape.study import train_config

    spec = _tiny_spec()
    wanted = to_dict(train_config(spec, spec.variants[0], 0))
    trained = copy.deepcopy(wanted)
    trained["model"]["kwargs"].update(num_classes=10, in_chans=1, img_size=8)  # what training fills in
    assert config_differences(trained, wanted) == []
    older = copy.deepcopy(trained)
    del older["save_preconditioner"]  # a config written before that field existed: its default
    assert config_differences(older, wanted) == []
    for key, value in (("data", "train_size"), ("ema", "decay"), ("schedule", "warmup_epochs")):
        other = copy.deepcopy(trained)
        other[key][value] = {"train_size": 128, "decay": 0.5, "warmup_epochs": 1}[value]
        assert config_differences(other, wanted) == [f"{key}.{value} {other[key][value]}, not {wanted[key][value]}"]
    other["model"]["kwargs"]["depth"] = 3
    assert "model.kwargs.depth 3, not 2" in config_differences(other, wanted)
    assert config_differences(other, wanted, ignore=("model.kwargs.depth", "data.train_size", "ema.decay",
                                                     "schedule.warmup_epochs")) == []

    run = Run.create(tmp_path / "runs" / "baseline-s0")
    run.save_config(other)
    with pytest.raises(LandscapeError, match=r"trained with other settings than the study asks for \(model.kwargs.depth "
                                             r"3, not 2; schedule.warmup_epochs 1, not 0\); delete it"):
        run_study(spec, tmp_path, jobs=1)
    # refused before the folder's record was written: it does not describe a study its runs were not trained by
    assert not (tmp_path / "study.yaml").exists() and not (tmp_path / "environment.yaml").exists()


@pytest.mark.slow
def test_a_run_refused_in_a_worker_stops_the_study_with_one_sentence_and_no_thread_traceback(tmp_path):
    # the pool's management thread, finding its workers killed, used to print an InvalidStateError traceback
    import subprocess
    import sys

    from landscape.runs import Run

    study = _write(tmp_path, _TINY_YAML.replace("seeds: 2", "seeds: 3"))  # tasks left waiting when one fails
    Run.create(tmp_path / "out" / "runs" / "baseline-s0").save_config(
        {"model": {"name": "vit_pico_patch4_32", "kwargs": {"embed_dim": 64}}, "seed": 0, "epochs": 9})
    for _ in range(4):  # a race: it printed in 3 of 5 tries
        done = subprocess.run([sys.executable, "-m", "landscape", "study", str(study), "--out", str(tmp_path / "out"),
                               "--jobs", "2"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "trained with other settings than the study asks for" in done.stderr.strip().splitlines()[-1]


def test_a_report_says_when_runs_of_one_variant_were_trained_with_other_settings(tmp_path):
    import copy
    from types import SimpleNamespace

    from landscape.config import to_dict
    from landscape.runs import Run
    from landscape.study import train_config
    from landscape.summary import training_disagreements

    spec = _tiny_spec()
    runs = []
    for seed, train_size in ((0, 256), (1, 256), (2, 128)):
        config = copy.deepcopy(to_dict(train_config(spec, spec.variants[0], seed)))
        config["data"]["train_size"] = train_size
        run = Run.create(tmp_path / f"baseline-s{seed}")
        run.save_config(config)
        runs.append(SimpleNamespace(run=run, path=run.root, variant=SimpleNamespace(key="vit", label="ViT"), label=None))
    assert training_disagreements(runs[:2]) == []  # seeds apart, nothing else
    older = Run.create(tmp_path / "older")  # a config written before save_preconditioner existed: its default
    config = copy.deepcopy(to_dict(train_config(spec, spec.variants[0], 3)))
    del config["save_preconditioner"]
    older.save_config(config)
    first = SimpleNamespace(run=older, path=older.root, variant=SimpleNamespace(key="vit", label="ViT"), label=None)
    assert training_disagreements([first, runs[0]]) == training_disagreements([runs[0], first]) == []
    (sentence,) = training_disagreements(runs)
    assert sentence.startswith("Runs of ViT were trained with different settings: baseline-s2 has data.train_size "
                               "128, not 256 (as in baseline-s0)"), sentence


# -- study files ------------------------------------------------------------------------------------------------
_TINY_YAML = """
name: tiny
data: digits
recipe: digits
seeds: 2
templates:
  vit: &vit {embed_dim: 16, depth: 2, num_heads: 2, mlp_ratio: 2.0, patch_size: 4, class_token: false,
             global_pool: avg}
variants:
  - {name: baseline, model: vit_pico_patch4_32, kwargs: *vit}
  - {name: grouped-g2, model: vit_pico_patch4_32_grouped_mlp, kwargs: {<<: *vit, group_size: 2}}
overrides: {epochs: 2, optim.lr: 3.0e-3}
analysis: {samples: 16, at: [peak, final], rhos: [0.05]}
"""


def _write(tmp_path, text, name="study.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_study_file_gives_the_variants_seeds_overrides_and_analysis_it_declares(tmp_path):
    from landscape.study import check_study, load_study

    spec = load_study(_write(tmp_path, _TINY_YAML))
    assert spec.name == "tiny" and spec.seeds == [0, 1] and spec.data == "digits"
    assert [v.name for v in spec.variants] == ["baseline", "grouped-g2"]
    assert spec.variants[1].kwargs == dict(TINY, group_size=2)  # the YAML merge key fills the template in
    assert spec.overrides == {"epochs": 2, "optim.lr": 3e-3}
    assert spec.analysis.at == ("peak", "final") and spec.analysis.rhos == (0.05,) and spec.analysis.samples == 16
    check_study(spec)
    from landscape.study import train_config

    plain = load_study(_write(tmp_path, _TINY_YAML.replace("recipe: digits\n", ""), "plain.yaml"))
    assert plain.recipe is None  # left out: the dataset's default recipe, as `landscape train` takes (not none)
    assert train_config(plain, plain.variants[0], 0) == train_config(spec, spec.variants[0], 0)


@pytest.mark.parametrize("change, message", [
    (("vit_pico_patch4_32,", "vit_nosuch_model,"), "nosuch"),
    (("group_size: 2", "group_size: 3"), "does not divide the depth"),
    (("  - {name: baseline, model: vit_pico_patch4_32, kwargs: *vit}\n", ""), "no baseline"),
    (("seeds: 2", "seeds: 0"), "a count from 1 to 10,000"),
    (("seeds: 2", "seeds: 1180591620717411303424"), "a count from 1 to 10,000"),
    (("name: tiny", "name: ../../../tmp/x"), "the study name '../../../tmp/x' cannot name a folder under runs/"),
    (("seeds: 2", "seeds: [1, 1]"), "distinct"),
    (("name: tiny", "nmae: tiny"), "unknown keys nmae"),
    (("analysis: {samples: 16,", "analysis: {sampels: 16,"), "unknown analysis settings sampels"),
    (("at: [peak, final]", "at: [best]"), "final and peak"),
    (("rhos: [0.05]", "rhos: [-1]"), "positive radii"),
    (("name: grouped-g2", "name: baseline"), "unique"),
    (("name: grouped-g2", "name: ../escape"), "cannot name a folder"),
    (("rhos: [0.05]", "rhos: [0.05, 0.05]"), "distinct radii"),
    (("analysis: {samples: 16,", "analysis: {samples: 16, surface_points: 1,"), "at least 2 points"),
    (("analysis: {samples: 16,", "analysis: {samples: 16, tol: .nan,"), "relative accuracy"),
    (("analysis: {samples: 16,", "analysis: {samples: 16, checkpoints: 'every:0',"), "'checkpoints': Unknown checkpoint selection 'every:0'"),
    # passed the check, then failed after every run had trained (or, for a NUL, with a traceback)
    (("analysis: {samples: 16,", "analysis: {samples: 16, surface_range: abc,"), "'surface_range' must be a positive"),
    (("analysis: {samples: 16,", "analysis: {samples: 16, surface_range: .inf,"), "'surface_range' must be a positive"),
    (("analysis: {samples: 16,", "analysis: {samples: 16, surface_range: -1,"), "'surface_range' must be a positive"),
    (("rhos: [0.05]", "rhos: [.inf]"), "--rho must be positive numbers, not inf"),
    (("analysis: {samples: 16,", "analysis: {samples: 16, seed: -5,"), "--seed must be between 0 and"),
    (("analysis: {samples: 16,", "analysis: {samples: 16, seed: abc,"), "'seed' must be an integer"),
    (("analysis: {samples: 16,", "analysis: {samples: 16, device: tpu,"), "Unknown device 'tpu'"),
    (("name: grouped-g2", "name: \"a\\0b\""), "variant name 'a\\\\x00b' cannot name a folder"),
    (("name: tiny", "name: \"t\\0y\""), "the study name 't\\\\x00y' cannot name a folder"),
    (("name: grouped-g2", "name: null"), "name must be text"),
    (("overrides: {epochs: 2,", "overrides: {task: mae, epochs: 2,"), r"pre-trains masked autoencoders \(task: mae\)"),
    (("analysis: {samples: 16,", "analysis: {samples: 5000,"), r"samples \(5000\) is more than the 1437 training"),
    (("overrides: {epochs: 2,", "overrides: {data.train_size: 10, epochs: 2,"), r"samples \(16\) is more than the 10 "
                                                                              "training images of digits the runs"),
    # the overrides won over the study's own keys: two "seeds" trained with seed 7, the variants' models replaced
    (("overrides: {epochs: 2,", "overrides: {seed: 7, epochs: 2,"), "the overrides set seed, which the study sets "
                                                                     "with its own 'seeds' key"),
    (("overrides: {epochs: 2,", "overrides: {data.name: mnist, epochs: 2,"), "the overrides set data.name"),
    (("overrides: {epochs: 2,", "overrides: {data: {name: mnist}, epochs: 2,"), "the overrides set data.name"),
    (("overrides: {epochs: 2,", "overrides: {model: {name: vit_base_patch16_224}, epochs: 2,"),
     "the overrides set model.name"),
    (("overrides: {epochs: 2,", "overrides: {model.name: vit_base_patch16_224, epochs: 2,"),
     "the overrides set model.name"),
    (("recipe: digits", "recipe: 5"), "'recipe' must name a recipe"),  # a traceback
    (("recipe: digits", "recipe: ''"), "'recipe' must name a recipe"),  # trained without any recipe
    (("seeds: 2", "seeds: 2\nseeds: 3"), r"the key 'seeds' is given twice \(the second at line 6\)"),  # kept the last
    (("{name: baseline, model", "{name: baseline, name: other, model"), "the key 'name' is given twice"),
    # passed --check, then train refused them, leaving a half-made study folder
    (("patch_size: 4,", "patch_size: 16,"), "Variant 'baseline': patch_size 16 is larger than the 8x8 images"),
    (("overrides: {epochs: 2,", "overrides: {data.train_size: 100000, epochs: 2,"),
     "data.train_size 100000 is more than the 1437 training images of digits"),
    (("overrides: {epochs: 2,", "overrides: {schedule: {sched: nope}, epochs: 2,"), "Unknown scheduler 'nope'"),
    (("overrides: {epochs: 2,", "overrides: {optim.opt: nope, epochs: 2,"), "Optimizer nope not found"),
])
def test_bad_studies_are_refused_in_one_sentence_before_anything_trains(tmp_path, change, message):
    from landscape.study import check_study, load_study

    text = _TINY_YAML.replace(*change)
    assert text != _TINY_YAML
    with pytest.raises(ConfigError, match=message) as caught:
        check_study(load_study(_write(tmp_path, text)))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "runs").exists()


def test_a_section_given_as_a_mapping_in_the_overrides_changes_only_the_keys_it_names(tmp_path):
    # it replaced the whole section: data: {train_size: 64} trained a Fashion-MNIST study on digits, and
    # model: {drop_path: 0.1} made every variant vit_tiny_patch16_224
    from landscape.study import check_study, load_study, train_config

    text = _TINY_YAML.replace("overrides: {epochs: 2,", "overrides: {data: {train_size: 64}, model: {drop_path: 0.1}, "
                              "schedule: {min_lr: 1.0e-5}, epochs: 2,")
    spec = load_study(_write(tmp_path, text))
    check_study(spec)
    dotted = load_study(_write(tmp_path, _TINY_YAML.replace(
        "overrides: {epochs: 2,", "overrides: {data.train_size: 64, model.drop_path: 0.1, schedule.min_lr: 1.0e-5, "
        "epochs: 2,")))
    for variant, plain in zip(spec.variants, dotted.variants):
        config = train_config(spec, variant, 0)
        assert config == train_config(dotted, plain, 0)
        assert (config.data.name, config.data.train_size, config.model.drop_path) == ("digits", 64, 0.1)
        assert config.model.name == variant.model and config.model.kwargs


def test_study_files_that_are_not_studies_are_refused(tmp_path):
    from landscape.study import load_study

    for text, message in (("[1, 2]", "must be a mapping"), ("name: x\n  bad: [", "not valid YAML"),
                          ("name: x", "needs the key 'data'")):
        with pytest.raises(ConfigError, match=message):
            load_study(_write(tmp_path, text))
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="folder"):
        load_study(tmp_path)


def test_the_demo_is_the_shipped_study_file_and_every_shipped_study_checks():
    from landscape.study import STUDIES_DIR, check_study, load_study

    files = sorted(STUDIES_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"demo-digits", "demo-fashion-mnist"}
    for f in files:
        spec = load_study(f)
        assert spec.variants and spec.seeds
    check_study(load_study(STUDIES_DIR / "demo-digits.yaml"))
    dynamics = load_study(STUDIES_DIR / "dynamics-digits.yaml")  # the gallery's curvature-through-training figures
    check_study(dynamics)
    assert dynamics.analysis.per_block and dynamics.analysis.preconditioned and dynamics.analysis.subspace
    assert dynamics.overrides["save_preconditioner"] is True
    spec = demo_study("digits", seeds=3, epochs=5)
    assert spec.seeds == [0, 1, 2] and spec.overrides["epochs"] == 5
    assert load_study(STUDIES_DIR / "demo-digits.yaml").overrides["epochs"] == 12  # the file itself is not changed


def test_the_peak_checkpoint_is_the_epoch_of_the_best_validation_top1(tmp_path):
    from landscape.runs import Run
    from landscape.study import peak_epoch

    run = Run.create(tmp_path / "run")
    run.write_metrics([{"epoch": e, "step": 10 * e, "val_top1": top1} for e, top1 in
                       zip(range(1, 6), (50.0, 70.0, 80.0, 80.0, 75.0))])
    assert peak_epoch(run) == 3  # the first epoch reaching the maximum
    (tmp_path / "run" / "metrics.csv").write_bytes(b"\x00\xff garbage")
    assert peak_epoch(run) is None


@pytest.mark.slow
def test_landscape_study_runs_a_study_file_end_to_end_and_writes_its_record(tmp_path):
    import yaml
    from click.testing import CliRunner

    from landscape.cli import cli

    text = _TINY_YAML.replace("seeds: 2", "seeds: 1").replace(
        "analysis: {samples: 16,", "analysis: {samples: 16, trace_matvecs: 2, density_steps: 3, sharpness_steps: 1, "
        "sharpness_draws: 1, surface_points: 3, surface_points_2d: 3, adaptive_rhos: [0.5],")
    result = CliRunner().invoke(cli, ["study", str(_write(tmp_path, text)), "--out", str(tmp_path / "out"),
                                      "--jobs", "1"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    resolved = yaml.safe_load((out / "study.yaml").read_text())
    assert resolved["seeds"] == [0] and resolved["analysis"]["at"] == ["peak", "final"]
    assert (out / "report.md").is_file() and (out / "environment.yaml").is_file()
    import pandas as pd

    timings = pd.read_csv(out / "timings.csv")
    assert {"train", "hessian", "total"} <= set(timings["stage"]) and (timings["seconds"] >= 0).all()


def test_the_hessian_runs_at_the_checkpoints_of_every_n_and_at_the_peak_when_the_peak_is_not_among_them(
        tmp_path, monkeypatch):
    import torch
    import xarray as xr

    import landscape.analyses.driver as driver
    import landscape.analyses.hessian  # noqa: F401 -- imported before the patch, or it would keep the fake analyze
    from landscape.checkpoints import save_checkpoint
    from landscape.runs import Run
    from landscape.study import _hessian

    run = Run.create(tmp_path / "run")
    top1 = {e: 50.0 + e for e in range(1, 13)}
    top1[7] = 99.0  # the peak: epoch 7, which every:5 (epochs 1, 6, 11 and the last, 12) does not select
    run.write_metrics([{"epoch": e, "step": 10 * e, "val_top1": t} for e, t in top1.items()])
    for e in top1:
        save_checkpoint(run.checkpoint_path(epoch=e), {"w": torch.zeros(1)}, model="m", epoch=e, step=10 * e)
    settings = AnalysisSettings(checkpoints="every:5", at=("peak", "final"))
    assert [i.epoch for i in run.select_checkpoints(settings.checkpoints)] == [1, 6, 11, 12]
    assert settings.at_checkpoints(run) == "epochs:7,12"
    assert settings.hessian_checkpoints(run) == "steps:10,60,70,110,120"
    assert AnalysisSettings(checkpoints="last", at=("final",)).hessian_checkpoints(run) == "steps:120"

    asked = []

    def analyze(run, analysis, *, checkpoints, **options):
        asked.append(checkpoints)
        n = len(run.select_checkpoints(checkpoints))
        return xr.Dataset({"eigenvalue_largest": (("checkpoint", "k"), [[1.0]] * n), "trace": ("checkpoint", [2.0] * n)})

    monkeypatch.setattr(driver, "analyze", analyze)
    assert _hessian(run, settings, None).startswith("5 checkpoints")
    assert asked == ["steps:10,60,70,110,120", "epochs:7,12"]  # through training, then the density at peak and final
    assert AnalysisSettings().hessian_checkpoints(Run.create(tmp_path / "empty")) == "all"  # no checkpoints: unchanged


def _descendants(pid: int) -> set[int]:
    """Every living descendant of ``pid`` (from /proc)."""
    from pathlib import Path

    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_killing_a_study_ends_its_workers_so_that_running_it_again_is_not_refused(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    study = _write(tmp_path, _TINY_YAML.replace("epochs: 2", "epochs: 30"))
    command = [sys.executable, "-m", "landscape", "study", str(study), "--out", str(tmp_path / "out"), "--jobs", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out" / "runs").glob("*/checkpoints/*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _descendants(process.pid)
    assert workers, "the study started no worker"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 15
    while workers & _descendants(1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers & _descendants(1), "workers outlived the study"
    from landscape.io import RunLock

    for run in (tmp_path / "out" / "runs").iterdir():  # what running the study again takes first
        RunLock(run).release()


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_a_study_and_its_workers_at_once_with_one_sentence(tmp_path):
    import os
    import pty
    import signal
    import subprocess
    import sys
    import time

    study = _write(tmp_path, _TINY_YAML.replace("epochs: 2", "epochs: 30"))
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "landscape", "study", str(study), "--out", str(tmp_path / "out"), "--jobs", "2"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's foreground job
    os.close(slave)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out" / "runs").glob("*/checkpoints/*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _descendants(process.pid)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    assert process.wait(timeout=30) == 130
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    text = output.decode(errors="replace")
    assert "Traceback" not in text and "Warning" not in text, text
    assert text.strip().splitlines()[-1].startswith("Interrupted: everything saved before stays as it was")
    deadline = time.monotonic() + 15
    while workers & _descendants(1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers & _descendants(1)


def test_a_study_shipped_with_landscape_is_named_without_its_folder(tmp_path, monkeypatch):
    from landscape.errors import ConfigError
    from landscape.study import STUDIES_DIR, load_study

    monkeypatch.chdir(tmp_path)  # not the repository: the file is found in the package
    assert load_study("dynamics-digits").name == load_study(STUDIES_DIR / "dynamics-digits.yaml").name
    assert load_study("demo-digits.yaml").variants
    with pytest.raises(ConfigError, match="named without a folder: demo-digits, demo-fashion-mnist, dynamics-digits"):
        load_study("nosuch")


def test_a_study_over_results_of_other_analysis_settings_is_refused_before_its_record_changes(tmp_path):
    # each analysis refused only when its turn came, after study.yaml had been rewritten to the refused settings
    import dataclasses

    from landscape.study import _write_yaml, resolved_study

    spec = _tiny_spec()
    measured = dataclasses.replace(spec, analysis=dataclasses.replace(spec.analysis,
                                                                     samples=spec.analysis.samples + 8))
    _write_yaml(tmp_path / "study.yaml", resolved_study(measured))
    before = (tmp_path / "study.yaml").read_text()
    _, _, name = next(iter(spec.run_names()))
    (tmp_path / "runs" / name / "analysis").mkdir(parents=True)
    (tmp_path / "runs" / name / "analysis" / "hessian.nc").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"other analysis settings \(samples \d+ there vs \d+ now\).*--force"):
        run_study(spec, tmp_path, jobs=1, formats=("png",))
    assert (tmp_path / "study.yaml").read_text() == before
    where = dataclasses.replace(measured, analysis=dataclasses.replace(measured.analysis, at=("peak", "final")))
    from landscape.study import _check_existing_analysis

    _check_existing_analysis(tmp_path, where, run_dirs=[tmp_path / "runs" / name])  # where to measure: allowed


def test_study_files_that_are_pipes_devices_or_huge_are_refused_at_once(tmp_path):
    import os

    from landscape.study import MAX_STUDY_BYTES, load_study

    os.mkfifo(tmp_path / "pipe.yaml")  # read, it would block with no word
    with pytest.raises(ConfigError, match="is a named pipe"):
        load_study(tmp_path / "pipe.yaml")
    with pytest.raises(ConfigError, match="is a device"):
        load_study("/dev/zero")  # read, it fills the memory
    (tmp_path / "big.yaml").write_text("#" * (MAX_STUDY_BYTES + 1))
    with pytest.raises(ConfigError, match="a study file is a few kilobytes"):
        load_study(tmp_path / "big.yaml")


def test_a_warm_up_longer_than_the_study_runs_is_noted_as_train_notes_it(tmp_path):
    from click.testing import CliRunner

    from landscape.cli import cli

    long = _write(tmp_path, _TINY_YAML.replace("{epochs: 2,", "{epochs: 2, schedule.warmup_epochs: 5,"))
    result = CliRunner().invoke(cli, ["study", str(long), "--check"])
    assert result.exit_code == 0, result.output
    assert "Note: in every run, the warm-up (5 epochs) is longer than the run (2)" in result.output
    plain = CliRunner().invoke(cli, ["study", str(_write(tmp_path, _TINY_YAML, "plain.yaml")), "--check"])
    assert plain.exit_code == 0 and "warm-up" not in plain.output


def test_a_study_for_a_gpu_checks_on_a_machine_without_one_and_its_run_is_refused_before_anything_is_written(
        tmp_path):
    import torch
    from click.testing import CliRunner

    from landscape.cli import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = _write(tmp_path, _TINY_YAML.replace("analysis: {samples: 16,", "analysis: {samples: 16, device: cuda,"))
    checked = CliRunner().invoke(cli, ["study", str(path), "--check"])  # it refused: a file checked on a laptop
    assert checked.exit_code == 0 and "fine." in checked.output, checked.output
    assert "Note: the study's analyses run on device 'cuda', which this machine cannot (no CUDA GPU is visible)" \
        in checked.output
    out = tmp_path / "out"
    run = CliRunner().invoke(cli, ["study", str(path), "--out", str(out)])
    assert run.exit_code == 1 and "The study's analyses run on device 'cuda' (its analysis setting device), and " \
        "this machine cannot" in run.output, run.output
    assert not out.exists()
    typo = _write(tmp_path, _TINY_YAML.replace("analysis: {samples: 16,", "analysis: {samples: 16, device: cdua,"))
    refused = CliRunner().invoke(cli, ["study", str(typo), "--check"])  # a name no machine has is still refused
    assert refused.exit_code == 1 and "Unknown device 'cdua'" in refused.output
