"""The baselines' schedules against the peers' own test vectors (recomputed), and dsdtune's rules
where they deliberately differ."""
import math

import pytest
import torch

from dsdtune.sparsity.prune import prune_global_magnitude
from dsdtune.sparsity.schedules import (cosine_drop_fraction, gmp_sparsity, imp_density, is_dst_update_step,
                                        is_gmp_step, phase_step)
from dsdtune.sparsity.topk import kept_count


# tensorflow/model-optimization, tensorflow_model_optimization/python/core/sparsity/keras/
# pruning_schedule_test.py, PolynomialDecayTest.testPolynomialDecay_PrunesCorrectly:
# PolynomialDecay(0.2, 0.8, begin 100, end 110, power 3, frequency 2).
@pytest.mark.parametrize("step, expected", [(100, 0.2), (102, 0.4928), (105, 0.725), (110, 0.8)])
def test_gmp_sparsity_matches_tf_mot_polynomial_decay(step, expected):
    assert gmp_sparsity(step, begin=100, end=110, initial=0.2, final=0.8, power=3) == pytest.approx(expected)


def test_gmp_sparsity_is_clipped_outside_the_ramp_and_follows_the_power():
    assert gmp_sparsity(0, begin=100, end=110, initial=0.2, final=0.8) == pytest.approx(0.2)
    assert gmp_sparsity(10**6, begin=100, end=110, initial=0.2, final=0.8) == pytest.approx(0.8)
    # power 1 is a straight line: halfway is the midpoint
    assert gmp_sparsity(50, begin=0, end=100, final=0.9, power=1) == pytest.approx(0.45)
    values = [gmp_sparsity(t, begin=0, end=100, final=0.9) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))  # never un-prunes


def test_gmp_one_step_ramp_does_not_divide_by_zero():
    assert gmp_sparsity(4, begin=5, end=5, initial=0.1, final=0.7) == pytest.approx(0.1)
    assert gmp_sparsity(5, begin=5, end=5, initial=0.1, final=0.7) == pytest.approx(0.7)
    assert [t for t in range(10) if is_gmp_step(t, begin=5, end=5, every=3)] == [5]


# google-research/jaxpruner, jaxpruner/sparsity_schedules_test.py, testPolynomialDecaySchedule:
# PolynomialSchedule(update_freq 5, start 0, end 20), target 0.5, at step 9 -> 0.4375. jaxpruner's
# progress is (c + 1 - start) / (end - start): its step c is t = c + 1 here (initial sparsity 0).
def test_gmp_sparsity_reproduces_jaxpruner_polynomial_schedule_one_step_later():
    assert gmp_sparsity(9 + 1, begin=0, end=20, final=0.5) == 0.4375
    assert gmp_sparsity(9, begin=0, end=20, final=0.5) != 0.4375  # the mapping is needed


# tensorflow/model-optimization, .../sparsity/keras/pruning_schedule_test.py,
# PruningScheduleTest.testPrunesOnlyInBeginEndStepRange: (begin 100, end 200, frequency 1).
def test_gmp_prunes_only_in_the_begin_end_range_like_tf_mot():
    prunes = {t: is_gmp_step(t, begin=100, end=200, every=1) for t in (90, 99, 100, 110, 200, 201, 210)}
    assert prunes == {90: False, 99: False, 100: True, 110: True, 200: True, 201: False, 210: False}


# Same file, PruningScheduleTest.testOnlyPrunesAtValidFrequencySteps: (begin 100, end 200, frequency 10).
def test_gmp_prunes_only_at_frequency_steps_like_tf_mot():
    prunes = {t: is_gmp_step(t, begin=100, end=200, every=10) for t in (100, 109, 110, 111)}
    assert prunes == {100: True, 109: False, 110: True, 111: False}


