"""Models: the registry `MODELS` and `build_model(name, input_shape, num_classes, **model_args)`.

A name is a built-in (below), `torchvision:<name>` (with `weights` in model_args for pretrained
tensors), `timm:<name>` (timm's `create_model`, with `pretrained: true` for its weights; the `[zoo]`
extra), a name given to `register_model` (`dsdtune.register_model`), or a user's `module:function`
(resolved by `dsdtune.registry`). Input shape and class count come from the dataset, and a factory
gets them only as the parameters it names (`build_model`'s adapter rule). Every model keeps its own
initialization (PyTorch defaults, or He init where the original paper used it): that is the
"base" init that sparse init schemes mask or replace, unless `init.checkpoint` loads trained weights
(`dsdtune.sparsity.checkpoint`). The first prunable layer is always the first one registered, so
`prunable_weights(exclude_first=True)` leaves the input layer dense.

A new built-in model is a factory `f(input_shape, num_classes, **options) -> nn.Module` here and one
entry in `BUILTIN_MODELS`.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import logging
import math
import os
import re
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import SpecError
from .registry import Registry

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "linear": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _image_shape(model: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs image input (C, H, W), got input_shape {tuple(input_shape)}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def _sequence_shape(model: str, input_shape: Sequence[int]) -> tuple[int, int]:
    """(channels, length) for (L,) or (C, L) input."""
    if len(input_shape) == 1:
        return 1, int(input_shape[0])
    if len(input_shape) == 2:
        return int(input_shape[0]), int(input_shape[1])
    raise ValueError(f"{model} needs (L,) or (C, L) input, got input_shape {tuple(input_shape)}")


# ---------------------------------------------------------------------------------------------
# Fully connected


class MLP(nn.Module):
    """Flatten, then Linear + activation (+ dropout) per hidden width, then a Linear head.

    All Linear layers live in `layers`, so parameters are named layers.0.weight, layers.2.weight...
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_classes: int,
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        modules: list[nn.Module] = []
        previous = in_features
        for width in widths:
            modules += [nn.Linear(previous, int(width)), _activation(activation)]
            if dropout > 0:
                modules.append(nn.Dropout(dropout))
            previous = int(width)
        modules.append(nn.Linear(previous, num_classes))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (256, 256),
    activation: str = "relu",
    dropout: float = 0.0,
) -> nn.Module:
    """MLP with hidden `widths` (default 256-256) on the flattened input."""
    return MLP(math.prod(input_shape), widths, num_classes, activation, dropout)


def lenet300_100(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """LeNet-300-100 (the DSD/pruning papers' MNIST MLP) for any flattened input."""
    return MLP(math.prod(input_shape), (300, 100), num_classes, "relu")


def deep_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    depth: int = 10,
    width: int = 256,
    activation: str = "tanh",
) -> nn.Module:
    """Deep vanilla MLP (`depth` hidden layers of `width`): no normalization, no residuals."""
    return MLP(math.prod(input_shape), [width] * depth, num_classes, activation)


# ---------------------------------------------------------------------------------------------
# Convolutional


class LeNet5(nn.Module):
    """LeNet-5: conv 6 / conv 16 (5x5, each followed by 2x2 max pool), then fc 120 / 84 / classes."""

    def __init__(self, input_shape: Sequence[int], num_classes: int):
        super().__init__()
        channels, height, width = _image_shape("lenet5", input_shape)
        # Padding 2 keeps 28x28 MNIST at full size like the original 32x32 input; a second padded
        # conv lets inputs as small as 8x8 (digits) through.
        self.conv1 = nn.Conv2d(channels, 6, 5, padding=2)
        small = min(height, width) // 2 < 10
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2 if small else 0)
        with torch.no_grad():
            features = self._features(torch.zeros(1, channels, height, width)).shape[1]
        self.fc1 = nn.Linear(features, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self._features(x)))
        return self.fc3(F.relu(self.fc2(x)))


