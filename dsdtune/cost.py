"""What a trial costs: parameters, inference FLOPs of the final model, training FLOPs of its flow.

FLOPs are counted the way the sparse-training literature counts them (RigL, Evci et al. 2020,
appendix H): the forward FLOPs of each layer are measured once on one batch with
`torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs; only the ops torch counts -
matmuls and convolutions - enter, so biases, norms and activations are left out) and attributed to
the layer whose module ran them; a module that owns several weights (a GRU's input and hidden
weights, a multi-layer LSTM) shares its FLOPs among them by size, as each weight enters one matrix
product per time step. Models built only of Linear and Conv layers and FLOP-free modules (the
built-in MLPs, CNNs and ResNets) are counted with forward hooks and torch's own formulas instead,
which gives the same numbers without the counter's cost (its first use imports torch's compiler
stack, seconds in a study's driver); any other model goes through FlopCounterMode.

A layer at density d costs d times its dense FLOPs, layer by layer; layers that are never pruned
stay dense. One training step on one sample costs about 3x its forward FLOPs
(forward, gradient of the input, gradient of the weights).

Training FLOPs come from what each phase's kind recorded while it ran (`phases.PhaseState`): the
per-layer densities it trained at from each step on, and extra work (e.g. RigL's dense gradient every
`every_steps` steps, as `passes` forward passes per sample of that step's batch). Static sparse
training costs 3 f_S per sample; gradual magnitude pruning the density of every step; a flow sums its
phases. The final model's parameters and inference FLOPs count what is there: its non-zero entries.

These are the FLOPs an ideal sparse kernel would spend; dsdtune itself multiplies by masks on dense
kernels, so its wall time does not shrink with sparsity. No Ray, no pandas.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .sparsity.masks import prunable_weights

TRAIN_FLOPS_PER_FORWARD = 3.0  # forward + backward (input gradient + weight gradient)


@dataclass(frozen=True)
class ModelCost:
    """Dense forward FLOPs per sample of a model, in total and per layer weight."""

    forward_flops: float  # per sample, every counted op of the model
    layer_flops: dict[str, float]  # layer weight name -> forward FLOPs per sample it takes part in
    layer_numel: dict[str, int]  # layer weight name -> entries of the weight
    params: int  # every parameter (weights, biases, norms)
    prunable: tuple[str, ...]  # the weights masks apply to in the run it was measured for

    def forward_flops_at(self, densities: Mapping[str, float]) -> float:
        """Per-sample forward FLOPs with each named layer weight scaled by its density (the rest dense)."""
        return self.forward_flops - sum((1.0 - float(d)) * self.layer_flops[n] for n, d in densities.items())

    def nonzero_params_at(self, densities: Mapping[str, float]) -> float:
        """Parameters left when each named layer weight keeps its density (biases, norms all kept)."""
        return self.params - sum((1.0 - float(d)) * self.layer_numel[n] for n, d in densities.items())

    def as_dict(self) -> dict:
        return {**asdict(self), "prunable": list(self.prunable)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ModelCost":
        return cls(float(data["forward_flops"]), {k: float(v) for k, v in data["layer_flops"].items()},
                   {k: int(v) for k, v in data["layer_numel"].items()}, int(data["params"]),
                   tuple(data["prunable"]))


def model_cost_key(task) -> str:
    """What a model's FLOPs depend on: the model, its arguments and the data's sample shape."""
    import json
    return json.dumps([task.model, task.model_args, task.dataset, task.dataset_args], sort_keys=True, default=str)


def measure_model(model: nn.Module, batch: torch.Tensor, prunable: Sequence[str]) -> ModelCost:
    """Forward FLOPs of `model` on one `batch` (first dimension = samples), per sample and layer.

    `prunable` names the weights masks apply to (as `prunable_weights` returns them). Runs in eval
    mode without gradients; a layer's FLOPs are those its module ran (FlopCounterMode's
    attribution: a module counts its own ops and its submodules'), shared by size among the
    module's layer weights.
    """
    all_weights = prunable_weights(model, exclude_first=False)
    missing = [n for n in prunable if n not in all_weights]
    if missing:
        raise ValueError(f"not a layer weight of this model: {missing[0]!r}")
    samples = int(batch.shape[0])
    if samples < 1:
        raise ValueError("need a batch with at least one sample")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            counted = _count_with_hooks(model, batch) if _hooks_count_everything(model) else None
            if counted is None:
                counted = _count_with_flop_counter(model, batch)
    finally:
        model.train(was_training)
    by_module, total = counted
    owners: dict[str, list[str]] = {}
    for name in all_weights:
        owners.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    layer_flops, layer_numel = {}, {}
    for owner, names in owners.items():
        module_flops = by_module.get(owner, 0) / samples
        size = sum(all_weights[n].numel() for n in names)
        for name in names:
            layer_flops[name] = module_flops * all_weights[name].numel() / size
            layer_numel[name] = all_weights[name].numel()
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(total / samples, layer_flops, layer_numel, params, tuple(prunable))


def _count_with_flop_counter(model: nn.Module, batch: torch.Tensor) -> tuple[dict[str, int], int]:
    """({module path: FLOPs of it and its submodules}, total FLOPs) from torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(batch)
    root = type(model).__name__  # FlopCounterMode names modules "<RootClass>.<path>"
    counts = counter.get_flop_counts()
    by_module = {path: sum(counts.get(f"{root}.{path}" if path else root, {}).values())
                 for path, _ in model.named_modules()}
    return by_module, counter.get_total_flops()


