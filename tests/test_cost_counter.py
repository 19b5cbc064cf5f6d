"""dsdtune.cost's two ways of counting a model's forward FLOPs give the same numbers: forward hooks on
Linear and Conv layers (the built-in models) and torch's FlopCounterMode (every other model)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dsdtune import cost
from dsdtune.cost import measure_model
from dsdtune.models import MODELS, build_model
from dsdtune.sparsity.masks import prunable_weights

SHAPES = {"mlp": (40,), "lenet300_100": (1, 28, 28), "lenet5": (1, 28, 28), "conv1d": (40,), "gru": (40,),
          "resnet20": (3, 32, 32), "resnet32": (3, 16, 16), "resnet56": (3, 8, 8), "vgg16": (3, 32, 32),
          "deep_mlp": (64,), "deep_cnn": (3, 16, 16)}


def _with_flop_counter(model, batch, prunable):
    original = cost._hooks_count_everything
    cost._hooks_count_everything = lambda model: False
    try:
        return measure_model(model, batch, prunable)
    finally:
        cost._hooks_count_everything = original


def test_every_registered_model_has_a_shape():
    assert set(SHAPES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_built_in_models_count_the_same_with_hooks_and_flop_counter(name):
    torch.manual_seed(0)
    model = build_model(name, SHAPES[name], 10)
    prunable = list(prunable_weights(model))
    batch = torch.randn(3, *SHAPES[name])
    hooked = measure_model(model, batch, prunable)
    assert hooked == _with_flop_counter(model, batch, prunable)
    assert hooked.forward_flops > 0 and all(f > 0 for f in hooked.layer_flops.values())
    # only the recurrent model needs the counter: its matmuls run inside nn.GRU
    assert cost._hooks_count_everything(model) == (name != "gru")


def test_hooked_layers_are_counted_like_torch():
    """Strided, padded, grouped and circular convolutions, Linear on 3-D input, no bias."""
    class Net(nn.Module):  # defined here, so measure_model uses FlopCounterMode for it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
            self.circular = nn.Conv1d(8, 6, 5, padding=2, padding_mode="circular", bias=False)
            self.proj = nn.Linear(6, 5, bias=False)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 36, 3))

        def forward(self, x):
            x = self.conv(x).flatten(2)  # (B, 8, 36)
            x = self.proj(self.circular(x).transpose(1, 2))  # Linear on (B, 36, 6)
            return self.head(x)

    model, batch = Net(), torch.randn(2, 4, 12, 12)
    prunable = list(prunable_weights(model, exclude_first=False))
    assert not cost._hooks_count_everything(model)
    counted = measure_model(model, batch, prunable)
    expected = {"conv.weight": 2 * 36 * 9 * 8 * 2, "circular.weight": 2 * 36 * 5 * 6 * 8,
                "proj.weight": 2 * 36 * 6 * 5, "head.1.weight": 2 * 180 * 3}
    assert counted.layer_flops == expected
    original = cost._hooks_count_everything
    cost._hooks_count_everything = lambda model: True
    try:
        assert measure_model(model, batch, prunable) == counted
    finally:
        cost._hooks_count_everything = original


def test_a_model_with_its_own_matmul_is_counted_by_the_flop_counter():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.mix = nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return self.fc(x) @ self.mix  # a matmul outside any Linear or Conv layer

    model = Bilinear()
    counted = measure_model(model, torch.randn(5, 6), ["fc.weight"])
    assert not cost._hooks_count_everything(model)
    assert counted.forward_flops == 2 * 6 * 6 + 2 * 6 * 4