def test_gmp_also_prunes_at_end_off_the_grid_so_the_ramp_reaches_final():
    # TF-MOT prunes at begin + k*every only: 100, 110, ..., 200 for end 205 (never at 205, where
    # s = final). dsdtune adds the end step.
    steps = [t for t in range(0, 300) if is_gmp_step(t, begin=100, end=205, every=10)]
    assert steps == list(range(100, 201, 10)) + [205]
    assert gmp_sparsity(steps[-1], begin=100, end=205, final=0.9) == 0.9


# Same file, testEndStepGreaterThanEqualsBeginStep / testFrequencyIsPositive /
# testBeginStepGreaterThanEqualsZero: the same arguments are refused here.
@pytest.mark.parametrize("begin, end, every", [(10, 5, 10), (10, 1000, 0), (10, 1000, -1), (-1, 1000, 10)])
def test_gmp_refuses_the_ranges_tf_mot_refuses(begin, end, every):
    with pytest.raises(ValueError):
        is_gmp_step(10, begin=begin, end=end, every=every)


def test_phase_step_rounds_like_kept_count_and_stays_in_the_phase():
    assert phase_step(0.0, 1000) == 0
    assert phase_step(0.75, 1000) == 750
    assert phase_step(0.75, 10) == 8 and phase_step(0.25, 10) == 2  # 7.5 -> 8, 2.5 -> 2 (half to even)
    assert phase_step(1.0, 1000) == 999  # the last step of the phase, so the ramp completes
    with pytest.raises(ValueError):
        phase_step(1.5, 10)


