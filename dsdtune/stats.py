"""Significance tests and effect sizes for comparing training methods across seeds.

Pure functions on plain sequences (lists, tuples, 1-D numpy arrays); no pandas, no Ray, nothing
else of dsdtune. scipy and statsmodels do the arithmetic; this module adds what their defaults get
wrong for seed studies:

- Welch's t everywhere (``equal_var=False``), Holm as Holm (``method="holm"``, not Holm-Sidak).
- Missing values (None, NaN, and +-inf from diverged runs) are dropped first; the ``n`` fields are
  the counts after dropping and the ``note`` says how many were dropped.
- Guards instead of silent NaN/inf: n = 1 in a group gives ``status="insufficient_n"``, zero
  variance gives ``status="no_variance"``; in both cases ``statistic`` and ``p_value`` are None.
- Rank tests whose smallest attainable p cannot reach ``alpha`` with these n (3 vs 3 Mann-Whitney,
  5-pair Wilcoxon) get ``status="rank_test_cannot_reach_alpha"``; the statistic and the (valid,
  necessarily large) p-value are still reported.

All tests are two-sided. Differences are always a - b.

Equivalence is tested with two one-sided tests (TOST; Schuirmann 1987, Lakens 2017): the arms are
shown equivalent within +-margin when both H0: diff <= -margin and H0: diff >= +margin are
rejected, i.e. the (1 - 2 alpha) t-interval lies inside the margin. Many methods over many tasks
are ranked with Friedman's test and its Iman-Davenport F correction, then pairwise Wilcoxon tests
with Holm (Demsar 2006, "Statistical comparisons of classifiers over multiple data sets").
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

__all__ = [
    "TestResult",
    "EffectSize",
    "Adjusted",
    "MinimumDetectableEffect",
    "Summary",
    "welch_t",
    "welch_t_from_stats",
    "paired_t",
    "one_sample_t",
    "mann_whitney",
    "wilcoxon_signed_rank",
    "hedges_g",
    "hedges_g_from_stats",
    "hedges_correction",
    "prob_superiority",
    "holm",
    "benjamini_hochberg",
    "minimum_detectable_effect",
    "minimum_detectable_effect_paired",
    "describe",
    "EquivalenceResult",
    "tost_paired",
    "tost_welch",
    "BootstrapCI",
    "bootstrap_ci_diff",
    "RankSummary",
    "friedman_ranks",
]

Status = Literal["ok", "insufficient_n", "no_variance", "rank_test_cannot_reach_alpha"]
Samples = Sequence[float | None] | np.ndarray


@dataclass(frozen=True)
class TestResult:
    """Outcome of one two-sided test.

    ``diff`` is mean(a) - mean(b) (independent tests), the mean of the per-pair differences a - b
    (paired tests) or mean(a) - value (one-sample). ``ci_low``/``ci_high`` is the t-based interval
    of ``diff`` at ``confidence`` (CI None when a guard fired; CI and confidence None for rank
    tests). ``min_p`` is the smallest p-value the rank test could produce with these n (None for
    t-tests). ``n_b`` is None for the one-sample test.
    """

    __test__ = False  # not a pytest test class despite the name

    test: str
    status: Status
    statistic: float | None
    df: float | None
    p_value: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    n_a: int
    n_b: int | None
    confidence: float | None
    min_p: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class EffectSize:
    """An effect size (``hedges_g`` or ``prob_superiority``); ``value`` None if a guard fired."""

    measure: str
    status: Status
    value: float | None
    n_a: int
    n_b: int
    note: str = ""


@dataclass(frozen=True)
class Adjusted:
    """Multiplicity-adjusted p-values aligned with the input (None where the input was missing)."""

    method: str
    p_adjusted: list[float | None]
    m: int  # family size actually used (non-missing inputs)


@dataclass(frozen=True)
class MinimumDetectableEffect:
    """Smallest true effect detectable with the given power at two-sided ``alpha``.

    ``effect_size`` is Cohen's d (independent design: difference / SD) or d_z (paired design:
    mean difference / SD of the differences); ``effect_metric`` is the same in metric units when an
    SD was given.
    """

    design: Literal["independent", "paired"]
    status: Status
    effect_size: float | None
    effect_metric: float | None
    n_a: int
    n_b: int | None
    alpha: float
    power: float
    note: str = ""


@dataclass(frozen=True)
class Summary:
    """Descriptive statistics of one sample; sd with ddof=1, CI = t-interval of the mean."""

    status: Status
    n: int
    n_dropped: int
    mean: float | None
    sd: float | None
    sem: float | None
    ci_low: float | None
    ci_high: float | None
    median: float | None
    min: float | None
    max: float | None
    confidence: float
    note: str = ""


# ----------------------------------------------------------------------------- helpers


def _clean(x: Samples, name: str) -> tuple[np.ndarray, int]:
    """1-D float array with missing/non-finite entries removed, and how many were removed."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"sample {name} must be one-dimensional, got shape {arr.shape}")
    keep = np.isfinite(arr)
    return arr[keep], int(arr.size - keep.sum())


