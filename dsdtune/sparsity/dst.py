"""The drop-and-grow rule of dynamic sparse training (SET, Mocanu et al. 2018; RigL, Evci et al. 2020).

Per layer, with the current 0/1 mask and a drop fraction f:

1. n_active = mask.sum(); n_swap = floor(n_active * f).
2. Drop: keep the n_active - n_swap active positions with the largest drop score (|w|).
3. Grow: among the positions not kept (a just-dropped one may come back), switch on the n_swap
   with the largest grow score (RigL: |dense gradient|; SET: uniform random scores).

The layer keeps exactly n_active connections. Both selections use `topk.top_k_mask`, so ties go
to the lower flat index (as tf.math.top_k in google-research/rigl and the stable argsort in
jaxpruner). The selection is that of rigl's `_get_update_op` (TF1) and `generic_mask_update`
(TF2) and of jaxpruner's `SET._update_masks`, with two differences: positions already off never
survive the drop (rigl scores them |mask * w| = 0, so they can outrank an active weight that is
exactly 0; jaxpruner, like dsdtune, puts them below every active one), and no noise is added to
the drop scores (rigl adds N(0, 1e-5) in TF1). How many are swapped: `swap_count`.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Mapping, Optional

import torch

from .masks import Masks
from .topk import top_k_mask


def swap_count(n_active: int, fraction: float) -> int:
    """Connections replaced at drop fraction `fraction`: floor(n_active * fraction).

    Truncation, as google-research/rigl (`tf.cast(n_ones * drop_fraction, tf.int32)`). The
    product is taken on the decimal value the fraction prints as, so 90 * 0.7 swaps 63
    (a float64 product truncates to 62; rigl's float32 product gives 63). jaxpruner instead
    keeps round(n_active * (1 - f)) (at least one) in its drop step.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a drop fraction lies in [0, 1], got {fraction}")
    return int(n_active * Fraction(repr(float(fraction))))


@torch.no_grad()
def drop_and_grow(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor,
                  fraction: float, *, reinit_regrown: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's SET / RigL update. Returns (new mask, grown).

    `mask` is 0/1 (float or bool); the new mask has its dtype and shape. `grown` is a bool tensor
    of the connections that restart: the caller sets those weights and their optimizer state
    (momentum, Adam moments) to 0. By default these are the positions switched on that were off
    before (rigl's `new_connections` with `reinit_when_same=False`, jaxpruner's
    `masks_activated`): a connection dropped and grown back in the same update keeps its weight.
    `reinit_regrown=True` restarts those too (rigl's `reinit_when_same=True`).
    """
    if not (mask.shape == drop_score.shape == grow_score.shape):
        raise ValueError(f"mask {tuple(mask.shape)}, drop score {tuple(drop_score.shape)} and "
                         f"grow score {tuple(grow_score.shape)} differ in shape")
    active = mask.bool()
    n_active = int(active.sum())
    n_swap = swap_count(n_active, fraction)
    kept = top_k_mask(_only_where(active, drop_score), n_active - n_swap)
    grown_back = top_k_mask(_only_where(~kept, grow_score), n_swap)
    new_active = kept | grown_back
    grown = grown_back if reinit_regrown else grown_back & ~active
    return new_active.to(mask.dtype), grown


@torch.no_grad()
def drop_and_grow_layers(masks: Masks | Mapping[str, torch.Tensor], drop_scores: Mapping[str, torch.Tensor],
                         grow_scores: Optional[Mapping[str, torch.Tensor]], fraction: float, *,
                         generator: Optional[torch.Generator] = None,
                         reinit_regrown: bool = False) -> tuple[Masks, dict[str, torch.Tensor]]:
    """`drop_and_grow` for every layer of `masks`, in their order. Returns (new Masks, grown by name).

    `grow_scores` None is SET: each layer's grow scores are uniform [0, 1) draws from
    `generator`, one tensor per layer in the masks' order, so a seeded generator gives the same
    masks on every run. RigL passes {name: |dense gradient|}.
    """
    if grow_scores is None and generator is None:
        raise ValueError("random growth (SET) needs a torch.Generator")
    new_masks, grown = {}, {}
    for name, mask in masks.items():
        grow = grow_scores[name] if grow_scores is not None else random_scores(mask, generator)
        new_masks[name], grown[name] = drop_and_grow(mask, drop_scores[name], grow, fraction,
                                                     reinit_regrown=reinit_regrown)
    return Masks(new_masks), grown


def random_scores(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) scores shaped like `like`, drawn on the generator's device, on `like`'s device."""
    scores = torch.rand(like.shape, generator=generator, device=generator.device)
    return scores.to(like.device)


def _only_where(allowed: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Scores with every position outside `allowed` below any real score (-inf)."""
    if not scores.is_floating_point() or torch.finfo(scores.dtype).bits < 32:
        scores = scores.float()  # kthvalue needs float32 on CPU; -inf needs a float
    return scores.masked_fill(~allowed, float("-inf"))
