"""`python -m dsdtune.study NAME|PATH`: a study file -> Ray Tune trials -> result files and a report.

Everything a user can get wrong is checked before Ray starts (exit code 2, one line). A study runs
in stages, each a Tuner in the study's storage: `prefix` trains every shared prefix once (e.g. the
dense baseline per seed), `sweep` (grid/random) or `search` (Optuna) runs the arms from those
prefixes, and for searches `confirm` re-runs the best config on fresh seeds beside the control.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import (
    SpecError, StudySpec, build_run_spec, default_studies_dir, get_by_path, load_study,
)

STAGE_PREFIX, STAGE_SWEEP, STAGE_SEARCH, STAGE_CONFIRM = "prefix", "sweep", "search", "confirm"


# ---------------------------------------------------------------------------------------------
# planning (no Ray)

@dataclass
class Arm:
    label: str
    assign: dict[str, Any]  # dotted path -> value, applied to the study's base spec
    factors: dict[str, Any]  # factor name (dotted path or "variant") -> value


@dataclass
class Plan:
    arms: list[Arm]
    seeds: list[int]
    prefix_length: int
    prefixes: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (arm label, seed)
    trial_prefix: dict[tuple[str, int], str] = field(default_factory=dict)
    epochs_per_trial: dict[str, int] = field(default_factory=dict)  # arm label -> epochs
    prefix_epochs: int = 0
    factors: list[str] = field(default_factory=list)

    @property
    def epochs_without_sharing(self) -> int:
        return sum(self.epochs_per_trial[a.label] for a in self.arms) * len(self.seeds)

    @property
    def epochs_with_sharing(self) -> int:
        shared = sum(1 for key in self.trial_prefix.values() if key in self.prefixes)
        return self.epochs_without_sharing - shared * self.prefix_epochs + len(self.prefixes) * self.prefix_epochs


def _label(factors: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in factors.items()) or "base"


def _grid_arms(spec: StudySpec) -> list[Arm]:
    """Variants x grid axes (grid and choice) x pre-sampled random axes."""
    space = spec.search.space
    if spec.search.algorithm == "grid":
        for path, axis in space.items():
            if axis.kind not in ("grid", "choice"):
                raise SpecError(f"search.space.{path}: {axis.kind} needs search.algorithm random or optuna; "
                                f"grid search takes grid or choice")
    grid_paths = [p for p, a in space.items() if a.kind in ("grid", "choice")]
    grid_values = [space[p].grid if space[p].grid is not None else space[p].choice for p in grid_paths]
    sampled_paths = [p for p, a in space.items() if a.kind not in ("grid", "choice")]
    samples: list[dict[str, Any]] = [{}]
    if spec.search.algorithm == "random" and sampled_paths:
        import numpy as np  # pre-sampled so that every seed of an arm sees the same values
        rng = np.random.default_rng(spec.search.seed)
        samples = [{p: _sample(space[p], rng) for p in sampled_paths} for _ in range(spec.search.num_samples)]
    variants = list((spec.variants or {"": {}}).items())
    arms = []
    for (vname, vassign), combo, sample in itertools.product(variants, itertools.product(*grid_values), samples):
        factors: dict[str, Any] = {"variant": vname} if vname else {}
        factors.update(zip(grid_paths, combo))
        factors.update(sample)
        assign = dict(vassign)
        assign.update({k: v for k, v in factors.items() if k != "variant"})
        arms.append(Arm(_label(factors), assign, factors))
    if not arms:
        raise SpecError("search.space: the study has no arms; give at least one grid value or variant")
    return arms


def _sample(axis, rng) -> Any:
    low, high = getattr(axis, axis.kind)
    if axis.kind == "uniform":
        return float(rng.uniform(low, high))
    if axis.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(low, high + 1))


def _probe_values(axis) -> list[Any]:
    if axis.kind in ("grid", "choice"):
        return list(axis.grid if axis.grid is not None else axis.choice)
    low, high = getattr(axis, axis.kind)
    return [low, high]


def _check_trial(spec: StudySpec, assign: dict[str, Any], seed: int, where: str):
    from .pipeline import check_names  # imports torch: only after the cheap checks passed
    try:
        run = build_run_spec(spec.base_run(), assign, seed)
        check_names(run)
    except SpecError as err:
        raise SpecError(f"{err}{where}") from None
    return run


def make_plan(spec: StudySpec) -> Plan:
    """Arms, seeds, shared prefixes and epoch counts; validates every arm's run spec."""
    for path in list(spec.search.space) + [p for v in (spec.variants or {}).values() for p in v]:
        if path.split(".")[0] not in ("task", "init", "pipeline"):
            raise SpecError(f"search.space.{path}: searched fields live under task., init. or pipeline.")
    if spec.search.algorithm != "optuna":
        return plan_for_arms(spec, _grid_arms(spec))
    if not spec.search.space:
        raise SpecError("search.space: optuna needs at least one searched field")
    # Optuna's arms are unknown in advance: probe every axis at its ends to find the shared prefix.
    probes = [Arm("base", {}, {})] + [Arm(f"{p}={v}", {p: v}, {p: v})
                                      for p, axis in spec.search.space.items() for v in _probe_values(axis)]
    plan = plan_for_arms(spec, probes)
    # Factors: the searched fields, and what the confirm stage's control changes (e.g. sparsity).
    control_keys = [k for k in (spec.confirm.control if spec.confirm else {}) if k not in spec.search.space]
    plan.arms, plan.factors, plan.trial_prefix = [], list(spec.search.space) + control_keys, {}
    plan.prefixes = {}
    if plan.prefix_length:
        from .pipeline import prefix_id
        for seed in plan.seeds:
            plan.prefixes[prefix_id(build_run_spec(spec.base_run(), {}, seed), plan.prefix_length)] = ("base", seed)
    return plan


