"""A user's own model, dataset and trained checkpoint: import paths, registration, one-line errors,
pruning a trained model, torchvision weights, the --dry-run layer listing, and real Ray runs."""
import os
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

import dsdtune
from dsdtune import data, registry
from dsdtune.config import SpecError, load_study
from dsdtune.models import build_model
from dsdtune.pipeline import Pipeline, run_pipeline
from dsdtune.sparsity.masks import kept_count
from dsdtune.study import main

ROOT = Path(__file__).resolve().parent.parent

MODEL_SOURCE = """
from torch import nn

def tiny_net(input_shape, num_classes, hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
"""

DATA_SOURCE = """
import torch
from torch.utils.data import Dataset

class Blobs(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        means = torch.tensor([[2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]])
        self.x = means[self.y] + 0.5 * torch.randn(n, 6, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(6), int(self.y[i])  # a random transform

def blobs(data_dir, num_train=240, num_test=60):
    return {"train": Blobs(num_train, 1), "test": Blobs(num_test, 2), "num_classes": 3}

def blob_tensors(data_dir, num_train=240):
    train, test = Blobs(num_train, 1), Blobs(60, 2)
    return {"train_x": train.x, "train_y": train.y, "test_x": test.x, "test_y": test.y, "num_classes": 3}
"""


@pytest.fixture(autouse=True)
def forget_user_modules():
    """Each test imports its own umodel / udata files."""
    for name in ("umodel", "udata"):
        sys.modules.pop(name, None)
    yield
    for name in ("umodel", "udata"):
        sys.modules.pop(name, None)


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """Write modules into a fresh folder on the plugin search path; forget them (and the path) afterwards."""
    folder = tmp_path / "user"
    folder.mkdir()
    names = []

    def write(name, source):
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return folder

    monkeypatch.setattr(registry, "_SEARCH_PATHS", [])
    saved_path = list(sys.path)
    registry.add_search_paths([folder])
    data.clear_cache()
    yield write
    for name in names:
        sys.modules.pop(name, None)
    sys.path[:] = saved_path
    data.clear_cache()


def run_spec(**changes):
    spec = {"task": {"dataset": "udata:blobs", "model": "umodel:tiny_net", "batch_size": 32, "device": "cpu",
                     "loader_workers": 0},
            "pipeline": {"flow": "DSD", "epochs": [2, 1, 1], "lr": 0.05, "sparsity": 0.5}, "seed": 3}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        spec[section][key] = value
    return spec


def test_import_paths_resolve_through_the_registries(user_modules):
    user_modules("umodel", MODEL_SOURCE)
    user_modules("udata", DATA_SOURCE)
    model = build_model("umodel:tiny_net", (6,), 3, hidden=8)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [8, 8, 3]
    streamed = data.load_dataset("udata:blobs", val_fraction=0.25)
    assert streamed.streaming and streamed.num_train == 180 and streamed.input_shape == (6,)
    tensors = data.load_dataset("udata:blob_tensors", val_fraction=0.25)
    assert not tensors.streaming and tuple(tensors.train_x.shape) == (180, 6)
    # tensors are normalized like a built-in dataset's
    assert float(tensors.train_x.mean()) == pytest.approx(0.0, abs=1e-5)
    result = run_pipeline(run_spec())
    assert result.status == "ok" and result.final["test_acc"] > 0.6
    assert result.final["sparsity"] < 0.5  # re-dense after S


