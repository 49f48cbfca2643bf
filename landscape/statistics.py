"""Statistics that hold at a few seeds: Welch intervals, effect sizes, the noise floor of top-1, rank correlations
within groups, and the rule that turns measures into a verdict.

Pure numpy/scipy: no torch, no files. Every function takes plain sequences of numbers.

Seeds of a variant
------------------
For seeds :math:`i = 1..n` with values :math:`x_i` and estimator standard errors :math:`s_i` (Hutchinson's trace,
Monte Carlo sharpness; zero where the estimate is deterministic), the variant's value is the mean :math:`\\bar x`
with

.. math::  \\mathrm{se}(\\bar x)^2 = \\frac{\\operatorname{sd}(x)^2}{n} + \\frac{1}{n^2}\\sum_i s_i^2,

conservative, as the seed spread already contains some estimator noise.

Two variants
------------
The difference :math:`d = \\bar x_a - \\bar x_b` is judged with Welch's t interval,
:math:`d \\pm t_{1-\\alpha/2,\\,\\nu}\\,\\mathrm{se}_d`, :math:`\\mathrm{se}_d^2 = \\mathrm{se}_a^2 + \\mathrm{se}_b^2`, with the
Welch-Satterthwaite degrees of freedom

.. math::  \\nu = \\frac{(\\mathrm{se}_a^2 + \\mathrm{se}_b^2)^2}{\\mathrm{se}_a^4/(n_a - 1) + \\mathrm{se}_b^4/(n_b - 1)}.

Without estimator errors this is exactly :func:`scipy.stats.ttest_ind` with ``equal_var=False``; the estimator
part is given the seed part's degrees of freedom (it is small next to it in practice). The standardised effect is
Hedges' :math:`g = J\\,(\\bar x_a - \\bar x_b)/s_p` (pooled seed standard deviation :math:`s_p`,
:math:`J = \\Gamma(m/2) / (\\sqrt{m/2}\\,\\Gamma((m-1)/2))`, :math:`m = n_a + n_b - 2`), with the 95% interval of
the population effect :math:`\\delta` from inverting the noncentral t distribution of
:math:`t = d/(s_p\\sqrt{1/n_a + 1/n_b})` (exact under normal seeds of equal variance; Steiger & Fouladi 1997).

Top-1 on N images
-----------------
A top-1 :math:`p` measured on :math:`N` validation images has the binomial standard error
:math:`100\\sqrt{p(1-p)/N}` percentage points. The peak-to-final drop :math:`a^* - a_E` is a difference of two such
measurements; its standard error is taken as :math:`\\sqrt{\\sigma(a^*)^2 + \\sigma(a_E)^2}` (as if the errors were
independent: on the same images they are positively correlated, so this overstates the noise of the difference).
The peak is the largest of the :math:`E - 1` earlier measurements, which biases it upward even where the true
accuracy never fell. A drop counts as real only above :math:`z\\,\\mathrm{se}` with
:math:`z = \\Phi^{-1}(1 - \\alpha/(E-1))`: if no earlier epoch was truly better than the final one, each
:math:`a_e - a_E` exceeds that with probability at most :math:`\\alpha/(E-1)`, so the largest does with probability
at most :math:`\\alpha` (a union bound, whatever the dependence between epochs).

Rank correlations
-----------------
Across runs: Spearman's :math:`r_s`. Within groups (variants): the ranks are taken within each group and centred on
the group's mean rank, and :math:`r_w = \\sum_g\\sum_i \\tilde r^x_{gi}\\tilde r^y_{gi} /
\\sqrt{\\sum \\tilde r^{x\\,2} \\sum \\tilde r^{y\\,2}}`: a weighted mean of the per-group Spearman correlations, so
a variant that moves both the measure and the response contributes nothing. p-values are two-sided permutation
p-values (the response permuted across runs, or within each group for :math:`r_w`): exact by enumeration when the
permutations number at most ``resamples``, otherwise Monte Carlo with :math:`p = (1 + k)/(1 + B)` (seeded). The
95% interval is Fisher's z with the Bonett-Wright variance :math:`(1 + r^2/2)/(n' - 3)`, :math:`n' = n` across
runs and :math:`n' = n - G + 1` within :math:`G` groups (descriptive; the permutation p-value decides).

Verdicts
--------
:data:`VERDICT_RULE` states how the outcomes of several measures make a verdict: the measures invariant under
reparameterisation decide, the others can only hold a verdict back.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
PERMUTATIONS = 10000
OUTCOMES = ("as predicted", "opposite", "within noise", "no call")
VERDICTS = ("supported", "contradicted", "inconclusive")


# == seeds of one variant ========================================================================================
@dataclasses.dataclass(frozen=True)
class Estimate:
    """A variant's value of one measure: the mean over ``n`` seeds, its standard error (seed spread plus estimator
    error, see the module docstring), the seed standard deviation (``nan`` for one seed) and the values."""

    mean: float
    se: float
    n: int
    sd: float
    values: tuple[float, ...] = ()


def combine_seeds(values: Sequence[float], ses: Sequence[float] | None = None) -> Estimate:
    """Mean over seeds and :math:`\\mathrm{se}^2 = \\operatorname{sd}^2/n + \\sum_i s_i^2/n^2`, NaN values dropped
    (a NaN estimator error counts as 0). With one seed the standard error is the estimator's alone."""
    x = np.asarray(values, dtype=float).ravel()
    s = np.zeros_like(x) if ses is None else np.nan_to_num(np.asarray(ses, dtype=float).ravel(), nan=0.0)
    keep = np.isfinite(x)
    x, s = x[keep], s[keep]
    n = int(x.size)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan)
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    seed_part = sd**2 / n if n > 1 else 0.0
    se = math.sqrt(seed_part + float((s**2).sum()) / n**2)
    return Estimate(float(x.mean()), se, n, sd, tuple(float(v) for v in x))


