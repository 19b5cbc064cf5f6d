"""Typed, validated specs for runs and studies; YAML loading; `--set` overrides.

Imports nothing else of dsdtune (registry names are checked by `dsdtune.pipeline.check_names`).
A user's mistake becomes a `SpecError` whose message is one line naming the field and what is
allowed; the command-line entry points print it and exit with code 2.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator, model_validator,
)

class SpecError(ValueError):
    """A user-caused problem with a study file, an override or a run spec (one line)."""


class _Strict(BaseModel):
    # Counts are ints (a boolean is not a count), numbers are finite, flags are booleans.
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


class KindSettings(_Strict):
    """Base of a phase kind's own settings block (`pipeline.<settings_key>` in a study file): every field
    typed and with a default; unknown keys, wrong types and non-finite numbers are refused."""


class TaskSpec(_Strict):
    """Dataset + model. `data_dir`: where the dataset's files are read, downloaded or cached.

    Unset (null), every dataset lives in one place whatever the directory a command runs in:
    `$DSDTUNE_DATA_DIR`, else `$XDG_CACHE_HOME/dsdtune/data`, else `~/.cache/dsdtune/data`
    (`dsdtune.data.default_data_dir`). A relative path in a study file is relative to the study
    file's folder, like `init.checkpoint` and the modules of `module:function` names; one given with
    `--set` is relative to the current directory (see `load_study`).
    """

    dataset: str = "mnist1d"
    dataset_args: dict[str, Any] = Field(default_factory=dict)
    model: str = "mlp"
    model_args: dict[str, Any] = Field(default_factory=dict)
    batch_size: StrictInt = Field(128, gt=0)
    eval_batch_size: StrictInt = Field(2048, gt=0)
    augment: StrictBool = False
    val_fraction: StrictFloat = Field(0.1, gt=0.0, lt=0.5)
    data_dir: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stream through a DataLoader instead of holding the data on the device (datasets given as torch
    # Datasets always stream); loader_workers are its worker processes (0: load in the training process).
    stream: StrictBool = False
    loader_workers: StrictInt = Field(2, ge=0)


class InitSpec(_Strict):
    """An init scheme: allocation (density, init_density) x mask positions x weight scheme.

    - density: the allocator of per-layer densities. One allocation per (allocator, density, model,
      base, bias, seed) is shared by every weight scheme; `floors: eoi` raises every arm's layers to
      what EOI can represent (1/max(fan_out, fan_in)), so base, EOI and AI arms keep identical counts.
    - positions: `auto` = the pruner's own mask for snip/grasp/synflow with base or AI weights,
      random positions for uniform/erk; `random` = random positions at the pruner's per-layer
      densities (a control); EOI always chooses its own positions (only `auto`).
    - base: the dense weights base and AI start from: the model's own init, or a dense orthogonal
      init times `gain` (the EOI paper's base arms). Pruners score these weights.
    - control: Frankle et al. 2021's sanity checks for base weights: `shuffle` the mask within each
      layer (same counts, random positions), `reinit` the kept weights (same mask, fresh draws).
    - gain: multiplies EOI and orthogonal weights (1 linear/tanh-near-linear; sqrt(2) ReLU; the EOI
      code's deep tanh MLP uses 1.0247 with biases N(0, 0.00448)).
    - bias: every Linear/Conv bias: the model's default, zero, or normal(0, bias_std), all arms.
    """

    density: Literal["dense", "uniform", "erk", "snip", "grasp", "synflow"] = "dense"
    weights: Literal["base", "eoi", "ai"] = "base"
    init_density: StrictFloat = Field(0.1, gt=0.0, le=1.0)
    positions: Literal["auto", "pruner", "random"] = "auto"
    base: Literal["default", "orthogonal"] = "default"
    control: Literal["none", "shuffle", "reinit"] = "none"
    floors: Literal["eoi", "none"] = "eoi"
    gain: StrictFloat = Field(1.0, gt=0.0)
    bias: Literal["default", "zero", "normal"] = "default"
    bias_std: StrictFloat = Field(0.0, ge=0.0)
    options: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Optional[str] = None  # a trained state_dict to start from (path relative to the study file)

    @model_validator(mode="after")
    def _combinations(self) -> "InitSpec":
        pruner = self.density in ("snip", "grasp", "synflow")
        if self.positions != "auto" and self.weights == "eoi":
            raise ValueError("positions: EOI chooses its own mask positions; leave positions at auto")
        if self.positions == "pruner" and not pruner:
            raise ValueError(f"positions: {self.density!r} is not a pruner (snip, grasp, synflow); use auto or random")
        if self.positions != "auto" and self.density == "dense":
            raise ValueError("positions: a dense init has no mask; leave positions at auto")
        if self.control != "none" and (self.weights != "base" or self.density == "dense"):
            raise ValueError("control: shuffle/reinit are sanity checks of a sparse init with base weights")
        if self.floors == "none" and self.weights == "eoi":
            raise ValueError("floors: EOI cannot draw a layer below 1/max(fan_out, fan_in); use floors: eoi")
        if self.bias == "normal" and self.bias_std <= 0:
            raise ValueError("bias_std: bias normal needs bias_std > 0 (e.g. 0.00448)")
        if "gain" in self.options:
            raise ValueError("options: gain is now init.gain")
        if self.checkpoint:  # anything that redraws weights or biases would overwrite the trained ones
            redraws = [f"init.{name}: {getattr(self, name)}" for name, default in
                       (("density", "dense"), ("weights", "base"), ("base", "default"), ("bias", "default"))
                       if getattr(self, name) != default]
            if redraws:
                raise ValueError(f"checkpoint: starts from trained weights, which {redraws[0]} would overwrite; "
                                 f"leave density, weights, base and bias at their defaults (dense, base, default, "
                                 f"default) and prune the trained model with a phase (flow SD, SDSD)")
        return self

    @property
    def sparse(self) -> bool:
        return self.density != "dense"

    @property
    def resolved_positions(self) -> str:
        """pruner | random | eoi | none: where the mask's positions come from."""
        if self.density == "dense":
            return "none"
        if self.weights == "eoi":
            return "eoi"
        if self.positions == "auto":
            return "pruner" if self.density in ("snip", "grasp", "synflow") else "random"
        return self.positions


Scalar = Union[StrictFloat, StrictInt]
PerPhase = Union[Any, list]


class PipelineSpec(_Strict):
    """A flow of phases; per-phase settings are scalars (broadcast) or lists aligned with the flow.

    `sparsity` and `criterion` may also be lists aligned with the sparse phases only (S and G), e.g.
    flow DSDSD with sparsity [0.5, 0.25]; a scalar sparsity is multiplied by `sparsity_decay` for each
    later sparse phase (0.5 with decay 0.5 gives the same schedule). `lr` entries left as null default to `lr_decay` times the
    previous phase's lr (the DSD paper's 1/10 per phase). `sparsity` left unset (null) means 0.5 for
    every sparse phase, except a first S phase after a sparse init, which takes the init's density.
    `exclude_first` left unset means the methods' own default (see `dsdtune.phases`); `criterion` left
    unset means each kind's own default (layer-wise magnitude; global magnitude for lottery tickets).
    Which letters exist, which of them are sparse and which settings blocks they own
    (`pipeline.gsm`, `pipeline.gradual`, `pipeline.dst`, `pipeline.rewind`, and users' kinds' blocks:
    the keys beyond the fields below) is the phase registry's business (`dsdtune.phases.check_flow`).
    """

    # A kind's own block is a key of its own (e.g. pipeline.gradual); phases.check_flow validates them.
    model_config = ConfigDict(extra="allow", validate_assignment=False, allow_inf_nan=False)

    flow: str = "DSD"
    epochs: Union[StrictInt, list[StrictInt]] = 10
    lr: Union[StrictFloat, list[Optional[StrictFloat]]] = 0.1
    lr_decay: StrictFloat = Field(0.1, gt=0.0, le=1.0)
    sparsity: Union[None, StrictFloat, list[StrictFloat]] = None
    sparsity_decay: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    criterion: Union[None, str, list[str]] = None
    schedule: Union[Literal["constant", "step", "cosine"], list[Literal["constant", "step", "cosine"]]] = "constant"
    optimizer: Union[Literal["sgd", "adam"], list[Literal["sgd", "adam"]]] = "sgd"
    momentum: Union[StrictFloat, list[StrictFloat]] = 0.9
    nesterov: Union[StrictBool, list[StrictBool]] = False
    weight_decay: Union[StrictFloat, list[StrictFloat]] = 5e-4
    exclude_first: Optional[StrictBool] = None
    exclude: list[str] = Field(default_factory=list)
    weight_histograms: StrictBool = False
    diagnostics: list[Literal["jacobian"]] = Field(default_factory=list)
    jacobian_samples: StrictInt = Field(32, gt=0)

    @field_validator("flow")
    @classmethod
    def _flow(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z]+", value or ""):
            raise ValueError(f"must be a non-empty string of phase letters (e.g. DSD), got {value!r}")
        return value

    @model_validator(mode="after")
    def _lengths(self) -> "PipelineSpec":
        n = len(self.flow)
        for field in ("epochs", "lr", "schedule", "optimizer", "momentum", "nesterov", "weight_decay"):
            value = getattr(self, field)
            if isinstance(value, list) and len(value) != n:
                raise ValueError(f"{field}: has {len(value)} entries but flow {self.flow!r} has {n} phases")
        for s in _as_list(self.sparsity) if self.sparsity is not None else []:
            if not 0.0 <= float(s) < 1.0:
                raise ValueError(f"sparsity: {s} is outside [0, 1) (sparsity is the fraction of zeros)")
        for e in _as_list(self.epochs):
            if int(e) < 0:
                raise ValueError(f"epochs: {e} is negative")
        if all(int(e) == 0 for e in (self.epochs if isinstance(self.epochs, list) else [self.epochs] * n)):
            raise ValueError(f"epochs: every phase of flow {self.flow!r} has 0 epochs; give at least one phase "
                             f"epochs > 0")
        for wd in _as_list(self.weight_decay):
            if wd < 0:
                raise ValueError(f"weight_decay: {wd} must be >= 0")
        lrs = _as_list(self.lr)
        if lrs[0] is None:
            raise ValueError("lr: the first phase's lr must be given")
        for lr in lrs:
            if lr is not None and not lr > 0:
                raise ValueError(f"lr: {lr} must be > 0")
        for m in _as_list(self.momentum):
            if not 0.0 <= m < 1.0:
                raise ValueError(f"momentum: {m} is outside [0, 1)")
        return self


class RunSpec(_Strict):
    """Everything one trial needs: what `dsdtune.run_pipeline` takes."""

    task: TaskSpec = Field(default_factory=TaskSpec)
    init: InitSpec = Field(default_factory=InitSpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    seed: StrictInt = 0


# ---------------------------------------------------------------------------------------------
# Studies

class SearchAxis(_Strict):
    """One searched field. Exactly one of the keys is set."""

    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[StrictFloat, StrictFloat]] = None
    loguniform: Optional[tuple[StrictFloat, StrictFloat]] = None
    int: Optional[tuple[StrictInt, StrictInt]] = None

    @model_validator(mode="after")
    def _one(self) -> "SearchAxis":
        set_keys = [k for k in ("grid", "choice", "uniform", "loguniform", "int") if getattr(self, k) is not None]
        if len(set_keys) != 1:
            raise ValueError("needs exactly one of grid, choice, uniform, loguniform, int")
        key = set_keys[0]
        value = getattr(self, key)
        if key in ("grid", "choice") and len(value) == 0:
            raise ValueError(f"{key}: is empty; give at least one value")
        if key in ("grid", "choice"):
            for i, a in enumerate(value):
                twin = next((b for b in value[:i] if same_value(a, b)), _MISSING)
                if twin is not _MISSING:
                    raise ValueError(f"{key}: {twin!r} is given twice ({value}); each value makes one arm, and "
                                     f"two arms of one value would train the same trials")
        if key in ("uniform", "loguniform", "int") and not value[0] < value[1]:
            raise ValueError(f"{key}: [low, high] needs low < high, got {list(value)}")
        if key == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform: bounds must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "int") if getattr(self, k) is not None)


