"""Global Sparse Momentum SGD (Ding et al., NeurIPS 2019): phase kind G.

GSM's update  Z <- beta Z + eta W + B o dL/dW,  W <- W - alpha Z  is exactly torch's SGD with
momentum beta and weight decay eta once the loss gradient is multiplied by B, the 0/1 indicator of
the global top-Q entries of |dL/dw * w|. So a GSM step = score, select exactly Q by top-k, mask the
gradients, then the ordinary optimizer step (whose weight decay the pipeline restricts to the
prunable weights: biases and norms get their full gradient and no decay). At the phase end the
network is truncated to the global top-Q by magnitude.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .masks import Masks
from .topk import kept_count, top_k_indices, top_k_mask


class GlobalSparseMomentum:
    def __init__(self, model: nn.Module, prunable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                 sparsity: float, budget: Optional[int] = None):
        self.names = list(prunable)
        self.params = [prunable[n] for n in self.names]
        self.optimizer = optimizer
        total = sum(p.numel() for p in self.params)
        # A parameter budget (kept weights) is the natural knob; a sparsity maps onto it.
        self.q = min(total, budget) if budget is not None else kept_count(total, 1.0 - sparsity)
        device = self.params[0].device
        self.scores = torch.empty(total, device=device, dtype=self.params[0].dtype)
        self.selected = torch.zeros(total, device=device, dtype=self.params[0].dtype)
        self.selected_views = []
        start = 0
        for p in self.params:
            self.selected_views.append(self.selected[start:start + p.numel()].view(p.shape))
            start += p.numel()
        self.previous_selection: Optional[torch.Tensor] = None
        self.overlap_history: list[float] = []

    @torch.no_grad()
    def select(self) -> torch.Tensor:
        """Exactly Q entries with the largest first-order Taylor score |g * w| (flat 0/1 buffer)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        products = torch._foreach_mul(grads, self.params)
        torch.cat([t.reshape(-1) for t in products], out=self.scores)
        self.scores.abs_()
        # exactly Q by the shared top-k rule, not a >= threshold: ties or mostly-zero scores must not
        # admit extra entries (ties go to the lower index, so a step is deterministic).
        chosen = top_k_indices(self.scores, self.q)
        self.selected.zero_()
        self.selected[chosen] = 1
        return self.selected

    def step(self, step: int = 0) -> None:
        """One GSM step (the training loop's step hook; `step` is its index, unused)."""
        self.select()
        with torch.no_grad():
            grads = [p.grad for p in self.params if p.grad is not None]
            if len(grads) == len(self.params):
                torch._foreach_mul_(grads, self.selected_views)
            else:
                for p, view in zip(self.params, self.selected_views):
                    if p.grad is not None:
                        p.grad.mul_(view)
        self.optimizer.step()

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Log the overlap of the last step's selection with the previous epoch's (re-activation)."""
        current = self.selected.bool().clone()
        if self.previous_selection is not None:
            overlap = (current & self.previous_selection).sum() / max(1, self.q)
            self.overlap_history.append(float(overlap))
        self.previous_selection = current

    @torch.no_grad()
    def truncate(self) -> None:
        """Keep the global top-Q weights by magnitude, zero the rest (GSM does no fine-tuning)."""
        flat = torch.cat([p.detach().abs().reshape(-1) for p in self.params])
        keep = top_k_mask(flat, self.q)
        start = 0
        self._final = {}
        for name, p in zip(self.names, self.params):
            m = keep[start:start + p.numel()].view(p.shape).to(p.dtype)
            p.mul_(m)
            self._final[name] = m
            start += p.numel()

    def final_masks(self) -> Masks:
        return Masks(self._final)

    def state_dict(self) -> dict:
        return {"previous_selection": None if self.previous_selection is None else self.previous_selection.cpu(),
                "overlap_history": list(self.overlap_history)}

    def load_state_dict(self, state: dict) -> None:
        prev = state["previous_selection"]
        self.previous_selection = None if prev is None else prev.to(self.selected.device)
        self.overlap_history = list(state["overlap_history"])