# == two variants ================================================================================================
@dataclasses.dataclass(frozen=True)
class Difference:
    """``a - b`` with Welch's interval, and Hedges' g with the interval of the standardised effect.

    ``outcome`` is relative to the predicted direction (see :func:`interval_outcome`).
    """

    difference: float
    se: float
    df: float
    low: float
    high: float
    p: float
    g: float
    g_low: float
    g_high: float
    n_a: int
    n_b: int
    outcome: str


def welch_interval(a: Estimate, b: Estimate, confidence: float = CONFIDENCE) -> tuple[float, float, float, float,
                                                                                      float, float]:
    """``(d, se_d, df, low, high, p)`` of Welch's t for ``a - b``; NaNs where a side has fewer than 2 seeds or
    no spread at all (the noise is then unknown)."""
    out = welch_arrays(a.mean, a.se, a.n, b.mean, b.se, b.n, confidence)
    return tuple(float(v) for v in out)  # type: ignore[return-value]


def welch_arrays(mean_a, se_a, n_a, mean_b, se_b, n_b, confidence: float = CONFIDENCE):
    """:func:`welch_interval` on arrays (broadcast): ``(d, se_d, df, low, high, p)``, NaN where ``n < 2`` on a
    side or ``se_d`` is 0 or not finite (``d`` is always given)."""
    mean_a, se_a, n_a, mean_b, se_b, n_b = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (
        mean_a, se_a, n_a, mean_b, se_b, n_b)))
    d = mean_a - mean_b
    va, vb = se_a**2, se_b**2
    se = np.sqrt(va + vb)
    ok = (n_a >= 2) & (n_b >= 2) & np.isfinite(se) & (se > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = np.where(ok, (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1)), np.nan)
        half = stats.t.ppf(0.5 + confidence / 2, df) * se
        p = 2 * stats.t.sf(np.abs(d) / se, df)
    se = np.where(ok, se, np.nan)
    return d, se, df, d - half, d + half, p