def plan_for_arms(spec: StudySpec, arms: list[Arm]) -> Plan:
    """The plan for fixed arms x the study's seeds; the prefix is the leading phases all arms share."""
    from .pipeline import expand_phases, prefix_id
    seeds = spec.seed_list
    runs = {a.label: _check_trial(spec, a.assign, seeds[0], f" (arm {a.label})" if a.factors else "") for a in arms}
    phase_lists = {label: expand_phases(run.pipeline) for label, run in runs.items()}
    reference = next(iter(phase_lists.values()))
    # Task/init/seed are part of a prefix's id; at least one phase is left for each trial on its own.
    length = min(len(p) for p in phase_lists.values()) - 1 if spec.share_prefixes else 0
    while length > 0 and any(p[:length] != reference[:length] for p in phase_lists.values()):
        length -= 1
    plan = Plan(arms, seeds, length, factors=list(arms[0].factors))
    plan.epochs_per_trial = {label: sum(p.epochs for p in plist) for label, plist in phase_lists.items()}
    plan.prefix_epochs = sum(p.epochs for p in reference[:length])
    if length:
        users: dict[str, list[tuple[str, int]]] = {}
        for arm in arms:
            for seed in seeds:
                pid = prefix_id(build_run_spec(spec.base_run(), arm.assign, seed), length)
                plan.trial_prefix[(arm.label, seed)] = pid
                users.setdefault(pid, []).append((arm.label, seed))
        plan.prefixes = {pid: trials[0] for pid, trials in users.items() if len(trials) > 1}
    return plan


def check_storage(spec: StudySpec, results_root: Path) -> tuple[Path, str]:
    """(local results directory, Ray storage path or URI); the local one must be creatable."""
    results_dir = (results_root / spec.name).resolve()
    storage = spec.storage
    if storage and "://" in storage:
        ray_storage = storage
    else:
        if storage:
            results_dir = Path(storage).expanduser().resolve()
        ray_storage = str(results_dir / "ray")
    probe = results_dir
    while not probe.exists():
        probe = probe.parent
    if not _can_create_in(probe):
        raise SpecError(f"storage: {results_dir} cannot be created ({probe} is not a writable directory); "
                        f"choose another path with --set storage=/some/writable/dir")
    return results_dir, ray_storage


def _can_create_in(directory: Path) -> bool:
    """Really try (os.access says yes to root even on read-only file systems); leaves nothing behind."""
    if not directory.is_dir():
        return False
    import tempfile
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dsdtune-probe-", dir=directory))
        return True
    except OSError:
        return False


def check_gpu(spec: StudySpec, address: Optional[str]) -> None:
    if spec.resources.gpu > 0 and not address:
        import torch
        if not torch.cuda.is_available():
            raise SpecError(f"resources.gpu: {spec.resources.gpu} GPU per trial was requested but this machine has "
                            f"no GPU; use --set resources.gpu=0, or --address to run on a GPU cluster")