def lenet5(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """LeNet-5 for 1- or 3-channel images of any size >= 8x8."""
    return LeNet5(input_shape, num_classes)


class Conv1DNet(nn.Module):
    """1-D CNN for MNIST-1D: conv layers (kernel 5, ReLU; all but the first stride 2), then Linear."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 5,
    ):
        super().__init__()
        in_channels, length = _sequence_shape("conv1d", input_shape)
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        previous = in_channels
        for i, out in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv1d(previous, int(out), kernel_size, stride=stride, padding=kernel_size // 2), nn.ReLU()]
            previous = int(out)
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            features = self.features(torch.zeros(1, in_channels, length)).numel()
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.in_channels, -1)
        return self.head(self.features(x).flatten(1))


def conv1d(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (32, 64, 64),
    kernel_size: int = 5,
) -> nn.Module:
    """Small 1-D CNN for (L,) or (C, L) input, e.g. MNIST-1D (40,)."""
    return Conv1DNet(input_shape, num_classes, channels, kernel_size)


class DeepCNN(nn.Module):
    """Deep vanilla CNN: `depth` 3x3 convs of `width` channels with circular padding, no
    normalization, no residuals, then global average pool and Linear. 1-D input uses Conv1d."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 10,
        width: int = 64,
        activation: str = "tanh",
    ):
        super().__init__()
        if len(input_shape) == 3:
            conv, self.sample_shape = nn.Conv2d, tuple(int(s) for s in input_shape)
        else:
            conv, self.sample_shape = nn.Conv1d, _sequence_shape("deep_cnn", input_shape)
        in_channels = self.sample_shape[0]
        layers: list[nn.Module] = []
        previous = in_channels
        for _ in range(depth):
            layers += [conv(previous, width, 3, padding=1, padding_mode="circular"), _activation(activation)]
            previous = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x.reshape(x.shape[0], *self.sample_shape))
        return self.head(x.flatten(2).mean(2))


def deep_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    depth: int = 10,
    width: int = 64,
    activation: str = "tanh",
) -> nn.Module:
    """Deep vanilla CNN (circular-padded 3x3 convs, tanh by default) for images or 1-D signals."""
    return DeepCNN(input_shape, num_classes, depth, width, activation)


# ---------------------------------------------------------------------------------------------
# Recurrent


