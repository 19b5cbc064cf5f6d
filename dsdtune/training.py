"""One epoch, evaluation, optimizer and LR schedule, device choice.

The loop is deliberately minimal (it takes the batches a dataset gives: index slices of device
tensors, or a streaming DataLoader's; the loss is summed on the device so a GPU never syncs
mid-epoch): the pipeline's phases plug in through the `before_step` / `after_step` hooks, which is
where masks are applied.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import SpecError
from .data import Dataset


def select_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise SpecError("task.device: cuda was requested but no GPU is visible; use device: auto or cpu")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def make_optimizer(params, kind: str, lr: float, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    raise SpecError(f"pipeline.optimizer: {kind!r} is not one of sgd, adam")


def set_hyperparameters(optimizer: torch.optim.Optimizer, momentum: float, nesterov: bool,
                        weight_decay: float, decay_groups: Optional[set[int]] = None) -> None:
    """Carry an optimizer (and its momentum buffers) into the next phase with new settings.

    `decay_groups` limits weight decay to those param-group indices (GSM decays only the weights).
    """
    for i, group in enumerate(optimizer.param_groups):
        group["weight_decay"] = weight_decay if decay_groups is None or i in decay_groups else 0.0
        if "momentum" in group:
            group["momentum"] = momentum
            group["nesterov"] = nesterov and momentum > 0
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def scheduled_lr(schedule: str, base_lr: float, epoch: int, epochs: int) -> float:
    """LR for the `epoch`-th (0-based) epoch of a phase of `epochs` epochs."""
    if schedule == "constant" or epochs <= 1:
        return base_lr
    if schedule == "step":  # x0.1 at 50% and 75% of the phase, as in the CIFAR ResNet recipe
        return base_lr * (0.1 ** ((epoch >= epochs // 2) + (epoch >= (3 * epochs) // 4)))
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))
    raise SpecError(f"pipeline.schedule: {schedule!r} is not one of constant, step, cosine")


def train_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    before_step: Optional[Callable[[int], None]] = None,
    after_step: Optional[Callable[[int], None]] = None,
    step: Optional[Callable[[int], None]] = None,
    first_step: int = 0,
) -> float:
    """Train on one epoch's (x, y) batches; return the mean training loss (non-finite if it diverged).

    The hooks get the index of the optimizer step (`first_step` for the first batch): `before_step`
    after the backward pass, `step` instead of `optimizer.step()`, `after_step` after it.
    """
    model.train()
    total, count = None, 0
    index = first_step
    for xb, yb in batches:
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step(index)
        if step is not None:
            step(index)
        else:
            optimizer.step()
        if after_step is not None:
            after_step(index)
        if total is None:
            total = torch.zeros((), device=yb.device)
        total += loss.detach() * yb.shape[0]
        count += yb.shape[0]
        index += 1
    return float(total) / count if count else math.nan


def train_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    augment: bool = False,
    before_step: Optional[Callable[[int], None]] = None,
    after_step: Optional[Callable[[int], None]] = None,
    step: Optional[Callable[[int], None]] = None,
) -> float:
    """Train one epoch on device tensors (shuffled by `generator`); return the mean training loss."""
    data = Dataset("tensors", x, y, x[:0], y[:0], x[:0], y[:0], 0, tuple(x.shape[1:]))
    return train_batches(model, data.train_batches(batch_size, generator, augment), optimizer,
                         before_step=before_step, after_step=after_step, step=step)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) over a split's batches; NaN for both if it has none (no
    sample scores nothing: 0 would be a perfect loss)."""
    model.eval()
    loss_sum = correct = None
    n = 0
    for xb, target in batches:
        logits = model(xb)
        if loss_sum is None:
            loss_sum = torch.zeros((), device=target.device, dtype=torch.float64)
            correct = torch.zeros((), device=target.device, dtype=torch.int64)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
        n += target.shape[0]
    if n == 0:
        return math.nan, math.nan
    return float(loss_sum) / n, int(correct) / n


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) over a split of device tensors."""
    return evaluate_batches(model, ((x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)))