def _clean_pairs(a: Samples, b: Samples) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop every pair in which either member is missing/non-finite."""
    xa = np.asarray(a, dtype=float)
    xb = np.asarray(b, dtype=float)
    if xa.ndim != 1 or xb.ndim != 1:
        raise ValueError("paired samples must be one-dimensional")
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples need equal lengths, got {xa.size} and {xb.size}")
    keep = np.isfinite(xa) & np.isfinite(xb)
    return xa[keep], xb[keep], int(xa.size - keep.sum())


def _dropped_note(**dropped: int) -> str:
    parts = [f"{k}: {v}" for k, v in dropped.items() if v]
    return f"dropped missing/non-finite values ({', '.join(parts)})" if parts else ""


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _is_constant(x: np.ndarray) -> bool:
    # Exact comparison on purpose: deterministic runs give bit-identical values, while a variance
    # computed by scipy from identical values can come out as a tiny positive number (mean rounding)
    # and turn into an absurd t instead of a clean guard.
    return x.size > 0 and bool(np.all(x == x[0]))


def _sd(x: np.ndarray) -> float:
    """Sample SD (ddof=1), exactly 0 for identical values."""
    return 0.0 if _is_constant(x) else float(x.std(ddof=1))


def _t_interval(diff: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    half = float(sps.t.ppf(0.5 + confidence / 2.0, df)) * se
    return diff - half, diff + half


def _f(x: object) -> float:
    """numpy scalar / 0-d or 1-element array -> Python float."""
    return float(np.asarray(x, dtype=float).reshape(-1)[0])


# ----------------------------------------------------------------------------- t-tests


def welch_t(a: Samples, b: Samples, confidence: float = 0.95) -> TestResult:
    """Welch's unequal-variance t-test of mean(a) vs mean(b), with the t-interval of a - b."""
    _check_confidence(confidence)
    xa, da = _clean(a, "a")
    xb, db = _clean(b, "b")
    note = _dropped_note(a=da, b=db)
    na, nb = int(xa.size), int(xb.size)
    diff = float(xa.mean() - xb.mean()) if na and nb else None
    guard = _guard_two_groups(na, nb, _is_constant(xa) and _is_constant(xb))
    if guard is not None:
        status, why = guard
        return TestResult("welch_t", status, None, None, None, diff, None, None, na, nb,
                          confidence, note=_join(why, note))
    # Via the summary statistics so that a constant group gets an SD of exactly 0 (see _is_constant)
    r = welch_t_from_stats(float(xa.mean()), _sd(xa), na, float(xb.mean()), _sd(xb), nb,
                           confidence)
    return dataclasses.replace(r, diff=diff, note=note)


def welch_t_from_stats(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float,
                       n_b: int, confidence: float = 0.95) -> TestResult:
    """Welch's t-test from summary statistics (SDs with ddof=1), e.g. numbers printed in a paper."""
    _check_confidence(confidence)
    _check_summary(sd_a, n_a, "a")
    _check_summary(sd_b, n_b, "b")
    diff = float(mean_a - mean_b)
    guard = _guard_two_groups(n_a, n_b, sd_a == 0 and sd_b == 0)
    if guard is not None:
        status, why = guard
        return TestResult("welch_t", status, None, None, None, diff, None, None, n_a, n_b,
                          confidence, note=why)
    res = sps.ttest_ind_from_stats(mean_a, sd_a, n_a, mean_b, sd_b, n_b, equal_var=False,
                                   alternative="two-sided")
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    low, high = _t_interval(diff, math.sqrt(va + vb), df, confidence)
    return TestResult("welch_t", "ok", float(res.statistic), float(df), float(res.pvalue), diff,
                      low, high, n_a, n_b, confidence)