def test_register_model_and_dataset_by_name(user_modules, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", {})

    @dsdtune.register_model("two_layer")
    def two_layer(input_shape, num_classes, hidden=4):
        return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    dsdtune.register_dataset("my_blobs", lambda data_dir: data.DATASETS["synthetic"](data_dir, input_shape=(5,)))
    pipe = Pipeline(run_spec(task__dataset="my_blobs", task__model="two_layer"))
    assert pipe.data.input_shape == (5,) and list(pipe.prunable) == ["2.weight"]
    with pytest.raises(ValueError, match="built-in"):
        dsdtune.register_model("mlp", two_layer)


@pytest.mark.parametrize("model,dataset,words", [
    ("umodel:tiny_nte", "udata:blobs", ["task.model", "'tiny_nte'", "tiny_net"]),
    ("umodl:tiny_net", "udata:blobs", ["task.model", "no module 'umodl'"]),
    ("umodel:tiny_net", "udat:blobs", ["task.dataset", "no module 'udat'"]),
    ("umodel:tiny_net", "udata:blob", ["task.dataset", "'blob'", "blobs"]),
    ("umodel:tiny_net", "udata", ["task.dataset", "'udata' is unknown", "module:function"]),
])
def test_misspelt_module_or_factory_is_one_line_exit_2(tmp_path, capsys, monkeypatch, model, dataset, words):
    study = tmp_path / "study"
    study.mkdir()
    (study / "umodel.py").write_text(MODEL_SOURCE)
    (study / "udata.py").write_text(DATA_SOURCE)
    (study / "s.yaml").write_text(yaml.safe_dump({"name": "s", "task": {"dataset": dataset, "model": model},
                                                  "pipeline": {"flow": "D", "epochs": 1}, "seeds": 1}))
    monkeypatch.setattr(registry, "_SEARCH_PATHS", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    results = tmp_path / "results"
    assert main([str(study / "s.yaml"), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not results.exists()  # before Ray, nothing written


@pytest.mark.parametrize("source,words", [
    ("def net(input_shape, num_classes):\n    return nn.Sequential(nn.Linear(input_shape[0], 4), nn.Linear(4, 7))\n",
     ["returns [2, 7]", "[2, 3]"]),
    ("def net(input_shape, num_classes):\n    return nn.Sequential(nn.Linear(5, 4), nn.Linear(4, num_classes))\n",
     ["fails on a batch", "[2, 6]"]),
])
def test_a_model_that_does_not_fit_the_data_is_one_line(tmp_path, capsys, monkeypatch, source, words):
    (tmp_path / "umodel.py").write_text("from torch import nn\n" + source)
    (tmp_path / "udata.py").write_text(DATA_SOURCE)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "task": {"dataset": "udata:blobs",
                                                                          "model": "umodel:net"},
                                                     "pipeline": {"flow": "D", "epochs": 1}, "seeds": 1}))
    monkeypatch.setattr(registry, "_SEARCH_PATHS", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main([str(tmp_path / "s.yaml"), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dsdtune: task.model: umodel:net "), err
    for word in words:
        assert word in err, err


def prune_spec(checkpoint, **pipeline):
    spec = run_spec(task__dataset="synthetic", task__model="mlp")
    spec["task"]["dataset_args"] = {"num_train": 200, "num_test": 50, "input_shape": [12], "num_classes": 4}
    spec["task"]["model_args"] = {"widths": [32, 24]}
    spec["init"] = {"checkpoint": str(checkpoint)}
    spec["pipeline"] = {"flow": "S", "epochs": [1], "lr": 1e-30, "momentum": 0.0, "weight_decay": 0.0,
                        "sparsity": 0.7, **pipeline}
    return spec


def trained_checkpoint(path):
    torch.manual_seed(11)
    model = build_model("mlp", (12,), 4, widths=[32, 24])
    torch.save(model.state_dict(), path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_s_phase_from_a_checkpoint_keeps_its_largest_weights(tmp_path):
    """Pruning a trained model (flow S) with a vanishing LR: exactly its largest weights per layer survive."""
    saved = trained_checkpoint(tmp_path / "trained.pt")
    result = run_pipeline(prune_spec(tmp_path / "trained.pt"))
    weights = result.model.state_dict()
    assert torch.equal(weights["layers.0.weight"], saved["layers.0.weight"])  # first layer untouched
    for name in ("layers.2.weight", "layers.4.weight"):
        original, pruned = saved[name], weights[name]
        kept = kept_count(original.numel(), 0.3)
        largest = torch.zeros(original.numel(), dtype=torch.bool)
        largest[original.abs().flatten().topk(kept).indices] = True
        assert torch.equal(pruned.flatten() != 0, largest), name
        assert torch.equal(pruned.flatten()[largest], original.flatten()[largest]), name
    for name in ("layers.0.bias", "layers.2.bias", "layers.4.bias"):
        assert torch.equal(weights[name], saved[name])


def test_checkpoint_mismatch_is_one_line_naming_the_first_bad_key(tmp_path):
    torch.save(build_model("mlp", (12,), 4, widths=[32, 16]).state_dict(), tmp_path / "other.pt")
    with pytest.raises(SpecError) as info:
        Pipeline(prune_spec(tmp_path / "other.pt"))
    message = str(info.value)
    assert "\n" not in message and "'layers.2.weight'" in message and "[16, 32]" in message
    state = build_model("mlp", (12,), 4, widths=[32, 24]).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(SpecError, match="'extra.weight'"):
        Pipeline(prune_spec(tmp_path / "extra.pt"))
    del state["extra.weight"], state["layers.4.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(SpecError, match="has no 'layers.4.bias'"):
        Pipeline(prune_spec(tmp_path / "missing.pt"))
    with pytest.raises(SpecError, match="does not exist"):
        Pipeline(prune_spec(tmp_path / "absent.pt"))


def test_checkpoint_is_relative_to_the_study_file_and_checked_before_ray(tmp_path, capsys):
    study = tmp_path / "proj"
    study.mkdir()
    trained_checkpoint(study / "trained.pt")
    spec = yaml.safe_load((ROOT / "tests" / "studies" / "tiny.yaml").read_text())
    spec["init"] = {"checkpoint": "trained.pt"}
    spec["task"]["model_args"] = {"widths": [32, 24]}
    (study / "s.yaml").write_text(yaml.safe_dump(spec))
    assert load_study(study / "s.yaml").init.checkpoint == str((study / "trained.pt").resolve())
    # tiny's data have 12 features: the checkpoint's first layer fits; 4 classes fit too. A model
    # with other widths does not:
    results = tmp_path / "results"
    assert main([str(study / "s.yaml"), "--results", str(results), "--set", "task.model_args={widths: [32, 8]}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "init.checkpoint" in err and "'layers.2.weight'" in err
    assert not results.exists()


def test_torchvision_pretrained_weights_from_the_cache(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(5)
    zoo = torchvision.models.resnet18()
    torch.save(zoo.state_dict(), cached)
    model = build_model("torchvision:resnet18", (3, 32, 32), 10, weights="IMAGENET1K_V1")
    mine, theirs = model.state_dict(), zoo.state_dict()
    assert torch.equal(mine["conv1.weight"], theirs["conv1.weight"])
    assert torch.equal(mine["layer4.1.bn2.running_var"], theirs["layer4.1.bn2.running_var"])
    assert mine["fc.weight"].shape == (10, 512)  # a fresh head for 10 classes
    with pytest.raises(SpecError, match="allowed: DEFAULT, IMAGENET1K_V1"):
        build_model("torchvision:resnet18", (3, 32, 32), 10, weights="IMAGENET9K")


def test_torchvision_weights_offline_without_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SpecError) as info:
        build_model("torchvision:resnet18", (3, 32, 32), 10, weights="IMAGENET1K_V1")
    message = str(info.value)
    assert "\n" not in message and "URLError" in message and "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_dry_run_lists_each_tasks_prunable_layers(capsys):
    assert main([str(ROOT / "tests" / "studies" / "tiny.yaml"), "--dry-run", "--set", "pipeline.exclude=[layers.4]"]) == 0
    out = capsys.readouterr().out
    assert "task mlp on synthetic (360 training samples of shape [12], 4 classes, tensors):" in out
    assert "layers.0.weight  Linear   32x12" in out and "dense (first layer)" in out
    assert "layers.4.weight  Linear   4x32" in out and "dense (pipeline.exclude)" in out
    assert "1 of 3 layer weights prunable: 1,024 of 1,536 weights (512 stay dense)" in out


def test_runtime_env_ships_only_the_users_modules(user_modules):
    folder = user_modules("umodel", MODEL_SOURCE)
    user_modules("udata", DATA_SOURCE)
    names = ["umodel:tiny_net", "udata:blobs", "mlp", "torchvision:resnet18"]
    assert registry.runtime_env(names, remote=True) == {
        "py_modules": [str(folder / "udata.py"), str(folder / "umodel.py")]}
    # A local instance's workers take the folders from the study's payload and append them to sys.path
    # (never PYTHONPATH, which would put them in front of the installed packages).
    assert registry.runtime_env(names, remote=False) is None
    assert registry.worker_payload()["search_paths"] == [str(folder)]
    assert sys.path.index(str(folder)) > max(sys.path.index(p) for p in sys.path if p.endswith("site-packages"))
    assert registry.runtime_env(["mlp", "synthetic"], remote=True) is None


def _run_study(args, cwd, timeout=400):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}  # only dsdtune itself
    proc = subprocess.run([sys.executable, "-m", "dsdtune.study", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


SHADOW = "raise ImportError('a study folder shadowed the installed {0}')\n"


def shadowing_project(folder):
    """A study folder whose yaml.py and numpy.py would break dsdtune and Ray if they shadowed the packages;
    its udata.py imports a neighbour module."""
    folder.mkdir()
    for name in ("yaml", "numpy"):
        (folder / f"{name}.py").write_text(SHADOW.format(name))
    (folder / "uneighbour.py").write_text("NUM_CLASSES = 3\n")
    (folder / "udata.py").write_text("import uneighbour  # found beside this file\n" + DATA_SOURCE)
    return folder


def test_a_study_folder_shadows_no_installed_package_dry_run(tmp_path):
    study = shadowing_project(tmp_path / "project")
    (study / "umodel.py").write_text(MODEL_SOURCE)
    (study / "s.yaml").write_text(yaml.safe_dump({"name": "s", "task": {"dataset": "udata:blobs",
                                                                       "model": "umodel:tiny_net"},
                                                  "pipeline": {"flow": "D", "epochs": 1}, "seeds": 1}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run_study([str(study / "s.yaml"), "--dry-run"], cwd=elsewhere)
    assert "task umodel:tiny_net on udata:blobs (216 training samples of shape [6], 3 classes, streamed)" in proc.stdout


def test_user_modules_run_on_real_ray(tmp_path):
    """A model in the cwd and a streamed Dataset next to the study file, imported by every Ray worker; the
    study folder's yaml.py and numpy.py shadow nothing, its modules still import their neighbours."""
    (tmp_path / "umodel.py").write_text(MODEL_SOURCE)
    study = shadowing_project(tmp_path / "project")
    (study / "s.yaml").write_text(yaml.safe_dump({
        "name": "user_modules", "task": {"dataset": "udata:blobs", "model": "umodel:tiny_net", "batch_size": 40,
                                         "loader_workers": 1, "device": "cpu"},
        "pipeline": {"flow": "DSD", "epochs": [2, 1, 1], "lr": [0.05, 0.01, 0.001]},
        "search": {"space": {"pipeline.sparsity": {"grid": [0.5, 0.75]}}}, "seeds": 1, "resources": {"cpu": 1}}))
    _run_study([str(study / "s.yaml"), "--results", str(tmp_path / "results"), "--no-report", "--num-cpus", "2"],
               cwd=tmp_path)
    trials = pd.read_csv(tmp_path / "results" / "user_modules" / "trials.csv")
    sweep = trials[trials.stage == "sweep"]
    assert len(trials) == len(sweep) == 2 and (sweep.status == "ok").all()
    assert sweep.prefix_id.nunique() == 1 and sweep.prefix_id.iloc[0]  # one shared prefix, trained once
    # both arms continue from the same trained dense phase
    assert sweep.acc_after_D1.nunique() == 1
    assert (sweep.final_test_acc > 0.6).all()


def test_example_project_runs_end_to_end(tmp_path):
    """examples/shapes as the README runs it (shortened: fewer samples and epochs)."""
    proc = _run_study([str(ROOT / "examples" / "shapes" / "study.yaml"), "--results", str(tmp_path), "--no-report",
                       "--num-cpus", "2", "--set", "task.dataset_args.num_train=400",
                       "--set", "pipeline.epochs=[1, 1, 1]"], cwd=tmp_path)
    assert "shapes_dsd finished" in proc.stdout
    trials = pd.read_csv(tmp_path / "shapes_dsd" / "trials.csv")
    sweep = trials[trials.stage == "sweep"]
    assert sorted(sweep["pipeline.sparsity"]) == [0.5, 0.8] and (sweep.status == "ok").all()
