"""dsdtune.stats against scipy/statsmodels, the DSD appendix check vector, and every guard."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import gamma
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from dsdtune import stats as S

NAN = float("nan")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def samples(rng: np.random.Generator, n_a: int = 9, n_b: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """Unequal n and unequal SD so that Welch differs from Student."""
    return rng.normal(0.91, 0.01, n_a), rng.normal(0.90, 0.03, n_b)


# ----------------------------------------------------------------------------- DSD check vector


def test_dsd_appendix_welch_check_vector():
    r = S.welch_t_from_stats(7.89, 0.03, 16, 7.97, 0.04, 16)
    assert r.status == "ok"
    assert f"{r.statistic:.3f}" == "-6.400"
    assert f"{r.df:.2f}" == "27.82"
    assert f"{r.p_value:.2e}" == "6.47e-07"
    assert f"{r.ci_low:.4f}" == "-0.1056"
    assert f"{r.ci_high:.4f}" == "-0.0544"
    assert r.diff == pytest.approx(-0.08)
    assert (r.n_a, r.n_b) == (16, 16)


def test_dsd_appendix_hedges_g_check_vector():
    g = S.hedges_g_from_stats(7.89, 0.03, 16, 7.97, 0.04, 16)
    assert g.status == "ok"
    assert f"{g.value:.3f}" == "-2.206"


# ----------------------------------------------------------------------------- t-tests vs scipy


def test_welch_matches_scipy_welch_not_student(rng):
    a, b = samples(rng)
    r = S.welch_t(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    student = sps.ttest_ind(a, b, equal_var=True)
    assert r.status == "ok"
    assert r.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert r.df == pytest.approx(ref.df, rel=1e-12)
    assert r.df != pytest.approx(student.df)  # really Welch's df, not n_a + n_b - 2
    assert r.diff == pytest.approx(a.mean() - b.mean())
    ci = ref.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_welch_df_and_ci_follow_the_spec_formula(rng):
    a, b = samples(rng)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = sps.t.ppf(0.95, df) * math.sqrt(va + vb)  # 90% interval
    r = S.welch_t(a, b, confidence=0.90)
    assert r.confidence == 0.90
    assert r.df == pytest.approx(df)
    assert r.ci_low == pytest.approx(a.mean() - b.mean() - half)
    assert r.ci_high == pytest.approx(a.mean() - b.mean() + half)


def test_welch_from_stats_agrees_with_samples(rng):
    a, b = samples(rng)
    r1 = S.welch_t(a, b)
    r2 = S.welch_t_from_stats(a.mean(), a.std(ddof=1), a.size, b.mean(), b.std(ddof=1), b.size)
    for f in ("statistic", "df", "p_value", "diff", "ci_low", "ci_high"):
        assert getattr(r2, f) == pytest.approx(getattr(r1, f), rel=1e-9), f


def test_paired_matches_ttest_rel(rng):
    b = rng.normal(0.9, 0.02, 8)
    a = b + rng.normal(0.005, 0.003, 8)
    r = S.paired_t(a, b)
    ref = sps.ttest_rel(a, b)
    assert r.status == "ok"
    assert r.statistic == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue)
    assert r.df == 7
    assert r.diff == pytest.approx(np.mean(a - b))
    ci = ref.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert (r.n_a, r.n_b) == (8, 8)
    # pairing matters: the unpaired test on the same numbers is far weaker here
    assert r.p_value < S.welch_t(a, b).p_value


def test_one_sample_matches_ttest_1samp_and_labels_reference(rng):
    a = rng.normal(0.92, 0.01, 7)
    r = S.one_sample_t(a, 0.915)
    ref = sps.ttest_1samp(a, 0.915)
    assert r.statistic == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue)
    assert r.df == 6
    assert r.diff == pytest.approx(a.mean() - 0.915)
    ci = ref.confidence_interval(0.95)  # CI of the mean; ours is of mean - value
    assert r.ci_low == pytest.approx(ci.low - 0.915)
    assert r.ci_high == pytest.approx(ci.high - 0.915)
    assert "reference variance ignored" in r.note
    assert r.n_b is None


# ----------------------------------------------------------------------------- rank tests vs scipy


def test_mann_whitney_matches_scipy(rng):
    a, b = samples(rng)
    r = S.mann_whitney(a, b)
    ref = sps.mannwhitneyu(a, b, alternative="two-sided")
    assert r.status == "ok"
    assert r.statistic == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue)
    assert r.min_p == pytest.approx(2 / math.comb(22, 9))


def test_wilcoxon_matches_scipy(rng):
    b = rng.normal(0.9, 0.02, 12)
    a = b + rng.normal(0.004, 0.005, 12)
    r = S.wilcoxon_signed_rank(a, b)
    ref = sps.wilcoxon(a, b, alternative="two-sided")
    assert r.status == "ok"
    assert r.statistic == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue)
    assert r.min_p == pytest.approx(2 / 2**12)


def test_wilcoxon_drops_zero_differences_like_scipy():
    a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    b = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]  # first difference is zero
    r = S.wilcoxon_signed_rank(a, b)
    ref = sps.wilcoxon(a, b, zero_method="wilcox")
    assert r.p_value == pytest.approx(ref.pvalue)
    assert r.min_p == pytest.approx(2 / 2**7)
    assert "1 zero difference" in r.note


# ----------------------------------------------------------------------------- effect sizes


def test_hedges_g_matches_direct_computation(rng):
    a, b = samples(rng)
    n1, n2 = a.size, b.size
    nu = n1 + n2 - 2
    sp = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / nu)
    j = gamma(nu / 2) / (math.sqrt(nu / 2) * gamma((nu - 1) / 2))
    g = S.hedges_g(a, b)
    assert g.status == "ok"
    assert g.value == pytest.approx(j * (a.mean() - b.mean()) / sp, rel=1e-12)
    assert S.hedges_g(b, a).value == pytest.approx(-g.value)


def test_hedges_correction_is_stable_for_large_nu():
    # Gamma itself overflows past ~171; the approximation 1 - 3/(4 nu - 1) is accurate there
    assert S.hedges_correction(1000) == pytest.approx(1 - 3 / (4 * 1000 - 1), rel=1e-6)
    assert S.hedges_correction(2) == pytest.approx(1 / math.sqrt(math.pi))  # Gamma(1)/Gamma(1/2)


def test_prob_superiority_counts_ties_as_half(rng):
    a, b = [1.0, 2.0, 3.0], [2.0, 2.0, 5.0]
    # brute force: pairs with a > b count 1, ties 0.5
    assert S.prob_superiority(a, b).value == pytest.approx(3 / 9)
    x, y = samples(rng)
    brute = np.mean((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :]))
    p = S.prob_superiority(x, y)
    assert p.value == pytest.approx(brute)
    assert S.prob_superiority(y, x).value == pytest.approx(1 - brute)
    assert S.prob_superiority([1.0], [1.0]).value == 0.5


# ----------------------------------------------------------------------------- multiplicity


def holm_by_spec(p: list[float]) -> list[float]:
    """p_adj(i) = max over j <= i of min(1, (m - j + 1) p(j)), in sorted order (stats.md)."""
    m = len(p)
    order = np.argsort(p)
    out = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order, start=1):
        running = max(running, min(1.0, (m - rank + 1) * p[i]))
        out[i] = running
    return out.tolist()


def bh_by_definition(p: list[float]) -> list[float]:
    m = len(p)
    order = np.argsort(p)
    out = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        out[i] = running
    return out.tolist()


def test_holm_hand_example():
    r = S.holm([0.01, 0.04, 0.03, 0.5])
    assert r.m == 4
    assert r.p_adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_holm_and_bh_match_definitions_and_statsmodels(rng):
    p = rng.uniform(0, 0.2, 15).tolist()
    h, bh = S.holm(p), S.benjamini_hochberg(p)
    assert h.p_adjusted == pytest.approx(holm_by_spec(p))
    assert h.p_adjusted == pytest.approx(multipletests(p, method="holm")[1].tolist())
    assert bh.p_adjusted == pytest.approx(bh_by_definition(p))
    assert bh.p_adjusted == pytest.approx(multipletests(p, method="fdr_bh")[1].tolist())
    # not the Holm-Sidak default of multipletests
    assert h.p_adjusted != pytest.approx(multipletests(p)[1].tolist())


def test_holm_leaves_the_garbage_collector_as_it_found_it():
    """Holm keeps statsmodels' full gc.collect() from visiting the process's older objects by
    freezing them for the call; they are handed back after it, and a process's own freeze is kept."""
    import gc

    cycle = []
    cycle.append(cycle)
    assert gc.get_freeze_count() == 0
    assert S.holm([0.01, 0.04, 0.03]).p_adjusted == pytest.approx(holm_by_spec([0.01, 0.04, 0.03]))
    assert gc.get_freeze_count() == 0 and gc.is_tracked(cycle)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        S.holm([0.01, 0.04])
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_holm_with_missing_entries_keeps_alignment_and_reports_m():
    p = [0.01, None, 0.04, NAN, 0.03]
    r = S.holm(p)
    assert r.m == 3
    assert r.p_adjusted[1] is None and r.p_adjusted[3] is None
    assert [r.p_adjusted[i] for i in (0, 2, 4)] == pytest.approx(holm_by_spec([0.01, 0.04, 0.03]))
    bh = S.benjamini_hochberg(p)
    assert bh.m == 3 and bh.p_adjusted[1] is None
    assert [bh.p_adjusted[i] for i in (0, 2, 4)] == pytest.approx(
        bh_by_definition([0.01, 0.04, 0.03]))