def _check_summary(sd: float, n: int, name: str) -> None:
    if not (isinstance(n, (int, np.integer)) and n >= 0):
        raise ValueError(f"n_{name} must be a non-negative integer, got {n!r}")
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd_{name} must be finite and >= 0, got {sd!r}")


def _guard_two_groups(na: int, nb: int, both_constant: bool) -> tuple[Status, str] | None:
    if na < 2 or nb < 2:
        return "insufficient_n", f"need at least 2 values per group, got n_a={na}, n_b={nb}"
    if both_constant:
        return "no_variance", "both groups have zero variance (deterministic runs?); t is undefined"
    return None


def paired_t(a: Samples, b: Samples, confidence: float = 0.95) -> TestResult:
    """Paired t-test on per-seed differences a - b; pairs with a missing member are dropped."""
    _check_confidence(confidence)
    xa, xb, dropped = _clean_pairs(a, b)
    note = _join(f"dropped {dropped} incomplete pair(s)" if dropped else "")
    n = int(xa.size)
    d = xa - xb
    diff = float(d.mean()) if n else None
    if n < 2:
        return TestResult("paired_t", "insufficient_n", None, None, None, diff, None, None, n, n,
                          confidence, note=_join(f"need at least 2 pairs, got {n}", note))
    if _is_constant(d):
        return TestResult("paired_t", "no_variance", None, None, None, diff, None, None, n, n,
                          confidence,
                          note=_join("all paired differences are equal; t is undefined", note))
    res = sps.ttest_rel(xa, xb, alternative="two-sided")
    ci = res.confidence_interval(confidence_level=confidence)
    return TestResult("paired_t", "ok", float(res.statistic), float(res.df), float(res.pvalue),
                      diff, float(ci.low), float(ci.high), n, n, confidence, note=note)


def one_sample_t(a: Samples, value: float, confidence: float = 0.95) -> TestResult:
    """One-sample t-test of mean(a) against a constant (a baseline with n = 1, a published number).

    The constant is treated as exact, so its own run-to-run variance is ignored (said in ``note``).
    """
    _check_confidence(confidence)
    if not math.isfinite(value):
        raise ValueError(f"reference value must be finite, got {value!r}")
    xa, da = _clean(a, "a")
    note = _join("reference variance ignored", _dropped_note(a=da))
    n = int(xa.size)
    diff = float(xa.mean() - value) if n else None
    if n < 2:
        return TestResult("one_sample_t", "insufficient_n", None, None, None, diff, None, None, n,
                          None, confidence, note=_join(f"need at least 2 values, got {n}", note))
    if _is_constant(xa):
        return TestResult("one_sample_t", "no_variance", None, None, None, diff, None, None, n,
                          None, confidence,
                          note=_join("sample has zero variance; t is undefined", note))
    res = sps.ttest_1samp(xa, popmean=value, alternative="two-sided")
    ci = res.confidence_interval(confidence_level=confidence)
    return TestResult("one_sample_t", "ok", float(res.statistic), float(res.df),
                      float(res.pvalue), diff, float(ci.low) - value, float(ci.high) - value, n,
                      None, confidence, note=note)


# ----------------------------------------------------------------------------- rank tests


