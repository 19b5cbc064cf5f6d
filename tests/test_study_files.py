"""Property: any study file dry-runs cleanly or ends in one line on stderr with exit code 2.

Never a traceback, never exit code 1, never a file under the results root or in the working directory.
The files are the shipped studies (studies/*.yaml, examples/shapes/*.yaml, tests/studies/*.yaml), made
small (synthetic data, short grids, a few seeds) so that a dry-run that passes is quick, then mutated:
a key dropped, an unknown key added, a value replaced by a wrong type, an out-of-range number, NaN or
infinity, an empty list or mapping, a line of the file duplicated or deleted (duplicate keys, broken
indentation), odd YAML (a bare scalar, a list, nothing); and random study files built from the field
names. `main` runs in-process, so each example costs a plan and one build per task, not an interpreter.
"""
from __future__ import annotations

import atexit
import copy
import functools
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from dsdtune.study import main

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(ROOT.glob("studies/*.yaml")) + sorted(ROOT.glob("examples/shapes/*.yaml")) + \
    sorted((ROOT / "tests" / "studies").glob("*.yaml"))
WORK = Path(tempfile.mkdtemp(prefix="dsdtune-study-files-"))  # data cache and the shapes example's copy
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
DATA = WORK / "data"
SHAPES = WORK / "shapes"

# Sizes a user's dataset/model/init functions take freely (dsdtune cannot bound them): never made large.
FREE_FORM = ("dataset_args", "model_args", "options")


def _small(tree: dict) -> dict:
    """The same study on small data, short grids and a few seeds: its structure (every variant), not its cost."""
    task = tree.setdefault("task", {})
    dataset = task.get("dataset", "mnist1d")
    if dataset == "mnist1d":
        task.update(dataset="synthetic", dataset_args={"num_train": 200, "num_test": 50, "input_shape": [40],
                                                       "num_classes": 10})
    elif dataset == "cifar10":
        task.update(dataset="synthetic", dataset_args={"num_train": 100, "num_test": 40, "input_shape": [3, 8, 8],
                                                       "num_classes": 10})
    elif dataset == "shapes_data:load":
        task["dataset_args"] = {"num_train": 100, "num_test": 40}
    args = task.get("model_args", {})
    if "depth" in args:
        args.update(depth=min(args["depth"], 4), width=min(args.get("width", 16), 16))
    if "widths" in args:
        args["widths"] = [min(w, 32) for w in args["widths"]]
    task["model_args"] = args
    task["data_dir"] = str(DATA)
    task.pop("loader_workers", None)
    options = (tree.get("init") or {}).get("options") or {}
    if "ai_steps" in options:
        options["ai_steps"] = 5
    control = tree.get("control") or {}
    for i, (path, axis) in enumerate(((tree.get("search") or {}).get("space") or {}).items()):
        for key in ("grid", "choice"):
            if key in axis:  # two values of the first axis; one of the others when variants multiply them
                kept = axis[key][:2 if i == 0 or not tree.get("variants") else 1]
                axis[key] = kept + [v for v in axis[key][2:] if path in control and v == control[path]]
    searched = [v for axis in ((tree.get("search") or {}).get("space") or {}).values() for v in axis.get("grid", [])]
    if "sign" in options and "grasp" not in searched:
        del options["sign"]  # GraSP's option: refused once no arm is GraSP
    seeds = tree.get("seeds", 3)
    tree["seeds"] = min(seeds, 2) if isinstance(seeds, int) else seeds[:2]
    if "search" in tree and "num_samples" in tree["search"]:
        tree["search"]["num_samples"] = min(tree["search"]["num_samples"], 4)
    return tree


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


@functools.cache
def bases() -> dict[str, tuple[dict, Path]]:
    """name -> (small study tree, folder it is written to: its own modules and files beside it)."""
    shutil.copytree(ROOT / "examples" / "shapes", SHAPES, ignore=shutil.ignore_patterns("*.pt", "__pycache__"))
    import sys
    sys.path.insert(0, str(SHAPES))
    try:
        import torch
        from shapes_net import small_cnn
        torch.manual_seed(0)  # a trained model file for prune_trained (the file train_dense.py writes)
        torch.save(small_cnn((3, 16, 16), 4, width=16).state_dict(), SHAPES / "trained.pt")
    finally:
        sys.path.remove(str(SHAPES))
    return {_name(path): (_small(yaml.safe_load(path.read_text())), SHAPES if path.parent.name == "shapes" else WORK)
            for path in SHIPPED}

