import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from landscape.report import (
    compare_estimates,
    drop_floor_columns,
    evaluate_hypotheses,
    format_estimate,
    hypothesis_h1,
    hypothesis_h2,
)
from landscape.analyses.dynamics import run_dynamics
from landscape.statistics import combine_seeds, drop_noise_floor
from landscape.summary import Measure


SHAPE = Measure("curv", "curvature", "nats", reparameterisation=True, size_dependent=False)
SIZE = Measure("tr", "trace", "nats", reparameterisation=True, size_dependent=True)
ADAPTIVE = Measure("adapt", "adaptive sharpness", "nats", reparameterisation=False, size_dependent=False)
MEASURES = [SHAPE, SIZE, ADAPTIVE]


def _rows(variant, family, values, *, params=1000, group_size=None, mlp_init=None, se=0.0, drops=None, base="vit",
          adaptive=None):
    labels = {"baseline": "ViT baseline", "grouped": f"GroupedMLP g={group_size}", "shallow": f"ShallowMLP {mlp_init}"}
    adaptive = values if adaptive is None else adaptive
    return [{"variant": variant, "label": labels[family], "family": family, "base": base, "seed": i,
             "params": params, "group_size": group_size if family != "baseline" else 1, "mlp_init": mlp_init,
             "width_ratio": 0.5 if family == "shallow" else None, "curv": v, "curv_se": se,
             "tr": v * params, "tr_se": 0.0, "adapt": adaptive[i] / 10, "adapt_se": 0.0,
             "drop": (drops or [math.nan] * len(values))[i]}
            for i, v in enumerate(values)]


def _table(baseline, grouped, sliced=(), random=(), grouped4=(), adaptive=None):
    """Rows of each variant; ``adaptive`` maps "baseline"/"grouped" to their adaptive sharpness (x10) when it is
    not to follow the curvature."""
    adaptive = adaptive or {}
    rows = _rows("vit", "baseline", baseline, params=1000, adaptive=adaptive.get("baseline"))
    rows += _rows("vit_grouped[g=2]", "grouped", grouped, params=700, group_size=2, adaptive=adaptive.get("grouped"))
    if grouped4:
        rows += _rows("vit_grouped[g=4]", "grouped", grouped4, params=550, group_size=4)
    if sliced:
        rows += _rows("vit_shallow[sliced]", "shallow", sliced, params=700, mlp_init="sliced")
    if random:
        rows += _rows("vit_shallow[random]", "shallow", random, params=700, mlp_init="random")
    return pd.DataFrame(rows)


def _verdicts(table):
    return {h.key: h.verdict for h in evaluate_hypotheses(table, MEASURES)}


def test_welch_interval_decides_the_outcome_of_a_comparison():
    a, b = combine_seeds([1.0, 1.2, 1.1]), combine_seeds([3.0, 3.2, 3.1])
    assert compare_estimates("m", a, b, predicted="lower").outcome == "as predicted"
    assert compare_estimates("m", b, a, predicted="lower").outcome == "opposite"
    # |d| = 4.3 standard errors: a normal z would call it, Welch's t at 2 degrees of freedom (t = 4.30) does not
    wide = combine_seeds([0.0, 2.0])
    narrow = combine_seeds([3.0, 3.0 + 1e-9])
    c = compare_estimates("m", wide, narrow)
    assert c.difference.df == pytest.approx(1.0, rel=1e-6)
    assert abs(c.difference.difference) / c.difference.se > 2.0 and c.outcome == "within noise"
    assert compare_estimates("m", combine_seeds([1.0]), b).outcome == "no call"


def test_clearly_flatter_reduced_variants_support_h1_h3_and_h4():
    table = _table(baseline=[10.0, 10.4, 10.2], grouped=[5.0, 5.2, 5.1], sliced=[4.0, 4.1, 4.2],
                   random=[8.0, 8.3, 8.1], grouped4=[2.0, 2.1, 2.05])
    verdicts = _verdicts(table)
    assert verdicts["H1"] == verdicts["H3"] == verdicts["H4"] == "supported"


