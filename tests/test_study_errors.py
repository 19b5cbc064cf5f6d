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
    ({}, ["=1"], ["--set '=1'", "dotted path"]),
    ({}, ["pipeline..lr=1"], ["'pipeline..lr'", "dotted path"]),
    # a metric has one direction: val_acc is maximised, val_loss minimised
    ({}, ["metric=val_loss", "mode=max"], ["mode", "val_loss", "min"]),
    ({}, ["mode=min"], ["mode", "val_acc", "max"]),
    # confirm re-runs an optuna search's best config; a grid or random study would ignore it
    ({}, ["confirm={seeds: 2}"], ["confirm", "optuna"]),
    # one value twice makes two arms of one label training the same trials
    ({"search/space": {"pipeline.sparsity": {"grid": [0.5, 0.5]}}}, [], ["search.space.pipeline.sparsity.grid",
                                                                        "twice"]),
    ({"search/space": {"pipeline.sparsity": {"grid": [0, 0.0, 0.5]}}}, [], ["pipeline.sparsity", "twice"]),
    ({"variants": {"a": {"pipeline.lr.0": 0.01}, "b": {"pipeline.lr.0": 0.01}}}, [], ["variants", "'a'", "'b'"]),
    ({"variants": {"a": {}, "b": {"pipeline.lr.0": 0.05}}}, [], ["variants", "identical", "changes nothing"]),
    # a control that matches no arm is found before Ray, with the values it may take
    ({}, ["control={pipeline.sparsity: 0.3}"], ["control", "0.3", "matches no arm", "0.0, 0.5"]),
    ({"variants": {"a": {}, "b": {"pipeline.lr.0": 0.01}}}, ["control={variant: c}"], ["control", "'c'", "a, b"]),
    # settings that change nothing
    ({}, ["pipeline.optimizer=adam", "pipeline.nesterov=true"], ["pipeline.nesterov", "adam"]),
    ({}, ["pipeline.optimizer=[sgd, adam, sgd]", "pipeline.nesterov=[false, true, false]"],
     ["pipeline.nesterov", "S1", "adam"]),
    ({}, ["pipeline.momentum=0", "pipeline.nesterov=true"], ["pipeline.nesterov", "momentum"]),
    ({}, ["init.gain=2.0"], ["init.gain", "orthogonal", "eoi"]),
    ({}, ["init.bias_std=0.01"], ["init.bias_std", "init.bias: normal"]),
    ({}, ["pipeline.flow=DGD", "search.space={pipeline.criterion: {grid: [layerwise_magnitude, global_magnitude]}}",
          "control=null"], ["search.space.pipeline.criterion", "changes nothing"]),
    ({}, ["pipeline.flow=DGD", "pipeline.criterion=global_magnitude"], ["pipeline.criterion", "G"]),
    ({}, ["test_metric=test_accuracy"], ["test_metric", "test_acc", "acc_after_S1"]),
    ({}, ["report.margin=1.0"], ["report.margin", "accuracy"]),
    # a dataset or model that fails on its args, a layer of no weights: one line, not a traceback
    ({}, ["task.dataset_args={num_train: 40, num_test: 10, input_shape: [-1]}"], ["task.dataset_args", "RuntimeError"]),
    ({}, ["task.model_args={widths: [-1]}"], ["task.model: building mlp with model_args", "widths", "RuntimeError"]),
    ({}, ["task.model_args={widths: [0]}"], ["task.model_args", "size > 0"]),
    ({}, ["variants=[a, b]"], ["variants", "valid dictionary"]),
    # a validation split of no samples would score every configuration alike
    ({}, ["task.dataset_args={num_train: 4, num_test: 10, input_shape: [12], num_classes: 4}"],
     ["task.val_fraction", "validation split", "4"]),
]

OPTUNA = Path(__file__).parent / "studies" / "tiny_optuna.yaml"
OPTUNA_CASES = [
    (["confirm.control={pipeline.sparsty: 0.0}"], ["confirm.control", "pipeline.sparsty", "unknown key"]),
    (["variants={a: {}, b: {pipeline.lr.0: 0.1}}"], ["variants", "optuna"]),
    (["seeds=[0, 1]"], ["seeds", "asha", "luck"]),
    (["confirm.first_seed=0"], ["confirm", "seed 0", "searched"]),
    (["confirm.control={}"], ["confirm.control", "empty"]),
    (["confirm.control={pipeline.sparsity: 0.5}"], ["confirm.control", "pipeline.sparsity", "changes nothing"]),
    (["search.space={pipeline.lr.1: {choice: [0.01, 0.01]}}"], ["search.space.pipeline.lr.1.choice", "twice"]),
    (["metric=val_loss", "mode=max"], ["mode", "val_loss"]),
]


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