WRONG_TYPES = ["x", "", True, False, None, [], {}, [1, 2], {"a": 1}, 1, 0.5, "0.5", [None]]
OUT_OF_RANGE = [-1, 0, -0.5, 1.0, 1.5, 2, 1000, 1e9, 1e-12, -1e9, 2 ** 63]
NON_FINITE = [math.nan, math.inf, -math.inf]
SMALL = [-1, 0, 1, 2, 64, 0.5, -0.5, math.nan, math.inf]  # the only numbers free-form args get
FIELDS = ["name", "description", "task", "init", "pipeline", "search", "seeds", "metric", "mode", "test_metric",
          "variants", "control", "confirm", "scheduler", "resources", "max_concurrent", "max_failures",
          "checkpoint_every_s", "share_prefixes", "storage", "report", "dataset", "model", "batch_size",
          "eval_batch_size", "augment", "val_fraction", "device", "stream", "density", "weights", "init_density",
          "positions", "base", "control", "floors", "gain", "bias", "bias_std", "checkpoint", "flow", "epochs",
          "lr", "lr_decay", "sparsity", "sparsity_decay", "criterion", "schedule", "optimizer", "momentum",
          "nesterov", "weight_decay", "exclude_first", "exclude", "weight_histograms", "diagnostics",
          "jacobian_samples", "gsm", "gradual", "dst", "rewind", "algorithm", "num_samples", "seed", "space",
          "grid", "choice", "uniform", "loguniform", "int", "kind", "grace_period", "reduction_factor", "cpu", "gpu",
          "first_seed", "margin", "pipeline.sparsity", "pipeline.lr", "pipeline.lr.1", "task.batch_size",
          "init.density", "init.gain", "variant", "budget", "step", "every_steps", "end", "drop_fraction"]
WORDS = ["grid", "optuna", "random", "asha", "none", "DSD", "S", "DG", "DMD", "DLD", "mlp", "conv1d", "synthetic",
         "erk", "snip", "eoi", "ai", "orthogonal", "val_loss", "val_acc", "test_acc", "max", "min", "adam", "sgd",
         "cosine", "zero", "normal", "global_magnitude", "cpu", "auto", "jacobian", "a"]


def _paths(node, prefix=()):
    """Every (path, value) of a tree, the root included."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _set(tree, path, value):
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)  # never the pool's own list or mapping: a later mutation edits it


def _delete(tree, path):
    node = tree
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 1000), st.floats(width=32),
                   st.sampled_from(WORDS), st.text(max_size=4))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4), max_leaves=10)


@st.composite
def random_study(draw) -> str:
    """A study file of known field names holding random values (data small, in the test's data folder)."""
    tree = draw(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6))
    tree.setdefault("name", "random")
    task = tree.get("task")
    if isinstance(task, dict):  # a dataset that generates small data, unless the file says otherwise
        task.setdefault("dataset", "synthetic")
        task["dataset_args"] = {"num_train": 60, "num_test": 20}
        task["data_dir"] = str(DATA)
    else:
        tree.setdefault("task", {"dataset": "synthetic", "dataset_args": {"num_train": 60, "num_test": 20},
                                 "data_dir": str(DATA)})
    return yaml.safe_dump(tree, sort_keys=False)


def _one(*choices):
    """A field's plausible values, or now and then (1 in 16) anything."""
    return st.integers(0, 15).flatmap(lambda i: leaves if i == 15 else st.sampled_from(choices))


SMALL_MODELS = {"mlp": {"widths": [16]}, "deep_mlp": {"depth": 3, "width": 8}, "conv1d": {"channels": [4, 4]}}
FLOWS = ("D", "DSD", "S", "SD", "DG", "DGD", "DM", "DMD", "DR", "DE", "DL", "DLD", "LD", "DSDSD", "X", "", "dsd")
AXES = {  # searched path -> plausible values
    "pipeline.sparsity": (0.0, 0.5, 0.9, 0, 1.0), "pipeline.lr": (0.1, 0.01, [0.1, None, None]),
    "pipeline.lr.1": (0.01, 0.001), "task.batch_size": (16, 32, 0), "init.density": ("dense", "erk", "snip"),
    "init.gain": (1.0, 2.0), "init.weights": ("base", "eoi"), "pipeline.criterion": ("global_magnitude", "random"),
    "pipeline.flow": FLOWS[:8], "pipeline.optimizer": ("sgd", "adam"), "pipeline.nesterov": (True, False),
    "init.bias": ("default", "zero"), "pipeline.exclude_first": (True, False), "task.model": tuple(SMALL_MODELS),
    "pipeline.epochs": (1, 2, [1, 1, 1]), "pipeline.momentum": (0.0, 0.9), "init.init_density": (0.1, 0.5),
}


