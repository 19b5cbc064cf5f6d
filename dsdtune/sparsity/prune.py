"""Pruning criteria: which weights a sparse phase keeps.

Each criterion maps {name: weight} and a target sparsity to a `Masks` object with an exact kept
count; kept counts and ties follow `dsdtune.sparsity.topk` (round(N*d); the lower index wins).
With `within` (the masks bound now) only currently kept weights compete and at most as many are
kept as are kept now, so a phase that prunes again (gradual magnitude pruning, iterative lottery
tickets) never brings a pruned weight back.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .masks import Masks
from .topk import kept_count, top_k_mask


def _scores(weight: torch.Tensor, name: str, within: Optional[Masks], scores: Optional[torch.Tensor] = None):
    """|w| (or given scores) as float, with positions outside `within` below every kept one."""
    s = (weight.detach().abs() if scores is None else scores).float()
    if within is not None:
        s = torch.where(within[name] > 0, s, torch.full_like(s, -1.0 if scores is None else -torch.inf))
    return s


@torch.no_grad()
def prune_layerwise_magnitude(weights: dict[str, torch.Tensor], sparsity: float,
                              generator: Optional[torch.Generator] = None, within: Optional[Masks] = None) -> Masks:
    """DSD's criterion: every layer keeps its own k = N(1 - sparsity) largest |w|."""
    tensors = {}
    for name, w in weights.items():
        k = _capped(kept_count(w.numel(), 1.0 - sparsity), within, [name])
        tensors[name] = top_k_mask(_scores(w, name, within), k).to(w.dtype)
    return Masks(tensors)


@torch.no_grad()
def prune_global_magnitude(weights: dict[str, torch.Tensor], sparsity: float,
                           generator: Optional[torch.Generator] = None, within: Optional[Masks] = None) -> Masks:
    """One threshold over all layers: keep the K = N_total(1 - sparsity) largest |w| overall."""
    names = list(weights)
    flat = torch.cat([_scores(weights[n], n, within).reshape(-1) for n in names])
    mask = top_k_mask(flat, _capped(kept_count(flat.numel(), 1.0 - sparsity), within, names))
    return Masks(_split(mask, weights))


@torch.no_grad()
def prune_random(weights: dict[str, torch.Tensor], sparsity: float,
                 generator: Optional[torch.Generator] = None, within: Optional[Masks] = None) -> Masks:
    """Exactly k random survivors per layer (a control for magnitude pruning)."""
    tensors = {}
    for name, w in weights.items():
        k = _capped(kept_count(w.numel(), 1.0 - sparsity), within, [name])
        if within is None:
            order = torch.randperm(w.numel(), generator=generator)
            mask = torch.zeros(w.numel(), dtype=w.dtype)
            mask[order[:k]] = 1
            tensors[name] = mask.reshape(w.shape).to(w.device)
        else:
            noise = torch.rand(w.shape, generator=generator).to(w.device)
            tensors[name] = top_k_mask(_scores(w, name, within, noise), k).to(w.dtype)
    return Masks(tensors)


def _capped(k: int, within: Optional[Masks], names: list[str]) -> int:
    if within is None:
        return k
    return min(k, sum(int(within[n].count_nonzero()) for n in names))


def _split(flat_mask: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, w in like.items():
        out[name] = flat_mask[start:start + w.numel()].reshape(w.shape).to(device=w.device, dtype=w.dtype)
        start += w.numel()
    return out


Criterion = Callable[..., Masks]
MAGNITUDE_CRITERIA: dict[str, Criterion] = {
    "layerwise_magnitude": prune_layerwise_magnitude,
    "global_magnitude": prune_global_magnitude,
}
CRITERIA: dict[str, Criterion] = {**MAGNITUDE_CRITERIA, "random": prune_random}