def test_adjust_edge_cases():
    assert S.holm([]).m == 0 and S.holm([]).p_adjusted == []
    assert S.holm([None, None]).p_adjusted == [None, None]
    with pytest.raises(ValueError):
        S.holm([0.5, 1.2])


# ----------------------------------------------------------------------------- power


def test_minimum_detectable_effect_matches_statsmodels():
    r = S.minimum_detectable_effect(8, 12, sd=0.02)
    d = TTestIndPower().solve_power(effect_size=None, nobs1=8, ratio=1.5, alpha=0.05, power=0.8,
                                    alternative="two-sided")
    assert r.status == "ok" and r.design == "independent"
    assert r.effect_size == pytest.approx(float(d))
    assert r.effect_metric == pytest.approx(0.02 * float(d))
    # at that effect the design really has 80% power
    assert TTestIndPower().power(r.effect_size, 8, 0.05, ratio=1.5) == pytest.approx(0.8)
    # more seeds detect smaller effects
    assert S.minimum_detectable_effect(16, 16).effect_size < r.effect_size
    assert S.minimum_detectable_effect(8, 12).effect_metric is None


def test_minimum_detectable_effect_paired_matches_statsmodels():
    r = S.minimum_detectable_effect_paired(10, sd_diff=0.01)
    d = TTestPower().solve_power(effect_size=None, nobs=10, alpha=0.05, power=0.8,
                                 alternative="two-sided")
    assert r.design == "paired" and r.status == "ok"
    assert r.effect_size == pytest.approx(float(d))
    assert r.effect_metric == pytest.approx(0.01 * float(d))


