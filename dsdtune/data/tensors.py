"""The tensor path: a dataset as train/val/test tensors on the training device.

Small datasets fit on the device, so batching is index slicing (`batch_indices`) and augmentation is
a batched tensor op (`augment_images`), not a DataLoader. The validation split is a fixed random
fraction of the training rows (`val_split`, the same for every trial and seed); normalization uses
the remaining training rows' per-channel mean and std (`channel_stats`). The streaming path
(`streaming.py`) uses the same split, statistics, batch order and augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The validation split uses its own fixed seed, so it is the same for every trial and every seed.
VAL_SPLIT_SEED = 20170101


@dataclass
class RawData:
    """What a loader returns: CPU tensors before the validation split and normalization."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


@dataclass
class Dataset:
    """Train/val/test tensors on one device: x float32 (normalized), y int64 class indices."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple  # per-sample shape, e.g. (40,) or (3, 32, 32)

    streaming = False

    @property
    def is_image(self) -> bool:
        """True for (C, H, W) samples, the ones `augment_images` applies to."""
        return len(self.input_shape) == 3

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    def train_batches(self, batch_size: int, generator: torch.Generator, augment: bool = False):
        """One epoch of shuffled (x, y) batches: the order drawn from `generator` (see `batch_indices`)."""
        for idx in batch_indices(self.num_train, batch_size, generator, self.train_x.device):
            # index_select is the same gather as x[idx] without advanced indexing's overhead (~3x
            # cheaper for image batches on CPU).
            xb, yb = self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)
            if augment:
                xb = augment_images(xb, generator)
            yield xb, yb

    def eval_batches(self, split: str, batch_size: int):
        """(x, y) batches of the "val" or "test" split in order."""
        x, y = (self.val_x, self.val_y) if split == "val" else (self.test_x, self.test_y)
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]


def val_split(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows), each sorted: a fixed random `val_fraction` of n, whatever the seed."""
    n_val = int(round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    return order[n_val:].sort().values, order[:n_val].sort().values


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per channel (dim 1) for (N, C, ...) data; one scalar for flat (N, D) data."""
    dims = [0] + list(range(2, x.dim())) if x.dim() > 2 else list(range(x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    if x.dim() <= 2:
        mean, std = mean.reshape(()), std.reshape(())
    return mean, std


def tensor_dataset(name: str, raw: RawData, train_idx: torch.Tensor, val_idx: torch.Tensor,
                   device: str | torch.device) -> Dataset:
    """`raw` split into train/val rows, moved to `device` and normalized with the train rows' statistics."""
    # Move before converting: uint8 images cost a quarter of the transfer that float32 would.
    def to_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device).to(torch.float32)

    train_x = to_device(raw.train_x[train_idx])
    mean, std = channel_stats(train_x)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    return Dataset(
        name=name,
        train_x=normalize(train_x),
        train_y=raw.train_y[train_idx].to(device),
        val_x=normalize(to_device(raw.train_x[val_idx])),
        val_y=raw.train_y[val_idx].to(device),
        test_x=normalize(to_device(raw.test_x)),
        test_y=raw.test_y.to(device),
        num_classes=raw.num_classes,
        input_shape=tuple(raw.train_x.shape[1:]),
    )


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """One epoch of shuffled mini-batch index tensors on `device` (the last one may be smaller).

    The permutation comes from a CPU generator, so the data order depends only on its state, not
    on the device; it is moved to the device once per epoch.
    """
    order = torch.randperm(n, generator=generator).to(device)
    return list(order.split(batch_size))


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Crop each image of a (B, C, H, W) batch from its zero-padded version at offset (dy, dx).

    Offsets run over [0, 2 * padding]; (padding, padding) is the unshifted image. Images with
    `flip` set are mirrored horizontally. One gather for the whole batch.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = dy.to(x.device).view(b, 1) + torch.arange(h, device=x.device)  # (B, H)
    cols = dx.to(x.device).view(b, 1) + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip.to(x.device).view(b, 1), cols.flip(1), cols)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def augment_images(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop from a `padding`-pixel zero-padded image plus random horizontal flip.

    Offsets and flips are drawn from the CPU `generator` (so results depend only on its state)
    and applied to the whole batch on x's device at once.
    """
    b = x.shape[0]
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return crop_flip(x, dy, dx, flip, padding)
