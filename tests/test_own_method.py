"""A researcher's own phase kind by import path (examples/own_method): it runs like a built-in one, resumes
bit for bit inside its phase, shares prefixes, reports its arms and FLOPs; mistakes are one line, exit 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from dsdtune import registry
from dsdtune.config import SpecError
from dsdtune.phases import PHASE_KINDS, kind_of, register_phase_kind, register_study_kinds
from dsdtune.pipeline import Pipeline, run_pipeline
from dsdtune.sparsity.topk import kept_count
from dsdtune.study.cli import main

from interrupted import run_interrupted

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_method"
TASK = {"dataset": "synthetic", "dataset_args": {"num_train": 600, "num_test": 100, "input_shape": [12],
                                                 "num_classes": 3},
        "model": "mlp", "model_args": {"widths": [32, 24]}, "batch_size": 50, "device": "cpu"}


@pytest.fixture
def linear_kind():
    registry.add_search_paths([str(EXAMPLE)])
    register_study_kinds({"X": "linear_ramp:LinearRamp"})
    yield kind_of("X")
    PHASE_KINDS.unregister("X")


def spec(**pipeline):
    return {"task": TASK, "seed": 0, "pipeline": {"flow": "DX", "epochs": [1, 3], "lr": 0.05, "sparsity": 0.8,
                                                  "linear": {"every_steps": 4, "end": 0.5}, **pipeline}}


def test_a_users_kind_prunes_on_its_own_ramp_with_exact_counts(linear_kind):
    pipe = Pipeline(spec())
    result = pipe.run()
    for name, weight in pipe.prunable.items():
        assert int(result.masks[name].sum()) == kept_count(weight.numel(), 0.2)
        assert int(weight.count_nonzero()) <= kept_count(weight.numel(), 0.2)
    changes = result.extra["phase_costs"]["X1"]["density_changes"]
    assert [s for s, _ in changes][:3] == [0, 4, 8] and changes[-1][0] == 16  # 33 steps, the ramp ends at 16
    cost = pipe.cost()
    assert 0 < cost.phases[1].training_flops < 3 * cost.phases[0].training_flops  # 3 epochs below dense cost
    assert linear_kind.describe() == {"name": "linear magnitude pruning", "dense": False, "sparse": True}


def test_a_users_kind_resumes_bit_identically_inside_its_phase(linear_kind, tmp_path):
    whole = run_pipeline(spec())
    resumed = run_interrupted(spec(), 2, tmp_path / "state.pt")  # epoch 2: inside X1, mid-ramp
    assert resumed.history == whole.history and resumed.extra["phase_costs"] == whole.extra["phase_costs"]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_register_phase_kind_for_notebooks():
    from dsdtune.phases import Sparse

    class Pruned(Sparse):  # e.g. a kind defined in a notebook cell
        name = "notebook pruning"

    register_phase_kind("N", Pruned)
    try:
        result = run_pipeline({"task": TASK, "seed": 0, "pipeline": {"flow": "DN", "epochs": 1, "lr": 0.05}})
        assert "acc_after_N1" in result.final
    finally:
        PHASE_KINDS.unregister("N")
    with pytest.raises(ValueError, match="'S' is the built-in kind sparse"):
        register_phase_kind("S", Pruned)


def _study(tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    (folder / "linear_ramp.py").write_text((EXAMPLE / "linear_ramp.py").read_text())
    (folder / "notakind.py").write_text("class Ramp:\n    pass\n\nVALUE = 3\n")
    study = yaml.safe_load((EXAMPLE / "study.yaml").read_text())
    study.update({"task": {"dataset": "synthetic", "model": "mlp", "model_args": {"widths": [16]}, "batch_size": 50},
                  "seeds": 1})
    study["pipeline"]["epochs"] = [1, 1]
    for key, value in changes.items():
        node = study
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    (folder / "s.yaml").write_text(yaml.safe_dump(study))
    return folder / "s.yaml"


@pytest.mark.parametrize("changes,words", [
    ({"phase_kinds": {"X": "linear_rmp:LinearRamp"}}, ["phase_kinds.X", "no module 'linear_rmp'"]),
    ({"phase_kinds": {"X": "linear_ramp:LinearRmp"}}, ["phase_kinds.X", "has no 'LinearRmp'", "LinearRamp"]),
    ({"phase_kinds": {"X": "notakind:Ramp"}}, ["phase_kinds.X", "not a subclass of dsdtune.PhaseKind"]),
    ({"phase_kinds": {"S": "linear_ramp:LinearRamp"}, "pipeline.flow": "DS"}, ["phase_kinds.S", "built-in"]),
    ({"phase_kinds": {"x": "linear_ramp:LinearRamp"}}, ["phase_kinds.x", "one capital letter"]),
    ({"pipeline.linear": {"every_steps": 0}}, ["pipeline.linear.every_steps", "greater than 0"]),
    ({"pipeline.linear": {"ends": 0.5}}, ["pipeline.linear.ends", "unknown key"]),
])
def test_a_users_kind_refused_in_one_line_before_ray(tmp_path, capsys, changes, words):
    results = tmp_path / "results"
    try:
        code = main([str(_study(tmp_path, **changes)), "--results", str(results), "--dry-run"])
    finally:
        if "X" in PHASE_KINDS.registered:
            PHASE_KINDS.unregister("X")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not results.exists()


def test_the_example_study_runs_through_ray_and_reports_its_kind(tmp_path):
    """examples/own_method as the README runs it, shortened; its arm in the report with its FLOPs."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dsdtune.study", str(EXAMPLE / "study.yaml"), "--results",
                           str(tmp_path), "--num-cpus", "2", "--set", "seeds=2", "--set", "pipeline.epochs=[2, 2]",
                           "--set", "task.dataset_args={num_samples: 1200}", "--set", "pipeline.dst.every_steps=3",
                           "--set", "pipeline.gradual.every_steps=3", "--set", "pipeline.linear.every_steps=3"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "own_method" / "trials.csv")
    assert sorted(trials.variant.unique()) == ["gmp", "linear", "rigl"] and (trials.status == "ok").all()
    assert trials.groupby("seed").prefix_id.nunique().eq(1).all()  # the three arms of a seed share D1
    assert trials.acc_after_X1.notna().sum() == 2
    linear = trials[trials.variant == "linear"]
    assert (linear.training_flops < linear.training_flops_dense).all()
    comparisons = pd.read_csv(tmp_path / "own_method" / "comparisons.csv")
    assert "variant=linear" in set(comparisons.arm)
    costs = pd.read_csv(tmp_path / "own_method" / "costs.csv")
    assert set(linear.trial_id) <= set(costs.trial_id)
