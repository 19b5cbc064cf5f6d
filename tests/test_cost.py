"""dsdtune.cost: per-layer FLOPs from torch's flop counter equal hand-computed values; a run's FLOPs
from what its phase kinds recorded."""
from __future__ import annotations

import pytest
import torch

from dsdtune.cost import measure_model, trial_cost
from dsdtune.models import build_model
from dsdtune.pipeline import Pipeline
from dsdtune.sparsity.masks import prunable_weights

SYNTHETIC = {"dataset": "synthetic", "dataset_args": {"num_train": 200, "input_shape": [20], "num_classes": 4},
             "model": "mlp", "model_args": {"widths": [32]}, "batch_size": 16, "val_fraction": 0.1, "device": "cpu"}


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
    """A DSD run's FLOPs: each phase at the densities its kind recorded (S: the mask it trained)."""
    pipe = Pipeline({"task": SYNTHETIC, "pipeline": {"flow": "DSD", "epochs": [2, 1, 1], "lr": [0.1, 0.01, 0.001],
                                                     "sparsity": 0.5}, "seed": 0})
    pipe.run()
    cost = pipe.cost()
    dense, sparse = 2 * (20 * 32 + 32 * 4), 2 * 20 * 32 + 0.5 * 2 * 32 * 4
    assert [p.training_flops for p in cost.phases] == [3 * 180 * 2 * dense, 3 * 180 * sparse, 3 * 180 * dense]
    assert cost.training_flops == 3 * 180 * (2 * dense + sparse + dense)
    assert cost.training_flops_dense == 3 * 180 * dense * 4
    assert cost.inference_flops == cost.inference_flops_dense == dense  # the re-dense phase drops the mask
    assert cost.params_final == cost.params
    # DS ends sparse: the final model counts what is there, its non-zero entries
    ds = Pipeline({"task": SYNTHETIC, "pipeline": {"flow": "DS", "epochs": [2, 1], "lr": [0.1, 0.01],
                                                   "sparsity": 0.5}, "seed": 0})
    ds.run()
    assert ds.cost().inference_flops == sparse and ds.cost().params_final == cost.params - 64
    # global magnitude: the per-layer densities the phase really trained at
    gm = Pipeline({"task": SYNTHETIC, "pipeline": {"flow": "DS", "epochs": [2, 1], "lr": [0.1, 0.01],
                                                   "sparsity": 0.5, "criterion": "global_magnitude"}, "seed": 0})
    gm.run()
    density = gm.masks.layer_densities()["layers.2.weight"]
    assert gm.cost().phases[1].training_flops == 3 * 180 * (2 * 20 * 32 + density * 2 * 32 * 4)


def test_a_module_with_several_weights_shares_its_flops_by_size():
    """A GRU's input and hidden weights each take their own matrix products: DSD at 0.9 with the
    first layer pruned too costs 3 x (f_D + 0.1 f_pruned + f_D) / 3, not less than the S phase alone."""
    torch.manual_seed(0)
    model = build_model("gru", (40,), 10)
    prunable = list(prunable_weights(model, exclude_first=False))
    cost = measure_model(model, torch.zeros(3, 40), prunable)
    recurrent = [n for n in prunable if "weight_" in n]
    assert len(recurrent) >= 2
    owner_total = sum(cost.layer_flops[n] for n in recurrent)
    for name in recurrent:  # each weight's share is its size's share of the module's FLOPs
        assert cost.layer_flops[name] == pytest.approx(owner_total * cost.layer_numel[name] /
                                                       sum(cost.layer_numel[n] for n in recurrent))
    assert sum(cost.layer_flops.values()) <= cost.forward_flops
    sparse = cost.forward_flops_at({n: 0.1 for n in prunable})
    assert 0 < sparse < cost.forward_flops
    flow = (cost.forward_flops + sparse + cost.forward_flops) / (3 * cost.forward_flops)
    assert 0.69 < flow < 0.71


def test_trial_cost_from_a_run():
    spec = {"task": {**SYNTHETIC, "batch_size": 16},
            "pipeline": {"flow": "DSD", "epochs": [3, 2, 1], "lr": [0.1, 0.01, 0.001], "sparsity": 0.75}, "seed": 0}
    pipe = Pipeline(spec)
    pipe.run()
    t = pipe.cost()
    assert t.samples_per_epoch == 180  # 200 minus the 10% validation rows
    dense, sparse = 2 * (20 * 32 + 32 * 4), 2 * 20 * 32 + 0.25 * 2 * 32 * 4
    assert t.training_flops == pytest.approx(3 * 180 * (3 * dense + 2 * sparse + 1 * dense))
    assert t.training_flops_dense == pytest.approx(3 * 180 * 6 * dense)
    # the same numbers from the records alone, as a report would compute them
    again = trial_cost(pipe.measure(), [(p, pipe.extra["phase_costs"][p.label]) for p in pipe.phases], 180, 16,
                       pipe.model)
    assert again == t


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


def test_a_re_dense_model_that_keeps_zeros_counts_only_its_non_zero_entries():
    """After a re-dense phase a weight can stay exactly 0 (a unit the S phase cut off gets no gradient
    back): the final parameters and inference FLOPs count what the model holds, not the dense size."""
    pipe = Pipeline({"task": SYNTHETIC, "pipeline": {"flow": "DSD", "epochs": [2, 1, 1], "lr": [0.1, 0.01, 0.001],
                                                     "sparsity": 0.5}, "seed": 0})
    pipe.run()
    before = pipe.cost()
    weight = pipe.model.layers[2].weight  # Linear 32 -> 4: 128 entries
    with torch.no_grad():
        weight[:, :8] = 0.0  # 8 hidden units cut off: 32 entries
    after = pipe.cost()
    assert after.params_final == before.params_final - 32 == sum(int(p.count_nonzero()) for p in pipe.model.parameters())
    assert after.inference_flops == before.inference_flops - 0.25 * 2 * 32 * 4
    assert after.inference_flops_dense == before.inference_flops_dense and after.training_flops == before.training_flops
