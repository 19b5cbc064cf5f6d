"""The Ray stages of a study: with the modules only it imports (`callbacks`, `dashboard`, `gates`, `search`),
the only part of `dsdtune.study` that imports Ray.

A grid or random study is one Tuner, `sweep`: every (arm, seed) is a trial. Trials that share a
prefix (e.g. the dense baseline of a seed) wait for it, not for each other: one of them, the
prefix's representative, trains it and stores it in the study's storage on the way, and a small
searcher (`gates.PrefixGate`) releases the others the moment their own prefix is stored. An Optuna
study searches in one Tuner, `search`, the same way: the first trial of each seed trains the seed's
prefix on the way and later suggestions of that seed wait for it (`gates.SearchGate`); then it
re-runs the best config beside its control on fresh seeds in `confirm` (a gated sweep again).

The first Ctrl-C (or SIGTERM) stops launching trials, asks running trials - on every node, through a
key in Ray's GCS (`SignalState.tell_trials`) - to checkpoint at their next epoch end, lets Tune
store its state, and returns; the caller writes partial results. A resumed stage (`--resume`) runs
with this run's settings: max_concurrent, max_failures, the trackers of `--log`, the console.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import time
import uuid
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
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from .. import registry
from ..config import SpecError, StudySpec
from ..trainable import STOP_NAMESPACE, prefix_stored, run_trial
from .callbacks import stage_callbacks
from .dashboard import named_trainable
from .gates import GateGenerator, PrefixGate, SearchGate
from .progress import active_console
from .plan import STAGE_CONFIRM, STAGE_SEARCH, STAGE_SWEEP, Arm, Plan, confirm_arms, plan_for_arms


def connect(address: Optional[str], dashboard_host: str, num_cpus: Optional[int], runtime_env: Optional[dict] = None):
    """Start or join Ray; returns (ray, whether we own the connection and must shut it down).

    `runtime_env` carries a user's model / dataset modules to the workers (`registry.runtime_env`).
    A local instance that does not listen on loopback only is shut down and refused (a SpecError).
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
        check_loopback(ctx)
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


