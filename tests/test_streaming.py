"""Streaming data: the DataLoader path gives the tensor path's batches in the same order, resumes bit for
bit, does not depend on the number of loader workers; imagefolder on a folder of PNGs."""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset as TorchDataset

from dsdtune import data
from dsdtune.config import SpecError
from dsdtune.pipeline import Pipeline, run_pipeline
from interrupted import run_interrupted

IMAGES = {"num_train": 300, "num_test": 60, "input_shape": [3, 8, 8], "num_classes": 3}


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def batches(dataset, seed, augment=False, batch_size=32):
    generator = torch.Generator().manual_seed(seed)
    out = [(x.clone(), y.clone()) for x, y in dataset.train_batches(batch_size, generator, augment)]
    return out, generator.get_state()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("augment", [False, True])
def test_streaming_and_tensor_paths_give_the_same_batches(workers, augment):
    tensors = data.load_dataset("synthetic", val_fraction=0.2, **IMAGES)
    streamed = data.load_dataset("synthetic", val_fraction=0.2, stream=True, loader_workers=workers, **IMAGES)
    assert streamed.streaming and streamed.input_shape == tensors.input_shape == (3, 8, 8)
    for seed in (0, 1):  # two epochs' worth of orders
        expected, state = batches(tensors, seed, augment)
        got, streamed_state = batches(streamed, seed, augment)
        assert len(got) == len(expected) == 8
        for (x, y), (ex, ey) in zip(got, expected):
            assert torch.equal(x, ex) and torch.equal(y, ey)
        assert torch.equal(state, streamed_state)  # the generator moved on identically
    for split in ("val", "test"):
        for (x, y), (ex, ey) in zip(streamed.eval_batches(split, 50), tensors.eval_batches(split, 50)):
            assert torch.equal(x, ex) and torch.equal(y, ey)


class Indexed(TorchDataset):
    """Item i is (i as a feature, a label): shows which rows a batch holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i % 2


def test_a_users_dataset_is_split_and_ordered_like_tensors():
    n = 100
    data.register_dataset("indexed", lambda data_dir: {"train": Indexed(n), "test": Indexed(10), "num_classes": 2})
    try:
        streamed = data.load_dataset("indexed", val_fraction=0.2, loader_workers=0)
        train_rows, val_rows = data.val_split(n, 0.2)
        got, _ = batches(streamed, 5, batch_size=16)
        order = data.batch_indices(len(train_rows), 16, torch.Generator().manual_seed(5))
        for (x, _), idx in zip(got, order):
            assert x.squeeze(1).long().tolist() == train_rows[idx].tolist()
        val = torch.cat([x for x, _ in streamed.eval_batches("val", 7)]).squeeze(1).long()
        assert val.tolist() == val_rows.tolist()
    finally:
        data.DATASETS.unregister("indexed")


TASK = {"dataset": "synthetic", "dataset_args": IMAGES, "model": "mlp", "model_args": {"widths": [32]},
        "batch_size": 32, "device": "cpu", "augment": True}


def spec(**task):
    return {"task": {**TASK, **task}, "seed": 4,
            "pipeline": {"flow": "DSD", "epochs": [2, 1, 1], "lr": 0.05, "sparsity": 0.5}}


def test_a_streamed_pipeline_trains_exactly_like_the_tensor_pipeline():
    tensors = run_pipeline(spec())
    streamed = run_pipeline(spec(stream=True, loader_workers=0))
    assert streamed.history == tensors.history
    for a, b in zip(tensors.model.state_dict().values(), streamed.model.state_dict().values()):
        assert torch.equal(a, b)


class NoisyBlobs(TorchDataset):
    """A user's Dataset with a random transform drawn from the global generators (torch and NumPy)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = 2.0 * torch.nn.functional.one_hot(self.y, 8).float() + 0.5 * torch.randn(n, 8, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        jitter = 0.1 * torch.randn(8) + float(np.random.uniform(-0.05, 0.05))
        return self.x[i] + jitter, int(self.y[i])


