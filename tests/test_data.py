"""Datasets as device tensors: shapes, dtypes, disjoint fixed splits, normalization, caches,
offline errors, torchvision on-disk formats, batching and augmentation."""
import hashlib
import os
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsdtune import data
from dsdtune.data import (
    DATASETS,
    Dataset,
    DatasetUnavailable,
    augment_images,
    batch_indices,
    crop_flip,
    load_dataset,
)


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def row_hashes(x: torch.Tensor) -> set[bytes]:
    return {hashlib.sha1(row.numpy().tobytes()).digest() for row in x.cpu().contiguous()}


def assert_well_formed(ds: Dataset, input_shape: tuple, num_classes: int) -> None:
    assert ds.input_shape == input_shape
    assert ds.num_classes == num_classes
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == input_shape and len(x) == len(y)
        assert len(y) == 0 or (int(y.min()) >= 0 and int(y.max()) < num_classes)
        assert torch.isfinite(x).all()
    # Train, validation and test share no sample.
    train, val, test = row_hashes(ds.train_x), row_hashes(ds.val_x), row_hashes(ds.test_x)
    assert len(train) == len(ds.train_x) and len(val) == len(ds.val_x)
    assert not (train & val) and not (train & test) and not (val & test)


def test_synthetic_shapes_split_and_normalization():
    ds = load_dataset("synthetic", num_train=200, num_test=50, num_classes=3)
    assert_well_formed(ds, (20,), 3)
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (180, 20, 50)
    # Normalized with the training split's statistics (flat data: one mean and std).
    assert abs(float(ds.train_x.mean())) < 1e-5
    assert abs(float(ds.train_x.std()) - 1) < 1e-4


def test_split_is_fixed_whatever_the_global_seed():
    torch.manual_seed(1)
    a = load_dataset("synthetic", num_train=100)
    data.clear_cache()
    torch.manual_seed(2)
    b = load_dataset("synthetic", num_train=100)
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_val_fraction_zero_keeps_all_training_rows_in_order():
    full = load_dataset("synthetic", num_train=64, val_fraction=0.0)
    split = load_dataset("synthetic", num_train=64, val_fraction=0.25)
    assert len(full.val_x) == 0 and len(full.train_x) == 64
    assert (len(split.train_x), len(split.val_x)) == (48, 16)
    # The same underlying rows: every split label multiset adds up to the full one.
    assert sorted(torch.cat([split.train_y, split.val_y]).tolist()) == sorted(full.train_y.tolist())
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("synthetic", val_fraction=1.0)


def test_synthetic_is_learnable_and_image_shaped_on_request():
    ds = load_dataset("synthetic", num_train=400, num_test=200, num_classes=4)
    # Nearest class mean, fit on train, is far above chance (0.25) on test.
    means = torch.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(4)])
    predicted = torch.cdist(ds.test_x, means).argmin(1)
    assert (predicted == ds.test_y).float().mean() > 0.8
    images = load_dataset("synthetic", input_shape=[3, 8, 8], num_train=40, num_test=10)
    assert images.input_shape == (3, 8, 8) and images.is_image
    # Image data are normalized per channel.
    assert images.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-5


def test_digits_flat_and_image():
    flat = load_dataset("digits")
    assert_well_formed(flat, (64,), 10)
    assert len(flat.train_x) + len(flat.val_x) + len(flat.test_x) == 1797
    image = load_dataset("digits", as_image=True)
    assert_well_formed(image, (1, 8, 8), 10)
    assert torch.equal(image.test_y, flat.test_y)


