"""Which tensors are prunable, and the exact kept counts of each pruning criterion."""
import pytest
import torch
from torch import nn

from dsdtune.sparsity.masks import MaskApplier, Masks, kept_count, measured_sparsity, prunable_weights
from dsdtune.sparsity.prune import prune_global_magnitude, prune_layerwise_magnitude, prune_random


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gru = nn.GRU(8, 16, num_layers=2)
        self.head = nn.Linear(16, 10)


def test_prunable_weights_skip_biases_norms_and_first_layer():
    net = Net()
    assert list(prunable_weights(net, exclude_first=False)) == [
        "conv.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.weight_ih_l1", "gru.weight_hh_l1", "head.weight"]
    assert "conv.weight" not in prunable_weights(net)  # first layer left dense by default
    assert list(prunable_weights(net, exclude=[r"^gru\."])) == ["head.weight"]


def test_kept_count_rounds_and_keeps_one():
    assert kept_count(300, 1 - 0.7) == 90
    assert kept_count(10, 0.01) == 1
    assert kept_count(10, 0.0) == 0
    assert kept_count(10, 1.0) == 10


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.999])
def test_layerwise_magnitude_keeps_exactly_k_largest(sparsity):
    torch.manual_seed(0)
    weights = {"a": torch.randn(30, 17), "b": torch.randn(8, 4, 3, 3)}
    masks = prune_layerwise_magnitude(weights, sparsity)
    for name, w in weights.items():
        k = kept_count(w.numel(), 1 - sparsity)
        m = masks[name]
        assert int(m.sum()) == k
        if 0 < k < w.numel():
            assert w.abs()[m.bool()].min() >= w.abs()[~m.bool()].max()


def test_ties_are_broken_by_index():
    w = {"a": torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])}
    assert prune_layerwise_magnitude(w, 0.6)["a"].tolist() == [0, 1, 1, 0, 0]


def test_global_magnitude_single_threshold():
    torch.manual_seed(1)
    weights = {"a": torch.randn(50) * 10, "b": torch.randn(50)}
    masks = prune_global_magnitude(weights, 0.5)
    assert int(masks["a"].sum() + masks["b"].sum()) == 50
    assert masks["a"].sum() > masks["b"].sum()  # the larger layer keeps more
    kept = torch.cat([weights[n].abs()[masks[n].bool()] for n in weights])
    dropped = torch.cat([weights[n].abs()[~masks[n].bool()] for n in weights])
    assert kept.min() >= dropped.max()


def test_random_pruning_exact_and_seeded():
    weights = {"a": torch.randn(40, 40)}
    m1 = prune_random(weights, 0.75, generator=torch.Generator().manual_seed(3))
    m2 = prune_random(weights, 0.75, generator=torch.Generator().manual_seed(3))
    assert int(m1["a"].sum()) == 400 and torch.equal(m1["a"], m2["a"])


def test_applier_masks_weights_grads_and_buffers():
    lin = nn.Linear(6, 4)
    masks = Masks({"weight": (torch.rand(4, 6) > 0.5).float()})
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(3, 6)).sum().backward()
    opt.step()
    applier = MaskApplier(lin, masks)
    applier.apply_to_weights()
    applier.apply_to_grads()
    applier.apply_to_optimizer_state(opt)
    pruned = masks["weight"] == 0
    assert (lin.weight[pruned] == 0).all() and (lin.weight.grad[pruned] == 0).all()
    assert (opt.state[lin.weight]["momentum_buffer"][pruned] == 0).all()
    assert lin.bias.grad.abs().sum() > 0  # biases untouched
    assert measured_sparsity([lin.weight]) == pytest.approx(float(pruned.float().mean()))


def test_mask_state_roundtrip():
    w = {"x": torch.randn(5, 5)}
    masks = prune_layerwise_magnitude(w, 0.4)
    back = Masks.from_state_dict(masks.state_dict(), w)
    assert torch.equal(back["x"], masks["x"]) and back["x"].dtype == torch.float32
    assert masks.density() == pytest.approx(15 / 25)


def test_grads_of_unused_layers_are_skipped():
    """A layer without a gradient this step (unused branch) must not break masking of the others."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    net = nn.ModuleDict({"a": a, "b": b})
    masks = Masks({"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(4, 4)})
    a(torch.randn(2, 4)).sum().backward()  # b gets no gradient
    MaskApplier(net, masks).apply_to_grads()
    assert (a.weight.grad == 0).all() and b.weight.grad is None