def test_clearly_sharper_reduced_variants_contradict_h1_h3_and_h4():
    table = _table(baseline=[2.0, 2.1, 2.05], grouped=[6.0, 6.2, 6.1], sliced=[9.0, 9.2, 9.1],
                   random=[4.0, 4.1, 4.05])
    verdicts = _verdicts(table)
    assert verdicts["H1"] == verdicts["H3"] == verdicts["H4"] == "contradicted"


def test_overlapping_seeds_are_inconclusive():
    table = _table(baseline=[4.0, 8.0, 6.0], grouped=[5.0, 7.5, 6.5], sliced=[3.0, 8.0, 5.0], random=[5.5, 6.0, 5.0])
    verdicts = _verdicts(table)
    assert verdicts == {"H1": "inconclusive", "H2": "inconclusive", "H3": "inconclusive", "H4": "inconclusive"}


def test_only_the_reparameterisation_invariant_measure_decides():
    # curvature says much flatter; the adaptive sharpness overlaps: not supported, and the reason says how the
    # other measures lean
    table = _table(baseline=[10.0, 10.4, 10.2], grouped=[5.0, 5.2, 5.1],
                   adaptive={"baseline": [4.0, 8.0, 6.0], "grouped": [5.0, 7.5, 6.5]})
    h1 = hypothesis_h1(table, MEASURES)
    (_, evidence, verdict), = h1.comparisons
    by_measure = {c.measure: c for c in evidence}
    assert by_measure["curv"].outcome == "as predicted" and by_measure["adapt"].outcome == "within noise"
    assert verdict == "inconclusive"
    assert "others: 1 of 1 as predicted" in h1.reason


def test_an_opposite_measure_holds_a_supported_verdict_back():
    table = _table(baseline=[2.0, 2.1, 2.05], grouped=[6.0, 6.2, 6.1],
                   adaptive={"baseline": [10.0, 10.4, 10.2], "grouped": [5.0, 5.2, 5.1]})
    (_, evidence, verdict), = hypothesis_h1(table, MEASURES).comparisons
    assert {c.measure: c.outcome for c in evidence if c.votes} == {"curv": "opposite", "adapt": "as predicted"}
    assert verdict == "inconclusive"


def test_every_verdict_shows_the_deciding_effect_sizes():
    table = _table(baseline=[10.0, 10.4, 10.2], grouped=[5.0, 5.2, 5.1])
    h1 = hypothesis_h1(table, MEASURES)
    (_, evidence, _), = h1.comparisons
    adapt = next(c for c in evidence if c.measure == "adapt").difference
    assert adapt.low < adapt.difference < adapt.high < 0 and adapt.g_low < adapt.g < adapt.g_high
    assert "adapt: Δ = " in h1.reason and ", g = " in h1.reason and "as predicted" in h1.reason


def test_a_size_dependent_measure_does_not_vote_between_sizes():
    # The trace column is curvature x params: smaller models look flatter by it alone. Curvature is equal,
    # so H1 must not be supported on the strength of the trace.
    table = _table(baseline=[5.0, 5.0001, 5.0002], grouped=[5.0, 5.0001, 5.0002])
    h1 = evaluate_hypotheses(table, MEASURES)[0]
    (_, evidence, verdict), = h1.comparisons
    by_measure = {c.measure: c for c in evidence}
    assert by_measure["tr"].outcome == "as predicted" and not by_measure["tr"].votes
    assert by_measure["curv"].votes
    assert verdict == "inconclusive"


def test_no_planted_difference_is_rarely_called_supported():
    # 300 simulated studies of 3 seeds with no difference between baseline and GroupedMLP in any measure
    rng = np.random.default_rng(12)
    supported = 0
    for _ in range(300):
        base, grouped = rng.normal(10, 1, 3), rng.normal(10, 1, 3)
        table = _table(baseline=list(base), grouped=list(grouped),
                       adaptive={"baseline": list(base + rng.normal(0, 1, 3)),
                                 "grouped": list(grouped + rng.normal(0, 1, 3))})
        supported += hypothesis_h1(table, MEASURES).verdict == "supported"
    assert supported / 300 <= 0.05