def test_mnist1d_default_size_matches_package_and_is_cached(tmp_path, monkeypatch):
    from mnist1d.data import get_dataset_args, make_dataset

    random.seed(7)
    np.random.seed(7)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    ds = load_dataset("mnist1d", data_dir=str(tmp_path))
    # Generating the data must not reseed the global RNGs that trials draw from.
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert_well_formed(ds, (40,), 10)
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (3600, 400, 1000)
    reference = make_dataset(get_dataset_args())  # the package's own default data
    assert ds.test_y.tolist() == reference["y_test"].tolist()
    assert sorted(torch.cat([ds.train_y, ds.val_y]).tolist()) == sorted(reference["y"].tolist())
    # Test rows keep their order; normalization is affine, so they correlate perfectly.
    corr = np.corrcoef(ds.test_x.numpy().ravel(), reference["x_test"].ravel())[0, 1]
    assert corr > 0.9999
    cached = list(tmp_path.glob("mnist1d_*.npz"))
    assert len(cached) == 1

    # Second load in the same process: no generation and no disk read.
    monkeypatch.setattr("mnist1d.data.make_dataset", lambda *a, **k: pytest.fail("regenerated"))
    os.remove(cached[0])
    again = load_dataset("mnist1d", data_dir=str(tmp_path))
    assert torch.equal(again.train_x, ds.train_x)


def test_mnist1d_disk_cache_and_args(tmp_path, monkeypatch):
    small = load_dataset("mnist1d", data_dir=str(tmp_path), num_samples=500)
    assert (len(small.train_x) + len(small.val_x), len(small.test_x)) == (400, 100)
    data.clear_cache()  # a new worker process: only the disk cache remains
    monkeypatch.setattr("mnist1d.data.make_dataset", lambda *a, **k: pytest.fail("regenerated"))
    again = load_dataset("mnist1d", data_dir=str(tmp_path), num_samples=500)
    assert torch.equal(again.test_x, small.test_x) and torch.equal(again.train_y, small.train_y)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("mnist1d", data_dir=str(tmp_path), num_sample=500)


def test_mnist1d_cached_copy_loads_without_importing_the_package(tmp_path):
    """A cached copy needs no mnist1d import (it pulls in scipy.interpolate and matplotlib.pyplot,
    about a second in every Ray worker)."""
    first = load_dataset("mnist1d", data_dir=str(tmp_path), num_samples=300)
    code = ("import sys, torch; from dsdtune.data import load_dataset; "
            f"d = load_dataset('mnist1d', data_dir={str(tmp_path)!r}, num_samples=300); "
            "torch.save([d.train_x, d.test_y], sys.argv[1]); print('mnist1d' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh.pt")], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"
    train_x, test_y = torch.load(tmp_path / "fresh.pt")
    assert torch.equal(train_x, first.train_x) and torch.equal(test_y, first.test_y)


def test_unknown_dataset_lists_allowed_names():
    with pytest.raises(ValueError, match="allowed: .*mnist1d"):
        load_dataset("imagenet")
    assert {"mnist1d", "digits", "synthetic", "cifar10", "cifar100", "mnist", "fashion_mnist"} <= set(DATASETS)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_absent_torchvision_dataset_is_a_one_line_error(tmp_path, name):
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(name, data_dir=str(tmp_path), download=False)
    message = str(info.value)
    assert "\n" not in message
    assert name in message and str(tmp_path) in message and "copy" in message