@st.composite
def axis(draw, path):
    kind = draw(st.sampled_from(["grid", "grid", "choice", "uniform", "loguniform", "int", "bogus"]))
    if kind in ("grid", "choice"):
        return {kind: draw(st.lists(_one(*AXES[path]), min_size=0, max_size=3))}
    ends = draw(st.lists(st.one_of(st.integers(-2, 64), st.floats(-1, 2), st.floats(1e-4, 1.0)), min_size=2,
                         max_size=3))
    return {kind: ends}


@st.composite
def schema_study(draw) -> str:
    """A study file field by field: known fields at plausible values (now and then anything), so that
    the checks after the types (plan, control, search, tasks) are reached."""
    model = draw(st.sampled_from(sorted(SMALL_MODELS)))
    fields = {
        "task": st.fixed_dictionaries({}, optional={
            "batch_size": _one(16, 32, 50, 0), "val_fraction": _one(0.1, 0.2, 0.0, 0.5, 0.001),
            "augment": _one(False, False, True), "stream": _one(False, True), "eval_batch_size": _one(64, 2),
            "device": _one("cpu", "auto")}),
        "init": st.fixed_dictionaries({}, optional={
            "density": _one("dense", "dense", "dense", "uniform", "erk", "snip", "grasp", "synflow"), "weights": _one("base", "eoi", "ai"),
            "init_density": _one(0.1, 0.5, 1.0, 0.0), "positions": _one("auto", "pruner", "random"),
            "base": _one("default", "orthogonal"), "control": _one("none", "shuffle", "reinit"),
            "floors": _one("eoi", "none"), "gain": _one(1.0, 2.0), "bias": _one("default", "zero", "normal"),
            "bias_std": _one(0.0, 0.01), "options": _one({}, {"ai_steps": 2}, {"gian": 1})}),
        "pipeline": st.fixed_dictionaries({}, optional={
            "flow": _one(*FLOWS), "epochs": _one(1, 2, 0, [1, 1, 1], [1, 0, 1]), "lr": _one(0.1, [0.1, None, 0.01]),
            "sparsity": _one(0.5, 0.0, 0.9, [0.5, 0.25]), "criterion": _one("global_magnitude", "layerwise_magnitude"),
            "schedule": _one("constant", "cosine", "step"), "optimizer": _one("sgd", "adam", ["sgd", "adam", "sgd"]),
            "momentum": _one(0.9, 0.0), "nesterov": _one(True, False, [False, True, False]),
            "weight_decay": _one(0.0, 5e-4), "exclude_first": _one(True, False, None), "exclude": _one([], ["x"]),
            "gsm": _one({}, {"momentum": 0.95}), "gradual": _one({}, {"every_steps": 2}),
            "dst": _one({}, {"every_steps": 1}), "rewind": _one({}, {"step": 1}), "lr_decay": _one(0.1, 1.0),
            "sparsity_decay": _one(1.0, 0.5)}),
        "search": st.fixed_dictionaries({}, optional={
            "algorithm": _one("grid", "random", "optuna"), "num_samples": _one(1, 2, 3),
            "space": st.dictionaries(st.sampled_from(sorted(AXES)), st.just(None), max_size=2)}),
        "seeds": _one(1, 2, [0, 1], [3], [1, 1]),
        "metric": _one("val_acc", "val_loss"), "mode": _one("max", "min"),
        "test_metric": _one("test_acc", "test_loss", "acc_after_D1", "acc_after_S1", "val_acc"),
        "variants": st.dictionaries(st.sampled_from(["a", "b", "c"]), st.dictionaries(
            st.sampled_from(sorted(AXES)), st.just(None), max_size=2), max_size=3),
        "control": _one({"variant": "a"}, {"pipeline.sparsity": 0.0}, {"pipeline.sparsity": 0.3}, {}),
        "confirm": _one({"seeds": 2, "control": {"pipeline.sparsity": 0.0}}, {"seeds": 2, "first_seed": 0}, {}),
        "scheduler": _one({"kind": "asha", "grace_period": 1}, {"kind": "none"}),
        "report": _one({"margin": 0.01}, {"margin": 1.0}), "share_prefixes": _one(True, False),
    }
    tree = draw(st.fixed_dictionaries({"name": st.just("schema")}, optional=fields))
    for section in ("search", "variants"):  # fill the drawn paths with values of their own
        node = tree.get(section)
        if section == "search" and isinstance(node, dict) and isinstance(node.get("space"), dict):
            node["space"] = {p: draw(axis(p)) for p in node["space"]}
        if section == "variants" and isinstance(node, dict):
            tree["variants"] = {name: {p: draw(_one(*AXES[p])) for p in assign} for name, assign in node.items()}
    task = tree.setdefault("task", {})
    task.update(dataset="synthetic", model=model, model_args=SMALL_MODELS[model], data_dir=str(DATA),
                dataset_args={"num_train": 60, "num_test": 20, "input_shape": [12], "num_classes": 3})
    return yaml.safe_dump(tree, sort_keys=False)