def hedges_g(a: Estimate, b: Estimate, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Hedges' g of ``a - b`` and the ``confidence`` interval of the standardised effect :math:`\\delta` by
    noncentral-t inversion; NaNs with fewer than 2 seeds a side or no spread."""
    if a.n < 2 or b.n < 2 or not (math.isfinite(a.sd) and math.isfinite(b.sd)):
        return math.nan, math.nan, math.nan
    m = a.n + b.n - 2
    pooled = math.sqrt(((a.n - 1) * a.sd**2 + (b.n - 1) * b.sd**2) / m)
    if pooled == 0.0:
        return math.nan, math.nan, math.nan
    d = (a.mean - b.mean) / pooled
    correction = math.exp(special.gammaln(m / 2) - special.gammaln((m - 1) / 2)) / math.sqrt(m / 2)
    scale = math.sqrt(1 / a.n + 1 / b.n)
    t = d / scale
    low = _noncentrality(t, m, 0.5 + confidence / 2) * scale
    high = _noncentrality(t, m, 0.5 - confidence / 2) * scale
    return correction * d, low, high


def _noncentrality(t: float, df: float, level: float) -> float:
    """The noncentrality :math:`\\lambda` with :math:`P(T_{df,\\lambda} \\le t) = \\text{level}` (decreasing in
    :math:`\\lambda`)."""
    def f(lam: float) -> float:
        return float(special.nctdtr(df, lam, t)) - level  # the noncentral t cdf without scipy.stats' overhead

    width = 2.0 + abs(t)
    lo, hi = t - width, t + width
    while f(lo) < 0:
        lo -= width
    while f(hi) > 0:
        hi += width
    return float(optimize.brentq(f, lo, hi, xtol=1e-10))


def interval_outcome(low: float, high: float, predicted: str = "lower") -> str:
    """*as predicted* when the interval of ``a - b`` lies wholly on the predicted side of 0 (``lower``: below,
    ``higher``: above), *opposite* when it lies wholly on the other side, *within noise* when it contains 0,
    *no call* when it is unknown (NaN)."""
    if predicted not in ("lower", "higher", "positive", "negative"):
        raise ValueError(f"predicted must be 'lower', 'higher', 'positive' or 'negative', not {predicted!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no call"
    sign = -1.0 if predicted in ("lower", "negative") else 1.0
    lo, hi = sorted((sign * low, sign * high))
    return "as predicted" if lo > 0 else ("opposite" if hi < 0 else "within noise")


def compare(a: Estimate, b: Estimate, *, predicted: str = "lower", confidence: float = CONFIDENCE) -> Difference:
    """Variant ``a`` against ``b``: Welch's interval of ``a - b``, Hedges' g, and the outcome for ``a`` being
    predicted ``lower`` (or ``higher``) than ``b``."""
    d, se, df, low, high, p = welch_interval(a, b, confidence)
    g, g_low, g_high = hedges_g(a, b, confidence)
    return Difference(d, se, df, low, high, p, g, g_low, g_high, a.n, b.n, interval_outcome(low, high, predicted))


# == the noise floor of top-1 ====================================================================================
def top1_standard_error(top1: float | np.ndarray, n: float | np.ndarray) -> float | np.ndarray:
    """Binomial standard error, in percentage points, of a top-1 of ``top1`` percent measured on ``n`` images."""
    p = np.clip(np.asarray(top1, dtype=float) / 100.0, 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 100.0 * np.sqrt(p * (1.0 - p) / np.asarray(n, dtype=float))
    return float(out) if np.ndim(out) == 0 else out


@dataclasses.dataclass(frozen=True)
class DropFloor:
    """A peak-to-final drop (percentage points) against its noise floor: ``se`` of the difference of two top-1
    measurements, ``threshold`` = z·se (see the module docstring); ``above`` is ``None`` when N is unknown."""

    drop: float
    se: float
    threshold: float
    z: float
    above: bool | None


def drop_noise_floor(peak: float, final: float, n: float | None, epochs: int | None,
                     alpha: float = ALPHA) -> DropFloor:
    """The drop ``peak - final`` and whether it exceeds the noise floor of top-1 on ``n`` images, the peak being
    the best of ``epochs`` measurements (the final one included)."""
    drop = float(peak) - float(final)
    if n is None or not math.isfinite(float(n)) or n <= 0 or not math.isfinite(drop):
        return DropFloor(drop, math.nan, math.nan, math.nan, None)
    se = math.hypot(top1_standard_error(peak, n), top1_standard_error(final, n))
    candidates = max(int(epochs or 2) - 1, 1)
    z = float(stats.norm.isf(alpha / candidates))
    return DropFloor(drop, se, z * se, z, bool(drop > z * se))


# == rank correlations ===========================================================================================
@dataclasses.dataclass(frozen=True)
class RankCorrelation:
    """Spearman's r_s (or its within-group form) with its interval, two-sided permutation p-value and outcome.

    ``groups`` is 0 across runs; ``exact`` says whether the p-value enumerates every permutation.
    """

    rho: float
    low: float
    high: float
    p: float
    n: int
    groups: int
    exact: bool
    outcome: str


def _centred_ranks(v: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Average ranks within each group minus the group's mean rank, :math:`(n_g + 1)/2`."""
    same = groups[:, None] == groups[None, :]
    less = ((v[None, :] < v[:, None]) & same).sum(axis=1)
    ties = ((v[None, :] == v[:, None]) & same).sum(axis=1)
    return less + (ties + 1) / 2 - (same.sum(axis=1) + 1) / 2


def rank_correlation(x: Sequence[float], y: Sequence[float], groups: Sequence | None = None, *,
                     predicted: str = "positive", resamples: int = PERMUTATIONS, seed: int = 0,
                     confidence: float = CONFIDENCE, alpha: float = ALPHA) -> RankCorrelation:
    """Rank correlation of ``x`` and ``y`` over the pairs where both are finite: across all pairs (``groups``
    None) or within ``groups``; see the module docstring. *as predicted* when the permutation p-value is below
    ``alpha`` and the sign is the ``predicted`` one, *opposite* when below with the other sign, *within noise*
    otherwise; *no call* when fewer than 4 pairs (4 degrees of freedom within groups) or no spread."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    g = np.zeros(x.size, dtype=int) if groups is None else np.unique(np.asarray(groups).astype(str),
                                                                     return_inverse=True)[1].ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, g = x[keep], y[keep], g[keep]
    n = int(x.size)
    sizes = np.bincount(g) if n else np.zeros(0, int)
    informative = int((sizes >= 2).sum())
    effective = int(sizes[sizes >= 2].sum()) - informative + 1 if groups is not None else n
    rx, ry = _centred_ranks(x, g), _centred_ranks(y, g)
    norm = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    n_groups = informative if groups is not None else 0
    if effective < 4 or norm == 0.0:
        rho = float((rx * ry).sum() / norm) if norm else math.nan
        return RankCorrelation(rho, math.nan, math.nan, math.nan, n, n_groups, False, "no call")
    rho = float((rx * ry).sum() / norm)
    perms, exact = _permuted_indices(g, resamples, seed)
    null = (ry[perms] @ rx) / norm
    hits = int((np.abs(null) >= abs(rho) - 1e-12).sum())
    p = hits / len(perms) if exact else (1 + hits) / (1 + len(perms))
    low, high = _fisher_interval(rho, effective, confidence)
    if p < alpha:
        outcome = "as predicted" if (rho > 0) == (predicted == "positive") else "opposite"
    else:
        outcome = "within noise"
    return RankCorrelation(rho, low, high, float(p), n, n_groups, exact, outcome)


def _permuted_indices(groups: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, bool]:
    """Index arrays that permute positions within each group: all of them (``exact``) when they number at most
    ``resamples``, else ``resamples`` random ones."""
    members = [np.flatnonzero(groups == k) for k in np.unique(groups)]
    total = math.prod(math.factorial(len(m)) for m in members)
    if total <= resamples:
        rows = []
        for combo in itertools.product(*(itertools.permutations(m) for m in members)):
            index = np.arange(groups.size)
            for m, order in zip(members, combo):
                index[m] = order
            rows.append(index)
        return np.array(rows), True
    rng = np.random.default_rng(seed)
    index = np.tile(np.arange(groups.size), (resamples, 1))
    for m in members:
        index[:, m] = rng.permuted(np.tile(m, (resamples, 1)), axis=1)
    return index, False


def _fisher_interval(r: float, n: int, confidence: float) -> tuple[float, float]:
    if n <= 3:
        return math.nan, math.nan
    r = float(np.clip(r, -0.999999, 0.999999))
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * math.sqrt((1 + r**2 / 2) / (n - 3))
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


# == from measures to a verdict ==================================================================================
VERDICT_RULE = (
    "The measures that stay unchanged under reparameterisations of the weights that keep the network function "
    "(adaptive sharpness) decide; the others can only hold a verdict back. A comparison is *supported* when at "
    "least one invariant measure votes, every voting invariant measure comes out *as predicted*, and no voting "
    "measure comes out *opposite*; *contradicted* in the mirror case; *inconclusive* otherwise, in particular when "
    "no invariant measure votes, however many of the others agree (the reason then says how they lean)."
)


def measure_verdict(outcomes: Sequence[tuple[str, bool]]) -> str:
    """The verdict of :data:`VERDICT_RULE` from ``(outcome, invariant)`` pairs of the voting measures."""
    invariant = [o for o, inv in outcomes if inv]
    every = [o for o, _ in outcomes]
    if invariant and all(o == "as predicted" for o in invariant) and "opposite" not in every:
        return "supported"
    if invariant and all(o == "opposite" for o in invariant) and "as predicted" not in every:
        return "contradicted"
    return "inconclusive"


def all_or_nothing(verdicts: Sequence[str]) -> str:
    """Several comparisons of one hypothesis: supported (contradicted) when every one is, inconclusive
    otherwise and when there is none."""
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    if verdicts and all(v == "contradicted" for v in verdicts):
        return "contradicted"
    return "inconclusive"