def mann_whitney(a: Samples, b: Samples, alpha: float = 0.05) -> TestResult:
    """Two-sided Mann-Whitney U test; ``statistic`` is U of sample a, ``diff`` is mean(a) - mean(b).

    ``min_p`` is the exact two-sided p of complete separation without ties, 2 / C(n_a + n_b, n_a):
    no data with these n can give a smaller p.
    """
    xa, da = _clean(a, "a")
    xb, db = _clean(b, "b")
    note = _dropped_note(a=da, b=db)
    na, nb = int(xa.size), int(xb.size)
    if na < 1 or nb < 1:
        return TestResult("mann_whitney", "insufficient_n", None, None, None, None, None, None,
                          na, nb, None,
                          note=_join(f"need at least 1 value per group, got {na} and {nb}", note))
    diff = float(xa.mean() - xb.mean())
    min_p = min(1.0, 2.0 / math.comb(na + nb, na))
    res = sps.mannwhitneyu(xa, xb, alternative="two-sided", method="auto")
    if _is_constant(np.concatenate([xa, xb])):
        return TestResult("mann_whitney", "no_variance", float(res.statistic), None, None, diff,
                          None, None, na, nb, None, min_p,
                          _join("all values are tied; the test has no information", note))
    status, why = _rank_guard(min_p, alpha, f"{na} vs {nb}")
    return TestResult("mann_whitney", status, float(res.statistic), None, float(res.pvalue), diff,
                      None, None, na, nb, None, min_p, _join(why, note))


def wilcoxon_signed_rank(a: Samples, b: Samples, alpha: float = 0.05) -> TestResult:
    """Two-sided Wilcoxon signed-rank test on paired differences a[i] - b[i].

    Zero differences are dropped before ranking (``zero_method="wilcox"``); ``min_p`` = 2 / 2**k
    for the k non-zero differences. ``statistic`` is scipy's (the smaller rank sum for two-sided).
    """
    xa, xb, dropped = _clean_pairs(a, b)
    note = f"dropped {dropped} incomplete pair(s)" if dropped else ""
    n = int(xa.size)
    d = xa - xb
    if n < 1:
        return TestResult("wilcoxon_signed_rank", "insufficient_n", None, None, None, None, None,
                          None, n, n, None, note=_join("no complete pairs", note))
    diff = float(d.mean())
    k = int(np.count_nonzero(d))
    if k == 0:
        return TestResult("wilcoxon_signed_rank", "no_variance", None, None, None, diff, None,
                          None, n, n, None, 1.0,
                          _join("all paired differences are zero; the test has no information",
                                note))
    zeros = f"{n - k} zero difference(s) dropped before ranking" if k < n else ""
    min_p = min(1.0, 2.0 / 2.0**k)
    statistic, p_value = _wilcoxon(d)
    status, why = _rank_guard(min_p, alpha, f"{k} non-zero pair(s)")
    return TestResult("wilcoxon_signed_rank", status, statistic, None, p_value, diff, None, None, n, n, None, min_p,
                      _join(why, zeros, note))


# scipy's method="auto" runs an exact permutation test when the differences have ties or zeros
# and there are at most this many of them (2**13 sign patterns < its 9999 resamples).
_WILCOXON_PERMUTATION_MAX_N = 13


def _wilcoxon(d: np.ndarray) -> tuple[float, float]:
    """(statistic, p-value) of ``scipy.stats.wilcoxon(d, zero_method="wilcox", method="auto")``,
    two-sided; where scipy takes its permutation path (ties or zeros, n <= 13) the
    permutation test runs here with a vectorized statistic: scipy's own calls its statistic once per
    sign pattern (2**n Python calls, ~30 ms per test; a report runs one per comparison).

    Flipping signs leaves |d| and so the ranks alone: the statistic of a sign pattern is the sum
    of the ranks where it is positive (ranks of the non-zero |d|, ties averaged; zeros count for
    neither side), as scipy computes it. Sums of half-integers are exact, so the null distribution
    and scipy.stats.permutation_test's p-value are scipy's to the bit."""
    zeros = d == 0
    nonzero = np.abs(d[~zeros])
    ties = np.unique(nonzero).size < nonzero.size
    if d.size > _WILCOXON_PERMUTATION_MAX_N or not (ties or zeros.any()):
        res = sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto")
        return float(res.statistic), float(res.pvalue)
    ranks = np.zeros(d.size)
    ranks[~zeros] = sps.rankdata(nonzero)

    def positive_rank_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.where(np.moveaxis(x, axis, -1) > 0, ranks, 0.0).sum(axis=-1)

    p = sps.permutation_test((d,), positive_rank_sum, permutation_type="samples", vectorized=True,
                             n_resamples=9999, alternative="two-sided").pvalue
    return float(min(ranks[d > 0].sum(), ranks[d < 0].sum())), float(p)