# Modules whose forward runs no op FlopCounterMode counts (no matmul, no convolution), matched by
# exact type: a subclass may override forward.
_FLOP_FREE = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Dropout,
              nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softmax,
              nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
              nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_HOOKED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The built-in models' own classes only compose their submodules with FLOP-free tensor ops;
# tests/test_cost_counter.py checks that each one's hook count equals FlopCounterMode's.
_BUILT_IN_MODELS = "dsdtune.models"


def _hooks_count_everything(model: nn.Module) -> bool:
    """Whether every matmul and convolution of `model`'s forward runs inside a hooked layer."""
    for module in model.modules():
        kind = type(module)
        if kind not in _HOOKED and kind not in _FLOP_FREE and kind.__module__ != _BUILT_IN_MODELS:
            return False
    return True


def _count_with_hooks(model: nn.Module, batch: torch.Tensor) -> Optional[tuple[dict[str, int], int]]:
    """The same counts as `_count_with_flop_counter` for a model `_hooks_count_everything` accepts,
    from forward hooks on its Linear and Conv layers and torch's formulas (`mm_flop`: 2 m k n;
    `conv_flop_count`: 2 x batch x output positions x kernel size x channels in x out); None if a
    layer saw an input those formulas do not cover (unbatched), so the caller falls back."""
    own: dict[str, int] = {}
    unsupported: list[str] = []

    def hook(path: str):
        def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x, w = inputs[0], module.weight
            if isinstance(module, nn.Linear):
                if x.dim() < 2:
                    unsupported.append(path)
                    return
                flops = 2 * (x.numel() // x.shape[-1]) * w.shape[1] * w.shape[0]
            else:
                if x.dim() != w.dim():  # unbatched input
                    unsupported.append(path)
                    return
                c_out, c_in, *kernel = w.shape
                flops = 2 * math.prod(output.shape[2:]) * math.prod(kernel) * x.shape[0] * c_out * c_in
            own[path] = own.get(path, 0) + flops
        return count

    handles = [m.register_forward_hook(hook(path)) for path, m in model.named_modules() if type(m) in _HOOKED]
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    if unsupported:
        return None
    by_module = {path: sum(f for p, f in own.items() if not path or p == path or p.startswith(path + "."))
                 for path, _ in model.named_modules()}
    return by_module, sum(own.values())


def samples_between(first: int, last: int, num_train: int, batch_size: int) -> int:
    """Training samples in a phase's optimizer steps [first, last): full batches but each epoch's last."""
    per_epoch = -(-num_train // batch_size)
    short = batch_size * per_epoch - num_train  # the last batch of every epoch is this much smaller
    return (last - first) * batch_size - (last // per_epoch - first // per_epoch) * short


@dataclass(frozen=True)
class PhaseCost:
    label: str
    kind: str
    epochs: int
    training_flops: float
    densities: dict[str, float]  # the densities it ended its training at ({}: dense)


@dataclass(frozen=True)
class TrialCost:
    params: int  # dense parameter count
    params_final: float  # non-zero parameters of the final model
    inference_flops: float  # per sample, the final model (each layer at its non-zero density)
    inference_flops_dense: float  # per sample, the same model dense
    training_flops: float  # the phases run, shared prefix included
    training_flops_dense: float  # the same epochs, every phase dense
    samples_per_epoch: int
    phases: list[PhaseCost] = field(default_factory=list)

    def as_row(self) -> dict[str, float]:
        """Flat numbers for a table."""
        return {"params": self.params, "params_final": self.params_final,
                "inference_flops": self.inference_flops, "inference_flops_dense": self.inference_flops_dense,
                "training_flops": self.training_flops, "training_flops_dense": self.training_flops_dense}


def phase_training_flops(model_cost: ModelCost, record: Mapping, total_steps: int, num_train: int,
                         batch_size: int) -> float:
    """Training FLOPs of one phase from its kind's record (`PhaseState.cost_record()`)."""
    changes = [(int(s), d) for s, d in record.get("density_changes") or [(0, {})]]
    ends = [s for s, _ in changes[1:]] + [total_steps]
    flops = sum(TRAIN_FLOPS_PER_FORWARD * model_cost.forward_flops_at(d) * samples_between(s, e, num_train, batch_size)
                for (s, d), e in zip(changes, ends) if e > s)
    for step, densities, passes in record.get("work") or []:
        flops += float(passes) * model_cost.forward_flops_at(densities) * samples_between(
            int(step), int(step) + 1, num_train, batch_size)
    return flops


@torch.no_grad()
def trial_cost(model_cost: ModelCost, records: Sequence[tuple], num_train: int, batch_size: int,
               model: Optional[nn.Module] = None) -> TrialCost:
    """A run's cost: `records` is one (phase, its cost record) per phase run (phase objects with label,
    kind, epochs); `model` the final model, whose non-zero entries give its parameters and inference
    FLOPs (without it: the dense model's)."""
    per_epoch = -(-num_train // batch_size)
    phases = []
    for phase, record in records:
        record = record or {}
        flops = phase_training_flops(model_cost, record, phase.epochs * per_epoch, num_train, batch_size)
        changes = record.get("density_changes") or [(0, {})]
        phases.append(PhaseCost(phase.label, phase.kind, int(phase.epochs), flops, dict(changes[-1][1])))
    final_densities: dict[str, float] = {}
    params_final: float = model_cost.params
    if model is not None:
        weights = prunable_weights(model, exclude_first=False)
        final_densities = {n: int(w.count_nonzero()) / w.numel() for n, w in weights.items() if n in model_cost.layer_flops}
        params_final = sum(int(p.count_nonzero()) for p in model.parameters())
    epochs = sum(p.epochs for p in phases)
    return TrialCost(
        params=model_cost.params, params_final=params_final,
        inference_flops=model_cost.forward_flops_at(final_densities),
        inference_flops_dense=model_cost.forward_flops,
        training_flops=sum(p.training_flops for p in phases),
        training_flops_dense=TRAIN_FLOPS_PER_FORWARD * model_cost.forward_flops * num_train * epochs,
        samples_per_epoch=int(num_train), phases=phases)
