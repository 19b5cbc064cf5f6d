"""The plan of an Optuna search shares a prefix only under the id its trials compute (no Ray)."""
from pathlib import Path

import numpy as np
import pytest

from dsdtune.config import build_run_spec, load_study
from dsdtune.pipeline import prefix_id
from dsdtune.study.plan import make_plan

OPTUNA = Path(__file__).parent / "studies" / "tiny_optuna.yaml"


def sampled_trials(spec, n, rng):
    """Assignments as a search draws them: anywhere in each axis, not only at its ends."""
    for _ in range(n):
        assign = {}
        for path, axis in spec.search.space.items():
            if axis.kind in ("grid", "choice"):
                values = axis.grid if axis.grid is not None else axis.choice
                assign[path] = values[int(rng.integers(len(values)))]
            elif axis.kind == "uniform":
                assign[path] = float(rng.uniform(*axis.uniform))
            elif axis.kind == "loguniform":
                assign[path] = float(np.exp(rng.uniform(*np.log(axis.loguniform))))
            else:
                assign[path] = int(rng.integers(axis.int[0], axis.int[1] + 1))
        yield assign


@pytest.mark.parametrize("space,shares", [
    ("{pipeline.lr.1: {loguniform: [0.0001, 0.05]}}", True),  # after the dense phase: shared
    ("{pipeline.lr.2: {uniform: [0.0001, 0.05]}, pipeline.lr.1: {choice: [0.01, 0.001]}}", True),
    ("{task.batch_size: {int: [20, 60]}}", False),  # every phase sees other batches
    ("{task.batch_size: {choice: [25, 50]}}", False),  # 50 is the study's own value
    ("{pipeline.lr.1: {loguniform: [0.0001, 0.05]}, task.batch_size: {int: [40, 60]}}", False),
    ("{init.bias: {choice: [default, zero]}}", False),
    ("{pipeline.exclude_first: {choice: [true, false]}}", False),
    ("{pipeline.exclude: {choice: [[], [layers.0]]}}", False),
    ("{pipeline.flow: {choice: [DSD, DGD]}}", False),  # G includes the first layer: another prunable set
    ("{pipeline.flow: {choice: [DSD, DMD]}}", True),  # M keeps DSD's default: the dense phase is shared
    ("{pipeline.epochs.0: {int: [2, 4]}}", False),
    ("{pipeline.weight_histograms: {choice: [false, true]}}", False),
])
def test_every_searched_trial_finds_the_prefix_the_plan_trains(space, shares):
    spec = load_study(OPTUNA, [f"search.space={space}", "scheduler.kind=none", "seeds=[0, 1]"])
    plan = make_plan(spec)
    assert (plan.prefix_length > 0) == shares
    planned = {seed: pid for pid, (_, seed) in plan.prefixes.items()}
    assert len(planned) == (2 if shares else 0)
    for assign in sampled_trials(spec, 40, np.random.default_rng(0)):
        for seed in spec.seed_list:
            if plan.prefix_length:  # the trainable's own computation (trainable.run_trial)
                run = build_run_spec(spec.base_run(), assign, seed)
                assert prefix_id(run, plan.prefix_length) == planned[seed], assign