def _h2_table(curv, drop, variants, adapt=None):
    base = {"label": "v", "family": "baseline", "base": "vit", "group_size": 1, "mlp_init": None,
            "width_ratio": None, "params": 1000, "curv_se": 0.0, "tr_se": 0.0, "adapt_se": 0.0}
    adapt = curv if adapt is None else adapt
    return pd.DataFrame([{**base, "variant": v, "seed": i, "curv": c, "tr": c, "adapt": a, "drop": d}
                         for i, (c, a, d, v) in enumerate(zip(curv, adapt, drop, variants))])


def test_h2_follows_the_sign_of_the_rank_correlation_across_and_within_variants():
    rng = np.random.default_rng(0)
    curv = np.linspace(1, 10, 12)
    variants = np.repeat(["a", "b", "c"], 4)
    table = _h2_table(curv, curv + rng.normal(0, 0.1, 12), variants)
    h2 = hypothesis_h2(table, MEASURES)
    assert h2.verdict == "supported"
    assert all(c.within is not None and c.within.outcome == "as predicted" for c in h2.correlations)
    table["drop"] = -table["drop"]
    assert hypothesis_h2(table, MEASURES).verdict == "contradicted"


def test_h2_across_runs_alone_is_not_enough_when_the_variant_drives_both():
    # three variants, each sharper and dropping more than the last, but within a variant no relation at all
    rng = np.random.default_rng(1)
    variants = np.repeat(["a", "b", "c"], 5)
    level = np.repeat([1.0, 5.0, 9.0], 5)
    table = _h2_table(level + rng.normal(0, 0.3, 15), level + rng.normal(0, 0.3, 15), variants)
    h2 = hypothesis_h2(table, MEASURES)
    adapt = next(c for c in h2.correlations if c.measure == "adapt")
    assert adapt.outcome == "as predicted" and adapt.within.outcome == "within noise"
    assert h2.verdict == "inconclusive"
    assert "Across runs supported" in h2.reason and "within variants inconclusive" in h2.reason


def test_h2_is_not_judged_when_every_drop_is_inside_its_noise_floor():
    curv = np.linspace(1, 10, 12)
    table = _h2_table(curv, curv, np.repeat(["a", "b", "c"], 4))
    table["val_size"], table["drop_threshold"], table["drop_above"] = 10000, 20.0, False
    h2 = hypothesis_h2(table, MEASURES)
    assert h2.verdict == "inconclusive" and h2.reason.startswith("Not judged: no run's drop rises above")
    assert "0 of 12 runs" in h2.reason


def test_missing_comparisons_are_inconclusive_and_say_why():
    table = pd.DataFrame(_rows("vit", "baseline", [1.0, 2.0]))
    for h in evaluate_hypotheses(table, [SHAPE]):
        assert h.verdict == "inconclusive"
        assert h.reason.startswith("Not tested") or "n = " in h.reason or "no invariant measure" in h.reason


def test_estimates_are_printed_to_the_precision_of_their_error():
    assert format_estimate(1.23456, 0.0123) == "1.235 ± 0.012"
    assert format_estimate(123.4, 25.0) == "123 ± 25"
    assert format_estimate(float("nan"), 1.0) == "–"
    assert format_estimate(0.000526, 3e-5) == "(5.26 ± 0.30) × 10⁻⁴"  # one power of ten, not "0.000526 ± 3e-05"
    assert format_estimate(-0.000426, 0.011) == "0.000 ± 0.011"  # no negative zero
    assert format_estimate(0.000999, 1e-4) == "(1.00 ± 0.10) × 10⁻³"  # a mantissa rounding to 10 moves the power
    assert format_estimate(0.0997, 1.4e-7) == "0.0997 ± 1.4e-07"  # an error below the fourth digit, as it is
    assert format_estimate(2.5e6, 1.2e5) == "(2.50 ± 0.12) × 10⁶"
    from landscape.report import _number

    assert _number(0.001004) == "+0.00100" and _number(-0.00022) == "-0.000220" and _number(114.2) == "+114"
    assert _number(-0.0) == "0"


