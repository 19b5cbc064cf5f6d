"""Model registry: every model builds for its kind of input, classifies, and exposes the expected
prunable layers (first layer dense by default)."""
import pytest
import torch
from torch import nn

from dsdtune.models import MODELS, build_model
from dsdtune.sparsity.masks import prunable_weights

# name -> (input shape, expected prunable weights with the first layer excluded)
CASES = {
    "mlp": ((40,), ["layers.2.weight", "layers.4.weight"]),
    "lenet300_100": ((1, 28, 28), ["layers.2.weight", "layers.4.weight"]),
    "lenet5": ((1, 28, 28), ["conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]),
    "conv1d": ((40,), ["features.2.weight", "features.4.weight", "head.weight"]),
    "gru": ((40,), ["gru.weight_hh_l0", "head.weight"]),
    "resnet20": ((3, 32, 32), 19),  # 18 block convs + fc
    "resnet32": ((3, 16, 16), 31),
    "resnet56": ((3, 8, 8), 55),
    "vgg16": ((3, 16, 16), 13),  # 12 convs + classifier
    "deep_mlp": ((64,), 10),  # 9 hidden-to-hidden + head
    "deep_cnn": ((3, 16, 16), 10),  # 9 convs + head
}


def test_every_registered_model_has_a_case():
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_classifies_and_prunes_expected_layers(name):
    torch.manual_seed(0)
    shape, expected = CASES[name]
    model = build_model(name, shape, 7)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    # Every parameter takes part: the loss gradient reaches it.
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname

    pruned = prunable_weights(model)
    all_prunable = prunable_weights(model, exclude_first=False)
    if isinstance(expected, list):
        assert list(pruned) == expected
    else:
        assert len(pruned) == expected
    # Exactly the first (input-facing) weight is left out, and it is the one touching the input.
    (first,) = [n for n in all_prunable if n not in pruned]
    assert first == next(iter(all_prunable))
    # Its input dimension is the sample's: flat features, image channels, or 1 for a 1-D signal.
    input_dim = dict(model.named_parameters())[first].shape[1]
    assert input_dim == (shape[0] if len(shape) == 3 else 1) or input_dim == torch.Size(shape).numel()
    # Never biases or normalization parameters.
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for n in all_prunable:
        assert not n.endswith("bias")
        assert n.rsplit(".", 1)[0] not in norms


def test_resnet20_size_and_option_a_shortcut():
    model = build_model("resnet20", (3, 32, 32), 10)
    params = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < params < 0.28e6  # He et al. 2016, Table 6: 0.27M
    # Option A: zero-padding shortcuts add no parameters (no 1x1 projection convs).
    assert all(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet_stage_widths_and_downsampling():
    model = build_model("resnet32", (3, 32, 32), 10)
    # Capture feature map shapes after each stage.
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    model(torch.randn(2, 3, 32, 32))
    assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


@pytest.mark.parametrize(
    "name,shape",
    [
        ("resnet20", (1, 28, 28)),
        ("resnet20", (1, 8, 8)),
        ("vgg16", (1, 28, 28)),
        ("lenet5", (3, 32, 32)),
        ("lenet5", (1, 8, 8)),
        ("deep_cnn", (40,)),
        ("conv1d", (2, 30)),
        ("gru", (2, 30)),
        ("mlp", (3, 8, 8)),
    ],
)
def test_models_adapt_to_other_input_sizes(name, shape):
    model = build_model(name, shape, 5)
    assert model(torch.randn(2, *shape)).shape == (2, 5)


def test_lenet300_100_matches_paper_size():
    model = build_model("lenet300_100", (784,), 10)
    assert sum(p.numel() for p in model.parameters()) == 266_610


def test_mlp_options():
    model = build_model("mlp", (10,), 3, widths=[8, 6, 4], activation="tanh", dropout=0.5)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(10, 8), (8, 6), (6, 4), (4, 3)]
    assert any(isinstance(m, nn.Tanh) for m in model.modules())
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    # With dropout the first prunable weight is still the input layer's.
    assert "layers.0.weight" not in prunable_weights(model)
    assert len(prunable_weights(model)) == 3


def test_deep_models_are_configurable_and_plain():
    mlp = build_model("deep_mlp", (16,), 4, depth=5, width=32)
    assert sum(isinstance(m, nn.Linear) for m in mlp.modules()) == 6
    assert any(isinstance(m, nn.Tanh) for m in mlp.modules())
    cnn = build_model("deep_cnn", (3, 8, 8), 4, depth=4, width=16)
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.padding_mode == "circular" and c.kernel_size == (3, 3) for c in convs)
    for model in (mlp, cnn):
        assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) for m in model.modules())


def test_torchvision_models_by_prefix():
    model = build_model("torchvision:resnet18", (3, 32, 32), 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_names_and_args_are_one_line_value_errors():
    with pytest.raises(ValueError, match="allowed: .*resnet20") as info:
        build_model("resnet19", (3, 32, 32), 10)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="widths"):
        build_model("mlp", (4,), 2, width=3)
    with pytest.raises(ValueError, match="activation"):
        build_model("mlp", (4,), 2, activation="swish")
    with pytest.raises(ValueError, match="torchvision"):
        build_model("torchvision:not_a_model", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="image input"):
        build_model("resnet20", (40,), 10)


def test_models_fit_a_small_batch():
    """A few SGD steps on a fixed batch lower the loss."""
    torch.manual_seed(0)
    for name, shape in [("conv1d", (40,)), ("gru", (40,)), ("mlp", (40,))]:
        model = build_model(name, shape, 4)
        x, y = torch.randn(16, *shape), torch.randint(0, 4, (16,))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(8):
            loss = nn.functional.cross_entropy(model(x), y)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert losses[-1] < losses[0], name