def test_minimum_detectable_effect_guards():
    assert S.minimum_detectable_effect(1, 5).status == "insufficient_n"
    assert S.minimum_detectable_effect(1, 5).effect_size is None
    assert S.minimum_detectable_effect_paired(1).status == "insufficient_n"


# ----------------------------------------------------------------------------- describe


def test_describe(rng):
    x = rng.normal(0.9, 0.02, 10)
    s = S.describe(x)
    assert s.status == "ok" and s.n == 10 and s.n_dropped == 0
    assert s.mean == pytest.approx(x.mean())
    assert s.sd == pytest.approx(x.std(ddof=1))
    assert s.sem == pytest.approx(sps.sem(x))
    lo, hi = sps.t.interval(0.95, 9, loc=x.mean(), scale=sps.sem(x))
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert (s.median, s.min, s.max) == (np.median(x), x.min(), x.max())


def test_describe_small_and_missing():
    one = S.describe([0.5, NAN, None])
    assert one.status == "insufficient_n" and one.n == 1 and one.n_dropped == 2
    assert one.mean == 0.5 and one.median == 0.5
    assert one.sd is None and one.sem is None and one.ci_low is None and one.ci_high is None
    empty = S.describe([NAN])
    assert empty.status == "insufficient_n" and empty.n == 0 and empty.mean is None
    const = S.describe([0.1, 0.1, 0.1])
    assert const.status == "ok" and const.sd == 0.0 and const.ci_low == const.ci_high