def prepare_datasets(spec: StudySpec, plan: Plan) -> None:
    """Download or generate each dataset once, here, before trials race for it (and fail offline)."""
    from .data import DatasetUnavailable, load_dataset
    arms = plan.arms or [Arm("base", {}, {})]
    tasks = {json.dumps(build_run_spec(spec.base_run(), a.assign, plan.seeds[0]).task.model_dump(), sort_keys=True)
             for a in arms}
    for text in tasks:
        task = json.loads(text)
        try:
            load_dataset(task["dataset"], device="cpu", val_fraction=task["val_fraction"],
                         data_dir=str(Path(task["data_dir"]).expanduser().resolve()), **task["dataset_args"])
        except DatasetUnavailable as err:
            raise SpecError(f"task.dataset: {err}") from None


def check_control(spec: StudySpec) -> None:
    if spec.control:
        for key in spec.control:
            if spec.search.algorithm != "optuna" and key not in (spec.search.space or {}) and key != "variant":
                raise SpecError(f"control: {key!r} is not a factor of this study; factors: "
                                f"{', '.join(list(spec.search.space) + (['variant'] if spec.variants else []))}")


def describe_plan(spec: StudySpec, plan: Plan) -> str:
    lines = [f"study {spec.name}: {spec.description.strip()}" if spec.description else f"study {spec.name}",
             f"flow {spec.pipeline.flow}, search {spec.search.algorithm}, seeds {plan.seeds}"]
    if spec.search.algorithm == "optuna":
        lines.append(f"optuna: {spec.search.num_samples} samples x {len(plan.seeds)} seeds over "
                     f"{', '.join(spec.search.space)}; scheduler {spec.scheduler.kind}")
        if spec.confirm:
            lines.append(f"confirm: best config and control on {spec.confirm.seeds} fresh seeds")
    else:
        lines.append(f"{len(plan.arms)} arms x {len(plan.seeds)} seeds = {len(plan.arms) * len(plan.seeds)} trials")
        for arm in plan.arms:
            lines.append(f"  arm {arm.label}: {plan.epochs_per_trial[arm.label]} epochs per trial")
    if plan.prefixes:
        lines.append(f"shared prefixes: {len(plan.prefixes)} (first {plan.prefix_length} phase(s), "
                     f"{plan.prefix_epochs} epochs each), trained once in stage 'prefix'")
    if spec.search.algorithm != "optuna":
        lines.append(f"epochs: {plan.epochs_with_sharing} with shared prefixes, "
                     f"{plan.epochs_without_sharing} without")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# running (Ray)

