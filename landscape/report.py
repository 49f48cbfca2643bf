"""The flat-minima report: four hypotheses, each with its evidence and a verdict by a rule stated in the report.

H1  The reduced-capacity variants (GroupedMLP, ShallowMLP) end in flatter minima than the baseline they are
    derived from (judged on each flatness measure; the reparameterisation-invariant ones decide).
H2  Flatter minima go with a smaller peak-to-final drop of top-1.
H3  ShallowMLP with the sliced initialisation ends in a flatter minimum than with the random initialisation.
H4  GroupedMLP: the larger the groups, the flatter the minimum (group size 1 is the baseline).

Statistics
----------
The methods are those of :mod:`landscape.statistics`. Every flatness measure is taken at a run's final checkpoint;
smaller is flatter. A comparison of variant :math:`a` with variant :math:`b` on one measure is judged by Welch's
95% t interval of :math:`d = \\bar x_a - \\bar x_b` (Satterthwaite degrees of freedom; the seeds' spread plus the
estimators' own errors): *as predicted* when the interval lies wholly on the predicted side of 0, *opposite* when
it lies wholly on the other side, *within noise* when it holds 0, *no call* when a variant has fewer than two seeds.
Beside it stand the difference and Hedges' g, each with its 95% interval. A measure that grows with the parameter count (:attr:`~landscape.summary.Measure.size_dependent`) does
not vote between models of different sizes.

A comparison's verdict follows :data:`landscape.statistics.VERDICT_RULE`: the reparameterisation-invariant
measures (adaptive sharpness) decide, the others can only hold a verdict back. A hypothesis made of several
comparisons is supported (contradicted) when all of them are, and inconclusive otherwise.

H2 is tested twice, with the same rule over the measures: across runs (Spearman's :math:`r_s`, one point per run)
and within variants (ranks centred in each variant, so that a variant moving both the measure and the drop does
not count), each with a permutation p-value; it is supported only when both are. Each run's drop is set against
its binomial noise floor (:func:`landscape.statistics.drop_noise_floor`); when no drop rises above it, H2 is not
judged.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from landscape.statistics import (
    OUTCOMES,
    VERDICT_RULE,
    VERDICTS,
    Difference,
    Estimate,
    RankCorrelation,
    all_or_nothing,
    combine_seeds,
    compare,
    drop_noise_floor,
    measure_verdict,
)
from landscape.statistics import rank_correlation as rank_test
from landscape.summary import FLAG_REPARAMETERISATION, FLAG_SIZE

PERMUTATIONS = 10000  # permutations behind the p-value of a rank correlation (exact below this many)
REPORT_TITLE = "Flat minima and peak-to-final degradation"  # the first line of every report (and the HTML title)


# == statistics ==================================================================================================
@dataclasses.dataclass(frozen=True)
class Comparison:
    """Variant ``a`` against ``b`` on one measure: the two seed estimates and Welch's difference ``a - b`` with
    Hedges' g. ``invariant``: the measure is unchanged by reparameterisation, so it decides the verdict;
    ``votes`` is False when the measure is not comparable between ``a`` and ``b`` (shown, no vote)."""

    measure: str
    a: Estimate
    b: Estimate
    difference: Difference
    invariant: bool = False
    votes: bool = True

    @property
    def outcome(self) -> str:
        return self.difference.outcome


def compare_estimates(measure: str, a: Estimate, b: Estimate, *, predicted: str = "lower", votes: bool = True,
                      invariant: bool = False) -> Comparison:
    """``a`` against ``b`` when ``a`` is predicted ``lower`` (or ``higher``) than ``b``: Welch's 95% interval
    decides the outcome (:func:`landscape.statistics.compare`)."""
    return Comparison(measure, a, b, compare(a, b, predicted=predicted), invariant, votes)


@dataclasses.dataclass(frozen=True)
class Correlation:
    """Spearman's :math:`r_s` of a measure with a response across ``n`` runs (95% interval, permutation p-value,
    outcome) and, in ``within``, the same within variants (:class:`~landscape.statistics.RankCorrelation`)."""

    measure: str
    rho: float
    low: float
    high: float
    n: int
    outcome: str
    votes: bool = True
    p: float = math.nan
    invariant: bool = False
    within: RankCorrelation | None = None


def rank_correlation(measure: str, x: Sequence[float], y: Sequence[float], *, predicted: str = "positive",
                     votes: bool = True, invariant: bool = False, groups: Sequence | None = None,
                     resamples: int = PERMUTATIONS, seed: int = 0) -> Correlation:
    """:math:`r_s(x, y)` across the pairs where both are finite (and within ``groups`` when given), each with
    its two-sided permutation p-value and outcome (:func:`landscape.statistics.rank_correlation`)."""
    across = rank_test(x, y, predicted=predicted, resamples=resamples, seed=seed)
    within = None if groups is None else rank_test(x, y, groups, predicted=predicted, resamples=resamples, seed=seed)
    return Correlation(measure, across.rho, across.low, across.high, across.n, across.outcome, votes, across.p,
                       invariant, within)


def format_estimate(mean: float, se: float) -> str:
    """``1.234 ± 0.056``: the mean to the precision its standard error supports (two significant digits of it);
    small or large values share one power of ten (``(5.26 ± 0.30) × 10⁻⁴``); an error far below the mean's fourth
    digit is shown as it is (``0.0997 ± 1.4e-07``)."""
    if not math.isfinite(mean):
        return "–"
    if not math.isfinite(se) or se <= 0:
        return f"{mean:.4g}"
    if se < 1e-4 * abs(mean):
        return f"{mean:.4g} ± {se:.2g}"
    size = max(abs(mean), se)
    exponent = int(math.floor(math.log10(size))) if size >= 1e5 or size < 1e-3 else 0
    for _ in range(2):  # once more when the mantissa rounds up to 10
        m, e = mean / 10.0**exponent, se / 10.0**exponent
        digits = max(0, 1 - int(math.floor(math.log10(e))))
        text_m, text_e = f"{m:.{digits}f}", f"{e:.{digits}f}"
        if exponent and max(abs(float(text_m)), abs(float(text_e))) >= 10:
            exponent += 1
            continue
        break
    if float(text_m) == 0:
        text_m = text_m.lstrip("-")  # no "-0.000"
    text = f"{text_m} ± {text_e}"
    return f"({text}) × 10{_superscript(exponent)}" if exponent else text


def _superscript(n: int) -> str:
    return str(n).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


# == the hypotheses ==============================================================================================
@dataclasses.dataclass
class Hypothesis:
    """One hypothesis: its statement, the evidence (comparisons or correlations) and the verdict with its reason."""

    key: str
    title: str
    statement: str
    verdict: str
    reason: str
    comparisons: list[tuple[str, list[Comparison], str]] = dataclasses.field(default_factory=list)
    correlations: list[Correlation] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _variant_rows(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {k: g for k, g in table.groupby("variant", sort=False)}


def _estimate(rows: pd.DataFrame, measure: str) -> Estimate:
    se_col = f"{measure}_se"
    return combine_seeds(rows[measure].to_numpy(float), rows[se_col].to_numpy(float) if se_col in rows else None)


def compare_variant_rows(a: pd.DataFrame, b: pd.DataFrame, measures: Sequence) -> tuple[list[Comparison], str]:
    """Every measure of variant rows ``a`` (predicted flatter) against ``b``, and the verdict of
    :data:`~landscape.statistics.VERDICT_RULE` over the measures that vote.

    ``measures`` are :class:`~landscape.summary.Measure` objects: flatter is lower, or higher for a measure with
    ``smaller_is_flatter`` false; a size-dependent measure votes only when both variants have the same
    parameter count.
    """
    same_size = _same_size(a, b)
    comparisons = []
    for m in measures:
        if m.name not in a or m.name not in b:
            continue
        predicted = "lower" if getattr(m, "smaller_is_flatter", True) else "higher"
        c = compare_estimates(m.name, _estimate(a, m.name), _estimate(b, m.name), predicted=predicted,
                              votes=same_size or not m.size_dependent, invariant=not m.reparameterisation)
        if c.a.n and c.b.n:
            comparisons.append(c)
    verdict = measure_verdict([(c.outcome, c.invariant) for c in comparisons if c.votes])
    return comparisons, verdict


def _same_size(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    pa, pb = set(a["params"].dropna()), set(b["params"].dropna())
    return bool(pa) and pa == pb and len(pa) == 1


def _label(rows: pd.DataFrame) -> str:
    return str(rows["label"].iloc[0])


def hypothesis_h1(table: pd.DataFrame, measures: Sequence) -> Hypothesis:
    """H1: every GroupedMLP and ShallowMLP variant against the baseline of the same base architecture."""
    variants = _variant_rows(table)
    comparisons = []
    for key, rows in variants.items():
        if rows["family"].iloc[0] not in ("grouped", "shallow"):
            continue
        base = _baseline_of(variants, rows)
        if base is None:
            continue
        evidence, verdict = compare_variant_rows(rows, base, measures)
        comparisons.append((f"{_label(rows)} vs {_label(base)}", evidence, verdict))
    statement = ("The reduced-capacity variants (GroupedMLP, ShallowMLP) end in flatter minima than the baseline "
                 "they are derived from. Every flatness measure is shown; the reparameterisation-invariant measures "
                 "comparable between the two sizes decide.")
    return _combine("H1", "Reduced capacity gives flatter minima", statement, comparisons,
                    missing="the study has no GroupedMLP or ShallowMLP run with a baseline of the same base "
                            "architecture")


def hypothesis_h3(table: pd.DataFrame, measures: Sequence) -> Hypothesis:
    """H3: ShallowMLP sliced init against random init at the same base and width."""
    variants = _variant_rows(table)
    shallow = {k: r for k, r in variants.items() if r["family"].iloc[0] == "shallow"}
    comparisons = []
    for key, rows in shallow.items():
        if rows["mlp_init"].iloc[0] != "sliced":
            continue
        for other in shallow.values():
            if (other["mlp_init"].iloc[0] == "random" and other["base"].iloc[0] == rows["base"].iloc[0]
                    and other["width_ratio"].iloc[0] == rows["width_ratio"].iloc[0]):
                evidence, verdict = compare_variant_rows(rows, other, measures)
                comparisons.append((f"{_label(rows)} vs {_label(other)}", evidence, verdict))
    statement = ("ShallowMLP initialised by slicing the full-width initialisation ends in a flatter minimum than "
                 "ShallowMLP initialised at random at the narrow width.")
    return _combine("H3", "Sliced initialisation gives flatter minima than random", statement, comparisons,
                    missing="the study lacks a ShallowMLP sliced / random pair of the same base and width")


def hypothesis_h4(table: pd.DataFrame, measures: Sequence) -> Hypothesis:
    """H4: consecutive group sizes (the baseline is group size 1) of each base; larger predicted flatter."""
    variants = _variant_rows(table)
    comparisons = []
    bases = sorted({r["base"].iloc[0] for r in variants.values() if r["family"].iloc[0] == "grouped"})
    for base in bases:
        sizes = {}
        for rows in variants.values():
            if rows["base"].iloc[0] == base and rows["family"].iloc[0] in ("grouped", "baseline"):
                sizes[int(rows["group_size"].iloc[0])] = rows
        ordered = sorted(sizes)
        for small, large in zip(ordered, ordered[1:]):
            evidence, verdict = compare_variant_rows(sizes[large], sizes[small], measures)
            comparisons.append((f"{_label(sizes[large])} vs {_label(sizes[small])}", evidence, verdict))
    statement = ("GroupedMLP: the larger the groups of blocks sharing one MLP, the flatter the minimum "
                 "(group size 1 is the baseline).")
    hypothesis = _combine("H4", "Larger MLP groups give flatter minima", statement, comparisons,
                          missing="the study has fewer than two group sizes (baseline included) of one base")
    if len(comparisons) == 1:
        hypothesis.notes.append("With two group sizes only, H4 is the GroupedMLP comparison of H1; a sweep over "
                                "three or more group sizes tests the trend.")
    return hypothesis


def _baseline_of(variants: dict[str, pd.DataFrame], rows: pd.DataFrame) -> pd.DataFrame | None:
    base = rows["base"].iloc[0]
    for other in variants.values():
        if other["family"].iloc[0] == "baseline" and other["base"].iloc[0] == base:
            return other
    return None


def _combine(key: str, title: str, statement: str, comparisons, *, missing: str) -> Hypothesis:
    if not comparisons:
        return Hypothesis(key, title, statement, "inconclusive", f"Not tested: {missing}.")
    verdicts = [v for _, _, v in comparisons]
    verdict = all_or_nothing(verdicts)
    parts = "; ".join(f"{name}: {v} ({vote_summary(evidence)})" for name, evidence, v in comparisons)
    if len(comparisons) == 1:
        reason = f"{parts}."
    else:
        rule = {"supported": "all comparisons are supported", "contradicted": "all comparisons are contradicted",
                "inconclusive": "the comparisons are neither all supported nor all contradicted"}[verdict]
        reason = f"{rule.capitalize()}: {parts}."
    return Hypothesis(key, title, statement, verdict, reason, comparisons=comparisons)


def vote_summary(evidence: Sequence[Comparison]) -> str:
    """The deciding (invariant) measures with their effect sizes, then how the other voting measures lean:
    ``adaptive sharpness: Δ = -0.12 [-0.20, -0.04], g = -2.1 [-3.9, -0.3], as predicted; others: 2 of 4 as
    predicted, 0 opposite``."""
    voting = [c for c in evidence if c.votes]
    if not voting:
        return "no voting measure"
    deciding = [f"{c.measure}: {effect_text(c.difference)}, {c.outcome}" for c in voting if c.invariant]
    others = [c for c in voting if not c.invariant]
    counts = {o: sum(c.outcome == o for c in others) for o in OUTCOMES}
    lean = (f"others: {counts['as predicted']} of {len(others)} as predicted, {counts['opposite']} opposite"
            if others else "no other measure")
    return "; ".join(deciding or ["no invariant measure votes"]) + f"; {lean}"


def effect_text(d: Difference) -> str:
    """``Δ = -0.12 [-0.20, -0.04], g = -2.1 [-3.9, -0.3]`` (95% intervals; Welch's for Δ)."""
    if not math.isfinite(d.low):
        return f"Δ = {_number(d.difference)} (no interval: fewer than 2 seeds or no spread)"
    text = f"Δ = {_number(d.difference)} [{_number(d.low)}, {_number(d.high)}]"
    if math.isfinite(d.g):
        text += f", g = {d.g:+.2f} [{d.g_low:+.2f}, {d.g_high:+.2f}]"
    return text


def _number(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    return f"{x:+#.3g}".removesuffix(".")  # three digits, trailing zeros kept: +0.00100, not +0.001; +114, not +114.


def hypothesis_h2(table: pd.DataFrame, measures: Sequence, *, response: str = "drop") -> Hypothesis:
    """H2: rank correlation of each measure with the peak-to-final drop (predicted positive), across runs and
    within variants; supported only when both scopes are (see :data:`~landscape.statistics.VERDICT_RULE`)."""
    same_size = table["params"].nunique(dropna=True) <= 1
    correlations = []
    if response in table:
        for m in measures:
            if m.name in table:
                predicted = "positive" if getattr(m, "smaller_is_flatter", True) else "negative"
                correlations.append(rank_correlation(
                    m.name, table[m.name], table[response], predicted=predicted,
                    votes=same_size or not m.size_dependent, invariant=not m.reparameterisation,
                    groups=table["variant"]))
    statement = ("Flatter minima go with a smaller peak-to-final drop: every flatness measure correlates with the "
                 "drop in the direction sharper -> larger drop, across runs and also within each variant (so that "
                 "a variant that changes both does not make the correlation alone).")
    if not correlations:
        return Hypothesis("H2", "Flatter minima, smaller peak-to-final drop", statement, "inconclusive",
                          "Not tested: the runs have no flatness measure together with a peak-to-final drop.")
    across = measure_verdict([(c.outcome, c.invariant) for c in correlations if c.votes])
    within = measure_verdict([(c.within.outcome, c.invariant) for c in correlations if c.within is not None])
    verdict = all_or_nothing([across, within])
    floor = drop_floor_summary(table)
    reason = (f"Across runs {across} ({_correlation_summary(correlations, within=False)}); within variants "
              f"{within} ({_correlation_summary(correlations, within=True)}). {floor}")
    known = table["drop_above"].notna() if "drop_above" in table else pd.Series(False, index=table.index)
    if known.any() and not table.loc[known, "drop_above"].astype(bool).any():
        verdict, reason = "inconclusive", f"Not judged: no run's drop rises above its noise floor. {reason}"
    return Hypothesis("H2", "Flatter minima, smaller peak-to-final drop", statement, verdict, reason,
                      correlations=correlations)


def _correlation_summary(correlations: Sequence[Correlation], *, within: bool) -> str:
    """The deciding (invariant) measures with r_s, interval and p, then how the others lean."""
    def scope(c: Correlation):
        return c.within if within else c

    voting = [c for c in correlations if (c.within is not None if within else c.votes)]
    if not voting:
        return "no voting measure"
    deciding = []
    for c in (c for c in voting if c.invariant):
        r = scope(c)
        text = f"{c.measure}: r = {r.rho:+.2f}" if math.isfinite(r.rho) else f"{c.measure}: r = –"
        if math.isfinite(r.low):
            text += f" [{r.low:+.2f}, {r.high:+.2f}]"
        if math.isfinite(r.p):
            text += f", p = {r.p:.2g}"
        deciding.append(f"{text}, {r.outcome}")
    others = [scope(c) for c in voting if not c.invariant]
    counts = {o: sum(r.outcome == o for r in others) for o in OUTCOMES}
    lean = (f"others: {counts['as predicted']} of {len(others)} as predicted, {counts['opposite']} opposite"
            if others else "no other measure")
    n = max(c.n for c in voting)
    return "; ".join(deciding or ["no invariant measure votes"]) + f"; {lean}; n = {n} run{'s' if n != 1 else ''}"


def drop_floor_columns(table: pd.DataFrame, results, weights: str = "raw") -> pd.DataFrame:
    """``table`` with each run's drop set against its noise floor: ``val_size`` (validation images), ``drop_se``,
    ``drop_threshold`` (percentage points) and ``drop_above`` (True/False, NaN where N is unknown), from the run's
    dynamics (:func:`landscape.statistics.drop_noise_floor`; the peak is the best of the run's evaluated epochs)."""
    from landscape.analyses.dynamics import validation_size

    by_run = {str(r.path): r for r in results}
    columns: dict[str, list] = {"val_size": [], "drop_se": [], "drop_threshold": [], "drop_above": []}
    for run in table["run"] if "run" in table else [None] * len(table):
        r = by_run.get(run)
        ds = getattr(r, "dynamics", None)
        if ds is None or weights not in [str(w) for w in ds["weights"].values]:
            for values in columns.values():
                values.append(math.nan)
            continue
        n = ds.attrs.get("val_size")
        if n is None:
            n = validation_size(r.run.load_config(), r.run.load_data_record())
        curve = ds["top1"].sel(weights=weights).values
        floor = drop_noise_floor(float(ds["peak_top1"].sel(weights=weights)), float(ds["final_top1"].sel(
            weights=weights)), n, int(np.isfinite(curve).sum()))
        columns["val_size"].append(math.nan if n is None else int(n))
        columns["drop_se"].append(floor.se)
        columns["drop_threshold"].append(floor.threshold)
        columns["drop_above"].append(math.nan if floor.above is None else floor.above)
    out = table.copy()
    for name, values in columns.items():
        out[name] = pd.Series(values, index=table.index, dtype=object if name == "drop_above" else float)
    return out


def drop_floor_summary(table: pd.DataFrame) -> str:
    """``Drops above their noise floor: 3 of 12 runs (floor 0.9-1.1 points on 10,000 images).``"""
    if "drop_above" not in table or table["drop_above"].isna().all():
        return "The drops' noise floor is unknown (the runs do not say how many validation images they used)."
    known = table[table["drop_above"].notna()]
    above = int(known["drop_above"].astype(bool).sum())
    low, high = known["drop_threshold"].min(), known["drop_threshold"].max()
    sizes = sorted({int(n) for n in known["val_size"]})
    span = f"{low:.2f}" if math.isclose(low, high, rel_tol=0.05) else f"{low:.2f}-{high:.2f}"
    return (f"Drops above their noise floor: {above} of {len(known)} runs (floor {span} points on "
            f"{', '.join(f'{n:,}' for n in sizes)} validation images).")


def evaluate_hypotheses(table: pd.DataFrame, measures: Sequence) -> list[Hypothesis]:
    """H1..H4 on a table with one row per run (see :func:`landscape.summary.final_measures`)."""
    return [hypothesis_h1(table, measures), hypothesis_h2(table, measures), hypothesis_h3(table, measures),
            hypothesis_h4(table, measures)]


# == the document ================================================================================================
@dataclasses.dataclass
class Block:
    """One element of the report: ``kind`` is heading (``level``), paragraph, table (``header``, ``rows``), image
    (``text`` = caption, ``target`` = path) or list (``rows`` = items)."""

    kind: str
    text: str = ""
    level: int = 2
    header: list[str] = dataclasses.field(default_factory=list)
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    target: str = ""


def heading(text: str, level: int = 2) -> Block:
    return Block("heading", text, level=level)


def paragraph(text: str) -> Block:
    return Block("paragraph", text)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Block:
    return Block("table", header=[str(h) for h in header], rows=[[str(c) for c in r] for r in rows])


def image(caption: str, target: str) -> Block:
    return Block("image", caption, target=target)


def bullets(items: Iterable[str]) -> Block:
    return Block("list", rows=[[str(i)] for i in items])


def render_markdown(blocks: Sequence[Block]) -> str:
    """The report as GitHub-flavoured Markdown."""
    out: list[str] = []
    for b in blocks:
        if b.kind == "heading":
            out.append("#" * b.level + " " + b.text)
        elif b.kind == "paragraph":
            out.append(b.text)
        elif b.kind == "table":
            cells = [[c.replace("|", "\\|") for c in row] for row in [b.header, *b.rows]]
            out.append("| " + " | ".join(cells[0]) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out.extend("| " + " | ".join(row) + " |" for row in cells[1:])
        elif b.kind == "image":
            out.append(f"![{b.text}]({b.target})")
        elif b.kind == "list":
            out.extend(f"- {row[0]}" for row in b.rows)
        out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    """Escape, then turn the Markdown we write inline (**bold**, `code`, [text](link)) into HTML."""
    import re

    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)


def render_html(blocks: Sequence[Block], title: str = "landscape report") -> str:
    """The report as one self-contained HTML page (figures linked, not embedded)."""
    body: list[str] = []
    for b in blocks:
        if b.kind == "heading":
            body.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif b.kind == "paragraph":
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "image":
            body.append(f'<figure><img src="{html.escape(b.target)}" alt="{html.escape(b.text)}">'
                        f"<figcaption>{_inline_html(b.text)}</figcaption></figure>")
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(r[0])}</li>" for r in b.rows) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 7px}"
             "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}figcaption{font-size:90%;color:#444}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# == the report of a study =======================================================================================
FIGURE_CAPTIONS = {
    "accuracy_curves": "Validation top-1 against epoch, one line per run; open circles mark each run's peak.",
    "peak_to_final_drop": "Peak-to-final drop of top-1 per variant: one marker per seed, mean ± standard deviation.",
    "drop_from_best": "Running drop from the best top-1 so far, one line per run; its last value is the "
                      "peak-to-final drop.",
    "generalization_gap": "Validation minus training loss against epoch, one line per run.",
    "hessian_vs_epoch": "Top Hessian eigenvalue, trace and trace per parameter against epoch (mean over seeds, "
                        "band from the lowest to the highest seed).",
    "spectral_density": "Hessian spectral density at the final checkpoint, one line per run (log scale).",
    "sharpness_vs_rho": "Worst-case and average sharpness against the radius rho at the final checkpoint, plain "
                        "and adaptive (mean ± sd over seeds).",
    "surface_1d": "Loss along a filter-normalised random direction through the final weights, one line per run.",
    "surface_2d": "Loss on a plane of two filter-normalised random directions through the final weights, first "
                  "seed of each variant.",
    "surface_3d": "The same planes as surfaces (log loss).",
    "flatness_vs_drop": "Each flatness measure against the peak-to-final drop, one point per run, with Spearman's "
                        "r_s.",
    "flatness_vs_gap": "Each flatness measure against the final generalisation gap, one point per run.",
}
HYPOTHESIS_FIGURES = {
    "H1": ("hessian_vs_epoch", "spectral_density", "sharpness_vs_rho", "surface_1d", "surface_2d"),
    "H2": ("flatness_vs_drop", "flatness_vs_gap", "peak_to_final_drop", "accuracy_curves"),
    "H3": ("sharpness_vs_rho", "surface_1d", "hessian_vs_epoch"),
    "H4": ("hessian_vs_epoch", "sharpness_vs_rho", "peak_to_final_drop"),
}


def _flag_legend() -> str:
    return (f"{FLAG_REPARAMETERISATION} changes under reparameterisations that leave the network function unchanged; "
            f"{FLAG_SIZE} grows with the parameter count or the weight norm, so it is not comparable between models "
            "of different sizes (shown, but it does not vote there).")


def _variants_table(table: pd.DataFrame) -> Block:
    rows = []
    for _, g in table.groupby("variant", sort=False):
        def est(col: str) -> str:
            e = combine_seeds(g[col].to_numpy(float)) if col in g else Estimate(math.nan, math.nan, 0, math.nan)
            return format_estimate(e.mean, e.sd) if e.n > 1 else format_estimate(e.mean, math.nan)
        params = g["params"].dropna()
        rows.append([g["label"].iloc[0], f"`{g['variant'].iloc[0]}`", len(g),
                     f"{int(params.iloc[0]):,}" if len(params) else "–",
                     est("top1_raw"), est("top1_ema"), est("drop_raw"), est("drop_ema"), _floor_cell(g), est("gap")])
    return table_block(["variant", "model", "seeds", "parameters", "final top-1 (%)", "final EMA top-1 (%)",
                        "drop (points)", "EMA drop (points)", "drops above noise floor", "final gap (nats)"], rows)


def _floor_cell(rows: pd.DataFrame) -> str:
    """``2 of 3 (floor 1.0)``: seeds whose drop exceeds its noise floor, and the mean floor in points."""
    if "drop_above" not in rows or rows["drop_above"].isna().all():
        return "–"
    known = rows[rows["drop_above"].notna()]
    return (f"{int(known['drop_above'].astype(bool).sum())} of {len(known)} "
            f"(floor {known['drop_threshold'].mean():.2f})")


table_block = table  # the Block constructor, under a name that the report's DataFrames do not shadow


def _measures_block(measures: Sequence) -> Block:
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    return table_block(["measure", "units", "changes under reparameterisation", "grows with parameter count",
                        "note"],
                       [[f"{m.label} (`{m.name}`)", m.units, yes(m.reparameterisation), yes(m.size_dependent), m.note]
                        for m in measures])


def _comparison_block(comparisons: list[Comparison], measures: dict, a_label: str, b_label: str) -> Block:
    rows = []
    counts = {(c.a.n, c.b.n) for c in comparisons}
    per_row = len(counts) > 1  # some measure is missing for some runs: each cell says how many runs it averages
    for c in comparisons:
        m = measures[c.measure]
        d = c.difference
        interval = f"[{_number(d.low)}, {_number(d.high)}], ν = {d.df:.1f}" if math.isfinite(d.low) else "–"
        g = f"{d.g:+.2f} [{d.g_low:+.2f}, {d.g_high:+.2f}]" if math.isfinite(d.g) else "–"
        outcome = c.outcome if c.votes else f"{c.outcome} (no vote)"
        a, b = format_estimate(c.a.mean, c.a.se), format_estimate(c.b.mean, c.b.se)
        if per_row:
            a, b = f"{a} (n={c.a.n})", f"{b} (n={c.b.n})"
        rows.append([f"{m.label}{m.flags}", a, b, _number(d.difference), interval, g,
                     f"**{outcome}**" if c.invariant and c.votes else outcome])
    n_a, n_b = next(iter(counts)) if len(counts) == 1 else (None, None)
    heading = (lambda label, n: f"{label} (n={n})" if n is not None else f"{label} (n per row)")
    return table_block(["measure", heading(a_label, n_a), heading(b_label, n_b), "difference Δ",
                        "95% Welch interval of Δ", "Hedges' g [95%]", "outcome"], rows)


def _correlation_block(correlations: list[Correlation], measures: dict, response: str) -> Block:
    def cells(r) -> list[str]:
        if r is None:
            return ["–", "–", "–"]
        rho = f"{r.rho:+.2f}" if math.isfinite(r.rho) else "–"
        interval = f"[{r.low:+.2f}, {r.high:+.2f}]" if math.isfinite(r.low) else "–"
        return [rho, interval, f"{r.p:.2g}" if math.isfinite(r.p) else "–"]

    rows, within = [], any(c.within is not None for c in correlations)
    for c in correlations:
        m = measures[c.measure]
        row = [f"{m.label}{m.flags}", *cells(c), c.outcome if c.votes else f"{c.outcome} (no vote)"]
        if within:
            row += [*cells(c.within), c.within.outcome if c.within is not None else "–"]
        rows.append(row + [c.n])
    header = ["measure", f"r_s with {response}", "95% interval", "permutation p", "outcome"]
    if within:
        header += ["within variants r_w", "95% interval", "permutation p", "outcome"]
    return table_block(header + ["runs"], rows)


def decision_rules_text() -> list[Block]:
    return [
        paragraph("Every flatness measure is taken at a run's final checkpoint; smaller is flatter. A variant's value "
                  "is the mean over its seeds with the standard error se² = sd²/n + Σ sᵢ²/n², where sd is the "
                  "standard deviation over the n seeds and sᵢ the estimator's own standard error of seed i "
                  "(Hutchinson trace, Monte Carlo sharpness; 0 for deterministic estimates). This is conservative: "
                  "the seed spread already holds part of the estimator noise."),
        bullets([
            "**Comparison of two variants on one measure**: Welch's 95% t interval of the difference of means Δ, "
            "with se_Δ = √(se_a² + se_b²) and the Welch-Satterthwaite degrees of freedom ν = se_Δ⁴ / (se_a⁴/(n_a−1) "
            "+ se_b⁴/(n_b−1)) (t, not a normal z: at 3 seeds ν can be 2-4, where t₀.₉₇₅ is 2.8-4.3). *As "
            "predicted* when the interval lies wholly on the predicted side of 0, *opposite* when wholly on the "
            "other side, *within noise* when it holds 0; *no call* when a variant has fewer than two seeds or no "
            "spread. Beside it: Hedges' g (the difference over the pooled seed standard deviation, small-sample "
            "corrected) with the 95% interval of the standardised effect from the noncentral t.",
            f"**Votes**: measures marked {FLAG_SIZE} do not vote between models of different parameter counts.",
            f"**Comparison verdict**: {VERDICT_RULE} Outcomes of the deciding measures are in bold.",
            "**Hypothesis verdict** (H1, H3, H4): supported when every comparison is supported, contradicted when "
            "every comparison is contradicted, inconclusive otherwise (and when there is no comparison to make).",
            "**Peak-to-final drop and its noise floor**: a top-1 p measured on N validation images has the binomial "
            "standard error √(p(1−p)/N); the drop is the difference of two such measurements, se = √(se_peak² + "
            "se_final²) (as if independent: on the same images this overstates it). The peak is the best of the E "
            "evaluated epochs, which biases it upward, so a drop counts as above its floor only beyond z·se with "
            "z = Φ⁻¹(1 − 0.05/(E−1)): where no earlier epoch was truly better than the final one, this happens in "
            "at most 5% of runs.",
            "**H2**: for each measure, Spearman's r_s with the drop across runs, and r_w within variants (ranks "
            "centred in each variant: a weighted mean of the per-variant correlations, so the variant cannot drive "
            "both sides). Each has a two-sided permutation p-value (the drops permuted across runs, or within each "
            f"variant; exact when there are at most {PERMUTATIONS:,} permutations, else {PERMUTATIONS:,} seeded "
            "ones) and a descriptive 95% Fisher-z interval. *As predicted* when p < 0.05 with the predicted sign, "
            "*opposite* when p < 0.05 with the other, *within noise* otherwise; *no call* below 4 runs (4 "
            "within-variant degrees of freedom). The comparison rule above gives a verdict for each scope; H2 is "
            "supported (contradicted) only when both scopes are, and not judged when no run's drop exceeds its "
            "noise floor.",
            "Under no real difference, this rule calls a comparison *supported* in at most 2.5% of studies (the "
            "deciding measure's one-sided error); `tests/test_statistics.py` checks it (with planted effects too) "
            "on simulated seeds.",
        ]),
    ]


def build_report(results, *, figures: dict[str, list[Path]] | None = None, report_path: str | os.PathLike | None = None,
                 weights: str = "raw") -> tuple[list[Block], list[Hypothesis]]:
    """The report of a study's runs as :class:`Block` s, and the hypotheses with their verdicts.

    ``figures`` (from :func:`landscape.figures.write_figures`) are linked relative to ``report_path``.
    """
    from landscape.version import __version__
    from landscape.summary import MEASURE_SOURCES, caveats, final_measures, settings_disagreements

    data, measures = final_measures(results, weights=weights)
    data = drop_floor_columns(data, results, weights)
    by_name = {m.name: m for m in measures}
    unlike = settings_disagreements(results)  # measured differently across runs: shown, but no vote
    hypotheses = evaluate_hypotheses(data, [m for m in measures if MEASURE_SOURCES.get(m.name) not in unlike])
    figures = figures or {}
    base = Path(report_path).parent if report_path is not None else Path(".")

    def link(name: str) -> str | None:
        paths = [p for p in figures.get(name, []) if Path(p).suffix == ".png"] or figures.get(name, [])
        return os.path.relpath(paths[0], base) if paths else None

    datasets = sorted({str((r.run.load_config().get("data") or {}).get("name", "?")) for r in results})
    blocks = [
        heading(REPORT_TITLE, 1),
        paragraph(f"{len(results)} runs of {data['variant'].nunique()} variants on {', '.join(datasets)}; flatness "
                  f"measured on the {weights} weights of each run's final checkpoint. Written by landscape "
                  f"{__version__} from the runs' `analysis/` results; every number below can be recomputed with "
                  "`landscape report RUN...`."),
        heading("Verdicts"),
        table_block(["hypothesis", "verdict", "why"], [[f"**{h.key}** {h.title}", f"**{h.verdict}**", h.reason]
                                                     for h in hypotheses]),
        heading("Runs"),
        paragraph("Mean ± standard deviation over seeds. The peak-to-final drop is the best validation top-1 of a run "
                  "minus its final one, in percentage points; the generalisation gap is validation minus training "
                  "loss at the last epoch, the training loss being the mean over the epoch's updates as trained "
                  "(augmented, label-smoothed, weights moving), so the gap is a trend, not a clean estimate."),
        _variants_table(data),
    ]
    problems = [c + (" They are left out of the verdicts." if c in unlike.values() else "") for c in caveats(results)]
    if problems:
        blocks += [paragraph("Read with care:"), bullets(problems)]
    blocks.append(heading("Flatness measures"))
    if measures:
        blocks += [_measures_block(measures), paragraph(_flag_legend()),
                   paragraph("Per variant at the final checkpoint: mean ± standard error (as defined in the decision "
                             "rules below)."), _flatness_table(data, measures)]
        blocks += _gauss_newton_blocks(results)
    else:
        blocks.append(paragraph("The runs have no Hessian, sharpness or surface results yet; run `landscape analyze "
                                "hessian|sharpness|surface RUN...` first. Every hypothesis below is therefore "
                                "inconclusive."))
    blocks += curvature_through_training_blocks(results)
    blocks += [heading("Setup"), *_setup_blocks(results)]
    blocks += [heading("Decision rules"), *decision_rules_text()]
    for h in hypotheses:
        blocks += [heading(f"{h.key}: {h.title}"), paragraph(f"*{h.statement}*"),
                   paragraph(f"Verdict: **{h.verdict}**. {h.reason}")]
        for name, evidence, verdict in h.comparisons:
            a_label, _, b_label = name.partition(" vs ")
            blocks.append(paragraph(f"{name}: **{verdict}** ({vote_summary(evidence)})."))
            if evidence:
                blocks.append(_comparison_block(evidence, by_name, a_label, b_label))
        if h.correlations:
            blocks.append(_correlation_block(h.correlations, by_name, "the peak-to-final drop"))
            gap = [rank_correlation(c.measure, data[c.measure], data["gap"],
                                    predicted="positive" if by_name[c.measure].smaller_is_flatter else "negative")
                   for c in h.correlations if "gap" in data]
            if gap:
                blocks += [paragraph("For reference (not part of the verdict), the same measures against the final "
                                     "generalisation gap, with the same rule:"),
                           _correlation_block(gap, by_name, "the gap")]
        for note in h.notes:
            blocks.append(paragraph(note))
        links = [(n, link(n)) for n in HYPOTHESIS_FIGURES.get(h.key, ())]
        links = [f"[{n.replace('_', ' ')}]({target})" for n, target in links if target]
        if links:
            blocks.append(paragraph("Figures: " + ", ".join(links) + "."))
    if figures:
        blocks.append(heading("Figures"))
        for name in figures:
            target = link(name)
            if target:
                blocks.append(image(FIGURE_CAPTIONS.get(name, name.replace("_", " ")), target))
    return blocks, hypotheses


def _final_hessian_entry(r, variable: str):
    """The last checkpoint's entry of the run's whole-model hessian results that hold ``variable`` (None if none)."""
    found = [x for x in r.results if x.kind == "hessian" and x.weights == r.weights and x.params is None
             and variable in x.dataset and x.dataset.sizes.get("checkpoint", 0)]
    if not found:
        return None
    ds = max(found, key=lambda x: x.dataset.sizes["checkpoint"]).dataset
    return ds.isel(checkpoint=int(np.argmax(ds["step"].values)))


def _percent(values: list[float]) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "–"
    return f"{np.mean(values):.1f}%" + (f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else "")


def curvature_through_training_blocks(results) -> list[Block]:
    """Where the curvature sits at the final checkpoint (share of the trace per kind of parameter group), how close
    the optimizer's sharpness came to its stability threshold, and how the top subspace moved; only the parts whose
    results exist (``analyze hessian --per-block``, ``--preconditioned``, ``--save-eigenvectors``)."""
    by_variant: dict[str, list] = {}
    for r in results:
        by_variant.setdefault(r.label, []).append(r)
    blocks: list[Block] = []
    rows, shares = [], {}
    for label, runs in by_variant.items():
        mlp, attn, rest, sharpest = [], [], [], []
        for r in runs:
            entry = _final_hessian_entry(r, "block_trace")
            if entry is None:
                continue
            groups = [str(g) for g in entry["group"].values]
            trace = entry["block_trace"].values.astype(float)
            total = float(entry["trace"])
            mlp.append(100 * trace[[g.endswith(".mlp") for g in groups]].sum() / total)
            attn.append(100 * trace[[g.endswith(".attn") for g in groups]].sum() / total)
            rest.append(100 - mlp[-1] - attn[-1])
            if "block_eigenvalue_largest" in entry:
                top = entry["block_eigenvalue_largest"].values.astype(float)
                sharpest.append(groups[int(np.nanargmax(top))])
        if mlp:
            shares[label] = float(np.mean(mlp))
            rows.append([label, len(mlp), _percent(mlp), _percent(attn), _percent(rest),
                         ", ".join(sorted(set(sharpest))) or "–"])
    if rows:
        blocks += [heading("Where the curvature sits"),
                   paragraph("Share of the Hessian trace on each kind of parameter group at the final checkpoint "
                             "(the trace of each group's diagonal block over the whole trace; mean ± standard "
                             "deviation over seeds), and the group whose restricted Hessian has the largest top "
                             "eigenvalue. A shared MLP counts once."),
                   table_block(["variant", "runs", "MLP blocks", "attention", "embedding, norms, head", "sharpest group"],
                         rows)]
        if len(shares) > 1:
            blocks.append(paragraph("The MLP blocks carry " + "; ".join(f"{v:.1f}% of the trace for {k}"
                                                                         for k, v in shares.items()) + "."))
    rows = []
    for label, runs in by_variant.items():
        ratios, optimizers = [], set()
        for r in runs:
            found = [x for x in r.results if x.kind == "hessian" and "preconditioned_sharpness" in x.dataset]
            if not found:
                continue
            ds = found[0].dataset
            ratio = ds["preconditioned_sharpness"].values / ds["stability_threshold"].values
            ratios.append((float(np.nanmax(ratio)) if np.isfinite(ratio).any() else np.nan, float(ratio[-1])))
            optimizers.add(str(ds["preconditioned_sharpness"].attrs.get("optimizer", "")))
        if ratios:
            peak, final = np.array(ratios).T
            rows.append([label, ", ".join(sorted(optimizers)), f"{np.nanmean(peak):.3g}", f"{np.nanmean(final):.3g}"])
    if rows:
        blocks += [heading("Edge of stability"),
                   paragraph("The sharpness the optimizer sees over its stability threshold (1 is the edge): for Adam "
                             "the top eigenvalue of P^-1/2 H P^-1/2 with P = (1 - beta1^t) diag(sqrt(v_hat) + eps) "
                             "against (2 + 2 beta1) / ((1 - beta1) lr), 38/lr at beta1 = 0.9 (Cohen et al. 2022); for "
                             "SGD the top eigenvalue against 2/lr (2(1 + momentum)/lr with momentum). Mean over seeds "
                             "of each run's highest ratio over training and its ratio at the final checkpoint."),
                   table_block(["variant", "optimizer", "highest ratio", "final ratio"], rows)]
    rows = []
    for label, runs in by_variant.items():
        overlaps, fractions = [], []
        for r in runs:
            found = [x for x in r.results if x.kind == "hessian" and "top_subspace_overlap" in x.dataset]
            if found:
                ds = found[0].dataset
                overlaps.append(float(np.nanmean(ds["top_subspace_overlap"].values))
                                if np.isfinite(ds["top_subspace_overlap"].values).any() else np.nan)
                fractions.append(float(ds["gradient_top_subspace_fraction"].values[-1]))
        if overlaps:
            rows.append([label, f"{np.nanmean(overlaps):.3f}", f"{np.nanmean(fractions):.3f}"])
    if rows:
        blocks += [heading("How the top subspace moves"),
                   paragraph("Mean over checkpoints of the overlap ||V_prev V^T||_F^2 / k of the top-k Hessian "
                             "eigenvectors with the previous checkpoint's (1: the same subspace), and the fraction of "
                             "the squared gradient norm in their span at the final checkpoint (Gur-Ari et al. 2018)."),
                   table_block(["variant", "mean overlap", "final gradient fraction"], rows)]
    return blocks


_SETTING_KEYS = {
    "hessian": ("samples", "split", "weights", "params", "top_k", "tol", "trace_matvecs", "seed"),
    "hessian-density": ("samples", "weights", "params", "density_probes", "density_steps", "density_scale", "seed"),
    "sharpness": ("samples", "weights", "params", "rhos", "p", "adaptive", "eta", "steps", "draws", "seed"),
    "surface": ("directions", "dims", "range", "points", "samples", "weights", "seed"),
}


def _setup_blocks(results) -> list[Block]:
    """How the runs were trained and measured, from the first run's config.yaml and its results' settings."""
    first = results[0]
    config = first.run.load_config()
    optim, schedule = config.get("optim") or {}, config.get("schedule") or {}
    source = config.get("source") if isinstance(config.get("source"), dict) else None
    if source is not None and not optim:  # imported: trained elsewhere, by settings this file does not hold
        training = (f"Weights (from `{first.path}/config.yaml`; every run has its own): imported from "
                    f"`{source.get('file', '?')}` ({source.get('format', '?')} format), trained elsewhere.")
    else:
        epochs = config.get('epochs', '?')
        training = (f"Training (from `{first.path}/config.yaml`; every run has its own): {epochs} "
                    f"epoch{'' if epochs == 1 else 's'} of batch {config.get('batch_size', '?')}, {optim.get('opt', '?')} at learning rate "
                    f"{optim.get('lr', '?')} with weight decay {optim.get('weight_decay', '?')}, "
                    f"{schedule.get('sched', '?')} schedule, EMA decay {(config.get('ema') or {}).get('decay')}.")
    rows = []
    for result in first.results:  # what each file holds, from its attributes
        if result.kind == "dynamics" or not result.checkpoints():
            continue
        ds, settings = result.dataset, result.settings
        density_only = result.kind == "hessian" and not (settings.get("top_k") or settings.get("trace"))
        keys = _SETTING_KEYS.get("hessian-density" if density_only else result.kind, ("samples", "weights", "seed"))
        where = ", ".join(str(c) for c in ds["checkpoint"].values) if ds.sizes.get("checkpoint", 0) <= 2 else (
            f"{ds.sizes['checkpoint']} checkpoints")
        rows.append([f"`analysis/{result.path.name}`: {result.describe()}", where,
                     ", ".join(f"{k}={settings[k]}" for k in keys if settings.get(k) is not None)])
    blocks = [paragraph(training)]
    if rows:
        blocks += [paragraph("Analyses (settings stored in each result file; shown for the first run):"),
                   table_block(["result", "checkpoints", "settings"], rows)]
    return blocks


def _gauss_newton_blocks(results) -> list[Block]:
    """The top eigenvalue of the generalised Gauss-Newton matrix beside the Hessian's at each run's final checkpoint,
    where a run has both (``landscape analyze hessian --matrix ggn``); nothing otherwise. Not part of any verdict."""
    from landscape.summary import final_entry

    def number(x: float) -> str:
        return "–" if not math.isfinite(x) else f"{x:.4g}"

    rows = []
    for r in results:
        hessian, ggn = getattr(r, "hessian", None), getattr(r, "ggn", None)
        if ggn is None or not ggn.sizes.get("checkpoint", 0) or "eigenvalue_largest" not in ggn:
            continue
        step = r.final_step if r.final_step is not None else -1
        top_ggn = float(final_entry(ggn, step)[0]["eigenvalue_largest"].isel(k=0))
        top_h = (float(final_entry(hessian, step)[0]["eigenvalue_largest"].isel(k=0))
                 if hessian is not None and "eigenvalue_largest" in hessian else math.nan)
        rows.append([r.label, str(r.seed), number(top_h), number(top_ggn),
                     number(top_ggn / top_h) if math.isfinite(top_h) and top_h != 0 else "–"])
    if not rows:
        return []
    return [paragraph("Top eigenvalue of the Hessian and of the generalised Gauss-Newton matrix G = J^T H_out J "
                      "(what many sharpness papers measure; for cross-entropy G is also the Fisher) at the final "
                      "checkpoint; not part of the verdicts."),
            table(["variant", "seed", "Hessian λ₁", "GGN λ₁", "GGN / Hessian"], rows)]


def _flatness_table(data: pd.DataFrame, measures: Sequence) -> Block:
    rows = []
    for _, g in data.groupby("variant", sort=False):
        rows.append([g["label"].iloc[0]] + [format_estimate(e.mean, e.se) for e in (_estimate(g, m.name)
                                                                                      for m in measures)])
    return table_block(["variant"] + [f"{m.label}{m.flags}" for m in measures], rows)


def write_report(results, out: str | os.PathLike, *, figures: dict[str, list[Path]] | None = None,
                 html: bool = False, weights: str = "raw") -> tuple[list[Path], list[Hypothesis]]:
    """Write the report of ``results`` to ``out`` (Markdown) and, with ``html``, next to it as ``.html``."""
    from landscape.io import atomic_write_text

    out = Path(out)
    blocks, hypotheses = build_report(results, figures=figures, report_path=out, weights=weights)
    atomic_write_text(out, render_markdown(blocks))
    paths = [out]
    if html:
        page = out.with_suffix(".html")
        atomic_write_text(page, render_html(blocks, title=REPORT_TITLE))
        paths.append(page)
    return paths, hypotheses
