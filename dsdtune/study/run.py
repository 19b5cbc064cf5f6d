"""The Ray stages of a study (the only module of `dsdtune.study` that imports Ray).

A grid or random study is one Tuner, `sweep`: every (arm, seed) is a trial. Trials that share a
prefix (e.g. the dense baseline of a seed) wait for it, not for each other: one of them, the
prefix's representative, trains it and stores it in the study's storage on the way, and a small
searcher (`PrefixGate`) releases the others the moment their own prefix is stored. An Optuna study
trains its prefixes in a stage `prefix`, searches in `search`, and re-runs the best config beside
its control on fresh seeds in `confirm` (a gated sweep again).

The first Ctrl-C (or SIGTERM) stops launching trials, asks running trials to checkpoint at their
next epoch end, lets Tune store its state, and returns; the caller writes partial results.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray starts: its ports ask for a token
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # signals are ours (see SignalState)
# Tune's default loggers write every result three times (JSON, CSV, TensorBoard); the JSON one is
# what the result tables are read from, so it is the one a study adds (see _run_tuner).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# ray.shutdown() at times waits out the driver's metrics report interval (its log: "Destructing
# CoreWorkerProcessImpl", then "Stats module has shutdown" one interval later): 10 s with Ray's
# default, in one driver of ten on a test machine (25 of 265). Ray's processes report every 2 s instead.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.logger import JsonLoggerCallback  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from .. import registry
from ..config import StudySpec
from ..trainable import prefix_stored, run_trial
from .progress import active_console
from .plan import STAGE_CONFIRM, STAGE_PREFIX, STAGE_SEARCH, STAGE_SWEEP, Arm, Plan, confirm_arms, plan_for_arms



def connect(address: Optional[str], dashboard_host: str, num_cpus: Optional[int], runtime_env: Optional[dict] = None):
    """Start or join Ray; returns (ray, whether we own the connection and must shut it down).

    `runtime_env` carries a user's model / dataset modules to the workers (`registry.runtime_env`).
    """
    if ray.is_initialized():  # called from a notebook or a test that already connected
        return ray, False
    if not address:
        # Ray's single-machine mode: its node address becomes 127.0.0.1, so every port a local study
        # opens (GCS, raylet, workers, dashboard agent, metrics) is bound to loopback, not to the network.
        # Ray reads the switch from the environment (its child processes) and from this constant.
        from ray._private import ray_constants
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        ctx = ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        ctx = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                       dashboard_host=dashboard_host, runtime_env=runtime_env)
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


def _study_payload(spec: StudySpec, plan: Plan, arms: list[Arm], ray_storage: str, stop_file: str) -> dict:
    return {"name": spec.name, "base": spec.base_run(),
            "arms": {a.label: a.assign for a in arms}, "seeds": plan.seeds, "metric": spec.metric,
            "mode": spec.mode, "cpus_per_trial": spec.resources.cpu, "gpus_per_trial": spec.resources.gpu,
            "checkpoint_every_s": spec.checkpoint_every_s, "prefix_length": plan.prefix_length,
            "prefix_lengths": dict(plan.arm_prefix_length),
            "prefix_root": prefix_root(ray_storage), "stop_file": stop_file,
            "report_every_epoch": spec.scheduler.kind != "none", "registry": registry.worker_payload(),
            "prefix_snapshots": {pid: [list(p) for p in points] for pid, points in plan.prefix_snapshots.items()},
            "model_costs": plan.model_costs}


def prefix_root(ray_storage: str) -> str:
    return f"{ray_storage.rstrip('/')}/prefixes"


class SignalState:
    """First SIGINT/SIGTERM: remember it and stop the running stage cleanly; second: exit at once."""

    def __init__(self, stop_file: Path, resume_hint: str):
        self.signum: Optional[int] = None
        self.requested_at = 0.0
        self.stop_file = stop_file
        self.resume_hint = resume_hint

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        # Tune's own stop signal; a no-op outside a stage, so that a stray one cannot end the process.
        signal.signal(signal.SIGUSR1, lambda *_: None)

    def _handle(self, signum, frame) -> None:
        import sys
        if self.signum is not None:
            print(f"dsdtune: stopped at once; what trials had stored is kept. {self.resume_hint}",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum, self.requested_at = signum, time.monotonic()
        try:  # running trials checkpoint at their next epoch end when they see this file
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.write_text(str(os.getpid()))
        except OSError:
            pass
        print(f"dsdtune: {signal.Signals(signum).name} received: stopping after running trials store their "
              f"state (press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def clear_stop_file(self) -> None:
        self.stop_file.unlink(missing_ok=True)


_SIGNALS: Optional[SignalState] = None  # the live one; Tune pickles its callbacks, so they look it up here


class StopOnSignal(tune.Callback):
    """Ends a stage once running trials have checkpointed after a stop request (or after a grace time)."""

    grace_s = 20.0

    def __init__(self):
        self.waiting: Optional[set] = None
        self.sent = False

    def on_step_end(self, iteration, trials, **info):
        state = _SIGNALS
        if state is None or state.signum is None or self.sent:
            return
        if self.waiting is None:
            self.waiting = {t.trial_id for t in trials if t.status == "RUNNING"}
        if not self.waiting or time.monotonic() - state.requested_at > self.grace_s:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own way to end a run, storing its state

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.waiting is not None:
            self.waiting.discard(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.waiting is not None:
            self.waiting.discard(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)


class PrefixGate(Searcher):
    """Releases (arm, seed) trials as soon as their own shared prefix is stored.

    Representatives (one trial per prefix) and trials without a shared prefix go first; a trial
    whose prefix diverged or failed is released with `prefix_status` set, and ends at once.
    """

    def __init__(self, trials: list[dict], root: str):
        super().__init__()
        self.queue = sorted(trials, key=lambda t: (t["role"] != "rep", t["role"] != "solo"))
        self.root = root
        self.stored: set[str] = set()
        self.failed: dict[str, str] = {}
        self.rep_trial: dict[str, str] = {}  # Tune trial id -> the prefix id it trains

    def set_search_properties(self, metric, mode, config, **spec):
        return True

    def _status(self, pid: str) -> Optional[str]:
        if pid in self.failed:
            return self.failed[pid]
        if pid not in self.stored and prefix_stored(self.root, pid):  # e.g. stored just before a resume
            self.stored.add(pid)
        return "stored" if pid in self.stored else None

    def suggest(self, trial_id):
        for i, trial in enumerate(self.queue):
            config = dict(trial)
            if trial["role"] == "dependent":
                status = self._status(trial["prefix"])
                if status is None:
                    continue
                config["prefix_status"] = None if status == "stored" else status
            del self.queue[i]
            if trial["role"] == "rep":
                self.rep_trial[trial_id] = trial["prefix"]
            return config
        return Searcher.FINISHED if not self.queue else None

    def on_trial_result(self, trial_id, result):
        if result.get("prefix_stored"):
            self.stored.add(result["prefix_stored"])

    def on_trial_complete(self, trial_id, result=None, error=False):
        pid = self.rep_trial.get(trial_id)
        if pid is None or self._status(pid) == "stored":
            return
        diverged = not error and bool(result) and result.get("status") == "diverged"
        self.failed[pid] = "prefix_diverged" if diverged else "prefix_error"

    def save(self, checkpoint_path):
        with open(checkpoint_path, "wb") as handle:
            pickle.dump({k: getattr(self, k) for k in ("queue", "root", "stored", "failed", "rep_trial")}, handle)

    def restore(self, checkpoint_path):
        with open(checkpoint_path, "rb") as handle:
            for key, value in pickle.load(handle).items():
                setattr(self, key, value)


def _run_tuner(name: str, ray_storage: str, payload: dict, spec: StudySpec, plan: Plan, resume: bool,
               signals: SignalState, *, param_space: Optional[dict] = None, tune_config: Optional[dict] = None,
               stop_after_prefix=False):
    global _SIGNALS
    _SIGNALS = signals
    if signals.signum is not None:  # stopped before this stage began
        return []
    keep = max(len(run.pipeline.flow) for run in plan.runs) + 2
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, study=payload, stop_after_prefix=stop_after_prefix),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    callbacks = [StopOnSignal(), JsonLoggerCallback()]
    console = active_console()
    if console is not None:  # progress display, trial names in the dashboard, trackers (--log)
        trainable = console.name_trials(trainable, name, payload)
        callbacks += console.callbacks(name, name, payload=payload, prefix_length=plan.prefix_length,
                                       param_space=param_space or {}, tune_extra=tune_config,
                                       planned_epochs=plan.epochs_with_sharing if plan.arms else None)
    path = f"{ray_storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=param_space)
    else:
        run_config = tune.RunConfig(
            name=name, storage_path=ray_storage, verbose=console.ray_verbosity if console else 1, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Keeping fewer checkpoints than a trial writes at its phase ends forces an experiment
            # snapshot at every one of them (Tune deletes old ones only after a snapshot): keep one per
            # phase, plus the interval checkpoints of the phase running.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep))
        tuner = tune.Tuner(trainable, param_space=param_space or {}, run_config=run_config,
                           tune_config=tune.TuneConfig(reuse_actors=True,
                                                       max_concurrent_trials=spec.max_concurrent or None,
                                                       **(tune_config or {})))
    return list(tuner.fit())


def sweep_trials(plan: Plan, arms: list[Arm]) -> list[dict]:
    """Every (arm, seed) of a sweep with its role: rep (trains and stores its prefix), dependent, solo."""
    reps = {tuple(v): pid for pid, v in plan.prefixes.items()}
    trials = []
    for arm in arms:
        for seed in plan.seeds:
            pid = plan.trial_prefix.get((arm.label, seed), "")
            role = "rep" if (arm.label, seed) in reps else ("dependent" if pid in plan.prefixes else "solo")
            trials.append({"arm": arm.label, "seed": seed, "role": role, "prefix": pid if role != "solo" else ""})
    return trials


def sweep_stage(spec: StudySpec, plan: Plan, arms: list[Arm], ray_storage: str, resume: bool, signals: SignalState,
                name: str = STAGE_SWEEP) -> list:
    """Every arm x seed in one Tuner; trials wait only for their own shared prefix."""
    payload = _study_payload(spec, plan, arms, ray_storage, str(signals.stop_file))
    trials = sweep_trials(plan, arms)
    gate = PrefixGate(trials, prefix_root(ray_storage))
    # Tune lets a custom searcher keep one trial pending at a time (for adaptive searchers, which
    # learn from each result); the gate's order is fixed, so queue as many as a grid search would.
    previous = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(16, len(trials)))
    try:
        return _run_tuner(name, ray_storage, payload, spec, plan, resume, signals,
                          tune_config={"search_alg": gate, "num_samples": len(trials)})
    finally:
        if previous is None:
            os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)
        else:
            os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = previous


def _prefix_stage(spec: StudySpec, plan: Plan, ray_storage: str, resume: bool, signals: SignalState) -> list:
    """Optuna studies: train each shared prefix once, before the search starts."""
    if not plan.prefixes:
        return []
    from ray import tune
    payload = _study_payload(spec, plan, [Arm("base", {}, {})], ray_storage, str(signals.stop_file))
    space = {"arm": "base", "role": "rep", "seed": tune.grid_search([seed for _, seed in plan.prefixes.values()]),
             "prefix": ""}
    return _run_tuner(STAGE_PREFIX, ray_storage, payload, spec, plan, resume, signals, param_space=space,
                      stop_after_prefix=True)


def optuna_stages(spec: StudySpec, plan: Plan, ray_storage: str, resume: bool, signals: SignalState):
    """Optuna TPE (with ASHA if asked) over the space, then the best config and control on fresh seeds.

    Returns {stage: results}, the best config (or None) and the confirm stage's seeds.
    """
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
    stages = {STAGE_PREFIX: _prefix_stage(spec, plan, ray_storage, resume, signals)}
    payload = _study_payload(spec, plan, [Arm("base", {}, {})], ray_storage, str(signals.stop_file))
    prefix_of_seed = {seed: pid for pid, (_, seed) in plan.prefixes.items()}
    for result in stages[STAGE_PREFIX]:  # search trials of a failed prefix end at once, marked so
        pid = prefix_of_seed.get((result.config or {}).get("seed"))
        if pid and not prefix_stored(payload["prefix_root"], pid):
            diverged = result.error is None and (result.metrics or {}).get("status") == "diverged"
            payload.setdefault("failed_prefixes", {})[pid] = "prefix_diverged" if diverged else "prefix_error"
    searcher = OptunaSearch(metric=spec.metric, mode=spec.mode,
                            sampler=optuna.samplers.TPESampler(seed=spec.search.seed))
    param_space = {"assign": space, "role": "dependent" if plan.prefixes else "solo"}
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
    stages[STAGE_SEARCH] = _run_tuner(STAGE_SEARCH, ray_storage, payload, spec, plan, resume, signals,
                                      param_space=param_space, tune_config=extra)
    best = best_assignment(stages[STAGE_SEARCH], spec)
    confirm_seeds: list[int] = []
    if spec.confirm and best is not None:
        best_arm, control_arm = confirm_arms(spec, best)
        confirm_seeds = list(range(spec.confirm.first_seed, spec.confirm.first_seed + spec.confirm.seeds))
        confirm_spec = spec.model_copy(update={"seeds": confirm_seeds, "search": spec.search.model_copy(
            update={"algorithm": "grid", "space": {}}), "variants": None})
        confirm_plan = plan_for_arms(confirm_spec, [best_arm, control_arm])
        confirm_plan.model_costs = plan.model_costs
        stages[STAGE_CONFIRM] = sweep_stage(confirm_spec, confirm_plan, [best_arm, control_arm], ray_storage,
                                            resume, signals, name=STAGE_CONFIRM)
    return stages, best, confirm_seeds


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