def test_cosine_drop_fraction_follows_the_rigl_paper():
    # RigL paper (Evci et al. 2020), eq. 1: f(t) = a/2 (1 + cos(pi t / T_end)); rigl_tf2's
    # CosineUpdateSchedule (Keras CosineDecay, alpha 0) gives the same values.
    assert cosine_drop_fraction(0, initial=0.3, end=1000) == pytest.approx(0.3)
    assert cosine_drop_fraction(500, initial=0.3, end=1000) == pytest.approx(0.15)
    assert cosine_drop_fraction(250, initial=0.3, end=1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(1000, initial=0.3, end=1000) == 0.0
    assert cosine_drop_fraction(5000, initial=0.3, end=1000) == 0.0


def test_dst_updates_every_interval_after_the_first_step_and_before_end():
    steps = [t for t in range(0, 1000) if is_dst_update_step(t, every=100, end=750)]
    assert steps == [100, 200, 300, 400, 500, 600, 700]
    # exactly the steps of the grid where the cosine drop fraction is positive
    assert all(cosine_drop_fraction(t, initial=0.3, end=750) > 0 for t in steps)


# google-research/rigl, rigl/sparse_optimizers_test.py, SparseSETOptimizerTest.testMaskNonUpdateIterations
# and testUpdateIterations: begin 1, end 4, frequency 2 -> the mask changes at iterations 1 and 3
# only (checked after each of 5 steps). rigl's end is inclusive: end 4 there is end 5 here.
def test_dst_update_steps_reproduce_rigl_set_optimizer_iterations():
    assert [t for t in range(1, 6) if is_dst_update_step(t, begin=1, end=4 + 1, every=2)] == [1, 3]


# google-research/rigl, rigl/sparse_optimizers_test.py, SparseRigLOptimizerTest.testApplyGradients:
# the iterations that skip the gradient step are the mask updates. Recomputed from its
# is_incremented vectors (global step before each call): (begin 3, end 7, freq 2) updates at 3, 5, 7;
# (1, 5, 3) at 1, 4; (0, 4, 1) at 0, 1, 2, 3, 4 - rigl's TF1 RigL also updates at step 0, dsdtune
# not (t > 0, as rigl's TF2 loop and its TF1 SET optimizer).
@pytest.mark.parametrize("begin, end, every, rigl_steps", [
    (3, 7, 2, [3, 5, 7]), (1, 5, 3, [1, 4]), (0, 4, 1, [0, 1, 2, 3, 4])])
def test_dst_update_steps_reproduce_rigl_rigl_optimizer_iterations(begin, end, every, rigl_steps):
    ours = [t for t in range(0, 12) if is_dst_update_step(t, begin=begin, end=end + 1, every=every)]
    assert ours == [t for t in rigl_steps if t > 0]


# google-research/jaxpruner, jaxpruner/sparsity_schedules_test.py, testPeriodicSchedule:
# PeriodicSchedule(update_freq 5, start 0, end 20): step 10 updates, step 9 does not. Its predicate
# (c % 5 == 0 and 0 <= c <= 20, on the update count) is ours with end 21, apart from c = 0.
def test_dst_update_steps_reproduce_jaxpruner_periodic_schedule():
    assert is_dst_update_step(10, every=5, end=21) and not is_dst_update_step(9, every=5, end=21)
    jaxpruner = [c for c in range(30) if c % 5 == 0 and 0 <= c <= 20]
    assert [t for t in range(30) if is_dst_update_step(t, every=5, end=21)] == [c for c in jaxpruner if c > 0]


# facebookresearch/open_lth, lottery/test/test_runner.py, TestRunner.test_level3_2it: the mask of
# level L keeps 0.8 ** L of the prunable weights (within 0.01), pruning fraction 0.2.
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_imp_density_is_open_lth_level_density(level):
    assert imp_density(level) == pytest.approx(0.8 ** level)
    assert imp_density(level, fraction=0.5) == pytest.approx(0.5 ** level)


def _open_lth_prune(magnitudes: torch.Tensor, remaining: torch.Tensor, fraction: float) -> torch.Tensor:
    """open_lth's pruning/sparse_global.py rule, restated: k = ceil(fraction * remaining); keep the
    remaining weights whose |w| exceeds the k-th smallest remaining |w| (0-based)."""
    k = math.ceil(fraction * int(remaining.sum()))
    threshold = magnitudes[remaining].sort().values[k]
    return remaining & (magnitudes > threshold)


def test_iterative_global_magnitude_is_exact_where_open_lth_prunes_one_more():
    # facebookresearch/open_lth, pruning/test/test_sparse_global.py, TestSparseGlobal.test_prune
    # and test_iterative_pruning only check fraction <= pruned < fraction + 1e-4 and that earlier
    # pruned weights stay pruned. With distinct magnitudes its rule prunes ceil(f n) + 1 weights;
    # dsdtune keeps exactly round(N * 0.8 ** L).
    torch.manual_seed(0)
    weights = {"a": torch.randn(40, 25), "b": torch.randn(500)}  # 1500 distinct magnitudes
    total = 1500
    flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    ours_prev = torch.ones(total, dtype=torch.bool)
    theirs = torch.ones(total, dtype=torch.bool)
    for level in range(1, 4):
        theirs_before = int(theirs.sum())
        theirs = _open_lth_prune(flat, theirs, 0.2)
        assert theirs_before - int(theirs.sum()) == math.ceil(0.2 * theirs_before) + 1
        # dsdtune's L: global magnitude over the masked weights at density 0.8 ** L
        masked = {n: w * m.reshape(w.shape) for (n, w), m in
                  zip(weights.items(), ours_prev.split([w.numel() for w in weights.values()]))}
        masks = prune_global_magnitude(masked, 1 - imp_density(level))
        ours = torch.cat([m.bool().reshape(-1) for _, m in masks.items()])
        assert int(ours.sum()) == kept_count(total, imp_density(level))
        assert not (ours & ~ours_prev).any()  # pruned weights stay pruned
        # both within open_lth's own tolerance of 0.8 ** L (test_runner: atol 0.01)
        assert abs(int(ours.sum()) / total - 0.8 ** level) <= 0.01
        assert abs(int(theirs.sum()) / total - 0.8 ** level) <= 0.01
        ours_prev = ours