def _rank_guard(min_p: float, alpha: float, design: str) -> tuple[Status, str]:
    if min_p > alpha:
        return ("rank_test_cannot_reach_alpha",
                f"with {design} the smallest attainable p is {min_p:.3g} > alpha={alpha:g}")
    return "ok", ""


# ----------------------------------------------------------------------------- effect sizes


def hedges_correction(nu: float) -> float:
    """Exact small-sample correction J(nu) = Gamma(nu/2) / (sqrt(nu/2) Gamma((nu-1)/2)), nu >= 2."""
    if nu < 2:
        raise ValueError(f"Hedges' correction needs nu >= 2, got {nu}")
    # gammaln avoids overflow of Gamma for large nu
    return math.exp(special.gammaln(nu / 2) - special.gammaln((nu - 1) / 2)) / math.sqrt(nu / 2)


def hedges_g_from_stats(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float,
                        n_b: int) -> EffectSize:
    """Hedges' g = J * (mean_a - mean_b) / pooled SD, from summary statistics (SDs with ddof=1)."""
    _check_summary(sd_a, n_a, "a")
    _check_summary(sd_b, n_b, "b")
    if n_a < 2 or n_b < 2:
        return EffectSize("hedges_g", "insufficient_n", None, n_a, n_b,
                          f"need at least 2 values per group, got n_a={n_a}, n_b={n_b}")
    nu = n_a + n_b - 2
    pooled = math.sqrt(((n_a - 1) * sd_a**2 + (n_b - 1) * sd_b**2) / nu)
    if pooled == 0:
        return EffectSize("hedges_g", "no_variance", None, n_a, n_b,
                          "pooled SD is zero; standardized effect is undefined")
    return EffectSize("hedges_g", "ok", hedges_correction(nu) * (mean_a - mean_b) / pooled,
                      n_a, n_b)


def hedges_g(a: Samples, b: Samples) -> EffectSize:
    """Hedges' g of a vs b (positive when a has the larger mean)."""
    xa, da = _clean(a, "a")
    xb, db = _clean(b, "b")
    na, nb = int(xa.size), int(xb.size)
    sd_a = _sd(xa) if na >= 2 else 0.0
    sd_b = _sd(xb) if nb >= 2 else 0.0
    r = hedges_g_from_stats(float(xa.mean()) if na else 0.0, sd_a, na,
                            float(xb.mean()) if nb else 0.0, sd_b, nb)
    return EffectSize(r.measure, r.status, r.value, na, nb,
                      _join(r.note, _dropped_note(a=da, b=db)))


def prob_superiority(a: Samples, b: Samples) -> EffectSize:
    """Vargha-Delaney A12 = P(A > B) + 0.5 P(A = B) for a random draw from each sample."""
    xa, da = _clean(a, "a")
    xb, db = _clean(b, "b")
    na, nb = int(xa.size), int(xb.size)
    note = _dropped_note(a=da, b=db)
    if na < 1 or nb < 1:
        return EffectSize("prob_superiority", "insufficient_n", None, na, nb,
                          _join(f"need at least 1 value per group, got {na} and {nb}", note))
    # Mid-ranks count ties as one half, so the rank sum gives A12 in O(n log n).
    ranks = sps.rankdata(np.concatenate([xa, xb]), method="average")
    u_a = float(ranks[:na].sum()) - na * (na + 1) / 2
    return EffectSize("prob_superiority", "ok", u_a / (na * nb), na, nb, note)


# ----------------------------------------------------------------------------- multiplicity


def holm(p_values: Sequence[float | None]) -> Adjusted:
    """Holm step-down adjusted p-values; None/NaN entries are dropped first and stay None."""
    return _adjust(p_values, "holm")


def benjamini_hochberg(p_values: Sequence[float | None]) -> Adjusted:
    """Benjamini-Hochberg (FDR) adjusted p-values; None/NaN entries are dropped and stay None."""
    return _adjust(p_values, "fdr_bh")


