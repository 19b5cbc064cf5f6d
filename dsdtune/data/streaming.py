"""The streaming path: torch Datasets (or tensors too large for the device) through a seeded DataLoader.

Datasets given as `torch.utils.data.Dataset` objects, and any dataset with `task.stream`, go through a
`StreamingDataset`: a DataLoader with workers and pinned memory that fetches exactly the index batches
the tensor path would slice, in the same order, so pairing and bit-exact resume hold on both paths.
Random transforms inside a Dataset draw from the global generators, which are seeded per batch. A
user's Datasets are not normalized by dsdtune (their transforms are theirs); a built-in's tensors
streamed with `stream` are normalized per sample exactly as the tensor path normalizes them.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import SpecError
from .tensors import RawData, augment_images, batch_indices, channel_stats, val_split


@dataclass
class DatasetParts:
    """What a loader returned as map-style torch Datasets of (x, y) items.

    `val`, if given, is used as the validation split as it is; otherwise the validation rows are
    carved out of `train` like a tensor dataset's, taken from `train_eval` when given (the same items
    as `train` through deterministic transforms).
    """

    train: Any
    test: Any
    num_classes: int
    val: Any = None
    train_eval: Any = None


class _SeededItems(torch.utils.data.Dataset):
    """Fetches a batch's items with the global RNGs seeded from that batch's own seed.

    A Dataset's random transforms draw from the global torch / random / NumPy generators. Seeding
    them per batch (from the phase generator's state and the batch number) makes those draws depend
    only on (seed, phase, epoch, batch): not on the number of loader workers or which worker fetched
    the batch, and a resumed run repeats them. In the main process (0 workers) the generators are put
    back afterwards, so fetching does not change what training draws (e.g. dropout).
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, request: tuple[int, list[int]]) -> list:
        seed, indices = request
        in_main = torch.utils.data.get_worker_info() is None
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if in_main else None
        torch.default_generator.manual_seed(seed)  # CPU only: a CUDA generator is training's, not ours
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return [self.dataset[i] for i in indices]
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])


class _PlannedBatches:
    """A streaming loader's batch sampler: the index batches planned for the current pass, each with a seed."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.seed = 0

    def __iter__(self):
        for number, batch in enumerate(self.batches):
            yield (self.seed + number * 0x9E3779B97F4A7C15) % 2**63, batch

    def __len__(self) -> int:
        return len(self.batches)


def _state_seed(generator: torch.Generator) -> int:
    """A seed determined by a generator's state, without drawing from it (the tensor path must not notice)."""
    digest = hashlib.sha256(generator.get_state().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StreamingDataset:
    """Train/val/test as torch Datasets of (x, y), batched by DataLoaders (workers, pinned memory).

    The batches are the tensor path's: `train_batches` draws the same permutation from the phase's
    generator (`batch_indices`) and the loader fetches exactly those index batches in that order, so
    arms that share a prefix see the same data order and a restored generator repeats an epoch.
    Augmentation (task.augment) is applied to each batch on the device as on the tensor path.
    """

    streaming = True

    def __init__(self, name: str, train: Any, val: Any, test: Any, num_classes: int, input_shape: tuple,
                 device: str | torch.device = "cpu", workers: int = 0):
        self.name, self.train, self.val, self.test = name, train, val, test
        self.num_classes, self.input_shape = num_classes, tuple(input_shape)
        self.device = torch.device(device)
        self.workers = int(workers)
        self._loaders: dict[str, tuple[torch.utils.data.DataLoader, _PlannedBatches]] = {}

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def num_train(self) -> int:
        return len(self.train)

    def _loader(self, split: str) -> tuple[torch.utils.data.DataLoader, _PlannedBatches]:
        if split not in self._loaders:
            sampler = _PlannedBatches()
            dataset = {"train": self.train, "val": self.val, "test": self.test}[split]
            loader = torch.utils.data.DataLoader(
                _SeededItems(dataset), batch_sampler=sampler, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                # The loader draws its workers' base seed from this generator: with none it would draw
                # from the global one and shift dropout's random numbers away from the tensor path's.
                generator=torch.Generator())
            self._loaders[split] = (loader, sampler)
        return self._loaders[split]

    def _batches(self, split: str, batches: list[list[int]], seed: int):
        loader, sampler = self._loader(split)
        sampler.batches, sampler.seed = batches, seed  # before iter(): workers prefetch at once
        for xb, yb in loader:
            xb = torch.as_tensor(xb).to(self.device, non_blocking=True)
            yield (xb if xb.dtype == torch.float32 else xb.float()), torch.as_tensor(yb).to(self.device).long()

    def train_batches(self, batch_size: int, generator: torch.Generator, augment: bool = False):
        """One epoch of (x, y) batches on the device, in the order `Dataset.train_batches` would give."""
        order = batch_indices(self.num_train, batch_size, generator)
        for xb, yb in self._batches("train", [b.tolist() for b in order], _state_seed(generator)):
            if augment:
                xb = augment_images(xb, generator)
            yield xb, yb

    def eval_batches(self, split: str, batch_size: int):
        """(x, y) batches of the "val" or "test" split in order (their transforms seeded the same each time)."""
        n = len(self.val if split == "val" else self.test)
        yield from self._batches(split, [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)], 0)


class _NormalizedRows(torch.utils.data.Dataset):
    """Rows of CPU tensors, normalized per sample exactly as the tensor path normalizes the whole split."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None, mean: torch.Tensor,
                 std: torch.Tensor):
        self.x, self.y, self.rows = x, y, rows
        self.mean = mean.squeeze(0) if mean.dim() else mean  # (1, C, ...) -> (C, ...) for one sample
        self.std = std.squeeze(0) if std.dim() else std

    def __len__(self) -> int:
        return len(self.y) if self.rows is None else len(self.rows)

    def __getitem__(self, index: int):
        row = index if self.rows is None else int(self.rows[index])
        return (self.x[row].to(torch.float32) - self.mean) / self.std, self.y[row]


def streamed_tensors(name: str, raw: RawData, train_idx: torch.Tensor, val_idx: torch.Tensor,
                      device: str | torch.device, workers: int) -> StreamingDataset:
    # The statistics the tensor path computes, on the CPU, so both paths feed the same values.
    mean, std = channel_stats(raw.train_x[train_idx].to(torch.float32))
    return StreamingDataset(
        name, _NormalizedRows(raw.train_x, raw.train_y, train_idx, mean, std),
        _NormalizedRows(raw.train_x, raw.train_y, val_idx, mean, std),
        _NormalizedRows(raw.test_x, raw.test_y, None, mean, std),
        raw.num_classes, tuple(raw.train_x.shape[1:]), device, workers)


def streamed_datasets(name: str, parts: DatasetParts, val_fraction: float, device: str | torch.device,
                       workers: int) -> StreamingDataset:
    from torch.utils.data import Subset

    if parts.val is not None:
        train, val = parts.train, parts.val
    else:
        train_idx, val_idx = val_split(len(parts.train), val_fraction)
        source = parts.train_eval if parts.train_eval is not None else parts.train
        train, val = Subset(parts.train, train_idx.tolist()), Subset(source, val_idx.tolist())
    if len(train) == 0:
        raise SpecError(f"task.dataset: {name!r} returned an empty train dataset")
    first_x = _SeededItems(train).__getitems__((0, [0]))[0][0]
    return StreamingDataset(name, train, val, parts.test, parts.num_classes, tuple(torch.as_tensor(first_x).shape),
                            device, workers)