class GRUNet(nn.Module):
    """A GRU reads the signal one step at a time ((L,) -> (B, L, 1)); Linear on the last state."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden_size: int = 128, num_layers: int = 1):
        super().__init__()
        self.in_channels, _ = _sequence_shape("gru", input_shape)
        self.gru = nn.GRU(self.in_channels, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, L) -> (B, L, C): time runs along the signal.
        x = x.reshape(x.shape[0], self.in_channels, -1).transpose(1, 2)
        _, hidden = self.gru(x)
        return self.head(hidden[-1])


def gru(input_shape: Sequence[int], num_classes: int, hidden_size: int = 128, num_layers: int = 1) -> nn.Module:
    """GRU sequence classifier for (L,) or (C, L) input."""
    return GRUNet(input_shape, num_classes, hidden_size, num_layers)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, section 4.2)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut.

    Where the block downsamples or widens, the shortcut is the paper's option A: subsample the
    input by 2 and append zero channels, which adds no parameters.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2): 3x3 conv 16, three stages of n blocks at 16/32/64 channels, avg pool, Linear."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, blocks_per_stage: int, widths=(16, 32, 64)):
        super().__init__()
        channels, _, _ = _image_shape("resnet", input_shape)
        self.conv1 = nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        previous = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(previous, width, stride))
                previous = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init, as in the paper.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))


def resnet20(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """CIFAR ResNet-20 (0.27M parameters)."""
    return CifarResNet(input_shape, num_classes, 3)


def resnet32(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """CIFAR ResNet-32 (0.46M parameters)."""
    return CifarResNet(input_shape, num_classes, 5)


def resnet56(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """CIFAR ResNet-56 (0.85M parameters)."""
    return CifarResNet(input_shape, num_classes, 9)


# ---------------------------------------------------------------------------------------------
# VGG-16 (CIFAR variant)

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-16 with BatchNorm for small images: 13 conv-BN-ReLU layers, max pools, Linear(512, classes).

    Pools that would shrink the feature map below 1x1 are skipped, so inputs smaller than 32x32
    work; a global average pool feeds the classifier whatever the input size.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, config: Sequence = _VGG16):
        super().__init__()
        channels, height, width = _image_shape("vgg16", input_shape)
        layers: list[nn.Module] = []
        previous = channels
        size = min(height, width)
        for item in config:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            layers += [nn.Conv2d(previous, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            previous = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def vgg16(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """CIFAR VGG-16 with BatchNorm and a 512 -> classes classifier (~14.7M parameters)."""
    return VGG(input_shape, num_classes)


# ---------------------------------------------------------------------------------------------

BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "lenet300_100": lenet300_100,
    "lenet5": lenet5,
    "conv1d": conv1d,
    "gru": gru,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg16": vgg16,
    "deep_mlp": deep_mlp,
    "deep_cnn": deep_cnn,
}

TORCHVISION_PREFIX = "torchvision:"


def _torchvision_model(name: str, input_shape: Sequence[int], num_classes: int, weights: Optional[str] = None,
                       **model_args: Any) -> nn.Module:
    """A torchvision model; with `weights` (e.g. IMAGENET1K_V1) its pretrained tensors are loaded.

    Pretrained weights come from torch's hub cache (downloaded there once). When the class count
    differs from the weights' (1000 for ImageNet), every tensor but the classifier head's is loaded
    and the head keeps its fresh initialization: the usual way to fine-tune a model-zoo network.
    """
    import torchvision.models

    builder = getattr(torchvision.models, name, None)
    if name.startswith("_") or not callable(builder):
        raise ValueError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models(), e.g. torchvision:resnet18"
        )
    model = builder(weights=None, num_classes=num_classes, **model_args)
    if weights is None:
        return model
    state = _torchvision_weights(name, str(weights))
    own = model.state_dict()
    model.load_state_dict({**own, **{k: v for k, v in state.items() if k in own and own[k].shape == v.shape}})
    return model


def _torchvision_weights(name: str, weights: str) -> dict[str, torch.Tensor]:
    import torchvision.models

    try:
        options = torchvision.models.get_model_weights(name)
    except Exception:
        raise SpecError(f"task.model_args.weights: torchvision:{name} has no pretrained weights") from None
    try:
        chosen = options[weights]
    except KeyError:
        allowed = ", ".join(["DEFAULT"] + [w.name for w in options])
        raise SpecError(f"task.model_args.weights: {weights!r} is not a weight set of torchvision:{name}; "
                        f"allowed: {allowed}") from None
    try:
        return chosen.get_state_dict(progress=False, weights_only=True)
    except Exception as err:  # offline (URLError), proxy, disk: one line saying where the file must go
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise SpecError(f"task.model_args.weights: torchvision:{name} {weights} is not in {cache} and could not "
                        f"be downloaded ({type(err).__name__}); run once with internet, or copy "
                        f"{os.path.basename(chosen.url)} into {cache}") from None


# ---------------------------------------------------------------------------------------------
# timm (pytorch-image-models), the `[zoo]` extra

TIMM_PREFIX = "timm:"
_TIMM_INSTALL = "pip install 'dsdtune[zoo]' (or pip install timm)"


def _timm():
    try:
        import timm
    except ImportError:
        raise SpecError(f"task.model: timm models need the timm package; {_TIMM_INSTALL}") from None
    return timm


def _timm_factory(name: str) -> Callable[..., nn.Module]:
    """What `timm:<name>` stands for; a name timm does not know is a one-line SpecError, found at lookup.

    `timm:create_model` is timm's own entry point: the model's name then comes as model_args.model_name.
    """
    if name == "create_model":
        return _timm_model_named
    _check_timm_name(name, "task.model", TIMM_PREFIX)
    return functools.partial(_timm_model, name)


def _check_timm_name(name: str, field: str, prefix: str) -> None:
    """A timm architecture, optionally with a pretrained tag (`resnet10t.c3_in1k`); else close matches."""
    timm = _timm()
    if timm.is_model(name):
        if "." not in name:
            return
        try:  # the tag must be one of the architecture's
            timm.models.get_pretrained_cfg(name, allow_unregistered=False)
            return
        except RuntimeError:
            pass
    known = timm.list_models(pretrained=True) if "." in name else timm.list_models() + ["create_model"]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    suggest = f"; close matches: {', '.join(prefix + c for c in close)}" if close else ""
    stem = re.match(r"[a-z]+", name.lower())
    family = timm.list_models(f"*{stem.group()}*", pretrained="." in name) if stem else []
    more = (f"; timm.list_models('*{stem.group()}*'{', pretrained=True' if '.' in name else ''}) lists "
            f"{len(family)} like it" if family else "; timm.list_models() lists them")
    raise SpecError(f"{field}: {prefix + name!r} is not a timm model{suggest}{more}")


def _timm_model_named(input_shape: Sequence[int], num_classes: int, model_name: Optional[str] = None,
                      **model_args: Any) -> nn.Module:
    """`timm:create_model` with model_args.model_name: the same as `timm:<model_name>`."""
    if not isinstance(model_name, str):
        raise SpecError("task.model_args.model_name: timm:create_model needs the model's name in "
                        "task.model_args.model_name, e.g. resnet10t; or write task.model: timm:resnet10t")
    _check_timm_name(model_name, "task.model_args.model_name", "")
    return _timm_model(model_name, input_shape, num_classes, **model_args)


def _timm_model(name: str, input_shape: Sequence[int], num_classes: int, pretrained: bool = False,
                **model_args: Any) -> nn.Module:
    """`timm.create_model(name, num_classes=<the data's>, in_chans=<the images' channels>, **model_args)`.

    With `pretrained: true` the weights are read from the Hugging Face cache where timm keeps them
    (downloaded there once if they are missing and the machine is online). A class count or channel
    count other than the weights' gets timm's own adaptation (a fresh classifier head; the first conv
    summed or repeated over channels).
    """
    timm = _timm()
    if len(input_shape) != 3:
        raise SpecError(f"task.model: {TIMM_PREFIX}{name} needs image input (C, H, W); the dataset's samples have "
                        f"shape {tuple(input_shape)}")
    channels = int(input_shape[0])
    if "in_chans" in model_args and model_args.pop("in_chans") != channels:
        raise SpecError(f"task.model_args.in_chans: the dataset's images have {channels} channel"
                        f"{'s' if channels != 1 else ''}; leave in_chans out (dsdtune passes the data's)")
    if not isinstance(pretrained, bool):
        raise SpecError(f"task.model_args.pretrained: true or false, got {pretrained!r}")
    if pretrained:
        overlay = dict(model_args.pop("pretrained_cfg_overlay", None) or {})
        own_source = any(overlay.get(key) for key in ("file", "url", "hf_hub_id", "state_dict"))
        weights = None if own_source else _timm_weights(timm, name)  # the user's own source: timm reads it
        if weights is not None:
            overlay["file"] = weights
        model_args.update(pretrained=True, pretrained_cfg_overlay=overlay)
    return timm.create_model(name, num_classes=num_classes, in_chans=channels, **model_args)


def _timm_weights(timm, name: str) -> Optional[str]:
    """The local file of `name`'s pretrained weights (from the Hugging Face cache, downloading once).

    Given to timm as the weights' file, so that no trial asks the Hub again (offline, every request
    would wait through its retries first). None where timm loads the weights its own way.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise SpecError(f"task.model_args.pretrained: {TIMM_PREFIX}{name} has no pretrained weights; drop pretrained, "
                        f"or pick a model that has some (timm.list_models(pretrained=True))")
    if cfg.file or not cfg.hf_hub_id or cfg.custom_load:
        return None
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in files:
        cached = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(cached, str):
            return cached
    cache = huggingface_hub.constants.HF_HUB_CACHE
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # offline, every retry would log a warning: the one line below says it
    try:
        for filename in files:
            try:
                return huggingface_hub.hf_hub_download(repo, filename, revision=revision or None)
            except LocalEntryNotFoundError:
                raise  # not cached and the Hub unreachable: no other file will do better
            except EntryNotFoundError:
                continue  # the repository has the other format
        raise FileNotFoundError(f"none of {files} in {repo}")
    except Exception as err:
        raise SpecError(f"task.model_args.pretrained: the weights of {TIMM_PREFIX}{name} (Hugging Face repo {repo}) "
                        f"are not in {cache} and could not be downloaded ({type(err).__name__}); run once with "
                        f"internet, or copy {_hub_folder(repo)} there from a machine that has it (HF_HUB_CACHE "
                        f"or HF_HOME move the cache)") from None
    finally:
        hub_logger.setLevel(level)


