import math

import numpy as np
import pytest
from scipy import special, stats

from landscape.statistics import (
    combine_seeds,
    compare,
    drop_noise_floor,
    hedges_g,
    interval_outcome,
    measure_verdict,
    rank_correlation,
    top1_standard_error,
    welch_arrays,
    welch_interval,
)


# == Welch's interval ============================================================================================
@pytest.mark.parametrize("n_a,n_b,scale_b", [(2, 2, 1.0), (3, 5, 4.0), (5, 3, 0.2), (4, 4, 1.0), (6, 2, 10.0)])
def test_welch_interval_matches_scipy_ttest_ind_with_unequal_variances(n_a, n_b, scale_b):
    rng = np.random.default_rng(n_a * 10 + n_b)
    a, b = rng.normal(1.0, 1.0, n_a), rng.normal(0.0, scale_b, n_b)
    d, se, df, low, high, p = welch_interval(combine_seeds(a), combine_seeds(b))
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert d == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert df == pytest.approx(ref.df, rel=1e-12)
    assert d / se == pytest.approx(ref.statistic, rel=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-10)
    assert (low, high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_welch_interval_by_hand():
    # a = 1, 2, 3: mean 2, variance 1, se² = 1/3;  b = 4, 6: mean 5, variance 2, se² = 1.
    # se_d² = 4/3 and nu = (4/3)² / ((1/3)²/2 + 1²/1) = (16/9) / (19/18) = 32/19.
    d, se, df, low, high, _ = welch_interval(combine_seeds([1.0, 2.0, 3.0]), combine_seeds([4.0, 6.0]))
    assert d == -3.0
    assert se == pytest.approx(math.sqrt(4 / 3), rel=1e-14)
    assert df == pytest.approx(32 / 19, rel=1e-14)
    half = stats.t.ppf(0.975, 32 / 19) * math.sqrt(4 / 3)
    assert (low, high) == pytest.approx((-3.0 - half, -3.0 + half), rel=1e-14)
    assert half > 2 * math.sqrt(4 / 3)  # at 1.7 degrees of freedom the t quantile is far above the normal 1.96


def test_estimator_errors_widen_the_seed_standard_error():
    est = combine_seeds([1.0, 3.0], [0.3, 0.4])
    assert est.mean == 2.0 and est.n == 2
    assert est.se == pytest.approx(math.sqrt(np.var([1, 3], ddof=1) / 2 + (0.09 + 0.16) / 4))
    one = combine_seeds([5.0, math.nan], [0.5, 0.1])
    assert one.n == 1 and one.se == 0.5 and math.isnan(one.sd)


def test_fewer_than_two_seeds_or_no_spread_makes_no_call():
    two = combine_seeds([1.0, 2.0])
    assert compare(combine_seeds([0.0]), two).outcome == "no call"
    assert compare(combine_seeds([1.0, 1.0]), combine_seeds([2.0, 2.0])).outcome == "no call"


def test_interval_outcome_follows_the_predicted_side():
    assert interval_outcome(-3.0, -1.0, "lower") == "as predicted"
    assert interval_outcome(-3.0, -1.0, "higher") == "opposite"
    assert interval_outcome(-1.0, 2.0, "lower") == "within noise"
    assert interval_outcome(math.nan, 1.0, "lower") == "no call"
    with pytest.raises(ValueError):
        interval_outcome(0.0, 1.0, "smaller")


# == Hedges' g ===================================================================================================
def test_hedges_g_by_hand():
    # pooled sd 1, d = -3, m = 4: J = Gamma(2) / (sqrt(2) Gamma(3/2)) = 1 / (sqrt(2) * sqrt(pi)/2) = sqrt(2/pi)
    g, low, high = hedges_g(combine_seeds([1.0, 2.0, 3.0]), combine_seeds([4.0, 5.0, 6.0]))
    assert g == pytest.approx(-3.0 * math.sqrt(2 / math.pi), rel=1e-12)
    # the bounds are the effects whose noncentral t puts the observed t = -3 / sqrt(2/3) at 97.5% and 2.5%
    scale = math.sqrt(2 / 3)
    assert stats.nct.cdf(-3 / scale, 4, low / scale) == pytest.approx(0.975, abs=1e-8)
    assert stats.nct.cdf(-3 / scale, 4, high / scale) == pytest.approx(0.025, abs=1e-8)
    assert low < -3.0 < high < 0.0


def test_hedges_g_interval_covers_the_planted_effect_95_percent_of_the_time():
    # delta lies in the interval exactly when the noncentral t with noncentrality delta / scale puts the observed
    # t between 2.5% and 97.5% (the cdf falls with the noncentrality): that decides coverage for many studies at
    # once, and hedges_g's own interval must agree with it study by study
    rng, delta, n, reps = np.random.default_rng(1), 1.0, 4, 4000
    a, b = rng.normal(delta, 1.0, (reps, n)), rng.normal(0.0, 1.0, (reps, n))
    pooled = np.sqrt((a.var(axis=1, ddof=1) + b.var(axis=1, ddof=1)) / 2)
    scale = math.sqrt(2 / n)
    t = (a.mean(axis=1) - b.mean(axis=1)) / pooled / scale
    level = stats.nct.cdf(t, 2 * n - 2, delta / scale)
    covered = (level >= 0.025) & (level <= 0.975)
    assert 0.94 <= covered.mean() <= 0.96  # 95% +- 3 binomial standard errors (0.34% at 4000 studies)
    for i in range(12):
        _, low, high = hedges_g(combine_seeds(a[i]), combine_seeds(b[i]))
        assert (low <= delta <= high) == covered[i]


def test_hedges_g_correction_is_the_exact_gamma_ratio():
    for m in (2, 5, 30):
        j = math.exp(special.gammaln(m / 2) - special.gammaln((m - 1) / 2)) / math.sqrt(m / 2)
        a, b = combine_seeds(np.arange(m // 2 + 1, dtype=float)), combine_seeds(np.arange(m - m // 2 + 1) + 2.0)
        pooled = math.sqrt(((a.n - 1) * a.sd**2 + (b.n - 1) * b.sd**2) / (a.n + b.n - 2))
        assert hedges_g(a, b)[0] == pytest.approx(j * (a.mean - b.mean) / pooled, rel=1e-12)
        assert abs(j - (1 - 3 / (4 * m - 1))) < 0.02  # Hedges' familiar approximation


# == simulated studies: false positives and power of the verdict rule ===========================================
def _simulated_verdicts(rng, studies: int, n: int, effect: float) -> np.ndarray:
    """Verdicts of studies comparing two variants on three correlated measures (the first invariant) with ``n``
    seeds each; variant a is lower than b by ``effect`` seed standard deviations in every measure."""
    cov = np.full((3, 3), 0.5) + 0.5 * np.eye(3)
    a = rng.multivariate_normal(np.full(3, -effect), cov, (studies, n))  # (study, seed, measure)
    b = rng.multivariate_normal(np.zeros(3), cov, (studies, n))
    se = lambda v: v.std(axis=1, ddof=1) / math.sqrt(n)  # noqa: E731
    _, _, _, low, high, _ = welch_arrays(a.mean(axis=1), se(a), n, b.mean(axis=1), se(b), n)
    invariant = (True, False, False)
    return np.array([measure_verdict([(interval_outcome(lo, hi, "lower"), inv)
                                      for lo, hi, inv in zip(low_row, high_row, invariant)])
                     for low_row, high_row in zip(low, high)])


def test_array_welch_equals_the_welch_of_each_pair():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 5))
    arrays = welch_arrays(a.mean(1), a.std(1, ddof=1) / math.sqrt(3), 3, b.mean(1), b.std(1, ddof=1) / math.sqrt(5), 5)
    for i in range(4):
        assert np.allclose([v[i] for v in arrays], welch_interval(combine_seeds(a[i]), combine_seeds(b[i])),
                           rtol=1e-13, atol=0)


@pytest.mark.parametrize("n", [3, 5])
def test_no_effect_is_called_supported_in_at_most_5_percent_of_studies(n):
    verdicts = _simulated_verdicts(np.random.default_rng(2024 + n), 2000, n, effect=0.0)
    rate = float(np.mean(verdicts == "supported"))
    # the invariant measure alone passes a one-sided 2.5% test; 2000 studies put the rate within +-0.7%
    assert rate <= 0.05
    assert float(np.mean(verdicts == "contradicted")) <= 0.05


def test_a_large_planted_effect_is_supported_with_high_power_at_five_seeds():
    verdicts = _simulated_verdicts(np.random.default_rng(7), 500, 5, effect=3.0)
    assert float(np.mean(verdicts == "supported")) >= 0.9
    assert not np.any(verdicts == "contradicted")


def test_welch_power_matches_the_noncentral_t_at_five_seeds():
    # equal variances and n: Welch's df is 8 only at equal sample variances, so allow a few points of slack
    # around the noncentral-t power of the pooled test at df = 8
    rng, n, effect, reps = np.random.default_rng(11), 5, 2.0, 4000
    a, b = rng.normal(-effect, 1, (reps, n)), rng.normal(0, 1, (reps, n))
    se = lambda v: v.std(axis=1, ddof=1) / math.sqrt(n)  # noqa: E731
    high = welch_arrays(a.mean(1), se(a), n, b.mean(1), se(b), n)[4]
    power = stats.nct.sf(stats.t.ppf(0.975, 8), 8, effect * math.sqrt(n / 2))
    assert float(np.mean(high < 0)) == pytest.approx(power, abs=0.05)
    assert float(np.mean(high < 0)) <= power  # Welch pays for not assuming equal variances


def test_verdict_rule_lets_only_the_invariant_measures_decide():
    assert measure_verdict([("as predicted", True), ("within noise", False)]) == "supported"
    assert measure_verdict([("within noise", True), ("as predicted", False), ("as predicted", False)]) == \
        "inconclusive"
    assert measure_verdict([("as predicted", True), ("opposite", False)]) == "inconclusive"
    assert measure_verdict([("opposite", True), ("within noise", False)]) == "contradicted"
    assert measure_verdict([("as predicted", False)]) == "inconclusive"
    assert measure_verdict([("as predicted", True), ("within noise", True)]) == "inconclusive"


# == the noise floor of top-1 ====================================================================================
def test_top1_standard_error_is_binomial_in_percentage_points():
    assert top1_standard_error(90.0, 10000) == pytest.approx(0.3, rel=1e-12)
    assert top1_standard_error(50.0, 100) == pytest.approx(5.0, rel=1e-12)
    assert np.allclose(top1_standard_error(np.array([90.0, 50.0]), 10000), [0.3, 0.5])


def test_drop_floor_by_hand():
    # two epochs: one earlier candidate, z = Phi^-1(0.95); se = sqrt(0.3² + 0.3²)
    floor = drop_noise_floor(90.0, 90.0 - 0.5, 10000, 2)
    assert floor.z == pytest.approx(stats.norm.isf(0.05), rel=1e-12)
    se = math.hypot(0.3, top1_standard_error(89.5, 10000))
    assert floor.se == pytest.approx(se, rel=1e-12)
    assert floor.above is (0.5 > floor.z * se)
    assert drop_noise_floor(90.0, 89.0, None, 10).above is None
    assert drop_noise_floor(91.0, 89.0, 10000, 11).z == pytest.approx(stats.norm.isf(0.005), rel=1e-12)


def test_a_plateau_of_binomial_noise_rarely_shows_a_drop_above_the_floor():
    # the true top-1 stays at 90% for 20 epochs; measured on 2000 images each epoch (independently)
    rng, n, epochs, runs = np.random.default_rng(3), 2000, 20, 1000
    curves = 100.0 * rng.binomial(n, 0.9, size=(runs, epochs)) / n
    above = [drop_noise_floor(c.max(), c[-1], n, epochs).above for c in curves]
    naive = np.mean(curves.max(axis=1) - curves[:, -1] > 2 * math.sqrt(2) * top1_standard_error(90.0, n))
    assert np.mean(above) <= 0.05
    assert naive > 0.05  # without counting the epochs the peak was chosen from, the max fools a 2-se rule


# == rank correlations ===========================================================================================
def test_rank_correlation_across_runs_is_spearman():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=12), rng.normal(size=12)
    assert rank_correlation(x, y).rho == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)


