"""The Ray stages of a study (the only module of `dsdtune.study` that imports Ray).

A study runs in stages, each a Tuner in the study's storage: `prefix` trains every shared prefix
once (e.g. the dense baseline per seed), `sweep` (grid/random) or `search` (Optuna) runs the arms
from those prefixes, and for searches `confirm` re-runs the best config on fresh seeds beside the
control.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..config import StudySpec
from .plan import Arm, Plan, confirm_arms, plan_for_arms

STAGE_PREFIX, STAGE_SWEEP, STAGE_SEARCH, STAGE_CONFIRM = "prefix", "sweep", "search", "confirm"



def connect(address: Optional[str], dashboard_host: str, num_cpus: Optional[int]):
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
    from ..trainable import run_trial
    from .progress import active_console
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, study=payload, prefix_length=prefix_length, prefixes=prefixes, stage=stage),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    console = active_console()
    if console is not None:
        trainable = console.name_trials(trainable, stage, payload)
        callbacks = console.callbacks(name, stage, payload=payload, prefix_length=prefix_length, prefixes=prefixes,
                                      param_space=param_space, tune_extra=tune_extra)
    path = f"{ray_storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=param_space)
    else:
        tune_config = tune.TuneConfig(reuse_actors=True, max_concurrent_trials=spec.max_concurrent or None,
                                      **(tune_extra or {}))
        run_config = tune.RunConfig(
            name=name, storage_path=ray_storage, verbose=console.ray_verbosity if console else 1,
            callbacks=callbacks if console else None,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=_checkpoints_to_keep(payload)))
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    print(f"dsdtune: stage '{name}'", flush=True)
    return tuner.fit()


def _checkpoints_to_keep(payload: dict) -> int:
    """One checkpoint per phase end, plus the latest timed one.

    Tune snapshots the experiment state as soon as a trial has saved `num_to_keep` checkpoints since
    the last snapshot (so the state never points at a deleted one); with 2, a trial of a DSD flow
    forced a snapshot at nearly every phase end - the "snapshotting may become a bottleneck"
    warnings. Keeping as many as a trial writes at its phase ends leaves the regular snapshot period
    to do it, and still bounds the disk a trial uses.
    """
    from ..config import build_run_spec
    phases = max(len(build_run_spec(payload["base"], assign, payload["seeds"][0]).pipeline.flow)
                 for assign in payload["arms"].values())
    return phases + 1


def grid_stages(spec: StudySpec, plan: Plan, arms: list[Arm], ray_storage: str, resume: bool,
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


def optuna_stages(spec: StudySpec, plan: Plan, ray_storage: str, resume: bool):
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
        confirm_prefix, confirm = grid_stages(confirm_spec, confirm_plan, [best_arm, control_arm], ray_storage,
                                               resume, STAGE_CONFIRM, "confirm-prefix")
    return prefix_results + confirm_prefix, search, confirm, best



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


