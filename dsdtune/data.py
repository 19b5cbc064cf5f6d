"""Dataset registry: every dataset becomes train/val/test tensors already on the training device.

Small datasets fit on the device, so batching is index slicing (`batch_indices`) and augmentation
is a batched tensor op (`augment_images`), not a DataLoader.

Each loader returns the raw data on the CPU (images as uint8, the rest as float); `load_dataset`
then carves a fixed validation split out of the training data, moves everything to the device and
normalizes with the training split's per-channel mean and std. Raw data are cached in-process
(a Ray worker running many trials loads a dataset once) and, where generating or converting is
slow, on disk under `data_dir`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

# The validation split uses its own fixed seed, so it is the same for every trial and every seed.
VAL_SPLIT_SEED = 20170101


class DatasetUnavailable(Exception):
    """A dataset is neither on disk nor downloadable; the message (one line) says what to do."""


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

    @property
    def is_image(self) -> bool:
        """True for (C, H, W) samples, the ones `augment_images` applies to."""
        return len(self.input_shape) == 3


@dataclass
class RawData:
    """What a loader returns: CPU tensors before the validation split and normalization."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


# (name, data_dir, sorted args) -> RawData; keeps a worker process from reloading per trial.
_RAW_CACHE: dict[tuple, RawData] = {}