# ----------------------------------------------------------------------------- guards


def all_finite_or_none(obj) -> bool:
    """No NaN/inf anywhere in a result dataclass."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            return False
    return True


@pytest.mark.parametrize("fn", [S.welch_t, S.paired_t])
def test_insufficient_n(fn):
    r = fn([0.9], [0.8])
    assert r.status == "insufficient_n"
    assert r.p_value is None and r.statistic is None and r.ci_low is None
    assert all_finite_or_none(r)


def test_insufficient_n_one_group_and_empty():
    r = S.welch_t([0.9], [0.8, 0.85, 0.82])
    assert r.status == "insufficient_n" and (r.n_a, r.n_b) == (1, 3)
    assert S.welch_t_from_stats(0.9, 0.0, 1, 0.8, 0.01, 5).status == "insufficient_n"
    assert S.one_sample_t([0.9], 0.8).status == "insufficient_n"
    assert S.hedges_g([0.9], [0.8, 0.7]).status == "insufficient_n"
    assert S.hedges_g([0.9], [0.8, 0.7]).value is None
    empty = S.welch_t([], [0.8, 0.9])
    assert empty.status == "insufficient_n" and empty.diff is None
    assert S.mann_whitney([], [1.0]).status == "insufficient_n"
    assert S.prob_superiority([], [1.0]).status == "insufficient_n"
    assert S.wilcoxon_signed_rank([NAN], [1.0]).status == "insufficient_n"


def test_no_variance_instead_of_infinite_t():
    # deterministic runs: scipy would give t = -inf, p = 0 here
    r = S.welch_t([0.9, 0.9, 0.9], [0.95, 0.95, 0.95])
    assert r.status == "no_variance"
    assert r.p_value is None and r.statistic is None
    assert r.diff == pytest.approx(-0.05)
    assert all_finite_or_none(r)
    assert S.welch_t([0.1] * 4, [0.1] * 4).status == "no_variance"
    assert S.welch_t_from_stats(0.9, 0.0, 3, 0.95, 0.0, 3).status == "no_variance"
    # one constant group alone is fine for Welch: df = n_b - 1
    one = S.welch_t([0.9, 0.9, 0.9], [0.95, 0.96, 0.94])
    assert one.status == "ok" and one.df == pytest.approx(2.0)
    assert S.hedges_g([0.1] * 3, [0.2] * 3).status == "no_variance"
    assert S.hedges_g_from_stats(0.1, 0.0, 3, 0.2, 0.0, 3).status == "no_variance"


def test_paired_no_variance_when_all_differences_equal():
    # equal per-seed differences (e.g. deterministic runs): ttest_rel would give t = inf, p = 0
    r = S.paired_t([0.5, 0.75, 1.0], [0.25, 0.5, 0.75])
    assert r.status == "no_variance" and r.p_value is None and r.statistic is None
    assert r.diff == 0.25
    assert all_finite_or_none(r)
    assert S.one_sample_t([0.3, 0.3, 0.3], 0.2).status == "no_variance"


def test_mann_whitney_3_vs_3_cannot_reach_alpha():
    r = S.mann_whitney([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])  # complete separation
    assert r.status == "rank_test_cannot_reach_alpha"
    assert r.statistic == 0.0  # still computed
    assert r.min_p == pytest.approx(0.1)
    assert r.p_value >= 0.05
    assert "0.1" in r.note
    assert S.mann_whitney([0.1, 0.2, 0.3, 0.35], [0.4, 0.5, 0.6, 0.7]).status == "ok"
    # the threshold follows alpha
    assert S.mann_whitney([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], alpha=0.1).status == "ok"


def test_wilcoxon_5_pairs_cannot_reach_alpha_6_can():
    b = [0.0] * 6
    r5 = S.wilcoxon_signed_rank([1, 2, 3, 4, 5], b[:5])
    assert r5.status == "rank_test_cannot_reach_alpha"
    assert r5.statistic == 0.0 and r5.min_p == pytest.approx(1 / 16)
    r6 = S.wilcoxon_signed_rank([1, 2, 3, 4, 5, 6], b)
    assert r6.status == "ok" and r6.p_value < 0.05
    # zero differences do not count as pairs: 6 pairs with one zero behave like 5
    assert S.wilcoxon_signed_rank([0, 2, 3, 4, 5, 6], b).status == "rank_test_cannot_reach_alpha"


def test_rank_tests_all_tied():
    r = S.wilcoxon_signed_rank([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert r.status == "no_variance" and r.p_value is None and r.diff == 0.0
    m = S.mann_whitney([0.5] * 4, [0.5] * 4)
    assert m.status == "no_variance" and m.p_value is None
    assert all_finite_or_none(r) and all_finite_or_none(m)


def test_nan_and_inf_are_dropped_and_counted(rng):
    a, b = samples(rng)
    r = S.welch_t(list(a) + [NAN, None], list(b) + [math.inf])
    ref = S.welch_t(a, b)
    assert (r.n_a, r.n_b) == (a.size, b.size)
    assert r.p_value == pytest.approx(ref.p_value)
    assert "a: 2" in r.note and "b: 1" in r.note
    m = S.mann_whitney(list(a) + [NAN], b)
    assert m.n_a == a.size and m.p_value == pytest.approx(S.mann_whitney(a, b).p_value)
    g = S.hedges_g(list(a) + [NAN], b)
    assert g.value == pytest.approx(S.hedges_g(a, b).value)


def test_paired_drops_incomplete_pairs():
    a = [0.91, 0.92, NAN, 0.95, 0.90]
    b = [0.90, 0.90, 0.93, None, 0.89]
    r = S.paired_t(a, b)
    ref = sps.ttest_rel([0.91, 0.92, 0.90], [0.90, 0.90, 0.89])
    assert r.n_a == 3 and r.p_value == pytest.approx(ref.pvalue)
    assert "2 incomplete pair" in r.note
    with pytest.raises(ValueError):
        S.paired_t([1.0, 2.0], [1.0])


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        S.welch_t([1.0, 2.0], [1.0, 3.0], confidence=95)
    with pytest.raises(ValueError):
        S.welch_t_from_stats(1.0, -0.1, 5, 1.0, 0.1, 5)
    with pytest.raises(ValueError):
        S.welch_t(np.ones((2, 2)), [1.0, 2.0])


def test_results_are_frozen():
    r = S.welch_t_from_stats(7.89, 0.03, 16, 7.97, 0.04, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.p_value = 0.5  # type: ignore[misc]


# ----------------------------------------------------------------------------- equivalence (TOST)


def test_tost_paired_equals_statsmodels_and_hand_formula(rng):
    from statsmodels.stats.weightstats import ttost_paired
    a = rng.normal(0.66, 0.005, 8)
    b = a + rng.normal(0.001, 0.002, 8)
    r = S.tost_paired(a, b, margin=0.005)
    p, (t1, p1, df1), (t2, p2, _) = ttost_paired(a, b, -0.005, 0.005)
    assert r.status == "ok" and r.test == "tost_paired" and (r.n_a, r.n_b) == (8, 8)
    assert r.p_value == pytest.approx(float(p), rel=1e-12)
    assert (r.p_lower, r.p_upper) == pytest.approx((float(p1), float(p2)), rel=1e-12)
    assert (r.t_lower, r.t_upper, r.df) == pytest.approx((float(t1), float(t2), 7.0), rel=1e-12)
    d = a - b
    se = d.std(ddof=1) / np.sqrt(8)
    assert r.p_lower == pytest.approx(sps.t.sf((d.mean() + 0.005) / se, 7), rel=1e-9)
    assert r.p_upper == pytest.approx(sps.t.cdf((d.mean() - 0.005) / se, 7), rel=1e-9)
    # The 90% t-interval lies inside the margin exactly when TOST rejects at 0.05.
    half = sps.t.ppf(0.95, 7) * se
    assert r.confidence == pytest.approx(0.90)
    assert (r.ci_low, r.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-9)
    assert (r.p_value < 0.05) == (-0.005 < r.ci_low and r.ci_high < 0.005)


def test_tost_welch_equals_statsmodels_unequal_variances(rng):
    from statsmodels.stats.weightstats import ttost_ind
    a, b = samples(rng)
    for margin in (0.005, 0.02, 0.05):
        r = S.tost_welch(a, b, margin)
        p, (t1, p1, df1), (t2, p2, _) = ttost_ind(a, b, -margin, margin, usevar="unequal")
        assert r.status == "ok" and r.test == "tost_welch"
        assert r.p_value == pytest.approx(float(p), rel=1e-12)
        assert (r.p_lower, r.p_upper) == pytest.approx((float(p1), float(p2)), rel=1e-12)
        assert r.df == pytest.approx(S.welch_t(a, b).df, rel=1e-9)  # Welch df, not n_a + n_b - 2
        w90 = S.welch_t(a, b, confidence=0.90)
        assert (r.ci_low, r.ci_high) == pytest.approx((w90.ci_low, w90.ci_high), rel=1e-12)
        assert (r.p_value < 0.05) == (-margin < r.ci_low and r.ci_high < margin)
    student, *_ = ttost_ind(a, b, -0.02, 0.02)  # statsmodels' default pools the variances
    assert S.tost_welch(a, b, 0.02).p_value != pytest.approx(float(student), rel=1e-6)


def test_tost_guards_and_bad_margin():
    assert S.tost_welch([0.5], [0.5, 0.6], 0.01).status == "insufficient_n"
    assert S.tost_paired([0.5, 0.5, 0.5], [0.4, 0.4, 0.4], 0.2).status == "no_variance"
    r = S.tost_paired([0.5, NAN, 0.6, 0.7], [0.5, 0.6, 0.6, 0.69], 0.05)
    assert r.status == "ok" and r.n_a == 3 and "incomplete pair" in r.note
    for bad in (0.0, -0.01, NAN, math.inf):
        with pytest.raises(ValueError, match="margin"):
            S.tost_paired([0.1, 0.2], [0.1, 0.3], bad)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_seeded_and_close_to_t_interval_for_large_n(rng):
    a, b = rng.normal(0.9, 0.01, 300), rng.normal(0.89, 0.02, 300)
    r1 = S.bootstrap_ci_diff(a, b, paired=False, seed=7)
    r2 = S.bootstrap_ci_diff(a, b, paired=False, seed=7)
    assert r1 == r2 and r1.status == "ok" and r1.ci_low < a.mean() - b.mean() < r1.ci_high
    w = S.welch_t(a, b)
    assert r1.ci_low == pytest.approx(w.ci_low, abs=0.15 * (w.ci_high - w.ci_low))
    assert r1.ci_high == pytest.approx(w.ci_high, abs=0.15 * (w.ci_high - w.ci_low))
    p = S.bootstrap_ci_diff(a, a - 0.001 + rng.normal(0, 0.001, 300), paired=True, seed=1)
    t = S.paired_t(a, a - 0.001 + rng.normal(0, 0.001, 300))
    assert p.status == "ok" and p.paired and 0.0005 < p.ci_low < 0.001 < p.ci_high < 0.0015
    assert t.ok
    assert S.bootstrap_ci_diff(a, b, paired=False, seed=8) != r1  # the seed matters


def test_bootstrap_guards():
    assert S.bootstrap_ci_diff([0.5], [0.4, 0.3], paired=False).status == "insufficient_n"
    assert S.bootstrap_ci_diff([0.5, 0.5], [0.4, 0.4], paired=False).status == "no_variance"
    assert S.bootstrap_ci_diff([0.5, 0.6], [0.4, 0.5], paired=True).status == "no_variance"


# ----------------------------------------------------------------------------- Friedman


def test_friedman_iman_davenport_hand_computed():
    # Ranks (1 = best): [1,2,3], [2,1,3], [1,3,2], [1,2,3] -> rank sums 5, 8, 11.
    table = [[0.90, 0.80, 0.70], [0.85, 0.86, 0.70], [0.90, 0.70, 0.80], [0.95, 0.90, 0.60]]
    r = S.friedman_ranks(table)
    assert r.status == "ok" and (r.n_blocks, r.k) == (4, 3)
    assert r.average_ranks == pytest.approx([1.25, 2.0, 2.75])
    # chi2 = 12 / (N k (k+1)) * sum R^2 - 3 N (k+1) = 0.25 * 210 - 48
    assert r.statistic == pytest.approx(4.5)
    assert r.p_value == pytest.approx(math.exp(-2.25))  # chi2 with 2 df: sf = exp(-x/2)
    assert r.f_statistic == pytest.approx(3 * 4.5 / (8 - 4.5))
    assert (r.df_num, r.df_den) == (2.0, 6.0)
    assert r.f_p_value == pytest.approx((1 + 2 * r.f_statistic / 6) ** -3)  # F(2, d2) closed form
    low = S.friedman_ranks([[-v for v in row] for row in table], higher_is_better=False)
    assert low.average_ranks == pytest.approx(r.average_ranks)


def test_friedman_guards():
    assert S.friedman_ranks([[0.9, 0.8], [0.7, 0.6]]).status == "insufficient_n"
    assert S.friedman_ranks([[0.5, 0.5, 0.5], [0.4, 0.4, 0.4]]).status == "no_variance"
    same = S.friedman_ranks([[3, 2, 1], [3, 2, 1], [6, 5, 4]])
    assert same.f_statistic == math.inf and same.f_p_value == 0.0
    with pytest.raises(ValueError, match="missing"):
        S.friedman_ranks([[0.9, NAN, 0.8], [0.7, 0.6, 0.5]])


@pytest.mark.parametrize("draws", [4, pytest.param(40, marks=pytest.mark.slow)])
def test_wilcoxon_equals_scipy_on_ties_and_zeros(rng, draws):
    """Small samples with ties or zero differences take scipy's exact permutation path, which
    dsdtune runs with a vectorized statistic: the same statistic and p-value to the bit.
    (scipy's own permutation path takes ~0.1 s a case: the long run draws 10x more.)"""
    cases = [[0.01, 0.01, -0.02, 0.03, 0.0, 0.005, 0.01, -0.01], [0.5, -0.5, 0.5, 0.25], [0.0, 0.0, 0.1],
             [1.0] * 13, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0.001 * i for i in range(-7, 8)]]
    for n in list(range(1, 15)) * draws:
        cases.append((rng.integers(-3, 4, n) * 0.5).tolist())  # ties and zeros
        cases.append(rng.normal(0, 1, n).tolist())  # neither: scipy's exact distribution
    for d in cases:
        b = np.zeros(len(d))
        r = S.wilcoxon_signed_rank(d, b)
        if np.count_nonzero(d) == 0:
            assert r.status == "no_variance"
            continue
        ref = sps.wilcoxon(d, b, zero_method="wilcox", alternative="two-sided", method="auto")
        assert (r.statistic, r.p_value) == (float(ref.statistic), float(ref.pvalue)), d