def _connect(address: Optional[str], dashboard_host: str, num_cpus: Optional[int]):
    """Start or join Ray; returns (ray, whether we own the connection and must shut it down)."""
    os.environ["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "token")
    import ray
    if ray.is_initialized():  # called from a notebook or a test that already connected
        return ray, False
    if address:
        ctx = ray.init(address=address, log_to_driver=True)
    else:
        ctx = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                       dashboard_host=dashboard_host)
    url = ctx.dashboard_url
    if url:
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        auth = (f"; it asks for the token stored in {token}" if os.environ["RAY_AUTH_MODE"] == "token" else "")
        print(f"dsdtune: Ray dashboard at http://{url}{auth}", flush=True)
    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            print(f"dsdtune: Prometheus metrics (ray_dsdtune_*) at "
                  f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", flush=True)
            break
    return ray, True


def _study_payload(spec: StudySpec, plan: Plan, arms: list[Arm]) -> dict:
    return {"name": spec.name, "base": _absolute_data_dir(spec.base_run()),
            "arms": {a.label: a.assign for a in arms}, "seeds": plan.seeds, "metric": spec.metric,
            "mode": spec.mode, "cpus_per_trial": spec.resources.cpu, "gpus_per_trial": spec.resources.gpu,
            "checkpoint_every_s": spec.checkpoint_every_s}


def _absolute_data_dir(base: dict) -> dict:
    # Ray runs each trial in its own directory: a relative data_dir would regenerate data per trial.
    base["task"]["data_dir"] = str(Path(base["task"]["data_dir"]).expanduser().resolve())
    return base


def _run_stage(name: str, ray_storage: str, param_space: dict, *, payload: dict, prefix_length: int,
               prefixes: Optional[dict], stage: str, spec: StudySpec, resume: bool, tune_extra: Optional[dict] = None):
    from ray import tune
    from .trainable import run_trial
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, study=payload, prefix_length=prefix_length, prefixes=prefixes, stage=stage),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    path = f"{ray_storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=param_space)
    else:
        tune_config = tune.TuneConfig(reuse_actors=True, max_concurrent_trials=spec.max_concurrent or None,
                                      **(tune_extra or {}))
        run_config = tune.RunConfig(
            name=name, storage_path=ray_storage, verbose=1,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    print(f"dsdtune: stage '{name}'", flush=True)
    return tuner.fit()


def _grid_stages(spec: StudySpec, plan: Plan, arms: list[Arm], ray_storage: str, resume: bool,
                 stage: str, prefix_name: str) -> tuple[list, list]:
    """Train the shared prefixes, then every arm x seed from them; returns (prefix results, results)."""
    from ray import tune
    payload = _study_payload(spec, plan, arms)
    prefix_results, prefixes = _prefix_stage(spec, plan, payload, ray_storage, resume, prefix_name)
    space = {"arm": tune.grid_search([a.label for a in arms]), "seed": tune.grid_search(plan.seeds)}
    grid = _run_stage(stage, ray_storage, space, payload=payload, prefix_length=plan.prefix_length,
                      prefixes=prefixes, stage=stage, spec=spec, resume=resume)
    return prefix_results, list(grid)


def _prefix_stage(spec: StudySpec, plan: Plan, payload: dict, ray_storage: str, resume: bool,
                  name: str) -> tuple[list, dict]:
    """Train each shared prefix once, by a representative (arm, seed) that uses it."""
    if not plan.prefixes:
        return [], {}
    from ray import tune
    ids = sorted(plan.prefixes)
    space = {"prefix": tune.grid_search([{"arm": plan.prefixes[i][0], "seed": plan.prefixes[i][1], "id": i}
                                         for i in ids])}
    results = list(_run_stage(name, ray_storage, space, payload=payload, prefix_length=plan.prefix_length,
                              prefixes=None, stage=STAGE_PREFIX, spec=spec, resume=resume))
    checkpoints = {r.metrics["prefix_id"]: r.checkpoint for r in results
                   if r.error is None and r.checkpoint is not None and r.metrics.get("prefix_id")}
    return results, checkpoints


def _optuna_stages(spec: StudySpec, plan: Plan, ray_storage: str, resume: bool):
    """Optuna TPE (with ASHA if asked) over the space, then the best config and control on fresh seeds."""
    from ray import tune
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    space = {}
    for path, axis in spec.search.space.items():
        if axis.kind in ("grid", "choice"):
            space[path] = tune.choice(axis.grid if axis.grid is not None else axis.choice)
        elif axis.kind == "uniform":
            space[path] = tune.uniform(*axis.uniform)
        elif axis.kind == "loguniform":
            space[path] = tune.loguniform(*axis.loguniform)
        else:
            space[path] = tune.randint(axis.int[0], axis.int[1] + 1)
    payload = _study_payload(spec, plan, [Arm("base", {}, {})])
    prefix_results, prefixes = _prefix_stage(spec, plan, payload, ray_storage, resume, STAGE_PREFIX)
    searcher = OptunaSearch(metric=spec.metric, mode=spec.mode,
                            sampler=optuna.samplers.TPESampler(seed=spec.search.seed))
    param_space = {"assign": space}
    if len(plan.seeds) > 1:
        searcher = Repeater(searcher, repeat=len(plan.seeds), set_index=True)
    else:
        param_space["seed"] = plan.seeds[0]
    extra = {"search_alg": searcher, "num_samples": spec.search.num_samples * len(plan.seeds),
             "metric": spec.metric, "mode": spec.mode}
    if spec.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler
        total = max(plan.epochs_per_trial.values())
        extra["scheduler"] = ASHAScheduler(time_attr="epoch", max_t=total, grace_period=spec.scheduler.grace_period,
                                           reduction_factor=spec.scheduler.reduction_factor)
    search = _run_stage(STAGE_SEARCH, ray_storage, param_space, payload=payload, prefix_length=plan.prefix_length,
                        prefixes=prefixes, stage=STAGE_SEARCH, spec=spec, resume=resume, tune_extra=extra)
    search = list(search)
    confirm_prefix, confirm = [], []
    best = best_assignment(search, spec)
    if spec.confirm and best is not None:
        best_arm, control_arm = confirm_arms(spec, best)
        seeds = list(range(spec.confirm.first_seed, spec.confirm.first_seed + spec.confirm.seeds))
        confirm_spec = spec.model_copy(update={"seeds": seeds, "search": spec.search.model_copy(
            update={"algorithm": "grid", "space": {}}), "variants": None})
        confirm_plan = plan_for_arms(confirm_spec, [best_arm, control_arm])
        confirm_prefix, confirm = _grid_stages(confirm_spec, confirm_plan, [best_arm, control_arm], ray_storage,
                                               resume, STAGE_CONFIRM, "confirm-prefix")
    return prefix_results + confirm_prefix, search, confirm, best


def confirm_arms(spec: StudySpec, best: dict) -> list[Arm]:
    """The best searched config and its control (the same config with confirm.control applied)."""
    control = dict(best)
    control.update(spec.confirm.control if spec.confirm else {})
    return [Arm("best", best, {}), Arm("control", control, {})]


def best_assignment(results: list, spec: StudySpec) -> Optional[dict]:
    """The searched config with the best mean validation metric over its completed trials.

    Trials a scheduler stopped early hold an earlier epoch's value: mixing them into a mean would
    compare unlike things, so a config ranks on its completed trials, and only configs without any
    completed trial fall back to (and rank below) their last values.
    """
    groups: dict[str, list] = {}
    for r in results:
        if r.error is None and r.metrics and spec.metric in r.metrics:
            groups.setdefault(json.dumps(r.config["assign"], sort_keys=True), []).append(r.metrics)
    if not groups:
        return None
    sign = 1 if spec.mode == "max" else -1

    def score(runs: list[dict]) -> tuple[bool, float]:
        done = [m[spec.metric] for m in runs if m.get("status") == "ok"]
        values = done or [m[spec.metric] for m in runs]
        return bool(done), sign * sum(values) / len(values)

    return json.loads(max(groups, key=lambda k: score(groups[k])))


# ---------------------------------------------------------------------------------------------
# result files

def _trial_rows(results: list, stage: str, factor_of, plan_factors: list[str],
                prefix_histories: dict[str, list[dict]], seeds: list[int]):
    trials, histories, layers, weights = [], [], [], []
    for result in results:
        config, metrics = result.config, result.metrics or {}
        if "prefix" in config:
            arm, seed = config["prefix"]["arm"], config["prefix"]["seed"]
        else:
            arm = config.get("arm", "searched")
            seed = config.get("seed", seeds[config.get("__trial_index__", 0)] if seeds else 0)
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if result.error is not None:
            status = "error"
        elif metrics.get("status") == "diverged":
            status = "diverged"
        elif metrics.get("status") == "ok":
            status = "ok"
        else:
            status = "stopped"  # ended early by the scheduler (ASHA)
        if stage == STAGE_PREFIX:  # a shared starting point, not a trial of an arm
            arm, factors = "prefix", {}
        elif "assign" in config:
            arm = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config["assign"].items())
            factors = factor_of(config["assign"])
        else:
            factors = factor_of(arm)
        row = {"trial_id": trial_id, "stage": stage, "arm": arm, **factors, "seed": seed,
               "status": status, "prefix_id": metrics.get("prefix_id", ""),
               "epochs_trained": metrics.get("epochs_trained", 0), "node_id": metrics.get("node_id", ""),
               "wall_time_s": round(float(metrics.get("time_total_s", 0.0)), 3)}
        for key in ("val_acc", "val_loss", "test_acc", "test_loss", "sparsity"):
            row[f"final_{key}"] = metrics.get(key)
        for key, value in metrics.items():
            if key.startswith(("acc_after_", "val_acc_after_", "jacobian_", "init_")):
                row[key] = value
        trials.append(row)
        frame = result.metrics_dataframe
        own = [] if frame is None else frame.to_dict("records")
        before = prefix_histories.get(row["prefix_id"], []) if stage != STAGE_PREFIX else []
        first_own = min((h.get("epoch", 0) for h in own), default=math.inf)
        for h in [h for h in before if h.get("epoch", 0) < first_own] + own:
            histories.append({"trial_id": trial_id, **{k: h.get(k) for k in HISTORY_COLUMNS}})
        for name, density in json.loads(metrics.get("layer_densities_json") or "{}").items():
            layers.append({"trial_id": trial_id, "layer": name, "density": density})
        for label, hist in json.loads(metrics.get("weight_histograms_json") or "{}").items():
            counts = hist["counts"]
            width = (hist["max"] - hist["min"]) / len(counts)
            for i, count in enumerate(counts):
                weights.append({"trial_id": trial_id, "phase_label": label, "bin_left": hist["min"] + i * width,
                                "bin_right": hist["min"] + (i + 1) * width, "count": count})
    return trials, histories, layers, weights