def shutdown() -> None:
    """`ray.shutdown()` of the local instance a study started, without its one-second wait for the
    autoscaler's monitor: Ray stops the GCS before it, and the monitor's SIGTERM handler then tries to
    tell the GCS that it is terminating until Ray kills it after 1 s (ray 2.60: _private/node.py,
    kill_all_processes; autoscaler/_private/monitor.py, _signal_handler). It is killed first here,
    which is where Ray's own shutdown ends for it."""
    node = getattr(ray._private.worker, "_global_node", None)
    from ray._private import ray_constants
    for info in (getattr(node, "all_processes", None) or {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=5)
    ray.shutdown()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name
        return address == "localhost"


def check_loopback(ctx) -> None:
    """The switch above is Ray's private one: check what it did. A local instance whose node address
    is not a loopback one would listen on the network: shut it down and refuse, in one line."""
    addresses = {node.get("NodeManagerAddress") for node in ray.nodes() if node.get("Alive")}
    addresses.add((getattr(ctx, "address_info", None) or {}).get("node_ip_address"))
    exposed = sorted(a for a in addresses if a and not _is_loopback(a))
    if exposed:
        shutdown()
        raise SpecError(f"Ray's local instance took the address {', '.join(exposed)} instead of 127.0.0.1, so its "
                        f"ports would be open to the network (this Ray, {ray.__version__}, ignores the single-machine "
                        f"switch RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); install the Ray dsdtune supports "
                        f"(pip install 'ray[tune,default]>=2.59,<2.61'), or start Ray yourself and pass --address")


def _study_payload(spec: StudySpec, plan: Plan, arms: list[Arm], ray_storage: str, stop_flag: str) -> dict:
    return {"name": spec.name, "base": spec.base_run(),
            "arms": {a.label: a.assign for a in arms}, "seeds": plan.seeds, "metric": spec.metric,
            "mode": spec.mode, "cpus_per_trial": spec.resources.cpu, "gpus_per_trial": spec.resources.gpu,
            "checkpoint_every_s": spec.checkpoint_every_s, "prefix_length": plan.prefix_length,
            "prefix_lengths": dict(plan.arm_prefix_length),
            "prefix_root": prefix_root(ray_storage), "stop_flag": stop_flag,
            "report_every_epoch": spec.scheduler.kind != "none", "registry": registry.worker_payload(),
            "prefix_snapshots": {pid: [list(p) for p in points] for pid, points in plan.prefix_snapshots.items()},
            "model_costs": plan.model_costs}


def prefix_root(ray_storage: str) -> str:
    return f"{ray_storage.rstrip('/')}/prefixes"


class SignalState:
    """First SIGINT/SIGTERM: remember it and stop the running stage cleanly; second: exit at once."""

    def __init__(self, study: str, resume_hint: str):
        self.signum: Optional[int] = None
        self.requested_at = 0.0
        self.resume_hint = resume_hint
        self.flag_name = f"stop-{study}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the trials ask it by name
        self._told = False

    def install(self) -> None:
        """After `ray.init` (which sets a SIGTERM handler of its own): the handlers."""
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
        print(f"dsdtune: {signal.Signals(signum).name} received: stopping after running trials store their "
              f"state (press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def tell_trials(self) -> None:
        """Raise the stop flag that every running trial asks at its epoch ends (from Tune's loop, not
        from the signal handler, which may interrupt Ray's own code): a key in Ray's GCS, which trials
        on every node reach (`trainable.StopRequests`); a process of its own would cost a worker."""
        if not self._told:
            _internal_kv_put(self.flag_name, b"1", namespace=STOP_NAMESPACE)
            self._told = True

    def close(self) -> None:
        if self._told and ray.is_initialized():
            _internal_kv_del(self.flag_name, namespace=STOP_NAMESPACE)
        self._told = False


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
        state.tell_trials()
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


class RestoredTrialSettings(tune.Callback):
    """Tune stores `max_failures` in each trial, and a restored trial keeps the one it was created with:
    this run's applies to every trial of a resumed stage."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures

    def on_step_begin(self, iteration, trials, **info):
        for trial in trials:
            trial.max_failures = self.max_failures


def _restore(path: str, trainable, run_config: tune.RunConfig, tune_config: tune.TuneConfig, max_failures: int):
    """Tune's stage at `path`, resumed (errored trials too) with this run's settings.

    `Tuner.restore` brings back the run and tune configs pickled when the stage started and takes
    none of the settings a resumed study may change (ray 2.60: tune/impl/tuner_internal.py,
    `_restore_from_path_or_uri`); they are set on the restored tuner here: the callbacks (the console,
    the trackers of --log), max_failures (also in each restored trial), and the gate, which holds this
    run's max_concurrent (Tune loads the saved state of the gate and its searcher into it).
    """
    tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    restored = tuner._local_tuner
    restored._run_config.callbacks = list(run_config.callbacks) + [RestoredTrialSettings(max_failures)]
    restored._run_config.failure_config = run_config.failure_config
    restored._run_config.checkpoint_config = run_config.checkpoint_config
    restored._run_config.verbose = run_config.verbose
    restored._tune_config.search_alg = tune_config.search_alg
    restored._tune_config.max_concurrent_trials = None
    return tuner


def _skip_callback_usage_tag() -> None:
    """Tune tags a run's callbacks for Ray's usage statistics by importing the W&B, MLflow, Comet and Aim
    integrations to compare classes (ray 2.60: air/_internal/usage.py, _count_callbacks), and those
    import wandb and mlflow wherever they are installed: 0.8 s of the driver's CPU before any trial
    starts. A study's callbacks are classes of its own (its trackers subclass Ray's), which the tag
    would count as custom ones; it is not recorded."""
    from ray.air._internal import usage
    usage.tag_callbacks = lambda callbacks: False


def _run_tuner(name: str, ray_storage: str, payload: dict, spec: StudySpec, plan: Plan, resume: bool,
               signals: SignalState, *, searcher: Searcher, num_samples: int, tune_extra: Optional[dict] = None):
    global _SIGNALS
    _SIGNALS = signals
    _skip_callback_usage_tag()
    if signals.signum is not None:  # stopped before this stage began
        return []
    keep = max(len(run.pipeline.flow) for run in plan.runs) + 2
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=payload),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    callbacks = [StopOnSignal(), JsonLoggerCallback()]
    console = active_console()
    if console is not None:  # progress display, trial names in the dashboard, trackers (--log)
        trainable = named_trainable(trainable, console.label_of(payload, name))
        callbacks += stage_callbacks(console, name, payload=payload, prefix_length=plan.prefix_length,
                                     param_space={}, tune_extra={"num_samples": num_samples},
                                     planned_epochs=plan.epochs_with_sharing if plan.arms else None)
    run_config = tune.RunConfig(
        name=name, storage_path=ray_storage, verbose=console.ray_verbosity if console else 1, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Keeping fewer checkpoints than a trial writes at its phase ends forces an experiment
        # snapshot at every one of them (Tune deletes old ones only after a snapshot): keep one per
        # phase, plus the interval checkpoints of the phase running.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep))
    tune_config = tune.TuneConfig(search_alg=GateGenerator(searcher), num_samples=num_samples, reuse_actors=True,
                                  **(tune_extra or {}))
    path = f"{ray_storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = _restore(path, trainable, run_config, tune_config, spec.max_failures)
    else:
        tuner = tune.Tuner(trainable, param_space={}, run_config=run_config, tune_config=tune_config)
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
    payload = _study_payload(spec, plan, arms, ray_storage, signals.flag_name)
    trials = sweep_trials(plan, arms)
    gate = PrefixGate(trials, prefix_root(ray_storage), spec.max_concurrent)
    # Tune lets a custom searcher keep one trial pending at a time (for adaptive searchers, which
    # learn from each result); the gate's order is fixed, so queue as many as a grid search would.
    previous = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(16, len(trials)))
    try:
        return _run_tuner(name, ray_storage, payload, spec, plan, resume, signals, searcher=gate,
                          num_samples=len(trials))
    finally:
        if previous is None:
            os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)
        else:
            os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = previous


def unstarted_trials(stage: str, plan: Plan, arms: list[Arm], results: list, ray_storage: str,
                     interrupted: bool) -> list[tuple]:
    """(stage, arm label, seed, status, prefix id) of the sweep's trials that never started: those held
    because their shared prefix diverged or failed (`prefix_diverged` / `prefix_error`, as its
    representative ended), and, in a stopped study, the others (`interrupted`)."""
    root = prefix_root(ray_storage)
    started, failed = set(), {}
    for result in results:
        config, metrics = result.config or {}, result.metrics or {}
        started.add((config.get("arm"), config.get("seed")))
        if config.get("role") == "rep" and config.get("prefix"):
            if result.error is not None:
                failed[config["prefix"]] = "prefix_error"
            elif metrics.get("status") == "diverged":
                failed[config["prefix"]] = "prefix_diverged"
    rows = []
    for trial in sweep_trials(plan, arms):
        if (trial["arm"], trial["seed"]) in started:
            continue
        how = failed.get(trial["prefix"]) if trial["role"] == "dependent" else None
        if how and prefix_stored(root, trial["prefix"]):  # it failed after storing its prefix
            how = None
        if how or interrupted:
            rows.append((stage, trial["arm"], trial["seed"], how or "interrupted", trial["prefix"]))
    return rows


def _results_dir(ray_storage: str) -> Optional[Path]:
    """The results folder (the driver's): Ray's state lies in it, or, remote (a cluster's), elsewhere."""
    if "://" not in ray_storage:
        return Path(ray_storage).parent
    console = active_console()
    return console.results_dir if console is not None else None


def optuna_journal(ray_storage: str) -> Optional[Path]:
    """Where an Optuna search keeps its study: beside Ray's state in the results folder (the driver's)."""
    from .search import JOURNAL
    results_dir = _results_dir(ray_storage)
    return results_dir / JOURNAL if results_dir is not None else None


def confirmed_config(ray_storage: str, best: dict, restoring: bool) -> dict:
    """The config the confirm stage runs: the search's best, stored as the stage starts; a restored stage
    keeps the one it started with (a resumed search, whose errored trials ran again, may now rank another
    first: its trials would continue with another config)."""
    from ..atomic import write_text
    from .state import confirm_file
    results_dir = _results_dir(ray_storage)
    if results_dir is None:
        return best
    path = confirm_file(results_dir)
    if restoring and path.exists():
        started = json.loads(path.read_text())
        if started != best:
            print(f"dsdtune: the confirm stage continues with the config it started with, {started} (the "
                  f"resumed search now ranks {best} first)", flush=True)
        return started
    write_text(path, json.dumps(best, sort_keys=True) + "\n")
    return best


def optuna_stages(spec: StudySpec, plan: Plan, ray_storage: str, resume: bool, signals: SignalState):
    """Optuna TPE (with ASHA if asked) over the space, then the best config and control on fresh seeds.

    Returns {stage: results}, the best config (or None), the confirm stage's seeds and its trials
    that never started (`unstarted_trials`). A study stopped during the search starts no confirm stage.
    """
    from .search import make_searcher, open_journal  # optuna: imported by the studies that use it

    payload = _study_payload(spec, plan, [Arm("base", {}, {})], ray_storage, signals.flag_name)
    # A restored stage loads its searcher's state (and with it the same Optuna study) into this one.
    restoring = resume and tune.Tuner.can_restore(f"{ray_storage.rstrip('/')}/{STAGE_SEARCH}")
    journal = optuna_journal(ray_storage)
    searcher = make_searcher(spec, open_journal(journal, fresh=not restoring) if journal else None)
    gate = SearchGate(searcher, plan.seeds, {seed: pid for pid, (_, seed) in plan.prefixes.items()},
                      payload["prefix_root"], spec.search.num_samples, spec.max_concurrent)
    extra = {"metric": spec.metric, "mode": spec.mode}
    if spec.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler
        total = max(plan.epochs_per_trial.values())
        extra["scheduler"] = ASHAScheduler(time_attr="epoch", max_t=total, grace_period=spec.scheduler.grace_period,
                                           reduction_factor=spec.scheduler.reduction_factor)
    if journal:
        print(f"dsdtune: the search's Optuna study: optuna-dashboard {journal}", flush=True)
    stages = {STAGE_SEARCH: _run_tuner(STAGE_SEARCH, ray_storage, payload, spec, plan, resume, signals,
                                       searcher=gate, num_samples=spec.search.num_samples * len(plan.seeds),
                                       tune_extra=extra)}
    best = best_assignment(stages[STAGE_SEARCH], spec)
    confirm_seeds: list[int] = []
    unstarted: list[tuple] = []
    if spec.confirm and best is not None and signals.signum is None:
        best = confirmed_config(ray_storage, best, resume and tune.Tuner.can_restore(
            f"{ray_storage.rstrip('/')}/{STAGE_CONFIRM}"))
        best_arm, control_arm = confirm_arms(spec, best)
        confirm_seeds = list(range(spec.confirm.first_seed, spec.confirm.first_seed + spec.confirm.seeds))
        confirm_spec = spec.model_copy(update={"seeds": confirm_seeds, "search": spec.search.model_copy(
            update={"algorithm": "grid", "space": {}}), "variants": None})
        confirm_plan = plan_for_arms(confirm_spec, [best_arm, control_arm])
        confirm_plan.model_costs = plan.model_costs
        stages[STAGE_CONFIRM] = sweep_stage(confirm_spec, confirm_plan, [best_arm, control_arm], ray_storage,
                                            resume, signals, name=STAGE_CONFIRM)
        unstarted = unstarted_trials(STAGE_CONFIRM, confirm_plan, [best_arm, control_arm], stages[STAGE_CONFIRM],
                                     ray_storage, signals.signum is not None)
    return stages, best, confirm_seeds, unstarted


def best_assignment(results: list, spec: StudySpec) -> Optional[dict]:
    """The searched config with the best mean validation metric over its completed trials.

    Trials a scheduler stopped early hold an earlier epoch's value: mixing them into a mean would
    compare unlike things, so a config ranks on its completed trials, and only configs without any
    completed trial fall back to (and rank below) their last values. Ties go to the config suggested
    first, and means add up in trial order: a resumed study, whose Tune results come back in another
    order, chooses the same config (its confirm stage continues the trials of that config).
    """
    groups: dict[str, list] = {}
    for r in sorted(results, key=lambda r: str((r.metrics or {}).get("trial_id", ""))):
        if r.error is None and r.metrics and spec.metric in r.metrics:
            groups.setdefault(json.dumps(r.config["assign"], sort_keys=True), []).append(r.metrics)
    if not groups:
        return None
    sign = 1 if spec.mode == "max" else -1

    def score(runs: list[dict]) -> tuple[bool, float]:
        done = [m[spec.metric] for m in runs if m.get("status") == "ok"]
        values = done or [m[spec.metric] for m in runs]
        return bool(done), sign * sum(values) / len(values)

    return json.loads(max(groups, key=lambda k: score(groups[k])))  # the first of equals: suggested first