def test_exact_permutation_p_value_of_a_perfect_order():
    # five pairs in the same order: 2 of the 120 orderings reach |r_s| = 1
    r = rank_correlation([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert r.exact and r.rho == 1.0 and r.p == pytest.approx(2 / 120)
    assert r.outcome == "as predicted"
    assert rank_correlation([1, 2, 3, 4], [1, 2, 3, 4]).p == pytest.approx(2 / 24)


def test_within_group_correlation_removes_what_the_group_drives():
    # two variants: the second is higher in both x and y (across runs: positive), but within each variant
    # x and y run opposite ways
    x = [1.0, 2.0, 3.0, 11.0, 12.0, 13.0]
    y = [3.0, 2.0, 1.0, 13.0, 12.0, 11.0]
    groups = ["a"] * 3 + ["b"] * 3
    assert rank_correlation(x, y).rho > 0.5
    within = rank_correlation(x, y, groups, predicted="positive")
    assert within.rho == -1.0 and within.groups == 2
    # 3! * 3! = 36 within-group orderings, two of them reach |r_w| = 1
    assert within.exact and within.p == pytest.approx(2 / 36)


def test_within_group_correlation_is_the_weighted_mean_of_per_group_spearman():
    rng = np.random.default_rng(5)
    sizes = [3, 4, 5]
    x, y = [rng.normal(size=s) for s in sizes], [rng.normal(size=s) for s in sizes]
    groups = np.repeat(np.arange(3), sizes)
    weights = np.array([s**3 - s for s in sizes], dtype=float)
    per_group = np.array([stats.spearmanr(a, b).statistic for a, b in zip(x, y)])
    expected = float((weights * per_group).sum() / weights.sum())
    assert rank_correlation(np.concatenate(x), np.concatenate(y), groups).rho == pytest.approx(expected, rel=1e-12)


def test_rank_correlation_false_positive_rate_is_at_most_5_percent():
    rng = np.random.default_rng(6)
    groups = np.repeat(np.arange(7), 3)
    calls = {"across": 0, "within": 0}
    reps = 400
    for _ in range(reps):
        shift = np.repeat(rng.normal(size=7), 3)
        x, y = shift + rng.normal(size=21), rng.normal(size=21)
        calls["across"] += rank_correlation(x, y, resamples=499, seed=1).outcome != "within noise"
        calls["within"] += rank_correlation(x, y, groups, resamples=499, seed=1).outcome != "within noise"
    # se of a 5% rate over 400 studies is 1.1%; a valid test stays below 5% + 2.2 se
    assert calls["across"] / reps <= 0.075 and calls["within"] / reps <= 0.075


def test_too_few_pairs_make_no_call():
    assert rank_correlation([1, 2, 3], [1, 2, 3]).outcome == "no call"
    assert rank_correlation([1, 2, 3, 4], [1, 1, 1, 1]).outcome == "no call"
    # four runs in two variants leave 3 within-group degrees of freedom
    assert rank_correlation([1, 2, 3, 4], [1, 2, 3, 4], ["a", "a", "b", "b"]).outcome == "no call"
