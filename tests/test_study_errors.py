"""Every user mistake ends in one line naming the field, exit code 2, before Ray, with nothing written."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsdtune.study import main

TINY = Path(__file__).parent / "studies" / "tiny.yaml"


def study_file(tmp_path, **changes):
    spec = yaml.safe_load(TINY.read_text())
    for dotted, value in changes.items():
        node = spec
        keys = dotted.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


CASES = [
    # (file changes, --set overrides, words the message must contain)
    ({}, ["pipeline.bogus=1"], ["pipeline.bogus", "unknown key"]),
    ({}, ["pipeline.epochs=abc"], ["pipeline.epochs"]),
    ({"search/space": {"pipeline.sparsity": {"grid": [0.5, 1.0]}}}, [], ["pipeline.sparsity", "[0, 1)"]),
    ({"search/space": {"pipeline.sparsity": {"grid": [-0.1]}}}, [], ["pipeline.sparsity", "[0, 1)"]),
    ({}, ["pipeline.epochs=[1, 2]"], ["epochs", "3 phases"]),
    ({}, ["task.dataset=imagenet42"], ["task.dataset", "mnist1d"]),
    ({}, ["task.model=transformer9000"], ["task.model", "resnet20"]),
    ({}, ["pipeline.criterion=largest_gradient"], ["pipeline.criterion", "layerwise_magnitude"]),
    ({}, ["init.density=magic"], ["init.density", "erk"]),
    ({"search/space": {"pipeline.sparsity": {"grid": []}}}, [], ["grid", "empty"]),
    ({}, ["seeds=0"], ["seeds", "at least 1"]),
    ({}, ["storage=/proc/dsdtune-results"], ["storage", "writable"]),
    ({}, ["metric=test_acc"], ["metric", "validation"]),
    ({}, ["control={pipeline.lr: 0.1}"], ["control", "factor"]),
    ({"search/space": {"pipeline.lr": {"uniform": [0.1, 0.01]}}}, ["search.algorithm=random"], ["uniform", "low < high"]),
    ({}, ["search.algorithm=bayes"], ["search.algorithm", "grid"]),
    # caught only by building the task once before Ray (dataset, model, init), or by strict types
    ({}, ["task.dataset_args={num_trian: 10}"], ["task.dataset_args", "num_trian"]),
    ({}, ["task.model_args={widthz: [8]}"], ["task.model_args", "widthz"]),
    ({}, ["task.augment=true"], ["task.augment", "images"]),
    ({}, ["init.options={gian: 2}"], ["init.options", "gian"]),
    ({}, ["pipeline.weight_decay=.nan"], ["pipeline.weight_decay", "finite"]),
    ({}, ["pipeline.weight_decay=-1"], ["pipeline.weight_decay", ">= 0"]),
    ({}, ["seeds=true"], ["seeds", "integer"]),
    ({}, ["pipeline.epochs=[0, 0, 0]"], ["pipeline.epochs", "0 epochs"]),
    ({}, ["task.batch_size=0"], ["task.batch_size", "greater than 0"]),
    ({}, ["search.algorithm=random", "search.num_samples=3"], ["search.num_samples", "sampled axis"]),
    ({}, ["scheduler.kind=asha"], ["scheduler.kind", "optuna"]),
    # the name is a folder under --results: never the results root itself, its parent or a hidden one
    ({"name": ".."}, [], ["name", "'..' is not a plain folder name"]),
    ({}, ["name=."], ["name", "plain folder name"]),
    ({"name": ".hidden"}, [], ["name", "plain folder name"]),
    ({}, ["name=a/b"], ["name", "plain folder name"]),
]

OPTUNA = Path(__file__).parent / "studies" / "tiny_optuna.yaml"
OPTUNA_CASES = [
    (["confirm.control={pipeline.sparsty: 0.0}"], ["confirm.control", "pipeline.sparsty", "unknown key"]),
    (["variants={a: {}, b: {pipeline.lr.0: 0.1}}"], ["variants", "optuna"]),
    (["seeds=[0, 1]"], ["seeds", "asha", "luck"]),
]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the runner gets as far as its Ray module."""
    class NotRay:
        def __getattr__(self, name):
            raise AssertionError("the study reached Ray")
    monkeypatch.setitem(sys.modules, "dsdtune.study.run", NotRay())


@pytest.mark.parametrize("changes,overrides,words", CASES)
def test_bad_study_is_one_line_and_exit_2(tmp_path, capsys, no_ray, changes, overrides, words):
    results = tmp_path / "results"
    args = [study_file(tmp_path, **changes), "--results", str(results)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not results.exists()
    assert main(args + ["--dry-run"]) == 2  # the plan alone is refused too
    capsys.readouterr()


@pytest.mark.parametrize("overrides,words", OPTUNA_CASES)
def test_bad_optuna_study_is_refused_before_the_search(tmp_path, capsys, no_ray, overrides, words):
    results = tmp_path / "results"
    assert main([str(OPTUNA), "--results", str(results), *sum((["--set", o] for o in overrides), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not results.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_requested_without_gpu(tmp_path, capsys):
    assert main([str(TINY), "--results", str(tmp_path / "r"), "--set", "resources.gpu=1"]) == 2
    err = capsys.readouterr().err
    assert "resources.gpu" in err and "no GPU" in err and not (tmp_path / "r").exists()


def test_unknown_study_and_broken_yaml(tmp_path, capsys):
    assert main(["no_such_study", "--results", str(tmp_path)]) == 2
    assert "sparsity_sweep" in capsys.readouterr().err  # lists what exists
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npipeline: [unclosed\n")
    assert main([str(bad), "--results", str(tmp_path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_command_line_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dsdtune.study", str(TINY), "--set", "pipeline.sparsity=2",
                           "--results", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_dry_run_plans_shared_prefixes(capsys):
    assert main(["sparsity_sweep", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 arms x 8 seeds = 48 trials" in out
    assert "shared prefixes: 8" in out
    assert "1680 with shared prefixes, 2880 without" in out


def test_offline_torchvision_dataset_is_one_line_before_ray(tmp_path, capsys):
    """cifar10 absent and not downloadable (no network here, download disabled to be sure)."""
    args = [str(TINY), "--results", str(tmp_path / "r"), "--set", "task.dataset=cifar10", "--set", "task.model=resnet20",
            "--set", "task.dataset_args={download: false}", "--set", f"task.data_dir={tmp_path / 'data'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dsdtune: task.dataset: cifar10") and "data" in err
    assert not (tmp_path / "r").exists()
