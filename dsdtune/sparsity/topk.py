"""The one top-k rule every criterion, allocator and GSM uses: how many weights a density keeps
and which ones win a tie.

- Rounding: a tensor of N entries at density d keeps round(N * d) entries (Python's round, half to
  even), at least one when d > 0, at most N.
- Ties: among equal scores the lower flat index wins (layers in the order given, then row-major
  inside a layer), so the same scores always give the same mask, on every device.

The selection is exact and O(n): `kthvalue` finds the k-th largest value, everything above it is
kept, and the remaining places go to the lowest indices holding exactly that value.
"""
from __future__ import annotations

import torch


def kept_count(numel: int, density: float) -> int:
    """Weights kept in a tensor of `numel` entries at `density`: round(N*d), at least 1 if d > 0."""
    if density <= 0:
        return 0
    return min(numel, max(1, int(round(numel * density))))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of `scores`) of the k largest scores; ties go to the lower flat index."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep.reshape(scores.shape)
    if torch.isnan(flat).any():
        raise ValueError("top-k scores contain NaN")
    kth = torch.kthvalue(flat, n - k + 1).values
    keep = flat > kth
    missing = k - int(keep.sum())
    if missing > 0:
        keep[torch.nonzero(flat == kth).flatten()[:missing]] = True
    return keep.reshape(scores.shape)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of `top_k_mask(scores, k)` in increasing order."""
    return torch.nonzero(top_k_mask(scores, k).reshape(-1)).flatten()