@pytest.fixture
def noisy_blobs():
    data.register_dataset("noisy_blobs", lambda data_dir: {"train": NoisyBlobs(200, 1), "test": NoisyBlobs(50, 2),
                                                              "num_classes": 3})
    yield {"dataset": "noisy_blobs", "dataset_args": {}, "model": "mlp", "model_args": {"widths": [16],
                                                                                        "dropout": 0.2},
           "augment": False}
    data.DATASETS.unregister("noisy_blobs")


@pytest.mark.parametrize("stop_epoch", [1, 3])  # mid-D1 and at the S1 -> D2 boundary
def test_streaming_resume_is_bit_identical(tmp_path, noisy_blobs, stop_epoch):
    run = spec(**noisy_blobs, loader_workers=2)
    full = run_pipeline(run)
    resumed = run_interrupted(run, stop_epoch, tmp_path / "state.pt")
    assert resumed.history == full.history
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_random_transforms_do_not_depend_on_the_number_of_workers(noisy_blobs):
    histories = [run_pipeline(spec(**noisy_blobs, loader_workers=w)).history for w in (0, 2)]
    assert histories[0] == histories[1]
    other_seed = spec(**noisy_blobs, loader_workers=0)
    other_seed["seed"] = 5
    assert run_pipeline(other_seed).history != histories[0]


def test_sparse_inits_that_score_a_batch_refuse_streamed_data(noisy_blobs):
    run = spec(**noisy_blobs)
    run["init"] = {"density": "snip", "init_density": 0.5}
    run["pipeline"]["flow"] = "S"
    run["pipeline"]["epochs"] = [1]
    with pytest.raises(SpecError, match="init.density: snip"):
        Pipeline(run)


def test_a_loader_returning_something_else_is_one_line():
    data.register_dataset("broken", lambda data_dir: {"train": [1, 2], "num_classes": 2})
    data.register_dataset("listy", lambda data_dir: [1, 2, 3])
    try:
        with pytest.raises(SpecError, match="returned no 'test'"):
            data.load_dataset("broken")
        with pytest.raises(SpecError, match="returned list; a loader returns a mapping"):
            data.load_dataset("listy")
    finally:
        data.DATASETS.unregister("broken")
        data.DATASETS.unregister("listy")


def write_pngs(root, per_class):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 100, (20, 24, 3)) + 120 * label  # dogs are bright
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_streams_a_folder_of_pngs(tmp_path):
    write_pngs(tmp_path, per_class=10)
    ds = data.load_dataset("imagefolder", data_dir=str(tmp_path), val_fraction=0.2, image_size=16, resize=18)
    assert ds.streaming and ds.num_classes == 2 and ds.input_shape == (3, 16, 16)
    assert (ds.num_train, len(ds.val), len(ds.test)) == (16, 4, 4)
    # validation rows go through the deterministic transforms: the same tensors every time
    first = [x for x, _ in ds.eval_batches("val", 3)]
    again = [x for x, _ in ds.eval_batches("val", 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    labels = torch.cat([y for _, y in ds.eval_batches("test", 8)])
    assert labels.tolist() == [0, 0, 1, 1]  # class indices from the folder names, sorted
    bright = torch.cat([x for x, _ in ds.eval_batches("test", 8)]).mean(dim=(1, 2, 3))
    assert bool((bright[2:] > bright[:2].max()).all())  # ImageNet-normalized pixels keep their order
    result = run_pipeline({"task": {"dataset": "imagefolder", "data_dir": str(tmp_path), "model": "lenet5",
                                    "dataset_args": {"image_size": 16, "resize": 18}, "batch_size": 8,
                                    "device": "cpu", "loader_workers": 0, "val_fraction": 0.2},
                           "pipeline": {"flow": "DS", "epochs": [1, 1], "sparsity": 0.5}, "seed": 0})
    assert result.status == "ok" and result.final["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_imagefolder_without_its_folders_is_one_line(tmp_path):
    with pytest.raises(data.DatasetUnavailable, match="train/<class>/<image files>"):
        data.load_dataset("imagefolder", data_dir=str(tmp_path))