@st.composite
def mutated_study(draw) -> tuple[str, Path]:
    """(YAML text, folder to write it to): a small shipped study with one to three mutations."""
    name = draw(st.sampled_from(sorted(bases())))
    tree, folder = bases()[name]
    tree = copy.deepcopy(tree)
    line_edits = []
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(tree)]
        path = draw(st.sampled_from(paths))
        free = any(k in FREE_FORM for k in path if isinstance(k, str))
        what = draw(st.sampled_from(["drop", "unknown", "wrong_type", "out_of_range", "non_finite", "empty",
                                     "duplicate_line", "delete_line"]))
        if what in ("duplicate_line", "delete_line"):
            line_edits.append((what, draw(st.integers(0, 10_000))))
        elif not path:  # the root: odd YAML at the top
            tree = copy.deepcopy(draw(st.sampled_from([None, 42, "name", [tree], [], {}])))
            break
        elif what == "drop":
            _delete(tree, path)
        elif what == "unknown":
            node = draw(st.sampled_from([n for _, n in _paths(tree) if isinstance(n, dict)] or [{}]))
            node[draw(st.sampled_from(["bogus", "lrr", "seed", "flow", "0", "x.y"]))] = draw(values)
        elif what == "wrong_type":
            _set(tree, path, draw(st.sampled_from(WRONG_TYPES)))
        elif what == "out_of_range":
            _set(tree, path, draw(st.sampled_from(SMALL if free else OUT_OF_RANGE)))
        elif what == "non_finite":
            _set(tree, path, draw(st.sampled_from(NON_FINITE)))
        else:
            _set(tree, path, draw(st.sampled_from([[], {}])))
    text = yaml.safe_dump(tree, sort_keys=False)
    lines = text.splitlines(keepends=True)
    for what, at in line_edits:
        if lines:
            i = at % len(lines)
            lines[i:i + 1] = [lines[i], lines[i]] if what == "duplicate_line" else []
    return "".join(lines), folder


ODD_YAML = ["", "null\n", "42\n", "- a\n- b\n", "just words\n", "name: [unclosed\n", "{\n", "name: x\n  bad: 1\n",
            "\t\n", "!!python/object/apply:os.getcwd []\n", "name: x\nseeds: *nowhere\n", "? [a, b]\n: 1\n",
            "name: x\nname: y\n", "name: x\ntask: {model: mlp, model: conv1d}\n", "name: x\ntask:\n  - dataset\n",
            "name: x\n'1': 2\n", "name: x\n1: 2\n", "name: x\nvariants: [a, b]\n", "name: x\nconfirm: 3\n",
            "name: x\nsearch: {space: [1]}\n", "name: x\ncontrol: [a]\n", "name: x\nvariants: {a: 1}\n",
            "name: x\nseeds: []\n", "name: x\nsearch: {space: {pipeline.lr: 3}}\n"]