def clear_cache() -> None:
    """Forget the in-process raw-data cache (the on-disk caches stay)."""
    _RAW_CACHE.clear()


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write a file through `write(fileobj)` into a temp file next to it, then rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_args(name: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(
            f"dataset {name!r} got unknown dataset_args {unknown}; allowed: {sorted(allowed)}"
        )


# ---------------------------------------------------------------------------------------------
# Loaders: (data_dir, **dataset_args) -> RawData


def _load_mnist1d(data_dir: str, **args: Any) -> RawData:
    """MNIST-1D generated offline by the `mnist1d` package (package defaults: 4000 train, 1000 test).

    Any key of `mnist1d.data.get_dataset_args()` (except url) can be overridden, e.g. num_samples.
    Generation is seeded by the package's own `seed` arg (default 42), so data match everywhere.
    """
    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    package_args = get_dataset_args(as_dict=True)
    package_args.pop("url", None)
    _check_args("mnist1d", args, set(package_args))
    package_args.update(args)
    try:
        from importlib.metadata import version

        package_version = version("mnist1d")
    except Exception:  # version metadata is only part of the cache key
        package_version = "unknown"
    key = json.dumps({"args": package_args, "version": package_version}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = os.path.join(data_dir, f"mnist1d_{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as arrays:
            x, y, x_test, y_test = (arrays[k] for k in ("x", "y", "x_test", "y_test"))
    else:
        # make_dataset reseeds the global `random` and NumPy RNGs; restore them so generating the
        # data does not change what a trial draws from those RNGs afterwards.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            generated = make_dataset(ObjectView(package_args))  # it wants attribute access
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        x, y = generated["x"].astype(np.float32), generated["y"].astype(np.int64)
        x_test, y_test = generated["x_test"].astype(np.float32), generated["y_test"].astype(np.int64)
        _atomic_write(path, lambda f: np.savez(f, x=x, y=y, x_test=x_test, y_test=y_test))
    return RawData(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x_test), torch.from_numpy(y_test), 10
    )


def _load_digits(data_dir: str, as_image: bool = False, test_fraction: float = 0.2) -> RawData:
    """sklearn's 8x8 digits (1797 samples), flat (64,) or (1, 8, 8) with as_image; fixed split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32))
    y = torch.from_numpy(digits.target.astype(np.int64))
    if as_image:
        x = x.reshape(-1, 1, 8, 8)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return RawData(x[train], y[train], x[test], y[test], 10)


def _load_synthetic(
    data_dir: str,
    num_train: int = 512,
    num_test: int = 256,
    input_shape: tuple | list = (20,),
    num_classes: int = 4,
    seed: int = 0,
    noise: float = 1.0,
) -> RawData:
    """Small seeded Gaussian clusters (one mean per class plus noise): learnable within a few steps."""
    shape = tuple(int(s) for s in input_shape)
    features = int(np.prod(shape))
    generator = torch.Generator().manual_seed(seed)
    # Means with norm ~3 so classes overlap little at unit noise, whatever the dimension.
    means = torch.randn(num_classes, features, generator=generator)
    means *= 3.0 / means.norm(dim=1, keepdim=True)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=generator)
        x = means[y] + noise * torch.randn(n, features, generator=generator)
        return x.reshape(n, *shape), y

    train_x, train_y = draw(num_train)
    test_x, test_y = draw(num_test)
    return RawData(train_x, train_y, test_x, test_y, num_classes)


# name -> (torchvision class name, folder torchvision keeps under root, number of classes)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
    "mnist": ("MNIST", "MNIST", 10),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", 10),
}


def _torchvision_loader(name: str) -> Callable[..., RawData]:
    class_name, folder, num_classes = _TORCHVISION[name]

    def load(data_dir: str, download: bool = True) -> RawData:
        # The whole dataset as uint8 tensors in one file: loading it is a fraction of a second,
        # while going through torchvision's pickles / idx files each time is not.
        cache = os.path.join(data_dir, f"{name}_tensors.pt")
        if os.path.exists(cache):
            saved = torch.load(cache, weights_only=True)
            return RawData(saved["train_x"], saved["train_y"], saved["test_x"], saved["test_y"], num_classes)
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, class_name)
        try:
            train = dataset_class(root=data_dir, train=True, download=download)
            test = dataset_class(root=data_dir, train=False, download=download)
        except Exception as error:  # offline, missing or corrupt files: torchvision raises many kinds
            how = "could not be downloaded" if download else "download is disabled (download: false)"
            raise DatasetUnavailable(
                f"{name} is not in {data_dir}/ and {how} ({type(error).__name__}): run once on a machine "
                f"with internet and download enabled, or copy the torchvision '{folder}' folder into "
                f"{data_dir}/"
            ) from None
        saved = {}
        for split, part in (("train", train), ("test", test)):
            images = torch.as_tensor(np.asarray(part.data))
            # CIFAR keeps (N, H, W, C) arrays, MNIST-style datasets (N, H, W): make both (N, C, H, W).
            images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
            saved[f"{split}_x"] = images.contiguous().to(torch.uint8)
            saved[f"{split}_y"] = torch.as_tensor(np.asarray(part.targets), dtype=torch.int64)
        _atomic_write(cache, lambda f: torch.save(saved, f))
        return RawData(saved["train_x"], saved["train_y"], saved["test_x"], saved["test_y"], num_classes)

    load.__name__ = f"_load_{name}"
    load.__doc__ = f"torchvision {class_name} under data_dir (download unless download=False)."
    return load


DATASETS: dict[str, Callable[..., RawData]] = {
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    **{name: _torchvision_loader(name) for name in _TORCHVISION},
}


# ---------------------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """A hashable version of dataset_args values (lists become tuples) for the cache key."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per channel (dim 1) for (N, C, ...) data; one scalar for flat (N, D) data."""
    dims = [0] + list(range(2, x.dim())) if x.dim() > 2 else list(range(x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    if x.dim() <= 2:
        mean, std = mean.reshape(()), std.reshape(())
    return mean, std


def load_dataset(
    name: str,
    *,
    device: str | torch.device = "cpu",
    val_fraction: float = 0.1,
    data_dir: str = "data",
    **dataset_args: Any,
) -> Dataset:
    """Load a registered dataset as normalized tensors on `device`, with a fixed validation split.

    The validation rows are a fixed random `val_fraction` of the training rows (the same for every
    trial); the remaining training rows keep their original order. Normalization uses the mean and
    std of the remaining training rows only.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    key = (name, os.path.abspath(data_dir), _freeze(dataset_args))
    raw = _RAW_CACHE.get(key)
    if raw is None:
        raw = DATASETS[name](data_dir, **dataset_args)
        _RAW_CACHE[key] = raw

    n = len(raw.train_y)
    n_val = int(round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values

    # Move before converting: uint8 images cost a quarter of the transfer that float32 would.
    def to_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device).to(torch.float32)

    train_x = to_device(raw.train_x[train_idx])
    mean, std = _channel_stats(train_x)

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
