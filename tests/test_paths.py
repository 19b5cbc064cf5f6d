"""Paths in a study file resolve against its folder, whatever the directory a command runs in; `--set`
paths against the current directory; datasets without task.data_dir live in one documented place."""
from pathlib import Path

import pytest
import yaml

from dsdtune import data
from dsdtune.config import StudySpec, load_study
from dsdtune.study import main

MNIST1D_SMALL = {"dataset": "mnist1d", "dataset_args": {"num_samples": 300}, "model": "mlp",
                 "model_args": {"widths": [8]}, "device": "cpu"}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A study file in tmp/project, commands run from tmp/elsewhere."""
    study, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    study.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data.clear_cache()
    yield study, elsewhere
    data.clear_cache()


def write_study(folder: Path, **sections) -> Path:
    spec = {"name": "paths", "task": dict(MNIST1D_SMALL), "pipeline": {"flow": "DSD", "epochs": 1}, "seeds": 1}
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_study_file_paths_are_relative_to_its_folder(project):
    study, elsewhere = project
    path = write_study(study, task={"data_dir": "cache"}, init={"checkpoint": "../weights/trained.pt"},
                       variants={"warm": {"init.checkpoint": "warm.pt", "task.data_dir": "other"}})
    spec = load_study(path)
    assert spec.task.data_dir == str(study / "cache")
    assert spec.init.checkpoint == str(study.parent / "weights" / "trained.pt")
    assert spec.variants["warm"] == {"init.checkpoint": str(study / "warm.pt"), "task.data_dir": str(study / "other")}
    # --set paths are the command line's: relative to the current directory
    spec = load_study(path, ["task.data_dir=mine", "init.checkpoint=ckpt/a.pt"])
    assert spec.task.data_dir == str(elsewhere / "mine") and spec.init.checkpoint == str(elsewhere / "ckpt" / "a.pt")
    assert load_study(path, ["task.data_dir=/abs/d"]).task.data_dir == "/abs/d"
    # Ray runs each trial in a folder of its own: the paths the workers get are absolute
    assert StudySpec(name="x", task={"data_dir": "rel"}).base_run()["task"]["data_dir"] == str(elsewhere / "rel")


def test_a_study_caches_its_data_beside_the_study_file_not_in_the_cwd(project, capsys):
    study, elsewhere = project
    path = write_study(study, task={"data_dir": "cache"})
    assert main([str(path), "--dry-run"]) == 0
    assert "task mlp on mnist1d (" in capsys.readouterr().out
    assert len(list((study / "cache").glob("mnist1d_*.npz"))) == 1
    assert not any(elsewhere.iterdir())


def test_without_data_dir_datasets_live_in_the_data_home(project, monkeypatch, tmp_path, capsys):
    study, elsewhere = project
    home = tmp_path / "home"
    monkeypatch.setenv("DSDTUNE_DATA_DIR", str(home))
    path = write_study(study)
    assert load_study(path).task.data_dir is None and data.default_data_dir() == str(home)
    assert main([str(path), "--dry-run"]) == 0
    assert len(list(home.glob("mnist1d_*.npz"))) == 1
    assert not any(elsewhere.iterdir()) and [p.name for p in study.iterdir()] == ["study.yaml"]
    monkeypatch.delenv("DSDTUNE_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == str(tmp_path / "xdg" / "dsdtune" / "data")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_data_dir() == str(Path.home() / ".cache" / "dsdtune" / "data")