class SearchSpec(_Strict):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: StrictInt = Field(1, gt=0)
    seed: StrictInt = 0
    space: dict[str, SearchAxis] = Field(default_factory=dict)


class SchedulerSpec(_Strict):
    kind: Literal["none", "asha"] = "none"
    grace_period: StrictInt = Field(2, gt=0)
    reduction_factor: StrictFloat = Field(3.0, gt=1.0)


class ResourcesSpec(_Strict):
    cpu: StrictFloat = Field(1.0, gt=0.0)
    gpu: StrictFloat = Field(0.0, ge=0.0)


class ConfirmSpec(_Strict):
    """After an Optuna search: re-run the best config on `seeds` fresh seeds (first_seed, first_seed + 1,
    ...; none of them a searched seed) beside a control, the best config with `control` applied."""

    seeds: StrictInt = Field(8, gt=0)
    first_seed: StrictInt = 1000
    control: dict[str, Any] = Field(default_factory=dict)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


class ReportSpec(_Strict):
    """How the report concludes: `margin` (metric units, e.g. 0.005 = 0.5 pp of accuracy) is the
    equivalence margin; with it every comparison adds a TOST, without it no equivalence is claimed."""

    margin: Optional[StrictFloat] = Field(None, gt=0.0)


class StudySpec(_Strict):
    name: str
    description: str = ""
    task: TaskSpec = Field(default_factory=TaskSpec)
    init: InitSpec = Field(default_factory=InitSpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    seeds: Union[StrictInt, list[StrictInt]] = 3
    metric: str = "val_acc"
    mode: Optional[Literal["max", "min"]] = None  # the metric's own direction (METRIC_MODES) when unset
    test_metric: str = "test_acc"
    variants: Optional[dict[str, dict[str, Any]]] = None
    control: Optional[dict[str, Any]] = None
    confirm: Optional[ConfirmSpec] = None
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent: StrictInt = Field(0, ge=0)
    max_failures: StrictInt = Field(2, ge=0)
    checkpoint_every_s: StrictFloat = Field(60.0, gt=0.0)
    share_prefixes: StrictBool = True
    storage: Optional[str] = None
    report: ReportSpec = Field(default_factory=ReportSpec)
    # A user's own methods: flow letter -> "package.module:ClassName" of a dsdtune.PhaseKind subclass,
    # found like a user's model (the study file's folder, the current directory, installed packages).
    phase_kinds: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # The name is a folder under --results: never ".", "..", a hidden name or a path.
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", value):
            raise ValueError(f"{value!r} is not a plain folder name; use letters, digits, '_', '-', '.', "
                             f"starting with a letter, digit or '_'")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"needs at least 1 seed, got {value}")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("needs a non-empty list of distinct integers")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value.startswith("test"):
            raise ValueError(f"{value!r} is a test metric; search on a validation metric (val_acc, val_loss)")
        if value not in ("val_acc", "val_loss"):
            raise ValueError(f"{value!r} is not searchable; allowed: val_acc, val_loss")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value):
        names = list(value or {})
        for i, a in enumerate(names):
            twin = next((b for b in names[:i] if same_value(value[a], value[b])), None)
            if twin is not None:
                raise ValueError(f"{twin!r} and {a!r} set the same values ({value[a]}); two arms of one spec "
                                 f"would train the same trials - drop one")
        return value

    @model_validator(mode="after")
    def _study(self) -> "StudySpec":
        direction = METRIC_MODES[self.metric]
        if self.mode is None:
            self.mode = direction
        elif self.mode != direction:
            better = "higher" if direction == "max" else "lower"
            raise ValueError(f"mode: {self.metric} is better {better}, so its mode is {direction}, not {self.mode}; "
                             f"write mode: {direction} or leave mode out")
        if self.confirm is not None:
            if self.search.algorithm != "optuna":
                raise ValueError(f"confirm: re-runs the best config of an optuna search; a {self.search.algorithm} "
                                 f"study runs every arm on every seed already - drop confirm, or add seeds")
            both = sorted(set(self.seed_list) & set(self.confirm.seed_list))
            if both:
                raise ValueError(f"confirm: seed {both[0]} is also a searched seed (seeds {self.seed_list}; confirm "
                                 f"runs {self.confirm.seed_list[0]}..{self.confirm.seed_list[-1]}); the confirmation "
                                 f"needs fresh seeds - raise confirm.first_seed")
        if self.report.margin is not None and self.report.margin >= 1.0 and "acc" in self.test_metric:
            raise ValueError(f"report.margin: {self.report.margin:g} is at least 1, the largest difference an "
                             f"accuracy ({self.test_metric}, in [0, 1]) can have, so every arm would be 'equivalent'; "
                             f"give it in accuracy units, e.g. 0.005 for 0.5 pp")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def base_run(self) -> dict[str, Any]:
        """The run spec (task/init/pipeline) before search values are filled in.

        Paths are made absolute (`load_study` already did for a study file's; a spec built in Python
        has them relative to the current directory): Ray runs each trial in a directory of its own,
        where a relative data_dir would regenerate the data per trial (and name a different prefix).
        """
        tree = {"task": self.task.model_dump(), "init": self.init.model_dump(), "pipeline": self.pipeline.model_dump()}
        _paths_relative_to(tree, Path.cwd())
        return tree


