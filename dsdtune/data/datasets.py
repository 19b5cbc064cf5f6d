"""Datasets by name: the registry `DATASETS`, the built-in loaders and `load_dataset`.

Each built-in loader returns the raw data on the CPU (images as uint8, the rest as float) as
`RawData`; a user's loader (`module:function`, or `register_dataset`) returns a mapping of tensors
(treated like a built-in's) or of torch Datasets (streamed). `load_dataset` checks what a loader
returned, carves the fixed validation split out of the training rows and hands the result to the
tensor path (`tensors.py`) or the streaming path (`streaming.py`). Raw data are cached in-process (a
Ray worker running many trials loads a dataset once) and, where generating or converting is slow, on
disk under the data folder: `task.data_dir`, else `default_data_dir()`.

A new built-in dataset is a loader `load(data_dir, **options) -> RawData` here and one entry in
`BUILTIN_DATASETS`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from ..atomic import write_atomic
from ..config import SpecError
from ..registry import Registry
from .streaming import DatasetParts, StreamingDataset, streamed_datasets, streamed_tensors
from .tensors import Dataset, RawData, tensor_dataset, val_split


class DatasetUnavailable(Exception):
    """A dataset is neither on disk nor downloadable; the message (one line) says what to do."""


def default_data_dir() -> str:
    """Where datasets are kept when a study does not set task.data_dir (absolute).

    `$DSDTUNE_DATA_DIR` if set, else `$XDG_CACHE_HOME/dsdtune/data`, else `~/.cache/dsdtune/data`.
    """
    chosen = os.environ.get("DSDTUNE_DATA_DIR")
    if not chosen:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        chosen = os.path.join(cache, "dsdtune", "data")
    return os.path.abspath(os.path.expanduser(chosen))


# (name, data_dir, sorted args) -> RawData or DatasetParts; keeps a worker process from reloading per trial.
_RAW_CACHE: dict[tuple, Any] = {}


def clear_cache() -> None:
    """Forget the in-process raw-data cache (the on-disk caches stay)."""
    _RAW_CACHE.clear()


# ---------------------------------------------------------------------------------------------
# Built-in loaders: (data_dir, **dataset_args) -> RawData (imagefolder: torch Datasets)


def _check_args(name: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(
            f"dataset {name!r} got unknown dataset_args {unknown}; allowed: {sorted(allowed)}"
        )


def _load_mnist1d(data_dir: str, **args: Any) -> RawData:
    """MNIST-1D generated offline by the `mnist1d` package (package defaults: 4000 train, 1000 test).

    Any key of `mnist1d.data.get_dataset_args()` (except url) can be overridden, e.g. num_samples.
    Generation is seeded by the package's own `seed` arg (default 42), so data match everywhere.
    The disk cache is named by the overrides and the package's version (which fixes its defaults),
    so a cached copy loads without importing the package: it imports scipy.interpolate and
    matplotlib.pyplot, about a second in every process that loads the data (each Ray worker).
    """
    try:
        from importlib.metadata import version

        package_version = version("mnist1d")
    except Exception:  # unknown version: the key holds every argument, defaults included
        package_version = None
    if package_version is not None:
        path = _mnist1d_cache_path(data_dir, args, package_version)
        if os.path.exists(path):
            return _load_mnist1d_npz(path)
    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    package_args = get_dataset_args(as_dict=True)
    package_args.pop("url", None)
    _check_args("mnist1d", args, set(package_args))
    package_args.update(args)
    if package_version is None:
        path = _mnist1d_cache_path(data_dir, package_args, "unknown")
    if os.path.exists(path):
        return _load_mnist1d_npz(path)
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
    write_atomic(path, lambda f: np.savez(f, x=x, y=y, x_test=x_test, y_test=y_test))
    return RawData(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x_test), torch.from_numpy(y_test), 10
    )


def _mnist1d_cache_path(data_dir: str, args: Mapping[str, Any], package_version: str) -> str:
    key = json.dumps({"args": dict(args), "version": package_version}, sort_keys=True)
    return os.path.join(data_dir, f"mnist1d_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz")


def _load_mnist1d_npz(path: str) -> RawData:
    with np.load(path) as arrays:
        x, y, x_test, y_test = (torch.from_numpy(arrays[k]) for k in ("x", "y", "x_test", "y_test"))
    return RawData(x, y, x_test, y_test, 10)


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
        write_atomic(cache, lambda f: torch.save(saved, f))
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


BUILTIN_DATASETS: dict[str, Callable[..., Any]] = {
    "imagefolder": _load_imagefolder,
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    **{name: _torchvision_loader(name) for name in _TORCHVISION},
}


# A re-registered name must not serve the previous loader's data: registering clears the cache.
DATASETS = Registry("dataset", "task.dataset", BUILTIN_DATASETS, on_change=clear_cache)


def register_dataset(name: str, loader: Optional[Callable] = None):
    """Make `loader(data_dir=..., **dataset_args) -> mapping` usable as task.dataset: name (call or decorator)."""
    return DATASETS.register(name, loader)


def dataset_loader(name: str) -> Callable[..., Any]:
    """The loader a task.dataset name stands for: built-in, registered, or an import path."""
    return DATASETS.lookup(name)


# ---------------------------------------------------------------------------------------------
# What a loader returned, and load_dataset


def _freeze(value: Any) -> Any:
    """A hashable version of dataset_args values (lists become tuples) for the cache key."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


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


def load_dataset(
    name: str,
    *,
    device: str | torch.device = "cpu",
    val_fraction: float = 0.1,
    data_dir: Optional[str] = None,
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
    data_dir = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else default_data_dir()
    key = (name, data_dir, _freeze(dataset_args))
    raw = _RAW_CACHE.get(key)
    if raw is None:
        raw = _as_loaded(name, loader(data_dir=data_dir, **dataset_args))
        _RAW_CACHE[key] = raw
    if isinstance(raw, DatasetParts):
        return streamed_datasets(name, raw, val_fraction, device, loader_workers)

    train_idx, val_idx = val_split(len(raw.train_y), val_fraction)
    if stream:
        return streamed_tensors(name, raw, train_idx, val_idx, device, loader_workers)

    return tensor_dataset(name, raw, train_idx, val_idx, device)