def write_fake_cifar10(root, train_per_batch=4, num_test=6, seed=0):
    """CIFAR-10 python format: pickled dicts with uint8 'data' rows (R, G, B planes) and 'labels'."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = train_per_batch
    batches["test_batch"] = num_test
    arrays = {}
    for filename, n in batches.items():
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / filename, "wb") as f:
            pickle.dump({"data": rows, "labels": labels, "batch_label": filename}, f)
        arrays[filename] = (rows, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    train_rows = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    return train_rows, train_labels, arrays["test_batch"][0], arrays["test_batch"][1]


def test_fake_cifar10_loads_normalized_in_chw_layout(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    # torchvision verifies the real files' md5 sums even without download; fake files only exist.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    train_rows, train_labels, test_rows, test_labels = write_fake_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=str(tmp_path), download=False, val_fraction=0.0)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.is_image
    assert ds.train_y.tolist() == train_labels and ds.test_y.tolist() == test_labels
    # Each 3072-byte row is three 32x32 planes; statistics per channel from the training images.
    train = train_rows.reshape(-1, 3, 32, 32).astype(np.float64)
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    expected = (test_rows.reshape(-1, 3, 32, 32) - mean) / std
    assert np.allclose(ds.test_x.numpy(), expected, atol=1e-4)
    assert ds.test_x.dtype == torch.float32

    # Converted once: the tensor cache alone is enough afterwards (load is weights_only).
    assert (tmp_path / "cifar10_tensors.pt").exists()
    data.clear_cache()
    for f in (tmp_path / "cifar-10-batches-py").iterdir():
        f.unlink()
    split = load_dataset("cifar10", data_dir=str(tmp_path), download=False, val_fraction=0.25)
    assert (len(split.train_x), len(split.val_x), len(split.test_x)) == (15, 5, 6)
    assert_well_formed(split, (3, 32, 32), 10)


def write_idx(path, array: np.ndarray) -> None:
    """MNIST idx format: zero bytes, type 0x08 (uint8), dimension count, big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_fake_mnist_idx_files_load(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    images = {"train": rng.integers(0, 256, (20, 28, 28)), "t10k": rng.integers(0, 256, (8, 28, 28))}
    labels = {"train": rng.integers(0, 10, 20), "t10k": rng.integers(0, 10, 8)}
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images[split])
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split])
    ds = load_dataset(name, data_dir=str(tmp_path), download=False, val_fraction=0.0)
    assert_well_formed(ds, (1, 28, 28), 10)
    assert ds.test_y.tolist() == labels["t10k"].tolist()
    train = images["train"].astype(np.float64)
    expected = (images["t10k"] - train.mean()) / train.std(ddof=1)
    assert np.allclose(ds.test_x[:, 0].numpy(), expected, atol=1e-4)


def test_batch_indices_cover_each_sample_once_deterministically():
    batches = batch_indices(10, 4, torch.Generator().manual_seed(3), "cpu")
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    again = batch_indices(10, 4, torch.Generator().manual_seed(3), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = batch_indices(10, 4, torch.Generator().manual_seed(4), "cpu")
    assert not torch.equal(torch.cat(batches), torch.cat(other))


def test_crop_at_center_is_identity_and_flip_is_exact():
    x = torch.randn(5, 3, 6, 7)
    center = torch.full((5,), 4)
    no = torch.zeros(5, dtype=torch.bool)
    assert torch.equal(crop_flip(x, center, center, no), x)
    assert torch.equal(crop_flip(x, center, center, ~no), x.flip(-1))
    # Mixed batch: only the flagged images are mirrored.
    some = torch.tensor([True, False, True, False, False])
    out = crop_flip(x, center, center, some)
    assert torch.equal(out[some], x[some].flip(-1)) and torch.equal(out[~some], x[~some])


def test_crop_shifts_in_zero_padding():
    x = torch.randn(2, 1, 8, 8)
    out = crop_flip(x, torch.tensor([0, 8]), torch.tensor([0, 8]), torch.tensor([False, False]))
    # Offset (0, 0) moves the image 4 pixels down-right; (8, 8) moves it up-left.
    assert torch.equal(out[0, :, 4:, 4:], x[0, :, :4, :4])
    assert (out[0, :, :4, :] == 0).all() and (out[0, :, :, :4] == 0).all()
    assert torch.equal(out[1, :, :4, :4], x[1, :, 4:, 4:])
    assert (out[1, :, 4:, :] == 0).all()


def test_augment_images_is_deterministic_per_generator_state():
    x = torch.randn(64, 3, 8, 8)
    a = augment_images(x, torch.Generator().manual_seed(0))
    b = augment_images(x, torch.Generator().manual_seed(0))
    c = augment_images(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    # With 81 offsets x 2 flips, some of 64 images change, and each output is a crop of its input.
    assert not torch.equal(a, x)
    assert all(set(a[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0} for i in range(64))
