"""A study from variants to report: what a run is, the surface width, and a tiny end-to-end study that resumes."""

import numpy as np
import pytest

from landscape.errors import ConfigError
from landscape.study import (
    AnalysisSettings,
    StudySpec,
    StudyVariant,
    demo_study,
    describe_variant,
    run_study,
    surface_width,
)

TINY = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=4, class_token=False, global_pool="avg")


def test_variants_are_recognised_from_the_model_name_and_knobs():
    base = describe_variant({"model": {"name": "vit_pico_patch4_32", "kwargs": dict(TINY)}})
    grouped = describe_variant({"model": {"name": "vit_pico_patch4_32_grouped_mlp",
                                          "kwargs": dict(TINY, group_size=3)}})
    random = describe_variant({"model": {"name": "vit_pico_patch4_32_shallow_mlp",
                                         "kwargs": dict(TINY, mlp_init="random")}})
    mlit = describe_variant({"model": {"name": "mlit_xxs", "kwargs": {}}})
    assert (base.family, base.group_size, base.label) == ("baseline", 1, "ViT baseline")
    assert (grouped.family, grouped.group_size, grouped.label) == ("grouped", 3, "GroupedMLP g=3")
    assert (random.family, random.mlp_init, random.width_ratio) == ("shallow", "random", 0.5)
    assert mlit.family == "mlit"
    # a variant is compared with the baseline of the same architecture only
    assert base.base == grouped.base == random.base
    other_size = describe_variant({"model": {"name": "vit_pico_patch4_32", "kwargs": dict(TINY, embed_dim=32)}})
    assert other_size.base != base.base


def test_surface_width_of_a_parabola_is_exact():
    a = np.linspace(-1, 1, 41)
    # loss = 4 a^2 rises by 0.1 at |a| = sqrt(0.025); the grid is linear between points, so compare to the chord
    width = surface_width(a, 4 * a**2, rise=0.1)
    assert width == pytest.approx(2 * np.sqrt(0.025), abs=0.01)
    assert surface_width(a, 1e-3 * a**2, rise=0.1) == 2.0  # never rises enough: the whole grid
    asymmetric = np.where(a > 0, 10 * a, 0.0)  # rises only to the right, at a = 0.01
    assert surface_width(a, asymmetric, rise=0.1) == pytest.approx(1.01)


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


def test_a_run_directory_with_other_settings_is_refused(tmp_path):
    from landscape.errors import LandscapeError
    from landscape.runs import Run

    run = Run.create(tmp_path / "runs" / "baseline-s0")
    run.save_config({"model": {"name": "vit_pico_patch4_32", "kwargs": {"embed_dim": 64}}, "seed": 0, "epochs": 9})
    with pytest.raises(LandscapeError, match="other settings"):
        run_study(_tiny_spec(), tmp_path, jobs=1)