def test_metric_direction_is_derived(tmp_path):
    from dsdtune.config import load_study
    assert load_study(TINY, ["metric=val_loss"]).mode == "min"
    assert load_study(TINY).mode == "max"
    assert load_study(TINY, ["metric=val_loss", "mode=min"]).mode == "min"


def test_duplicate_keys_are_one_line_with_the_line(tmp_path, capsys, no_ray):
    text = TINY.read_text().replace("seeds: 2\n", "seeds: 2\nresources: {cpu: 1}\nseeds: 3\n")
    assert text.count("seeds:") == 2
    study = tmp_path / "dup.yaml"
    study.write_text(text)
    results = tmp_path / "results"
    assert main([str(study), "--results", str(results), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'seeds'" in err and "twice" in err, err
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith("seeds:")]
    assert f"lines {lines[0]} and {lines[1]}" in err, err
    nested = tmp_path / "nested.yaml"
    nested.write_text(TINY.read_text().replace("  batch_size: 50\n", "  batch_size: 50\n  batch_size: 25\n"))
    assert main([str(nested), "--results", str(results), "--dry-run"]) == 2
    assert "'batch_size'" in capsys.readouterr().err
    assert main([str(TINY), "--results", str(results), "--dry-run", "--set", "control={a: 1, a: 2}"]) == 2
    assert "'a'" in capsys.readouterr().err
    assert not results.exists()


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    from dsdtune.config import load_study
    study = tmp_path / "merge.yaml"
    study.write_text(TINY.read_text().replace("pipeline:\n  flow: DSD\n", "pipeline:\n  <<: {flow: DSDSD}\n  flow: DSD\n"))
    assert load_study(study).pipeline.flow == "DSD"  # an explicit key overrides a merged one (YAML's rule)


def trained_checkpoint(tmp_path):
    """A state_dict of tiny.yaml's model, as a user's trained model file."""
    import torch
    from dsdtune.models import build_model
    path = tmp_path / "trained.pt"
    torch.save(build_model("mlp", (12,), 4, widths=[32, 32]).state_dict(), path)
    return path


@pytest.mark.parametrize("init,words", [
    ("{bias: zero}", ["init.checkpoint", "init.bias"]),
    ("{bias: normal, bias_std: 0.01}", ["init.checkpoint", "init.bias"]),
    ("{base: orthogonal}", ["init.checkpoint", "init.base"]),
    ("{density: erk}", ["init.checkpoint", "init.density"]),
])
def test_checkpoint_with_an_init_that_overwrites_it_is_refused(tmp_path, capsys, no_ray, init, words):
    checkpoint = trained_checkpoint(tmp_path)
    results = tmp_path / "results"
    args = [str(TINY), "--results", str(results), "--dry-run", "--set", f"init.checkpoint={checkpoint}"]
    assert main(args) == 0  # the trained model alone is fine
    capsys.readouterr()
    fields = init.strip("{}").split(", ")
    assert main(args + sum((["--set", f"init.{f.replace(': ', '=')}"] for f in fields), [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not results.exists()


@pytest.mark.parametrize("overrides", [
    # nesterov for the SGD arm of an optimizer grid; a gain for the EOI variant's weights
    ["pipeline.nesterov=true", "search.space={pipeline.optimizer: {grid: [sgd, adam]}}", "control=null"],
    ["pipeline.nesterov=[false, true, false]", "search.space={pipeline.optimizer: {grid: [sgd, adam]}}",
     "control=null"],
    ["pipeline.flow=SD", "pipeline.epochs=[2, 1]", "pipeline.lr=[0.05, 0.005]", "init.density=erk",
     "init.init_density=0.5", "init.gain=1.5",
     "variants={base: {}, eoi: {init.weights: eoi}}", "search.space={}", "control={variant: base}"],
])
def test_a_shared_setting_some_arm_uses_is_accepted(tmp_path, capsys, overrides):
    args = [str(TINY), "--results", str(tmp_path / "r"), "--dry-run"] + sum((["--set", o] for o in overrides), [])
    assert main(args) == 0, capsys.readouterr().err


def test_a_setting_an_arm_sets_for_itself_must_change_it(tmp_path, capsys, no_ray):
    args = [str(TINY), "--results", str(tmp_path / "r"), "--dry-run", "--set", "search.space={}", "--set",
            "variants={sgd: {}, adam: {pipeline.optimizer: adam, pipeline.nesterov: true}}", "--set", "control=null"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pipeline.nesterov: changes nothing in arm variant=adam" in err, err
