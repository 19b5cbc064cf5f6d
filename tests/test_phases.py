"""Phase kinds as registered objects; the methods' own first-layer defaults; Jacobian diagnostics."""
import pytest
import torch

from dsdtune.config import PipelineSpec, SpecError
from dsdtune.phases import PHASE_KINDS, Dense, DenseState, expand_phases, register_phase_kind, resolve_exclude_first
from dsdtune.pipeline import Pipeline, run_pipeline
from dsdtune.sparsity.topk import kept_count, top_k_mask

TASK = {"dataset": "synthetic", "dataset_args": {"num_train": 200, "num_test": 50, "input_shape": [12],
                                                 "num_classes": 3},
        "model": "mlp", "model_args": {"widths": [16, 16]}, "batch_size": 50, "device": "cpu"}


def test_a_new_phase_kind_is_one_registered_object():
    """A kind registered in one place is usable in flows, with its own transition, step hooks and state."""
    calls: list = []

    class FrozenFirstState(DenseState):  # e.g. a baseline that trains with the first prunable layer frozen
        def enter(self):
            super().enter()
            calls.append(("start", self.phase.label, self.ctx.total_steps))

        def hooks(self):
            first = next(iter(self.ctx.prunable.values()))
            return {"before_step": lambda step: (first.grad.zero_(), calls.append(step))}

    class FrozenFirst(Dense):
        name = "frozen-first"
        State = FrozenFirstState

    register_phase_kind("F", FrozenFirst)
    try:
        assert [p.kind for p in expand_phases(PipelineSpec(flow="DF", epochs=1))] == ["D", "F"]
        pipe = Pipeline({"task": TASK, "pipeline": {"flow": "DF", "epochs": [1, 2], "lr": 0.05, "weight_decay": 0.0,
                                             "momentum": 0.0},  # no momentum: a zero gradient holds the layer
                         "seed": 0})
        pipe.run(stop_after_phase=0)
        first = next(iter(pipe.prunable.values())).detach().clone()
        result = pipe.run()
        # 200 samples minus 10% validation in batches of 50: 4 steps per epoch, indexed through the phase
        assert calls == [("start", "F1", 8), *range(8)] and "acc_after_F1" in result.final
        assert torch.equal(next(iter(pipe.prunable.values())), first)  # its hook held the layer
    finally:
        PHASE_KINDS.unregister("F")
    with pytest.raises(SpecError, match="unknown phase kind F"):
        Pipeline({"task": TASK, "pipeline": {"flow": "DF"}, "seed": 0})


@pytest.mark.parametrize("flow,given,excluded", [("DSD", None, True), ("DGD", None, False), ("DG", None, False),
                                                 ("DSDGD", None, True), ("DGD", True, True), ("DSD", False, False)])
def test_first_layer_default_follows_the_method(flow, given, excluded):
    """DSD keeps the first layer dense; GSM's official code puts it in the global top-Q."""
    spec = PipelineSpec(flow=flow, epochs=1, exclude_first=given)
    assert resolve_exclude_first(spec) is excluded
    pipe = Pipeline({"task": TASK, "pipeline": spec.model_dump(), "seed": 0})
    assert ("layers.0.weight" not in pipe.prunable) is excluded


def test_gsm_first_layer_joins_the_global_top_q_by_default():
    result = run_pipeline({"task": TASK, "pipeline": {"flow": "DG", "epochs": [1, 2], "lr": [0.05, 0.02],
                                                      "sparsity": 0.8}, "seed": 0})
    weights = [p for n, p in result.model.named_parameters() if n.endswith("weight")]
    total = sum(w.numel() for w in weights)
    assert sum(int(w.count_nonzero()) for w in weights) == kept_count(total, 0.2)


def test_jacobian_diagnostics_reach_the_phase_end_metrics():
    result = run_pipeline({"task": TASK, "init": {"density": "uniform", "weights": "eoi", "init_density": 0.5},
                           "pipeline": {"flow": "S", "epochs": 2, "lr": 0.05, "exclude_first": False,
                                        "diagnostics": ["jacobian"], "jacobian_samples": 8}, "seed": 0})
    for when in ("init", "after_S1"):
        for stat in ("mean", "max", "spread"):
            assert result.final[f"jacobian_sv_{stat}_{when}"] > 0, (stat, when)
    assert result.history[-1]["jacobian_sv_max_after_S1"] == result.final["jacobian_sv_max_after_S1"]


def test_jacobian_singular_values_of_a_linear_map():
    from dsdtune.diagnostics import jacobian_stats
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12))
    model = torch.nn.Linear(12, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(2.0 * q[:3])  # rows orthonormal, times 2: every singular value is 2
    stats = jacobian_stats(model, torch.randn(5, 12))
    assert stats["jacobian_sv_max"] == pytest.approx(2.0, rel=1e-5)
    assert stats["jacobian_sv_mean"] == pytest.approx(2.0, rel=1e-5)
    assert stats["jacobian_sv_spread"] == pytest.approx(0.0, abs=1e-5)


def test_one_top_k_rule_ties_go_to_the_lower_index():
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0])
    assert top_k_mask(scores, 3).tolist() == [False, True, True, True, False, False]
    assert top_k_mask(scores, 0).sum() == 0 and top_k_mask(scores, 6).all()
    assert kept_count(300, 0.3) == 90 and kept_count(10, 0.01) == 1
