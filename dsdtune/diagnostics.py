"""Diagnostics of a network's state: the input-to-logits Jacobian's singular values.

Dynamical isometry (Pennington et al.; the EOI paper's `--record_jacobian`) asks that the singular
values of d logits / d input concentrate around 1. For each of a fixed set of inputs the Jacobian
(classes x input features) is computed exactly (one backward pass per class, eval mode) and its
singular values summarised:
- jacobian_sv_mean:   mean of all singular values over all samples;
- jacobian_sv_max:    median over samples of the largest singular value;
- jacobian_sv_spread: standard deviation of all singular values over all samples.
"""
from __future__ import annotations

import torch
from torch import nn

JACOBIAN_KEYS = ("jacobian_sv_mean", "jacobian_sv_max", "jacobian_sv_spread")


def jacobian_singular_values(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """(samples, min(classes, features)) singular values of each sample's input-to-logits Jacobian."""
    was_training = model.training
    model.eval()
    x = inputs.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(x)
            rows = []
            for c in range(logits.shape[1]):
                (grad,) = torch.autograd.grad(logits[:, c].sum(), x, retain_graph=c + 1 < logits.shape[1])
                rows.append(grad.reshape(x.shape[0], -1))
    finally:
        model.train(was_training)
    jacobians = torch.stack(rows, dim=1).double()  # samples are independent in eval mode
    return torch.linalg.svdvals(jacobians)


def jacobian_stats(model: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    values = jacobian_singular_values(model, inputs)
    if not torch.isfinite(values).all():
        return {k: float("nan") for k in JACOBIAN_KEYS}
    return {"jacobian_sv_mean": float(values.mean()), "jacobian_sv_max": float(values.max(dim=1).values.median()),
            "jacobian_sv_spread": float(values.std())}