def python_default_warning_filters() -> None:
    """Python's own filters (pytest installs others): deprecations hidden, the rest shown once per place."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)


def dry_run(text: str, folder: Path, capsys) -> tuple[int, str]:
    """Write the study beside `folder`'s files, dry-run it in-process, check the promise."""
    study = Path(tempfile.mkstemp(suffix=".yaml", prefix="study-", dir=folder)[1])
    cwd = Path(tempfile.mkdtemp(prefix="cwd-", dir=WORK))
    results = cwd / "results"
    before = os.getcwd()
    try:
        study.write_text(text, encoding="utf-8")
        os.chdir(cwd)
        with warnings.catch_warnings(record=True) as caught:
            python_default_warning_filters()  # what a user's terminal would print
            code = main([str(study), "--dry-run", "--results", str(results)])
    finally:
        os.chdir(before)
        study.unlink()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("dsdtune: "), err
        assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]  # lines above the one
    assert not results.exists() and not any(cwd.iterdir()), "a dry-run wrote files"
    cwd.rmdir()
    return code, err


@pytest.mark.parametrize("name", [_name(p) for p in SHIPPED])
def test_each_small_shipped_study_dry_runs(name, capsys):
    """The unmutated bases pass (exit code 0): the mutations start from working studies."""
    tree, folder = bases()[name]
    code, err = dry_run(yaml.safe_dump(tree, sort_keys=False), folder, capsys)
    assert code == 0, err


@pytest.mark.parametrize("text", ODD_YAML)
def test_odd_yaml_is_one_line(text, capsys):
    bases()
    dry_run(text, WORK, capsys)


def test_a_file_that_is_not_utf8_is_one_line(capsys):
    bases()
    study = WORK / "latin1.yaml"
    study.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main([str(study), "--dry-run", "--results", str(WORK / "results")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "UTF-8" in err, err


def test_a_user_dataset_whose_length_is_not_an_int_is_one_line(capsys):
    """Found by the search: a streamed user Dataset with len() of .inf was a TypeError in the check."""
    tree, folder = copy.deepcopy(bases()["shapes/study"])
    tree["task"]["dataset_args"]["num_test"] = math.inf
    code, err = dry_run(yaml.safe_dump(tree), folder, capsys)
    assert code == 2 and "task.dataset: the test split of shapes_data:load has no length" in err, err


FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(FAST, max_examples=600)


def _outcome(code: int, err: str) -> None:
    """Hypothesis' statistics count the outcomes: exit 0, or exit 2 and the field the line names."""
    if code != 2:
        return event(f"exit {code}")
    where, _, what = err.removeprefix("dsdtune: ").partition(": ")
    if where.startswith("/"):  # the file itself: not YAML, not a mapping, a key twice
        where = "the file: " + " ".join(what.split()[:3])
    event(f"exit 2 ({where})")


def _mutated(capsys, case):
    text, folder = case
    _outcome(*dry_run(text, folder, capsys))


def _random(capsys, text):
    _outcome(*dry_run(text, WORK, capsys))


@FAST
@given(case=mutated_study())
def test_mutated_studies_dry_run_or_are_one_line(capsys, case):
    _mutated(capsys, case)


def _task(**changes) -> str:
    task = {"dataset": "synthetic", "dataset_args": {"num_train": 60, "num_test": 20, "input_shape": [12]},
            "model": "mlp", "model_args": {"widths": [16]}, "data_dir": str(DATA)}
    for key, value in changes.items():
        task[key].update(value)
    return yaml.safe_dump({"name": "regression", "task": task}, sort_keys=False)


@FAST
@given(text=random_study())
# What the search found (each was a traceback): variants as a list (the path fixer called .values()), a
# dataset or a model that fails on its args with a RuntimeError, a layer of width 0 (FLOP counting
# divided by its size).
@example(text="name: regression\nvariants: [a, b]\n")
@example(text=_task(dataset_args={"input_shape": [-1]}))
@example(text=_task(dataset_args={"num_train": -1}))
@example(text=_task(model_args={"widths": [-1]}))
@example(text=_task(model_args={"widths": [0]}))
def test_random_studies_dry_run_or_are_one_line(capsys, text):
    _random(capsys, text)


@FAST
@given(text=schema_study())
def test_schema_studies_dry_run_or_are_one_line(capsys, text):
    _random(capsys, text)


@pytest.mark.slow
@SLOW
@given(text=schema_study())
def test_schema_studies_many(capsys, text):
    _random(capsys, text)


@pytest.mark.slow
@SLOW
@given(case=mutated_study())
def test_mutated_studies_many(capsys, case):
    _mutated(capsys, case)


@pytest.mark.slow
@SLOW
@given(text=random_study())
def test_random_studies_many(capsys, text):
    _random(capsys, text)