def _hub_folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


# ---------------------------------------------------------------------------------------------
# The registry and the adapter

MODELS = Registry("model", "task.model", BUILTIN_MODELS,
                  shown=list(BUILTIN_MODELS) + [f"{TORCHVISION_PREFIX}<name>", f"{TIMM_PREFIX}<name>"],
                  prefixes={TORCHVISION_PREFIX: lambda name: functools.partial(_torchvision_model, name),
                            TIMM_PREFIX: _timm_factory})


def register_model(name: str, factory: Optional[Callable] = None):
    """Make `factory(input_shape=..., num_classes=..., **model_args) -> nn.Module` usable as task.model: name.

    Works as a call or a decorator (`@register_model("tiny")`). Registered models travel to Ray workers
    with the study (functions defined in a notebook or script are shipped by value). The factory gets
    input_shape and num_classes only if it has parameters of those names (see `build_model`).
    """
    return MODELS.register(name, factory)


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory a task.model name stands for: built-in, torchvision:<name>, timm:<name>, registered, or an
    import path."""
    return MODELS.lookup(name)


_FROM_DATA = {"input_shape": "one sample's shape", "num_classes": "class count"}


def build_model(name: str, input_shape: Sequence[int], num_classes: int, /, **model_args: Any) -> nn.Module:
    """Build `name` (built-in, `torchvision:<name>`, `timm:<name>`, registered or `module:function`) for the data.

    The adapter rule: the factory is called with `model_args` as keyword arguments, plus `input_shape=`
    and `num_classes=` (from the data) for each that it names as a parameter - never through `**kwargs`,
    which would hand them to whatever the factory forwards its keywords to (timm.create_model passes them
    to the network's constructor). model_args may give input_shape or num_classes themselves only with
    the data's values. Mistakes are one-line SpecErrors (ValueErrors) naming the field.
    """
    input_shape = tuple(int(s) for s in input_shape)
    data = {"input_shape": input_shape, "num_classes": int(num_classes)}
    for key, value in data.items():
        if key in model_args and not _same_value(model_args[key], value):
            raise SpecError(f"task.model_args.{key}: {model_args[key]!r}, but the data's {_FROM_DATA[key]} is "
                            f"{value!r}; leave {key} out (dsdtune passes the data's to a factory that takes it)")
    builder = model_factory(name)
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # no signature (some C callables): pass everything, as documented
        parameters = None
    if parameters is None:
        passed = {**data, **model_args}
    else:
        by_keyword = {p for p, v in parameters.items()
                      if v.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        passed = {**{k: v for k, v in data.items() if k in by_keyword}, **model_args}
        if not takes_any:
            allowed = sorted(by_keyword - set(data))
            unknown = sorted(set(model_args) - by_keyword)
            if unknown:
                raise SpecError(f"task.model_args: model {name!r} got unknown model_args {unknown}; allowed: "
                                f"{allowed or 'none'}")
        missing = [p for p, v in parameters.items() if v.default is inspect.Parameter.empty and p not in passed
                   and v.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if missing:
            raise SpecError(f"task.model_args: model {name!r} needs {', '.join(missing)}, which has no default; "
                            f"give it in task.model_args")
    model = builder(**passed)
    if not isinstance(model, nn.Module):
        raise SpecError(f"task.model: {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _same_value(given: Any, expected: Any) -> bool:
    if isinstance(expected, tuple):
        return isinstance(given, (list, tuple)) and tuple(given) == expected
    return isinstance(given, int) and not isinstance(given, bool) and given == expected
