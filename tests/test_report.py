import math

import numpy as np
import pandas as pd
import pytest

from landscape.report import (
    combine_seeds,
    compare_estimates,
    evaluate_hypotheses,
    format_estimate,
    majority_verdict,
    rank_correlation,
)
from landscape.summary import Measure

SHAPE = Measure("curv", "curvature", "nats", reparameterisation=True, size_dependent=False)
SIZE = Measure("tr", "trace", "nats", reparameterisation=True, size_dependent=True)


def _rows(variant, family, values, *, params=1000, group_size=None, mlp_init=None, se=0.0, drops=None, base="vit"):
    labels = {"baseline": "ViT baseline", "grouped": f"GroupedMLP g={group_size}", "shallow": f"ShallowMLP {mlp_init}"}
    return [{"variant": variant, "label": labels[family], "family": family, "base": base, "seed": i,
             "params": params, "group_size": group_size if family != "baseline" else 1, "mlp_init": mlp_init,
             "width_ratio": 0.5 if family == "shallow" else None, "curv": v, "curv_se": se,
             "tr": v * params, "tr_se": 0.0, "drop": (drops or [math.nan] * len(values))[i]}
            for i, v in enumerate(values)]


def _table(baseline, grouped, sliced=(), random=(), grouped4=()):
    rows = _rows("vit", "baseline", baseline, params=1000)
    rows += _rows("vit_grouped[g=2]", "grouped", grouped, params=700, group_size=2)
    if grouped4:
        rows += _rows("vit_grouped[g=4]", "grouped", grouped4, params=550, group_size=4)
    if sliced:
        rows += _rows("vit_shallow[sliced]", "shallow", sliced, params=700, mlp_init="sliced")
    if random:
        rows += _rows("vit_shallow[random]", "shallow", random, params=700, mlp_init="random")
    return pd.DataFrame(rows)


def _verdicts(table):
    return {h.key: h.verdict for h in evaluate_hypotheses(table, [SHAPE, SIZE])}


def test_combined_standard_error_adds_seed_spread_and_estimator_error():
    est = combine_seeds([1.0, 3.0], [0.3, 0.4])
    assert est.mean == 2.0 and est.n == 2
    assert est.se == pytest.approx(math.sqrt(np.var([1, 3], ddof=1) / 2 + (0.09 + 0.16) / 4))
    one = combine_seeds([5.0], [0.5])
    assert one.se == 0.5 and math.isnan(one.sd)


def test_two_standard_errors_decide_the_outcome_of_a_comparison():
    a, b = combine_seeds([1.0, 1.2]), combine_seeds([3.0, 3.2])  # se 0.1 each: difference -2, combined se 0.14
    assert compare_estimates("m", a, b, predicted="lower").outcome == "as predicted"
    assert compare_estimates("m", b, a, predicted="lower").outcome == "opposite"
    close = combine_seeds([2.9, 3.3])
    assert compare_estimates("m", close, b).outcome == "within noise"
    assert compare_estimates("m", combine_seeds([1.0]), b).outcome == "no call"


def test_majority_rule():
    assert majority_verdict(["as predicted", "as predicted", "opposite"]) == "supported"
    assert majority_verdict(["opposite", "opposite", "within noise"]) == "contradicted"
    assert majority_verdict(["as predicted", "opposite"]) == "inconclusive"
    assert majority_verdict([]) == "inconclusive"


def test_clearly_flatter_reduced_variants_support_h1_and_h4():
    table = _table(baseline=[10.0, 10.4], grouped=[5.0, 5.2], sliced=[4.0, 4.1], random=[8.0, 8.3],
                   grouped4=[2.0, 2.1])
    verdicts = _verdicts(table)
    assert verdicts["H1"] == "supported"
    assert verdicts["H3"] == "supported"
    assert verdicts["H4"] == "supported"


def test_clearly_sharper_reduced_variants_contradict_h1_and_h3():
    table = _table(baseline=[2.0, 2.1], grouped=[6.0, 6.2], sliced=[9.0, 9.2], random=[4.0, 4.1])
    verdicts = _verdicts(table)
    assert verdicts["H1"] == "contradicted"
    assert verdicts["H3"] == "contradicted"
    assert verdicts["H4"] == "contradicted"