VARIANTS = [
    ("baseline", "vit_pico_patch4_32", {}),
    ("grouped", "vit_pico_patch4_32_grouped_mlp", {"group_size": 2}),
    ("sliced", "vit_pico_patch4_32_shallow_mlp", {"width_ratio": 0.5, "mlp_init": "sliced"}),
    ("random", "vit_pico_patch4_32_shallow_mlp", {"width_ratio": 0.5, "mlp_init": "random"}),
]
EPOCHS = np.arange(1, 6)


def _hand_made_run(root, name, model, kwargs, seed, scale, *, analyses=True):
    """A run on digits whose top-1 falls by about ``scale`` points in its last epoch and whose final checkpoint
    is sharper by ``scale`` (times 1 + 0.02 seed, so that seeds differ) by every measure."""
    import json

    import xarray as xr

    from landscape.runs import Run

    run = Run.create(root / f"{name}-s{seed}")
    run.save_config({"model": {"name": model, "kwargs": {"embed_dim": 16, **kwargs}}, "data": {"name": "digits"},
                     "seed": seed})
    rng = np.random.default_rng(seed + 10 * len(name))
    run.write_metrics([{"epoch": int(e), "step": int(10 * e), "train_loss": float(np.exp(-e / 2)),
                        "val_loss": float(np.exp(-e / 2) + 0.05 * e * scale),
                        "val_top1": float(90 - 60 * np.exp(-e) - scale * (e == EPOCHS[-1]) + rng.normal(0, 0.2))}
                       for e in EPOCHS])
    if not analyses:
        return run
    final = {"checkpoint": ["epoch-0005"], "epoch": ("checkpoint", [5.0]), "step": ("checkpoint", [50])}
    value = scale * (1 + 0.02 * seed)
    rho = np.array([0.05, 0.5])
    files = {
        "hessian": (xr.Dataset({"eigenvalue_largest": (("checkpoint", "k"), [[10.0 * value]])},
                               coords={**final, "k": [1]}), {"top_k": 1}),
        "sharpness": (xr.Dataset({"worst_case": (("checkpoint", "rho"), [value * rho**2])},
                                 coords={**final, "rho": rho}), {"adaptive": False}),
        "sharpness-adaptive": (xr.Dataset({"worst_case": (("checkpoint", "rho"), [3 * value * rho**2])},
                                          coords={**final, "rho": rho}), {"adaptive": True}),
    }
    for file, (ds, settings) in files.items():
        kind = file.split("-")[0]
        ds.attrs.update(analysis=kind, settings=json.dumps({"weights": "raw", **settings}))
        path = run.analysis_path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.to_netcdf(path, engine="h5netcdf")
    return run


