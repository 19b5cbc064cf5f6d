"""The console of a running study: one progress display per stage, Ray's own output in a log file.

A stage's display counts trials (done, running, pending, failed), epochs done of the stage's
total, elapsed time and an ETA from the epoch rate so far, and each arm's best validation metric.
On a terminal it is a live `rich` display; otherwise (a pipe, a CI log) one plain line every few
seconds, less often as the stage goes on. Ray's progress tables, its Python logs and the trials'
own output go to `ray.log` in the study's results folder instead (`--verbose` brings them back).

Nothing here imports Ray: `StageProgress` has the hooks of a Tune callback and `callbacks.py`
makes it one; the console hooks Ray's worker-output dispatcher only once Ray runs (`connected`).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, TextIO

PLAIN_INTERVAL_S = 5.0
MAX_ARMS_SHOWN = 12


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_label(study: str, stage: str, config: dict, seeds: Optional[list[int]] = None) -> str:
    """A trial's name for people: `study/arm/seed=N` (`study/<stage>/.../seed=N` outside the sweep).

    The same name is the actor's repr in Ray's dashboard, the MLflow run name and the console's arm.
    """
    return f"{study}/{arm_label(stage, config)}/seed={trial_seed(config, seeds)}"


def arm_label(stage: str, config: dict) -> str:
    if "assign" in config:  # searched: the sampled values are the arm
        arm = ", ".join(f"{k}={_fmt(v)}" for k, v in config["assign"].items()) or "base"
    else:
        arm = str(config.get("arm", "base"))
    return arm if stage == "sweep" else f"{stage}/{arm}"


def trial_seed(config: dict, seeds: Optional[list[int]] = None) -> int:
    if "seed" in config:
        return config["seed"]
    index = config.get("__trial_index__", 0)  # the Repeater's index into the study's seeds
    return seeds[index] if seeds and index < len(seeds) else index


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StageProgress:
    """A stage's counts, rendered live or as plain lines, fed through Tune's callback hooks.

    `epochs_of(config) -> (epoch the trial starts after, epoch it ends at)` comes from the plan, so
    that "epochs done of total" and the ETA count what this stage trains (not a shared prefix).
    """

    def __init__(self, stage: str, *, total_trials: int, epochs_of: Callable[[dict], tuple[int, int]],
                 metric: str, mode: str, arm_of: Callable[[dict], str], out: TextIO = None,
                 live: Optional[bool] = None, interval_s: float = PLAIN_INTERVAL_S,
                 planned_epochs: Optional[int] = None):
        self.stage, self.total_trials, self.epochs_of = stage, total_trials, epochs_of
        self.planned_epochs = planned_epochs  # the plan's count, when it knows it (shared prefixes counted once)
        self.metric, self.mode, self.arm_of = metric, mode, arm_of
        self.out = out or sys.stdout
        self.live_wanted = self.out.isatty() if live is None else live
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._span: dict[str, tuple[int, int]] = {}  # trial id -> (start epoch, end epoch)
        self._epoch: dict[str, int] = {}  # trial id -> last reported epoch
        self._status: dict[str, str] = {}  # trial id -> Tune's status
        self._diverged: set[str] = set()
        self._arm: dict[str, str] = {}
        self._best: dict[str, float] = {}  # arm -> best validation metric so far
        self._arm_trials: dict[str, set[str]] = {}
        self._started = time.monotonic()
        self._last_line = 0.0
        self._live = None
        self._ended = False

    def __getstate__(self):  # Tune pickles its callbacks with the experiment state
        state = dict(self.__dict__)
        state.update(_lock=None, _live=None, out=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock, self.out = threading.Lock(), sys.stdout

    # ---- Tune's hooks (run in the driver's event loop) ----
    def setup(self, **info):
        self._started = time.monotonic()
        if self.live_wanted:
            from rich.console import Console
            from rich.live import Live
            self._live = Live(self, console=Console(file=self.out), refresh_per_second=2, transient=False)
            self._live.start()

    def _track(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._span:
            self._span[tid] = self.epochs_of(trial.config)
            arm = self.arm_of(trial.config)
            self._arm[tid] = arm
            self._arm_trials.setdefault(arm, set()).add(tid)
        return tid

    def on_step_end(self, iteration, trials, **info):
        with self._lock:
            for trial in trials:
                self._status[self._track(trial)] = trial.status
        # Every few seconds at first, then less often: a day-long stage logs a few hundred lines.
        now = time.monotonic()
        interval = min(60.0, max(self.interval_s, (now - self._started) / 12))
        if self._live is None and now - self._last_line >= interval:
            self._print_line()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        with self._lock:
            tid = self._track(trial)
            if "epoch" in result:
                self._epoch[tid] = max(self._epoch.get(tid, 0), int(result["epoch"]))
            if result.get("status") == "diverged":
                self._diverged.add(tid)
            value = result.get(self.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                arm = self._arm[tid]
                best = self._best.get(arm)
                if best is None or (value > best if self.mode == "max" else value < best):
                    self._best[arm] = float(value)

    def on_trial_complete(self, iteration, trials, trial, **info):
        with self._lock:
            self._status[self._track(trial)] = "TERMINATED"

    def on_trial_error(self, iteration, trials, trial, **info):
        with self._lock:
            self._status[self._track(trial)] = "ERROR"

    def on_experiment_end(self, trials, **info):
        with self._lock:
            for trial in trials:
                self._status[self._track(trial)] = trial.status
        self._ended = True
        if self._live is not None:
            self._live.stop()
        else:
            self._print_line()
            for line in self._arm_lines():
                print(f"  {line}", file=self.out, flush=True)

    # ---- the numbers ----
    def counts(self) -> dict:
        with self._lock:
            statuses = list(self._status.values())
            done = sum(s == "TERMINATED" for s in statuses)
            failed = sum(s == "ERROR" for s in statuses)
            running = sum(s == "RUNNING" for s in statuses)
            known = len(statuses)
            total_trials = max(self.total_trials, known)
            epochs_done = sum(max(0, self._epoch.get(t, start) - start) for t, (start, _) in self._span.items())
            planned = [end - start for start, end in self._span.values()]
            mean_planned = sum(planned) / len(planned) if planned else 0.0
            # A finished trial (ended, diverged or stopped by a scheduler) has nothing left to train.
            remaining = sum(max(0, end - self._epoch.get(t, start)) for t, (start, end) in self._span.items()
                            if self._status.get(t) not in ("TERMINATED", "ERROR"))
            if self.planned_epochs is not None:  # trials not created yet train what the plan has left
                remaining += max(0, self.planned_epochs - sum(planned))
            else:
                remaining += (total_trials - known) * mean_planned
            epochs_total = epochs_done + remaining
            diverged = len(self._diverged)
        elapsed = time.monotonic() - self._started
        eta = remaining * elapsed / epochs_done if epochs_done else math.inf
        return {"done": done, "running": running, "pending": total_trials - done - failed - running,
                "failed": failed, "diverged": diverged, "trials": total_trials, "epochs_done": epochs_done,
                "epochs_total": int(round(epochs_total)), "elapsed_s": elapsed, "eta_s": eta if not self._ended else 0.0}

    def arms(self) -> list[tuple[str, int, int, Optional[float]]]:
        """(arm, trials done, trials known, best metric) per arm, best first, at most MAX_ARMS_SHOWN."""
        with self._lock:
            rows = [(arm, sum(self._status.get(t) == "TERMINATED" for t in tids), len(tids), self._best.get(arm))
                    for arm, tids in self._arm_trials.items()]
        sign = -1 if self.mode == "max" else 1
        rows.sort(key=lambda r: (r[3] is None, sign * (r[3] or 0.0)))
        return rows[:MAX_ARMS_SHOWN]

    def summary_line(self) -> str:
        c = self.counts()
        failed = f", {c['failed']} failed" if c["failed"] else ""
        diverged = f" ({c['diverged']} diverged)" if c["diverged"] else ""
        line = (f"dsdtune: {self.stage}: {c['done']}/{c['trials']} trials done{diverged}, {c['running']} running, "
                f"{c['pending']} pending{failed}; epochs {c['epochs_done']}/{c['epochs_total']}; "
                f"{_clock(c['elapsed_s'])} elapsed")
        if not self._ended:
            line += f", ETA {_clock(c['eta_s'])}"
        best = [r for r in self.arms() if r[3] is not None]
        if best:
            line += f"; best {self.metric} {best[0][3]:.4f} ({best[0][0]})"
        return line

    def _arm_lines(self) -> list[str]:
        return [f"{arm}: {done}/{n} done, best {self.metric} " + (f"{best:.4f}" if best is not None else "-")
                for arm, done, n, best in self.arms()]

    def _print_line(self) -> None:
        self._last_line = time.monotonic()
        print(self.summary_line(), file=self.out, flush=True)

    # ---- the live display (rich calls this a few times a second, from its own thread) ----
    def __rich__(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        c = self.counts()
        head = Table.grid(padding=(0, 2))
        head.add_row(f"[bold]{self.stage}[/bold]",
                     ProgressBar(total=max(1, c["epochs_total"]), completed=c["epochs_done"], width=30),
                     f"epochs {c['epochs_done']}/{c['epochs_total']}",
                     f"{_clock(c['elapsed_s'])} elapsed" + ("" if self._ended else f", ETA {_clock(c['eta_s'])}"))
        trials = (f"trials: {c['done']} done" + (f" ({c['diverged']} diverged)" if c["diverged"] else "")
                  + f", {c['running']} running, {c['pending']} pending, {c['failed']} failed")
        table = Table(box=None, padding=(0, 2), show_edge=False)
        table.add_column("arm")
        table.add_column("trials done", justify="right")
        table.add_column(f"best {self.metric}", justify="right")
        for arm, done, n, best in self.arms():
            table.add_row(arm, f"{done}/{n}", f"{best:.4f}" if best is not None else "-")
        return Group(head, trials, table)


class RayLogFile:
    """Ray's Python logs, its warnings and the trials' stdout/stderr, appended to one file."""

    def __init__(self, path: Path, loggers: tuple[str, ...] = ("ray",)):
        self.path, self.loggers = path, loggers
        self._stream = None
        self._handler = None
        self._saved_handlers: list = []
        self._saved_showwarning = None
        self._dispatcher = self._printer = None

    def open(self) -> None:
        # Ray installs its console handler when imported (the command line imports run.py first);
        # it is replaced here.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.path, "a", buffering=1)
        self._handler = logging.StreamHandler(self._stream)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._saved_handlers = {}
        for name in self.loggers:  # Ray's (and a tracker's) console handlers, replaced by the file
            logger = logging.getLogger(name)
            self._saved_handlers[name] = (list(logger.handlers), logger.propagate)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.addHandler(self._handler)
            logger.propagate = False
        self._saved_showwarning = warnings.showwarning
        warnings.showwarning = self._showwarning

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        path = str(filename).replace("\\", "/")
        if any(f"/{name}/" in path for name in self.loggers + ("sqlalchemy", "tensorboardX", "optuna")):
            self._stream.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            self._saved_showwarning(message, category, filename, lineno, file, line)

    def capture_worker_output(self) -> bool:
        """Send the trials' forwarded stdout/stderr here instead of the console (after `ray.init`)."""
        try:  # Ray's driver-side dispatcher of worker output; absent in other Ray versions
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return False
        original = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
        if not original:
            return False
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", self._worker_lines)
        self._dispatcher, self._printer = dispatcher, original[0]
        return True

    def _worker_lines(self, data: dict) -> None:
        where = data.get("actor_name") or data.get("task_name") or "worker"
        for line in data.get("lines", []):
            self._stream.write(f"({where} pid={data.get('pid')}) {line}\n")

    def close(self) -> None:
        if self._handler is None:
            return
        for name, (handlers, propagate) in self._saved_handlers.items():
            logger = logging.getLogger(name)
            logger.removeHandler(self._handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate
        warnings.showwarning = self._saved_showwarning
        if self._dispatcher is not None:  # the trials' output back to the console (a notebook goes on)
            self._dispatcher.remove_handler("ray_print_logs")
            self._dispatcher.add_handler("ray_print_logs", self._printer)
            self._dispatcher = None
        self._handler = None
        self._stream.close()


_ACTIVE: Optional["StudyConsole"] = None


def _assignment(payload: dict, config: dict) -> dict:
    """A trial's dotted-path values: its arm's (by label) or the searched ones."""
    if "arm" in config:
        return payload["arms"][config["arm"]]
    return config.get("assign", {})


def _run_of(payload: dict, config: dict):
    from ..config import build_run_spec
    assign = _assignment(payload, config)
    return assign, build_run_spec(payload["base"], assign, trial_seed(config, payload["seeds"]))


def active_console() -> Optional["StudyConsole"]:
    """The console of the study being run (set by the command line), or None (e.g. a notebook)."""
    return _ACTIVE


class StudyConsole:
    """How a study talks while it runs: Ray's verbosity and log file, and each stage's callbacks.

    `with StudyConsole(...)` routes Ray's output to `ray.log` (unless verbose) and makes the console
    the one `run.py` hands to every stage.
    """

    def __init__(self, spec, results_dir: Path, *, verbose: bool = False, log: tuple[str, ...] = (),
                 factors_by_label: Optional[dict[str, dict]] = None, out: TextIO = None):
        self.spec, self.results_dir, self.verbose, self.log = spec, Path(results_dir), verbose, tuple(log)
        self.factors_by_label = factors_by_label or {}
        self.out = out or sys.stdout
        # The Python loggers that also go to the file: Ray's, the trackers', Optuna's.
        trackers = {"mlflow": ("mlflow", "alembic"), "wandb": ("wandb",)}
        loggers = ("ray",) + sum((trackers.get(choice, ()) for choice in self.log), ())
        if spec.search.algorithm == "optuna":
            loggers += ("optuna",)
        self.log_file = RayLogFile(self.results_dir / "ray.log", loggers)

    @property
    def ray_verbosity(self) -> int:
        return 1 if self.verbose else 0

    def __enter__(self):
        global _ACTIVE
        if not self.verbose:
            # Tune's newer console output prints its experiment banner even at verbose=0; the
            # classic reporter is silent at 0.
            self._saved_output_env = os.environ.get("RAY_AIR_NEW_OUTPUT")
            os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
            # These install their console handlers on import; ours replace them.
            if "mlflow" in self.log:
                import mlflow  # noqa: F401
            if "optuna" in self.log_file.loggers:
                import optuna  # noqa: F401
            self.log_file.open()
            print(f"dsdtune: Ray's own output goes to {self.log_file.path} (--verbose shows it here)",
                  file=self.out, flush=True)
        _ACTIVE = self
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        _ACTIVE = None
        self.log_file.close()
        if not self.verbose:
            if self._saved_output_env is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = self._saved_output_env
        return False

    def connected(self) -> None:
        """After `ray.init`: the trials' forwarded output goes to the log file too."""
        if not self.verbose:
            self.log_file.capture_worker_output()

    # ---- per stage (the closures below go into Tune's pickled state: they hold nothing of self) ----
    def epochs_of(self, payload: dict, stage: str, prefix_length: int):
        from ..phases import expand_phases
        cache: dict[str, tuple[int, int]] = {}
        lengths = payload.get("prefix_lengths", {})  # per arm: the leading phases it shares

        def span(config: dict) -> tuple[int, int]:
            import json
            key = json.dumps({k: v for k, v in config.items() if k != "__trial_index__"}, sort_keys=True, default=str)
            if key not in cache:
                _, run = _run_of(payload, config)
                epochs = [p.epochs for p in expand_phases(run.pipeline, run.init)]
                shared = lengths.get(config.get("arm"), prefix_length)
                restored = config.get("role") == "dependent" and shared > 0  # it starts from its stored prefix
                cache[key] = (sum(epochs[:shared]) if restored else 0, sum(epochs))
            return cache[key]
        return span

    def params_of(self, payload: dict, stage: str):
        study, factors_by_label = self.spec.name, dict(self.factors_by_label)

        def params(config: dict) -> dict:
            values: dict = {"study": study, "stage": stage, "seed": trial_seed(config, payload["seeds"])}
            if config.get("prefix"):
                values["prefix_id"] = config["prefix"]
            assign = _assignment(payload, config)
            values.update(factors_by_label.get(config.get("arm"), {}))
            values.update(assign)
            if "arm" in config:
                values["arm"] = config["arm"]
            return values
        return params

    def label_of(self, payload: dict, stage: str):
        study, seeds = self.spec.name, list(payload["seeds"])  # shipped to the trials: nothing of self
        return lambda config: trial_label(study, stage, config, seeds)
