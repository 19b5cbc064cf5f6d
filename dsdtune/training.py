"""One epoch, evaluation, optimizer and LR schedule, seeding, device choice.

The loop is deliberately minimal (index slicing on device tensors, no DataLoader, the loss summed
on the device so a GPU never syncs mid-epoch): the pipeline's phases plug in through the
`before_step` / `after_step` hooks, which is where masks are applied.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import SpecError
from .data import augment_images, batch_indices


def select_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise SpecError("task.device: cuda was requested but no GPU is visible; use device: auto or cpu")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed the global generators (model init, dropout); data order uses its own generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for a sub-stream (e.g. (seed, phase index)); stable across processes."""
    value = seed & 0xFFFFFFFFFFFF
    for s in stream:
        # splitmix64-style mixing: neighbouring (seed, phase) pairs give unrelated streams.
        value = (value * 0x9E3779B97F4A7C15 + s + 1) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
        value = (value * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


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


def train_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    augment: bool = False,
    before_step: Optional[Callable[[], None]] = None,
    after_step: Optional[Callable[[], None]] = None,
    step: Optional[Callable[[], None]] = None,
) -> float:
    """Train one epoch; return the mean training loss (non-finite if the run diverged)."""
    model.train()
    do_step = step or optimizer.step
    total = torch.zeros((), device=x.device)
    for idx in batch_indices(x.shape[0], batch_size, generator, x.device):
        # index_select is the same gather as x[idx] without advanced indexing's overhead (~3x
        # cheaper for image batches on CPU).
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        if augment:
            xb = augment_images(xb, generator)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        do_step()
        if after_step is not None:
            after_step()
        total += loss.detach() * yb.shape[0]
    return float(total) / x.shape[0]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) over a split."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
    n = max(1, x.shape[0])
    return float(loss_sum) / n, int(correct) / n