def test_report_command_writes_markdown_and_html_with_every_hypothesis(tmp_path):
    from click.testing import CliRunner

    from landscape.cli import cli

    runs = [str(_hand_made_run(tmp_path / "runs", name, model, kwargs, seed, 1.0 + i).root)
            for i, (name, model, kwargs) in enumerate(VARIANTS) for seed in (0, 1, 2)]
    out = tmp_path / "report.md"
    result = CliRunner().invoke(cli, ["report", *runs, "--out", str(out), "--html", "--no-figures"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for key in ("H1", "H2", "H3", "H4"):
        assert f"## {key}:" in text
    # the hand-made runs grow sharper from baseline to ShallowMLP random, by every measure and clearly
    assert "| **H1** Reduced capacity gives flatter minima | **contradicted** |" in text
    assert "| **H3** Sliced initialisation gives flatter minima than random | **supported** |" in text
    assert "changes under reparameterisation" in text
    # effect sizes beside the verdicts, the stated rule, and each drop against its floor on the 360 digits images
    assert "95% Welch interval of Δ" in text and "Hedges' g [95%]" in text and ", g = " in text
    assert "The measures that stay unchanged under reparameterisations" in text
    assert "drops above noise floor" in text and "360 validation images" in text
    assert "within variants r_w" in text
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_a_partial_study_names_what_each_run_lacks_and_each_row_its_count(tmp_path):
    # a run without its Hessian, or with NaN losses, was left out of rows without a word, under "(n=3)" headings
    from click.testing import CliRunner

    from landscape.cli import cli
    from landscape.runs import Run

    runs = [_hand_made_run(tmp_path / "runs", name, model, kwargs, seed, 1.0 + i)
            for i, (name, model, kwargs) in enumerate(VARIANTS[:2]) for seed in (0, 1, 2)]
    runs[1].analysis_path("hessian").unlink()
    rows = Run(runs[2].root).read_metrics().to_dict("records")
    rows[-1]["val_loss"] = float("nan")
    Run(runs[2].root).write_metrics(rows)
    out = tmp_path / "report.md"
    result = CliRunner().invoke(cli, ["report", *[str(r.root) for r in runs], "--out", str(out), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert f"{runs[1].root.name} has no Hessian results (5 of 6 runs do)" in result.output
    assert f"{runs[2].root.name}'s training or validation loss is not finite" in result.output
    text = out.read_text()
    assert "(n per row)" in text and "(n=2)" in text and "(n=3)" in text


def test_drop_floor_columns_read_the_validation_size_and_the_epochs_of_each_run(tmp_path):
    name, model, kwargs = VARIANTS[0]
    results = []
    for seed, scale in ((0, 0.0), (1, 9.0)):
        run = _hand_made_run(tmp_path, name, model, kwargs, seed, scale, analyses=False)
        results.append(SimpleNamespace(path=run.root, run=run, dynamics=run_dynamics(run)))
    table = drop_floor_columns(pd.DataFrame({"run": [str(r.path) for r in results], "seed": [0, 1]}), results)
    for r, (_, row) in zip(results, table.iterrows()):
        ds = r.dynamics
        expected = drop_noise_floor(float(ds["peak_top1"].sel(weights="raw")),
                                    float(ds["final_top1"].sel(weights="raw")), 360, ds.sizes["epoch"])
        assert row["val_size"] == 360
        assert row["drop_threshold"] == pytest.approx(expected.threshold, rel=1e-12)
        assert row["drop_above"] == expected.above
    # a final epoch 9 points below the peak is far above the floor on 360 images (about 3 points); none is not
    assert list(table["drop_above"]) == [False, True]


def test_dynamics_command_writes_dynamics_nc_and_the_seed_summary(tmp_path):
    from click.testing import CliRunner

    from landscape.cli import cli

    name, model, kwargs = VARIANTS[0]
    runs = [str(_hand_made_run(tmp_path, name, model, kwargs, seed, 1.0, analyses=False).root) for seed in (0, 1)]
    result = CliRunner().invoke(cli, ["analyze", "dynamics", *runs])
    assert result.exit_code == 0, result.output
    assert "across seeds" in result.output and "peak_to_final_drop" in result.output
    assert all((tmp_path / f"{name}-s{seed}" / "analysis" / "dynamics.nc").is_file() for seed in (0, 1))


def test_adaptive_sharpness_from_the_cli_is_labelled_adaptive_in_the_report_whatever_its_file_is_called(tmp_path):
    """``analyze sharpness --adaptive`` then ``report`` on a tiny real run: the numbers are called adaptive, read
    from the file's attrs, even after the file is renamed to the plain name."""
    from click.testing import CliRunner
    from conftest import TINY_VIT, make_tiny_run

    from landscape.cli import cli

    def landscape(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", TINY_VIT, 0)
    landscape("analyze", "sharpness", run.root, "--adaptive", "--rho", "0.5", "--steps", "1", "--draws", "1",
              "--samples", "16", "--checkpoints", "last", "--device", "cpu")
    (run.analysis_dir / "sharpness-adaptive.nc").rename(run.analysis_dir / "sharpness.nc")
    landscape("report", run.root, "--out", tmp_path / "report.md", "--no-figures")
    text = (tmp_path / "report.md").read_text()
    assert "adaptive worst-case sharpness, ρ = 0.5" in text
    assert "worst-case sharpness (SAM)" not in text
    assert "`analysis/sharpness.nc`: adaptive sharpness" in text