def test_overlapping_seeds_are_inconclusive():
    table = _table(baseline=[4.0, 8.0], grouped=[5.0, 7.5], sliced=[3.0, 8.0], random=[5.5, 6.0])
    verdicts = _verdicts(table)
    assert verdicts == {"H1": "inconclusive", "H2": "inconclusive", "H3": "inconclusive", "H4": "inconclusive"}


def test_a_size_dependent_measure_does_not_vote_between_sizes():
    # The trace column is curvature x params: smaller models look flatter by it alone. Curvature is equal,
    # so H1 must not be supported on the strength of the trace.
    table = _table(baseline=[5.0, 5.0001], grouped=[5.0, 5.0001])
    h1 = evaluate_hypotheses(table, [SHAPE, SIZE])[0]
    (_, evidence, verdict), = h1.comparisons
    by_measure = {c.measure: c for c in evidence}
    assert by_measure["tr"].outcome == "as predicted" and not by_measure["tr"].votes
    assert by_measure["curv"].votes
    assert verdict == "inconclusive"


def test_h2_follows_the_sign_of_the_rank_correlation():
    rng = np.random.default_rng(0)
    curv = np.linspace(1, 10, 12)
    base = {"variant": "v", "label": "v", "family": "baseline", "base": "vit", "group_size": 1, "mlp_init": None,
            "width_ratio": None, "params": 1000, "curv_se": 0.0, "tr_se": 0.0}
    rows = [{**base, "seed": i, "curv": c, "tr": c, "drop": c + rng.normal(0, 0.1)} for i, c in enumerate(curv)]
    table = pd.DataFrame(rows)
    assert evaluate_hypotheses(table, [SHAPE, SIZE])[1].verdict == "supported"
    table["drop"] = -table["drop"]
    assert evaluate_hypotheses(table, [SHAPE, SIZE])[1].verdict == "contradicted"
    table["drop"] = rng.permutation(12) * 0 + rng.normal(0, 1, 12)
    corr = rank_correlation("curv", table["curv"], table["drop"])
    assert corr.low < corr.rho < corr.high and corr.n == 12


def test_missing_comparisons_are_inconclusive_and_say_why():
    table = pd.DataFrame(_rows("vit", "baseline", [1.0, 2.0]))
    for h in evaluate_hypotheses(table, [SHAPE]):
        assert h.verdict == "inconclusive"
        assert h.reason.startswith("Not tested") or "n = " in h.reason


def test_estimates_are_printed_to_the_precision_of_their_error():
    assert format_estimate(1.23456, 0.0123) == "1.235 ± 0.012"
    assert format_estimate(123.4, 25.0) == "123 ± 25"
    assert format_estimate(float("nan"), 1.0) == "–"


def test_report_command_writes_markdown_and_html_with_every_hypothesis(tmp_path):
    from click.testing import CliRunner

    from landscape.cli import cli
    from test_figures import VARIANTS, _make_run

    runs = [str(_make_run(tmp_path / "runs", name, model, kwargs, params, seed, 1.0 + i).root)
            for i, (name, model, kwargs, params) in enumerate(VARIANTS[:4]) for seed in (0, 1)]
    out = tmp_path / "report.md"
    result = CliRunner().invoke(cli, ["report", *runs, "--out", str(out), "--html", "--no-figures"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for key in ("H1", "H2", "H3", "H4"):
        assert f"## {key}:" in text
    # the hand-made runs grow sharper from baseline to ShallowMLP random, by every measure and clearly
    assert "| **H1** Reduced capacity gives flatter minima | **contradicted** |" in text
    assert "| **H3** Sliced initialisation gives flatter minima than random | **supported** |" in text
    assert "changes under reparameterisation" in text and "grows with parameter count" in text
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_dynamics_command_writes_dynamics_nc_and_the_seed_summary(tmp_path):
    from click.testing import CliRunner

    from landscape.cli import cli
    from test_figures import VARIANTS, _make_run

    name, model, kwargs, params = VARIANTS[0]
    runs = [str(_make_run(tmp_path, name, model, kwargs, params, seed, 1.0, analyses=False).root) for seed in (0, 1)]
    result = CliRunner().invoke(cli, ["analyze", "dynamics", *runs])
    assert result.exit_code == 0, result.output
    assert "across seeds" in result.output and "peak_to_final_drop" in result.output
    assert all((tmp_path / f"{name}-s{seed}" / "analysis" / "dynamics.nc").is_file() for seed in (0, 1))