@contextlib.contextmanager
def _collector_skips_older_objects():
    """statsmodels' Holm ends with a full ``gc.collect()``, which visits every object of the process:
    0.1-0.5 s per call where torch and Ray are loaded (the study runner writes its report in
    process). The objects that exist before the call are frozen for its duration (``gc.freeze``,
    O(1)), so that collection visits only what the call made; ``gc.unfreeze`` hands them back to
    the collector. Left alone if the process froze objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _adjust(p_values: Sequence[float | None], method: str) -> Adjusted:
    raw = [None if p is None or (isinstance(p, float) and math.isnan(p)) else p
           for p in (float(q) if q is not None else None for q in p_values)]
    idx = [i for i, p in enumerate(raw) if p is not None]
    vals = np.array([raw[i] for i in idx], dtype=float)
    if np.any((vals < 0) | (vals > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {vals[(vals < 0) | (vals > 1)]}")
    out: list[float | None] = [None] * len(raw)
    if idx:
        with _collector_skips_older_objects():
            _, adj, _, _ = multipletests(vals, alpha=0.05, method=method, is_sorted=False,
                                         returnsorted=False)
        for i, p in zip(idx, adj):
            out[i] = float(p)
    return Adjusted(method, out, len(idx))


# ----------------------------------------------------------------------------- power


def minimum_detectable_effect(n_a: int, n_b: int, alpha: float = 0.05, power: float = 0.8,
                              sd: float | None = None) -> MinimumDetectableEffect:
    """Smallest Cohen's d a two-sided two-sample t-test detects with this power (TTestIndPower).

    With ``sd`` (the metric's SD) also returns the effect in metric units, so a non-significant
    comparison reads "no effect larger than X detected".
    """
    _check_power_args(alpha, power, sd)
    if n_a < 2 or n_b < 2:
        return MinimumDetectableEffect("independent", "insufficient_n", None, None, n_a, n_b,
                                       alpha, power, f"need n >= 2 per group, got {n_a}, {n_b}")
    d = _f(TTestIndPower().solve_power(effect_size=None, nobs1=n_a, ratio=n_b / n_a, alpha=alpha,
                                       power=power, alternative="two-sided"))
    return MinimumDetectableEffect("independent", "ok", d, d * sd if sd is not None else None,
                                   n_a, n_b, alpha, power, "Cohen's d (difference / SD)")


def minimum_detectable_effect_paired(n_pairs: int, alpha: float = 0.05, power: float = 0.8,
                                     sd_diff: float | None = None) -> MinimumDetectableEffect:
    """Smallest d_z (mean diff / SD of diffs) a two-sided paired t-test detects (TTestPower)."""
    _check_power_args(alpha, power, sd_diff)
    if n_pairs < 2:
        return MinimumDetectableEffect("paired", "insufficient_n", None, None, n_pairs, n_pairs,
                                       alpha, power, f"need at least 2 pairs, got {n_pairs}")
    d = _f(TTestPower().solve_power(effect_size=None, nobs=n_pairs, alpha=alpha, power=power,
                                    alternative="two-sided"))
    return MinimumDetectableEffect("paired", "ok", d, d * sd_diff if sd_diff is not None else None,
                                   n_pairs, n_pairs, alpha, power,
                                   "d_z (mean difference / SD of differences)")


def _check_power_args(alpha: float, power: float, sd: float | None) -> None:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    if sd is not None and not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd must be finite and >= 0, got {sd!r}")


# ----------------------------------------------------------------------------- description


def describe(x: Samples, confidence: float = 0.95) -> Summary:
    """n, mean, SD (ddof=1), SEM, t-interval of the mean, median, min, max after dropping NaNs."""
    _check_confidence(confidence)
    arr, dropped = _clean(x, "x")
    n = int(arr.size)
    note = _dropped_note(x=dropped)
    if n == 0:
        return Summary("insufficient_n", 0, dropped, None, None, None, None, None, None, None,
                       None, confidence, _join("no values", note))
    mean = float(arr.mean())
    median, lo, hi = float(np.median(arr)), float(arr.min()), float(arr.max())
    if n == 1:
        return Summary("insufficient_n", 1, dropped, mean, None, None, None, None, median, lo, hi,
                       confidence, _join("one value: SD and CI undefined", note))
    sd = _sd(arr)
    sem = sd / math.sqrt(n)
    ci_low, ci_high = _t_interval(mean, sem, n - 1, confidence)
    return Summary("ok", n, dropped, mean, sd, sem, ci_low, ci_high, median, lo, hi, confidence,
                   note)


# ----------------------------------------------------------------------------- equivalence


@dataclass(frozen=True)
class EquivalenceResult:
    """TOST of diff = a - b against the equivalence region (-margin, +margin).

    ``p_value`` is the larger of the two one-sided p-values (``p_lower`` for H0: diff <= -margin,
    ``p_upper`` for H0: diff >= +margin); equivalence at level alpha <=> p_value < alpha <=> the
    (1 - 2 alpha) t-interval ``[ci_low, ci_high]`` lies inside the margin. ``confidence`` is that
    interval's level (0.90 for alpha = 0.05). Guards as for the t-tests.
    """

    test: str
    status: Status
    margin: float
    p_value: float | None
    p_lower: float | None
    p_upper: float | None
    t_lower: float | None
    t_upper: float | None
    df: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    n_a: int
    n_b: int
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _check_margin(margin: float, alpha: float) -> None:
    if not (isinstance(margin, (int, float, np.integer, np.floating)) and math.isfinite(margin)
            and margin > 0):
        raise ValueError(f"equivalence margin must be a finite number > 0, got {margin!r}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")


def tost_paired(a: Samples, b: Samples, margin: float, alpha: float = 0.05) -> EquivalenceResult:
    """Paired TOST on per-seed differences a - b (statsmodels ``ttost_paired``)."""
    _check_margin(margin, alpha)
    t = paired_t(a, b, confidence=1.0 - 2.0 * alpha)
    if not t.ok:
        return EquivalenceResult("tost_paired", t.status, float(margin), None, None, None, None,
                                 None, None, t.diff, None, None, 1.0 - 2.0 * alpha, t.n_a, t.n_a,
                                 t.note)
    xa, xb, _ = _clean_pairs(a, b)
    p, (t1, p1, df1), (t2, p2, _) = ttost_paired(xa, xb, -float(margin), float(margin))
    return EquivalenceResult("tost_paired", "ok", float(margin), _f(p), _f(p1), _f(p2), _f(t1),
                             _f(t2), _f(df1), t.diff, t.ci_low, t.ci_high, 1.0 - 2.0 * alpha, t.n_a,
                             t.n_a, t.note)


def tost_welch(a: Samples, b: Samples, margin: float, alpha: float = 0.05) -> EquivalenceResult:
    """TOST with Welch's unequal-variance t (statsmodels ``ttost_ind``, ``usevar="unequal"``)."""
    _check_margin(margin, alpha)
    t = welch_t(a, b, confidence=1.0 - 2.0 * alpha)
    if not t.ok:
        return EquivalenceResult("tost_welch", t.status, float(margin), None, None, None, None,
                                 None, None, t.diff, None, None, 1.0 - 2.0 * alpha, t.n_a,
                                 int(t.n_b or 0), t.note)
    xa, _ = _clean(a, "a")
    xb, _ = _clean(b, "b")
    p, (t1, p1, df1), (t2, p2, _) = ttost_ind(xa, xb, -float(margin), float(margin),
                                              usevar="unequal")
    return EquivalenceResult("tost_welch", "ok", float(margin), _f(p), _f(p1), _f(p2), _f(t1),
                             _f(t2), _f(df1), t.diff, t.ci_low, t.ci_high, 1.0 - 2.0 * alpha,
                             t.n_a, int(t.n_b), t.note)


# ----------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile-bootstrap interval of a difference (paired: mean of a - b; else mean a - mean b).

    Percentile intervals run too narrow below about 15 values per group: the t-interval stays the
    primary CI, this one shows whether the two agree.
    """

    status: Status
    ci_low: float | None
    ci_high: float | None
    confidence: float
    n_resamples: int
    seed: int
    paired: bool
    note: str = ""


def bootstrap_ci_diff(a: Samples, b: Samples, paired: bool, confidence: float = 0.95,
                      n_resamples: int = 9999, seed: int = 0) -> BootstrapCI:
    """``scipy.stats.bootstrap`` (percentile method, seeded) of the difference of means."""
    _check_confidence(confidence)
    if paired:
        xa, xb, dropped = _clean_pairs(a, b)
        note = f"dropped {dropped} incomplete pair(s)" if dropped else ""
        d = xa - xb
        data: tuple[np.ndarray, ...] = (d,)
        constant, small = _is_constant(d), d.size < 2

        def statistic(x, axis=-1):
            return np.mean(x, axis=axis)
    else:
        xa, da = _clean(a, "a")
        xb, db = _clean(b, "b")
        note = _dropped_note(a=da, b=db)
        data = (xa, xb)
        constant, small = _is_constant(xa) and _is_constant(xb), min(xa.size, xb.size) < 2

        def statistic(x, y, axis=-1):
            return np.mean(x, axis=axis) - np.mean(y, axis=axis)
    if small:
        return BootstrapCI("insufficient_n", None, None, confidence, n_resamples, seed, paired,
                           _join("need at least 2 values per group (or 2 pairs)", note))
    if constant:
        return BootstrapCI("no_variance", None, None, confidence, n_resamples, seed, paired,
                           _join("no variance: every resample gives the same difference", note))
    res = sps.bootstrap(data, statistic, n_resamples=n_resamples, confidence_level=confidence,
                        method="percentile", vectorized=True, paired=False,
                        rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return BootstrapCI("ok", float(ci.low), float(ci.high), confidence, n_resamples, seed, paired,
                       note)


# ----------------------------------------------------------------------------- many tasks


@dataclass(frozen=True)
class RankSummary:
    """Friedman test over blocks (tasks) x treatments (methods), with Iman-Davenport's F.

    ``average_ranks`` follow the treatments' order; rank 1 is the best treatment of a block (ties
    share the mean rank). Iman-Davenport: F = (N - 1) chi2 / (N (k - 1) - chi2) with k - 1 and
    (k - 1)(N - 1) degrees of freedom; it is less conservative than chi2 itself.
    """

    status: Status
    n_blocks: int
    k: int
    average_ranks: list[float]
    statistic: float | None
    p_value: float | None
    f_statistic: float | None
    df_num: float | None
    df_den: float | None
    f_p_value: float | None
    note: str = ""


def friedman_ranks(table: Sequence[Sequence[float]] | np.ndarray,
                   higher_is_better: bool = True) -> RankSummary:
    """Friedman + Iman-Davenport on a blocks x treatments table (no missing cells)."""
    x = np.asarray(table, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"need a 2-D blocks x treatments table, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("the table has missing or non-finite cells; Friedman needs complete blocks")
    n, k = x.shape
    ranks = np.vstack([sps.rankdata(-row if higher_is_better else row, method="average")
                       for row in x]) if n else np.zeros((0, k))
    avg = [float(r) for r in ranks.mean(axis=0)] if n else [math.nan] * k
    if n < 2 or k < 3:
        return RankSummary("insufficient_n", n, k, avg, None, None, None, None, None, None,
                           f"Friedman needs at least 2 blocks and 3 treatments, got {n} x {k}")
    if all(_is_constant(row) for row in x):
        return RankSummary("no_variance", n, k, avg, None, None, None, None, None, None,
                           "every block ties all treatments; ranks carry no information")
    res = sps.friedmanchisquare(*x.T)
    chi2 = float(res.statistic)
    df1, df2 = k - 1.0, (k - 1.0) * (n - 1.0)
    denom = n * (k - 1.0) - chi2
    # chi2 = N (k - 1) exactly when every block ranks the treatments the same way: F is infinite.
    f = math.inf if denom <= 0 else (n - 1.0) * chi2 / denom
    pf = 0.0 if math.isinf(f) else float(sps.f.sf(f, df1, df2))
    return RankSummary("ok", n, k, avg, chi2, float(res.pvalue), f, df1, df2, pf)
