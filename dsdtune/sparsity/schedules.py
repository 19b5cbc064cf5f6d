"""Sparsity and drop-fraction schedules of the baseline methods, as plain functions of the step.

Floats in, floats (or bools) out; no torch. `step` is always the number of optimizer steps the
phase has already taken, so a mask computed "at step t" is in force for the step with index t
(the same count as TensorFlow model-optimization's `pruning_step`, which its callback sets to
`optimizer.iterations` before each batch).

- Gradual magnitude pruning (Zhu & Gupta 2017): `gmp_sparsity`, `is_gmp_step`.
- Dynamic sparse training (SET, Mocanu et al. 2018; RigL, Evci et al. 2020):
  `cosine_drop_fraction`, `is_dst_update_step`.
- Iterative magnitude pruning / lottery tickets (Frankle & Carbin 2019): `imp_density`.
- `phase_step` turns a fraction of a phase's steps into a step index.
"""
from __future__ import annotations

import math


def phase_step(fraction: float, total_steps: int) -> int:
    """The step index at `fraction` of a phase of `total_steps` steps: round(fraction * total_steps).

    Python's round (half to even), the rounding `topk.kept_count` uses, clamped to the phase's
    last step, total_steps - 1: the phase runs steps 0 .. total_steps - 1, so an end of 1.0 lands
    on the last step and a ramp that ends there still reaches its final sparsity.
    E.g. begin 0.0 and end 0.75 of 1000 steps are steps 0 and 750.
    """
    if total_steps < 1:
        raise ValueError(f"a phase has at least one step, got total_steps={total_steps}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a fraction of the phase lies in [0, 1], got {fraction}")
    return min(total_steps - 1, int(round(fraction * total_steps)))


def gmp_sparsity(step: int, *, begin: int, end: int, final: float, initial: float = 0.0,
                 power: float = 3.0) -> float:
    """Target sparsity of gradual magnitude pruning at `step`.

        s(t) = final + (initial - final) * (1 - p)^power,   p = clip((t - begin) / (end - begin), 0, 1)

    TensorFlow model-optimization's `PolynomialDecay` (power 3 in Zhu & Gupta). begin == end is a
    one-step ramp: `initial` before `begin`, `final` from `begin` on (TF-MOT would divide by
    zero there; jaxpruner returns `final` at every step). jaxpruner's `PolynomialSchedule` at its
    step c equals this at t = c + 1 with initial 0: its mask takes effect after step c's update.
    """
    _check_range(begin, end)
    if step >= end:
        progress = 1.0
    elif step <= begin:
        progress = 0.0
    else:
        progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - progress) ** power


def is_gmp_step(step: int, *, begin: int, end: int, every: int) -> bool:
    """Whether gradual magnitude pruning recomputes the mask before step `step`.

    True when begin <= t <= end and (t - begin) % every == 0, as in TF-MOT's `PruningSchedule`,
    and also at t == end: TF-MOT never prunes at `end` when end - begin is not a multiple of
    `every`, so its last mask stays below the final sparsity; here the ramp always ends with a
    mask at exactly s(end) = final.
    """
    _check_range(begin, end)
    _check_every(every)
    if not begin <= step <= end:
        return False
    return (step - begin) % every == 0 or step == end


def cosine_drop_fraction(step: int, *, initial: float, end: int) -> float:
    """RigL's drop fraction: initial / 2 * (1 + cos(pi * t / end)) for t < end, 0 from `end` on.

    The RigL paper's annealing (initial 0.3, end 75 % of training); google-research/rigl's TF2
    `CosineUpdateSchedule` (Keras `CosineDecay` with alpha 0, decay steps = its last update step)
    gives the same values. Its TF1 optimizers decay over end - begin steps but evaluate at the
    absolute step; with begin 0 (their default) the two agree.
    """
    if end <= 0:
        raise ValueError(f"the drop fraction's end step must be positive, got {end}")
    if step >= end:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * step / end))


def is_dst_update_step(step: int, *, every: int, end: int, begin: int = 0) -> bool:
    """Whether SET / RigL drop and grow connections before step `step`.

    True when t > 0, begin <= t < end and (t - begin) % every == 0. With begin 0: every `every`
    steps, never before the first step, never from `end` on.

    - t > 0: the first update follows `every` steps under the initial mask, as in rigl's TF2
      loop (it tests `step % update_freq == 0` after `apply_gradients`, so its step is >= 1)
      and rigl's TF1 SET optimizer. rigl's TF1 RigL optimizer and jaxpruner (`PeriodicSchedule`
      on the update count) also update at t = 0 when they begin at 0.
    - end exclusive: updates happen exactly where `cosine_drop_fraction` is positive. rigl and
      jaxpruner include `end`, which differs only under a constant drop fraction when `end` is
      on the grid; a rigl or jaxpruner end e is end e + 1 here.
    """
    _check_range(begin, end)
    _check_every(every)
    return step > 0 and begin <= step < end and (step - begin) % every == 0


def imp_density(level: int, *, fraction: float = 0.2) -> float:
    """Density of iterative magnitude pruning after `level` rounds that each prune `fraction` of
    the remaining weights: (1 - fraction) ** level (open_lth: 0.8 ** level).

    dsdtune keeps exactly round(N * density) weights at each level (`topk.kept_count`). open_lth
    prunes ceil(fraction * remaining) and then keeps only |w| above the sorted value at that
    index, one weight more than that when magnitudes are distinct; it also counts the layers it
    is told to ignore in `remaining`, so its density is over every prunable tensor.
    """
    if level < 0:
        raise ValueError(f"pruning levels count from 0, got {level}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction pruned per level lies in [0, 1), got {fraction}")
    return (1.0 - fraction) ** level


def _check_range(begin: int, end: int) -> None:
    if begin < 0 or end < begin:
        raise ValueError(f"steps need 0 <= begin <= end, got begin={begin}, end={end}")


def _check_every(every: int) -> None:
    if every < 1:
        raise ValueError(f"an update interval is at least one step, got every={every}")
