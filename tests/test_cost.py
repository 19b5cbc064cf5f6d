"""dsdtune.cost: per-layer FLOPs from torch's flop counter equal hand-computed values."""
from __future__ import annotations

import pytest
import torch

from dsdtune.cost import flow_cost, measure_model, trial_cost
from dsdtune.models import build_model
from dsdtune.pipeline import expand_phases
from dsdtune.config import PipelineSpec
from dsdtune.sparsity.masks import prunable_weights


def _mlp(exclude_first=True):
    torch.manual_seed(0)
    model = build_model("mlp", (40,), 10, widths=[64])  # Linear 40->64, ReLU, Linear 64->10
    prunable = list(prunable_weights(model, exclude_first=exclude_first))
    return model, measure_model(model, torch.zeros(5, 40), prunable)


def test_two_layer_mlp_dense_and_half_sparse():
    model, cost = _mlp()
    # 2 FLOPs per multiply-add; biases are not counted.
    assert cost.layer_flops == {"layers.0.weight": 2 * 40 * 64, "layers.2.weight": 2 * 64 * 10}
    assert cost.forward_flops == 2 * (40 * 64 + 64 * 10) == 6400
    assert cost.params == 40 * 64 + 64 + 64 * 10 + 10
    assert cost.prunable == ("layers.2.weight",)  # the first layer stays dense (exclude_first)
    half = {"layers.2.weight": 0.5}
    assert cost.forward_flops_at(half) == 2 * 40 * 64 + 0.5 * 2 * 64 * 10 == 5760
    assert cost.nonzero_params_at(half) == cost.params - 320
    _, both = _mlp(exclude_first=False)
    assert both.forward_flops_at({"layers.0.weight": 0.5, "layers.2.weight": 0.5}) == 3200


def test_flow_training_flops_per_phase_density():
    _, cost = _mlp()
    phases = expand_phases(PipelineSpec(flow="DSD", epochs=[2, 1, 1], lr=[0.1, 0.01, 0.001], sparsity=0.5))
    t = flow_cost(cost, phases, samples_per_epoch=100)
    assert [p.forward_flops for p in t.phases] == [6400, 5760, 6400]
    assert t.training_flops == 3 * 100 * (6400 * 2 + 5760 * 1 + 6400 * 1)
    assert t.training_flops_dense == 3 * 100 * 6400 * 4
    assert t.inference_flops == t.inference_flops_dense == 6400  # the re-dense phase drops the mask
    assert t.params_final == cost.params and t.exact
    ds = flow_cost(cost, expand_phases(PipelineSpec(flow="DS", epochs=[2, 1], lr=[0.1, 0.01], sparsity=0.5)), 100)
    assert ds.inference_flops == 5760 and ds.params_final == cost.params - 320
    # Global magnitude's per-layer densities depend on the weights: approximated and said so.
    gm = flow_cost(cost, expand_phases(PipelineSpec(flow="DS", epochs=[2, 1], lr=[0.1, 0.01], sparsity=0.5,
                                                    criterion="global_magnitude")), 100)
    assert not gm.exact and "global_magnitude" in gm.note
    exact = flow_cost(cost, expand_phases(PipelineSpec(flow="DS", epochs=[2, 1], lr=[0.1, 0.01], sparsity=0.5,
                                                       criterion="global_magnitude")), 100,
                      phase_densities=[None, {"layers.2.weight": 0.25}])
    assert exact.exact and exact.inference_flops == 5120 + 0.25 * 1280


def _conv_flops(cin, cout, k, hw_out):
    return 2 * cin * cout * k * k * hw_out * hw_out


def test_resnet20_dense_and_half_sparse_equal_hand_count():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10)
    prunable = list(prunable_weights(model, exclude_first=True))
    cost = measure_model(model, torch.zeros(2, 3, 32, 32), prunable)
    # Hand count: conv1 3->16 at 32x32; per stage 3 blocks x 2 convs; the first conv of stages 2
    # and 3 has stride 2; option-A shortcuts have no convs; the head is Linear 64 -> 10.
    expected = {"conv1.weight": _conv_flops(3, 16, 3, 32), "fc.weight": 2 * 64 * 10}
    for stage, (cin, cout, hw) in enumerate([(16, 16, 32), (16, 32, 16), (32, 64, 8)]):
        for block in range(3):
            first_in = cin if block == 0 else cout
            expected[f"stages.{stage}.{block}.conv1.weight"] = _conv_flops(first_in, cout, 3, hw)
            expected[f"stages.{stage}.{block}.conv2.weight"] = _conv_flops(cout, cout, 3, hw)
    assert cost.layer_flops == expected
    assert cost.forward_flops == sum(expected.values()) == 81_102_080
    assert cost.params == 269_722  # the paper's 0.27M
    half = {n: 0.5 for n in prunable}
    assert cost.forward_flops_at(half) == expected["conv1.weight"] + 0.5 * (81_102_080 - expected["conv1.weight"])


def test_trial_cost_from_a_run_spec():
    spec = {"task": {"dataset": "synthetic", "dataset_args": {"num_train": 200, "input_shape": [20], "num_classes": 4},
                     "model": "mlp", "model_args": {"widths": [32]}, "batch_size": 16, "val_fraction": 0.1},
            "pipeline": {"flow": "DSD", "epochs": [3, 2, 1], "lr": [0.1, 0.01, 0.001], "sparsity": 0.75}, "seed": 0}
    t = trial_cost(spec)
    assert t.samples_per_epoch == 180  # 200 minus the 10% validation rows
    dense, sparse = 2 * (20 * 32 + 32 * 4), 2 * 20 * 32 + 0.25 * 2 * 32 * 4
    assert [p.forward_flops for p in t.phases] == [dense, sparse, dense]
    assert t.training_flops == pytest.approx(3 * 180 * (3 * dense + 2 * sparse + 1 * dense))
    assert t.training_flops_dense == pytest.approx(3 * 180 * 6 * dense)