# ---------------------------------------------------------------------------------------------
# helpers

def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# A searched metric's direction: accuracy is better higher, loss lower.
METRIC_MODES = {"val_acc": "max", "val_loss": "min"}
_MISSING = object()


def same_value(a: Any, b: Any) -> bool:
    """Whether two values of a study file are one value once typed: 0 and 0.0 are (a float field takes
    both), True and 1 are not (a flag is never a number); lists and mappings compare item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line naming the first offending field and what is allowed."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    # pydantic lists union members in the location (e.g. 'epochs.int'); keep the user's path only.
    loc = re.sub(r"\.(int|float|str|bool|list\[[^\]]*\]|literal\[[^\]]*\]|function-after\[[^\]]*\])", "", loc)
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    msg = msg.replace("Value error, ", "")
    field = re.match(r"([a-z_]+): ", msg)
    if field:  # a section-level check names its own field: pipeline + sparsity -> pipeline.sparsity
        loc, msg = ".".join(filter(None, [loc, field.group(1)])), msg[field.end():]
    where = ".".join(filter(None, [prefix, loc]))
    return f"{where}: {msg}" if where else msg


def set_by_path(tree: dict, path: str, value: Any) -> None:
    """Set tree['a']['b'] = value for path 'a.b' (creating sections); 'pipeline.lr.1' sets a list item."""
    keys = path.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            node = _list_item(node, key, path)
            continue
        if not isinstance(node.get(key, {}), (dict, list)):
            raise SpecError(f"{path}: {key} is a value, not a section or list")
        node = node.setdefault(key, {})
    if isinstance(node, list):
        index = int(keys[-1]) if keys[-1].isdigit() else None
        if index is None or index >= len(node):
            raise SpecError(f"{path}: index {keys[-1]} is outside the list of {len(node)} entries")
        node[index] = value
    elif keys[-1].isdigit():
        raise SpecError(f"{path}: {'.'.join(keys[:-1])} must be written as a list to set entry {keys[-1]}")
    else:
        node[keys[-1]] = value


def _list_item(node: list, key: str, path: str):
    if not key.isdigit() or int(key) >= len(node):
        raise SpecError(f"{path}: {key} is not an index of a list of {len(node)} entries")
    return node[int(key)]


def get_by_path(tree: dict, path: str) -> Any:
    node = tree
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names one key twice (YAML loaders silently keep the last)."""

    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(problem=f"key {key!r} appears twice")
        self.key, self.lines = key, (first_line, line)

    def describe(self) -> str:
        return f"key {self.key!r} is given twice in one mapping (lines {self.lines[0]} and {self.lines[1]})"


class StudyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (a merge key, <<, may be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the safe loader refuses it itself
                    continue
                if first is not None:
                    raise DuplicateKeyError(key, first, key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_override(text: str) -> tuple[str, Any]:
    """'pipeline.lr=[0.1, null]' -> ('pipeline.lr', [0.1, None]); values are YAML."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected key=value, e.g. --set pipeline.epochs=5")
    key, raw = text.split("=", 1)
    if not all(key.strip().split(".")):
        raise SpecError(f"--set {text!r}: {key.strip()!r} is not a dotted path of fields, e.g. pipeline.epochs")
    try:
        value = yaml.load(raw, Loader=StudyLoader) if raw.strip() else ""
    except DuplicateKeyError as err:
        raise SpecError(f"--set {text!r}: {err.describe()}; keep one") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_run_spec(base: dict, assignments: dict[str, Any], seed: int) -> RunSpec:
    """A trial's run spec: the study's task/init/pipeline with an arm's dotted-path values and a seed."""
    tree = copy.deepcopy(base)
    for path, value in assignments.items():
        set_by_path(tree, path, value)
    tree["seed"] = int(seed)
    return parse_run_spec(tree)


def parse_run_spec(spec: Union[dict, RunSpec]) -> RunSpec:
    if isinstance(spec, RunSpec):
        return spec
    try:
        return RunSpec.model_validate(spec)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def load_study(source: Union[str, Path], overrides: list[str] = (), studies_dir: Union[str, Path, None] = None) -> StudySpec:
    """Load a study by name (studies/NAME.yaml) or path, apply `key=value` overrides, validate.

    Relative paths (`PATH_FIELDS`) become absolute: those written in the study file against the
    file's folder, those given in `overrides` (`--set`) against the current directory.
    """
    path = resolve_study_path(source, studies_dir)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot be read ({type(err).__name__}); give a UTF-8 YAML file") from None
    try:
        raw = yaml.load(text, Loader=StudyLoader)
    except DuplicateKeyError as err:
        raise SpecError(f"{path}: {err.describe()}; keep one (YAML would silently use the last)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a study file must be a YAML mapping with at least 'name'")
    raw = copy.deepcopy(raw)
    raw.setdefault("name", path.stem)
    _paths_relative_to(raw, path.parent)
    for text in overrides:
        key, value = parse_override(text)
        set_by_path(raw, key, value)
    _paths_relative_to(raw, Path.cwd())  # only the overrides' paths are still relative
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


# Fields that change how a study runs, not what it computes: a resumed study may change them.
RUN_ONLY_FIELDS = ("description", "max_concurrent", "max_failures", "checkpoint_every_s", "storage", "report")


def study_identity(spec: StudySpec) -> dict:
    """The resolved spec that defines a study's results (what `--resume` must find unchanged)."""
    tree = spec.model_dump(mode="json")
    for key in RUN_ONLY_FIELDS:
        tree.pop(key, None)
    return tree


def spec_hash(spec: StudySpec) -> str:
    text = json.dumps(study_identity(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def first_difference(old: Any, new: Any, path: str = "") -> Optional[str]:
    """The dotted path of the first field where two spec trees differ (None if equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    return None if old == new else (path or "(root)")


# The fields that hold file system paths; a relative one is made absolute by `_paths_relative_to`.
PATH_FIELDS = ("task.data_dir", "init.checkpoint")


def _paths_relative_to(raw: dict, folder: Path) -> None:
    """Make relative PATH_FIELDS absolute against `folder`, wherever a study tree sets them.

    That is in their sections, in variants, controls (control, confirm.control) and search axes
    (grid/choice values). Absolute paths and unset ones (null) are left as they are.
    """
    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str((folder / value).resolve())
        if isinstance(value, str) and value:
            return str(Path(value).expanduser())
        return value

    def fix_assignments(assignments: Any) -> None:  # {"init.checkpoint": value, ...}
        if isinstance(assignments, dict):
            for field in PATH_FIELDS:
                if field in assignments:
                    assignments[field] = absolute(assignments[field])

    for field in PATH_FIELDS:
        section, key = field.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section][key] = absolute(raw[section][key])
    if isinstance(raw.get("variants"), dict):  # anything else is refused by the spec's own types
        for variant in raw["variants"].values():
            fix_assignments(variant)
    fix_assignments(raw.get("control"))
    if isinstance(raw.get("confirm"), dict):
        fix_assignments(raw["confirm"].get("control"))
    space = (raw.get("search") or {}).get("space") if isinstance(raw.get("search"), dict) else None
    for field in PATH_FIELDS:
        axis = space.get(field) if isinstance(space, dict) else None
        if isinstance(axis, dict):
            for key in ("grid", "choice"):
                if isinstance(axis.get(key), list):
                    axis[key] = [absolute(v) for v in axis[key]]


def default_studies_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "studies"


def resolve_study_path(source: Union[str, Path], studies_dir: Union[str, Path, None] = None) -> Path:
    studies_dir = Path(studies_dir) if studies_dir else default_studies_dir()
    candidate = Path(source)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    named = studies_dir / f"{source}.yaml"
    if named.exists():
        return named
    shipped = sorted(p.stem for p in studies_dir.glob("*.yaml"))
    raise SpecError(f"study {str(source)!r} not found: give a path to a .yaml file or one of: {', '.join(shipped)}")
