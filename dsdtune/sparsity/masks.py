"""Which tensors are prunable, the Masks object, and applying masks fast.

A mask is a float 0/1 tensor per prunable parameter name (float, not bool, so that applying it is
one fused multiply). Applying masks to weights, gradients and optimizer buffers uses torch's
foreach kernels: one call for all layers instead of one Python-level op per layer.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .topk import kept_count  # noqa: F401  (the one rounding rule; re-exported)

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
RECURRENT_WEIGHT = re.compile(r"weight_(ih|hh)_l\d+(_reverse)?$")


def _module_weights(model: nn.Module, include_embedding: bool) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, weight, is_input_facing) for every prunable weight, in registration order."""
    found = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, PRUNABLE_MODULES) or (include_embedding and isinstance(module, nn.Embedding)):
            found.append((prefix + "weight", module.weight, True))
        elif isinstance(module, nn.RNNBase):
            for pname, param in module.named_parameters(recurse=False):
                if RECURRENT_WEIGHT.match(pname):
                    # Only the first layer's input weights face the input; the rest are hidden-to-hidden.
                    found.append((prefix + pname, param, pname.startswith("weight_ih_l0")))
    return found


def prunable_weights(
    model: nn.Module,
    exclude_first: bool = True,
    exclude: Iterable[str] = (),
    include_embedding: bool = False,
) -> dict[str, nn.Parameter]:
    """Prunable weights by parameter name: Linear/Conv/recurrent weights, never biases or norms.

    `exclude_first` leaves the first layer's input-facing weight dense (the DSD paper's default);
    `exclude` holds regular expressions matched (re.search) against parameter names.
    """
    patterns = [re.compile(p) for p in exclude]
    found = _module_weights(model, include_embedding)
    first_module = None
    if exclude_first and found:
        first_module = found[0][0].rsplit(".", 1)[0] if "." in found[0][0] else ""
    result: dict[str, nn.Parameter] = {}
    for name, param, input_facing in found:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if first_module is not None and owner == first_module and input_facing:
            continue
        if any(p.search(name) for p in patterns):
            continue
        result[name] = param
    return result


class Masks:
    """Name -> 0/1 float tensor, with density statistics and fused application."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def items(self):
        return self.tensors.items()

    def kept_counts(self) -> dict[str, int]:
        return {n: int(m.count_nonzero()) for n, m in self.tensors.items()}

    def layer_densities(self) -> dict[str, float]:
        return {n: int(m.count_nonzero()) / m.numel() for n, m in self.tensors.items()}

    def density(self) -> float:
        kept = sum(int(m.count_nonzero()) for m in self.tensors.values())
        total = sum(m.numel() for m in self.tensors.values())
        return kept / total if total else 1.0

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def to(self, device: torch.device | str) -> "Masks":
        return Masks({n: m.to(device) for n, m in self.tensors.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Stored as bool: 4x smaller checkpoints; converted back to the weight dtype on load.
        return {n: m.bool().cpu() for n, m in self.tensors.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> "Masks":
        return cls({n: state[n].to(device=params[n].device, dtype=params[n].dtype) for n in state})


class MaskApplier:
    """Binds masks to a model's parameters once, so each step costs one foreach call per target.

    The per-step methods run once or twice per training step, so they avoid per-call Python
    overhead (a `no_grad` decorator, scanning the list for missing gradients) on the common path.
    """

    def __init__(self, model: nn.Module, masks: Masks):
        params = dict(model.named_parameters())
        self.names = list(masks.tensors)
        self.params = [params[n] for n in self.names]
        self.masks = [masks[n] for n in self.names]

    # The per-step methods take (and ignore) the step index, so they serve as training-loop hooks as they are.
    def apply_to_weights(self, step: int = 0) -> None:
        with torch.no_grad():  # in-place on leaf parameters
            torch._foreach_mul_(self.params, self.masks)

    def apply_to_grads(self, step: int = 0) -> None:
        # Gradients are plain tensors (no autograd history), so no no_grad is needed here.
        grads = [p.grad for p in self.params]
        try:
            torch._foreach_mul_(grads, self.masks)
        except TypeError:
            # Some parameter got no gradient this step (None in the list; the call is rejected
            # before touching any tensor): mask the ones that did.
            pairs = [(g, m) for g, m in zip(grads, self.masks) if g is not None]
            if len(pairs) == len(grads):
                raise
            if pairs:
                torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def apply_to_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every per-parameter optimizer buffer (momentum, Adam moments) where the mask is 0."""
        buffers, masks = [], []
        for param, mask in zip(self.params, self.masks):
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    buffers.append(value)
                    masks.append(mask)
        if buffers:
            torch._foreach_mul_(buffers, masks)


@torch.no_grad()
def measured_sparsity(weights: Iterable[torch.Tensor]) -> float:
    """Fraction of exact zeros over the given tensors (one device sync)."""
    weights = list(weights)
    if not weights:
        return 0.0
    zeros = torch.stack([(w == 0).sum() for w in weights]).sum()
    total = sum(w.numel() for w in weights)
    return float(zeros) / total


def describe_prunable(model: nn.Module, exclude_first: bool = True, exclude: Iterable[str] = ()) -> str:
    """One line per Linear/Conv/recurrent weight: its module, shape, size, and whether it will be pruned.

    The same rules as `prunable_weights` (which decides), so a user sees what a foreign model
    exposes to pruning before anything runs.
    """
    candidates = [(name, param) for name, param, _ in _module_weights(model, include_embedding=False)]
    pruned = prunable_weights(model, exclude_first=exclude_first, exclude=exclude)
    patterns = [re.compile(p) for p in exclude]
    modules = dict(model.named_modules())
    width = max([len(name) for name, _ in candidates] + [4])
    lines = []
    for name, param in candidates:
        owner = modules.get(name.rsplit(".", 1)[0] if "." in name else "", model)
        if name in pruned:
            why = "pruned"
        elif any(p.search(name) for p in patterns):
            why = "dense (pipeline.exclude)"
        else:
            why = "dense (first layer)"
        shape = "x".join(str(s) for s in param.shape)
        lines.append(f"  {name:<{width}}  {type(owner).__name__:<8} {shape:<14} {param.numel():>11,}  {why}")
    total = sum(p.numel() for _, p in candidates)
    kept_dense = total - sum(p.numel() for p in pruned.values())
    lines.append(f"  {len(pruned)} of {len(candidates)} layer weights prunable: "
                 f"{total - kept_dense:,} of {total:,} weights ({kept_dense:,} stay dense)")
    return "\n".join(lines)