HISTORY_COLUMNS = ["epoch", "phase", "phase_kind", "phase_label", "lr", "sparsity", "train_loss", "val_loss",
                   "val_acc", "test_loss", "test_acc"]


def phase_labels(spec: StudySpec, plan: Plan) -> list[str]:
    """Phase labels of every arm's flow (variants may change it), in order of first appearance."""
    from .pipeline import expand_phases
    runs = [build_run_spec(spec.base_run(), a.assign, plan.seeds[0]) for a in plan.arms] or \
        [build_run_spec(spec.base_run(), {}, plan.seeds[0])]
    labels = [p.label for run in runs for p in expand_phases(run.pipeline)]
    return list(dict.fromkeys(labels))


def write_atomic_csv(frame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def write_atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(results_dir: Path, spec: StudySpec, plan: Plan, stages: dict[str, list], arms: list[Arm],
                  seeds_by_stage: dict[str, list[int]]) -> dict[str, int]:
    import pandas as pd
    results_dir.mkdir(parents=True, exist_ok=True)
    by_label = {a.label: a for a in arms}

    def factor_of(arm_or_assign) -> dict:
        """Factor values as the trial's run spec holds them (an arm by label, or searched values)."""
        arm = by_label.get(arm_or_assign) if isinstance(arm_or_assign, str) else None
        assign = arm.assign if arm is not None else arm_or_assign
        values = {"variant": arm.factors["variant"]} if arm is not None and "variant" in arm.factors else {}
        tree = build_run_spec(spec.base_run(), assign, plan.seeds[0]).model_dump()
        values.update({f: get_by_path(tree, f) for f in plan.factors if f != "variant"})
        return values

    prefix_histories = {}
    for result in stages.get(STAGE_PREFIX, []):
        frame = result.metrics_dataframe
        if result.metrics and frame is not None:
            prefix_histories[result.metrics.get("prefix_id", "")] = frame.to_dict("records")
    trials, histories, layers, weights = [], [], [], []
    for stage, results in stages.items():
        t, h, l, w = _trial_rows(results, stage, factor_of, plan.factors, prefix_histories,
                                 seeds_by_stage.get(stage, plan.seeds))
        trials += t
        histories += h
        layers += l
        weights += w
    trial_frame = pd.DataFrame(trials)
    labels = phase_labels(spec, plan)
    phase_columns = [c for label in labels for c in (f"acc_after_{label}", f"val_acc_after_{label}")
                     if c in trial_frame.columns]
    trial_frame = trial_frame[[c for c in trial_frame.columns if c not in phase_columns] + phase_columns]
    order = {STAGE_PREFIX: 0, STAGE_SWEEP: 1, STAGE_SEARCH: 1, STAGE_CONFIRM: 2}
    if not trial_frame.empty:
        trial_frame = trial_frame.sort_values(by=["stage", "arm", "seed"], key=lambda c: c.map(order) if c.name == "stage" else c,
                                              kind="stable")
    write_atomic_csv(trial_frame, results_dir / "trials.csv")
    write_atomic_csv(pd.DataFrame(histories, columns=["trial_id"] + HISTORY_COLUMNS), results_dir / "history.csv")
    if layers:
        write_atomic_csv(pd.DataFrame(layers), results_dir / "layers.csv")
    if weights:
        write_atomic_csv(pd.DataFrame(weights), results_dir / "weights.csv")
    flows = list(dict.fromkeys(build_run_spec(spec.base_run(), a.assign, plan.seeds[0]).pipeline.flow
                               for a in plan.arms)) or [spec.pipeline.flow]
    meta = {"name": spec.name, "description": spec.description.strip(), "metric": spec.metric, "mode": spec.mode,
            "test_metric": spec.test_metric, "factors": plan.factors, "flow": ", ".join(flows),
            "phase_labels": labels, "seeds": plan.seeds,
            "search_alg": spec.search.algorithm, "control": spec.control,
            "shared_prefix": bool(plan.prefixes), "prefix_length": plan.prefix_length,
            "epochs_with_sharing": plan.epochs_with_sharing if plan.arms else None,
            "epochs_without_sharing": plan.epochs_without_sharing if plan.arms else None}
    if spec.search.algorithm == "optuna" and spec.confirm:
        meta["control"] = dict(spec.confirm.control)
        meta["confirm_seeds"] = seeds_by_stage.get(STAGE_CONFIRM)
    write_atomic_text(json.dumps(meta, indent=2, default=str) + "\n", results_dir / "study.json")
    counts: dict[str, int] = {}
    for row in trials:
        if row["stage"] != STAGE_PREFIX:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# command line

def _list_studies() -> None:
    import yaml
    for path in sorted(default_studies_dir().glob("*.yaml")):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        first = " ".join(str(description).split())
        print(f"{path.stem:22s} {first}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dsdtune.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", help="a shipped study name (see --list) or a path to a .yaml file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any field by dotted path, value in YAML (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the shipped studies")
    parser.add_argument("--dry-run", action="store_true", help="print the trial plan without starting Ray")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study from its storage")
    parser.add_argument("--fresh", action="store_true", help="discard the study's previous Ray state and start over")
    parser.add_argument("--address", default=None, help="Ray cluster to join ('auto' or host:port); "
                        "default: start a local Ray instance")
    parser.add_argument("--dashboard-host", default="127.0.0.1", help="dashboard bind address (local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    parser.add_argument("--results", default="results", help="root folder of the results (default: results/)")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = parser.parse_args(argv)
    if not args.list and not args.study:
        parser.error("name a study (see --list)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        _list_studies()
        return 0
    try:
        spec = load_study(args.study, args.set)
        results_dir, ray_storage = check_storage(spec, Path(args.results))
        plan = make_plan(spec)
        check_control(spec)
        if args.dry_run:
            print(describe_plan(spec, plan))
            return 0
        check_gpu(spec, args.address)
        state_dir = Path(ray_storage) if "://" not in ray_storage else None
        if state_dir is not None and state_dir.exists() and any(state_dir.iterdir()) and not (args.resume or args.fresh):
            raise SpecError(f"{results_dir} already holds a run of this study: add --resume to continue it, or "
                            f"--fresh to discard its Ray state and start over")
        prepare_datasets(spec, plan)
    except SpecError as err:
        print(f"dsdtune: {err}", file=sys.stderr)
        return 2
    print(describe_plan(spec, plan), flush=True)
    if args.fresh and state_dir is not None and state_dir.exists():
        shutil.rmtree(state_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ray, owned = _connect(args.address, args.dashboard_host, args.num_cpus)
    try:
        stages: dict[str, list] = {}
        arms = list(plan.arms)
        seeds_by_stage = {STAGE_PREFIX: plan.seeds, STAGE_SWEEP: plan.seeds, STAGE_SEARCH: plan.seeds}
        if spec.search.algorithm == "optuna":
            prefix, search, confirm, best = _optuna_stages(spec, plan, ray_storage, args.resume)
            stages = {STAGE_PREFIX: prefix, STAGE_SEARCH: search, STAGE_CONFIRM: confirm}
            if best is not None:
                arms += confirm_arms(spec, best)
            if spec.confirm:
                seeds_by_stage[STAGE_CONFIRM] = list(range(spec.confirm.first_seed,
                                                           spec.confirm.first_seed + spec.confirm.seeds))
            if best is not None:
                print(f"dsdtune: best config by mean {spec.metric}: {best}", flush=True)
        else:
            prefix, sweep = _grid_stages(spec, plan, plan.arms, ray_storage, args.resume, STAGE_SWEEP, STAGE_PREFIX)
            stages = {STAGE_PREFIX: prefix, STAGE_SWEEP: sweep}
        counts = write_results(results_dir, spec, plan, stages, arms, seeds_by_stage)
    finally:
        if owned:
            ray.shutdown()
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"dsdtune: {spec.name} finished in {time.monotonic() - started:.0f} s: {summary}; "
          f"results in {results_dir}", flush=True)
    if not args.no_report:
        try:
            from .report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            written = write_report(results_dir)
            print(f"dsdtune: report written to {written.get('report.md', results_dir / 'report.md')}")
    return 1 if counts.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
