"""Dataset registry: every dataset becomes train/val/test tensors on the training device, or streams.

Small datasets fit on the device, so batching is index slicing (`batch_indices`) and augmentation
is a batched tensor op (`augment_images`), not a DataLoader.

Each loader returns the raw data on the CPU (images as uint8, the rest as float); `load_dataset`
then carves a fixed validation split out of the training data, moves everything to the device and
normalizes with the training split's per-channel mean and std. Raw data are cached in-process
(a Ray worker running many trials loads a dataset once) and, where generating or converting is
slow, on disk under `data_dir`.

A dataset may also be a user's (`module:function` or `dsdtune.register_dataset`), returning tensors
(treated like a built-in's) or torch Datasets. Datasets, and any dataset with `stream`, go through
a `StreamingDataset`: a DataLoader with workers and pinned memory that fetches exactly the index
batches the tensor path would slice, in the same order, so pairing and bit-exact resume hold on
both paths. A user's Datasets are not normalized by dsdtune: their transforms are theirs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .config import SpecError

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


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _load_imagefolder(data_dir: str, image_size: int = 224, resize: int = 256, train_split: str = "train",
                      test_split: str = "val") -> dict:
    """torchvision ImageFolder over data_dir/train and data_dir/val (one subfolder per class), streamed.

    The usual ImageNet transforms: training images get a random resized crop to `image_size` and a
    random horizontal flip; validation rows (carved from train) and the test set (data_dir/val) are
    resized to `resize` and center-cropped to `image_size`; all are normalized with ImageNet's mean
    and std.
    """
    from torchvision import datasets, transforms

    roots = [os.path.join(data_dir, split) for split in (train_split, test_split)]
    for root in roots:
        if not os.path.isdir(root):
            raise DatasetUnavailable(f"imagefolder needs {root}/<class>/<image files>; {root} does not exist "
                                     f"(set task.data_dir to the folder holding {train_split}/ and {test_split}/)")
    normalize = transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                  transforms.ToTensor(), normalize])
    try:
        train = datasets.ImageFolder(roots[0], transform=train_tf)
        test = datasets.ImageFolder(roots[1], transform=eval_tf)
    except (FileNotFoundError, OSError) as err:
        raise DatasetUnavailable(f"imagefolder: {' '.join(str(err).split())}") from None
    if test.classes != train.classes:
        raise DatasetUnavailable(f"imagefolder: {roots[1]} has classes {test.classes[:5]}... but {roots[0]} has "
                                 f"{train.classes[:5]}...; both need the same class folders")
    train_eval = copy.copy(train)  # the same file list (scanned once) through the deterministic transforms
    train_eval.transform = eval_tf
    return {"train": train, "train_eval": train_eval, "test": test, "num_classes": len(train.classes)}


DATASETS: dict[str, Callable[..., Any]] = {
    "imagefolder": _load_imagefolder,
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


def dataset_loader(name: str) -> Callable[..., Any]:
    """The loader a task.dataset name stands for: built-in, registered, or an import path."""
    from . import plugins
    return plugins.lookup(name, "dataset", DATASETS, "task.dataset", sorted(DATASETS))


def val_split(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows), each sorted: a fixed random `val_fraction` of n, whatever the seed."""
    n_val = int(round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    return order[n_val:].sort().values, order[:n_val].sort().values


def load_dataset(
    name: str,
    *,
    device: str | torch.device = "cpu",
    val_fraction: float = 0.1,
    data_dir: str = "data",
    stream: bool = False,
    loader_workers: int = 0,
    **dataset_args: Any,
) -> "Dataset | StreamingDataset":
    """Load a dataset (built-in, registered or `module:function`) with a fixed validation split.

    The validation rows are a fixed random `val_fraction` of the training rows (the same for every
    trial); the remaining training rows keep their original order. Tensors are normalized with the
    mean and std of the remaining training rows only and live on `device`; with `stream` they stay
    on the CPU and go through a DataLoader (`StreamingDataset`), normalized the same way per sample.
    A loader that returns `torch.utils.data.Dataset` objects always streams, through its own
    transforms (dsdtune does not normalize them).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    loader = dataset_loader(name)
    key = (name, os.path.abspath(data_dir), _freeze(dataset_args))
    raw = _RAW_CACHE.get(key)
    if raw is None:
        raw = _as_loaded(name, loader(data_dir=data_dir, **dataset_args))
        _RAW_CACHE[key] = raw
    if isinstance(raw, DatasetParts):
        return _streamed_datasets(name, raw, val_fraction, device, loader_workers)

    train_idx, val_idx = val_split(len(raw.train_y), val_fraction)
    if stream:
        return _streamed_tensors(name, raw, train_idx, val_idx, device, loader_workers)

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


# ---------------------------------------------------------------------------------------------
# Datasets given as torch Datasets, or too large for the device: a seeded streaming DataLoader


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


_TENSOR_KEYS = ("train_x", "train_y", "test_x", "test_y", "num_classes")
_DATASET_KEYS = ("train", "test", "num_classes")


def _as_loaded(name: str, loaded: Any) -> RawData | DatasetParts:
    """A loader's return value as RawData (tensors) or DatasetParts (torch Datasets); bad ones: SpecError."""
    if isinstance(loaded, (RawData, DatasetParts)):
        return loaded
    needs = f"a mapping with {', '.join(_TENSOR_KEYS)} (tensors) or {', '.join(_DATASET_KEYS)} (torch Datasets)"
    if not isinstance(loaded, Mapping):
        raise SpecError(f"task.dataset: {name!r} returned {type(loaded).__name__}; a loader returns {needs}")
    keys = _DATASET_KEYS if "train" in loaded else _TENSOR_KEYS
    missing = [k for k in keys if k not in loaded]
    if missing:
        raise SpecError(f"task.dataset: {name!r} returned no {missing[0]!r}; a loader returns {needs}")
    if "train" in loaded:
        for key in ("train", "test", "val", "train_eval"):
            part = loaded.get(key)
            if part is not None and not (hasattr(part, "__getitem__") and hasattr(part, "__len__")):
                raise SpecError(f"task.dataset: {name!r} returned {key} as {type(part).__name__}, not a map-style "
                                f"torch.utils.data.Dataset (with __getitem__ and __len__)")
        if loaded.get("train_eval") is not None and len(loaded["train_eval"]) != len(loaded["train"]):
            raise SpecError(f"task.dataset: {name!r} returned train_eval with {len(loaded['train_eval'])} items "
                            f"but train with {len(loaded['train'])}; train_eval must hold the same items")
        return DatasetParts(loaded["train"], loaded["test"], int(loaded["num_classes"]), loaded.get("val"),
                            loaded.get("train_eval"))

    def features(value: Any) -> torch.Tensor:
        tensor = torch.as_tensor(value)
        return tensor if tensor.dtype == torch.uint8 else tensor.to(torch.float32)

    raw = RawData(features(loaded["train_x"]), torch.as_tensor(loaded["train_y"]).long(),
                  features(loaded["test_x"]), torch.as_tensor(loaded["test_y"]).long(), int(loaded["num_classes"]))
    for split in ("train", "test"):
        n_x, n_y = len(getattr(raw, f"{split}_x")), len(getattr(raw, f"{split}_y"))
        if n_x != n_y:
            raise SpecError(f"task.dataset: {name!r} returned {n_x} {split}_x rows but {n_y} {split}_y labels")
    return raw


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


def _streamed_tensors(name: str, raw: RawData, train_idx: torch.Tensor, val_idx: torch.Tensor,
                      device: str | torch.device, workers: int) -> StreamingDataset:
    # The statistics the tensor path computes, on the CPU, so both paths feed the same values.
    mean, std = _channel_stats(raw.train_x[train_idx].to(torch.float32))
    return StreamingDataset(
        name, _NormalizedRows(raw.train_x, raw.train_y, train_idx, mean, std),
        _NormalizedRows(raw.train_x, raw.train_y, val_idx, mean, std),
        _NormalizedRows(raw.test_x, raw.test_y, None, mean, std),
        raw.num_classes, tuple(raw.train_x.shape[1:]), device, workers)


def _streamed_datasets(name: str, parts: DatasetParts, val_fraction: float, device: str | torch.device,
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
