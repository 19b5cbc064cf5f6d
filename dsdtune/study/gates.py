"""Searchers that release a stage's trials as their shared prefixes are stored (a Ray module: `run.py`
imports it).

Trials that share a prefix (the leading phases of one task, init and seed) wait for it, not for each
other: one of them, the prefix's representative (`role: rep`), trains it and stores it in the
study's storage on the way, and the trials that start from it (`dependent`) are released the moment
it is stored; trials that share nothing are `solo`.

- `PrefixGate`: the fixed (arm, seed) trials of a sweep (grid, random, an Optuna study's confirm).
- `SearchGate`: an adaptive searcher's suggestions (Optuna), each run on every seed; a seed's first
  trial trains the seed's prefix, and its later trials wait for it.

A prefix whose representative diverged or failed releases none of its trials: in a sweep they never
start and the results list them as `prefix_diverged` / `prefix_error` (`run.unstarted_trials`); a
search drops the seed. When Tune restores a stage (`--resume`), it resumes the failed
representative, which trains the prefix again, and the trials that waited for it run; a diverged
prefix stays diverged (it would diverge again). `GateGenerator` is what lets a restored stage ask its
gate again.

A gate also holds `max_concurrent`: it counts the trials it released that have not ended, restored
ones included (Tune's `ConcurrencyLimiter` forgets the running trials of a stage restored without
it), and it is this run's value, not the one the stage started with (a resume may change it).
"""
from __future__ import annotations

import math
import pickle
from typing import Optional

from ray.tune.search import SearchGenerator, Searcher

from ..trainable import prefix_stored

STORED, TRAINING, UNTRAINED = "stored", "training", "untrained"
FAILED = ("prefix_diverged", "prefix_error")


class Prefixes:
    """What a gate knows of each shared prefix: stored, being trained (by which trial), or failed (how)."""

    def __init__(self, root: str):
        self.root = root
        self.stored: set[str] = set()
        self.failed: dict[str, str] = {}  # prefix id -> prefix_diverged | prefix_error
        self.training: set[str] = set()
        self.rep: dict[str, str] = {}  # prefix id -> the Tune trial id of its (last) representative
        self.checked: set[str] = set()  # looked for in the storage in this session

    def status(self, pid: str) -> str:
        if pid in self.stored:
            return STORED
        if pid not in self.checked:  # stored before this session began (before a resume): look once
            self.checked.add(pid)
            if prefix_stored(self.root, pid):
                self.stored.add(pid)
                self.training.discard(pid)
                self.failed.pop(pid, None)
                return STORED
        if pid in self.failed:
            return self.failed[pid]
        return TRAINING if pid in self.training else UNTRAINED

    def train(self, pid: str, trial_id: str) -> None:
        self.rep[pid] = trial_id
        self.training.add(pid)

    def on_result(self, result: Optional[dict]) -> None:
        pid = (result or {}).get("prefix_stored")
        if pid:
            self.stored.add(pid)
            self.training.discard(pid)

    def on_complete(self, trial_id: str, result: Optional[dict], error: bool, stopped_fails: bool) -> None:
        """A trial ended: if it was training a prefix that is not stored, the prefix failed (or, if a
        scheduler stopped the trial first and `stopped_fails` is false, is free to be trained again)."""
        self.on_result(result)
        for pid in [p for p in self.training if self.rep.get(p) == trial_id]:
            self.training.discard(pid)
            if prefix_stored(self.root, pid):
                self.stored.add(pid)
            elif error:
                self.failed[pid] = "prefix_error"
            elif (result or {}).get("status") == "diverged":
                self.failed[pid] = "prefix_diverged"
            elif stopped_fails:
                self.failed[pid] = "prefix_error"

    def after_restore(self) -> None:
        """Tune resumes the errored representatives (`resume_errored`): their prefixes are being trained
        again, by the same trials. The storage is looked at again (a prefix may have been stored after the
        last snapshot)."""
        for pid, how in list(self.failed.items()):
            if how == "prefix_error":
                del self.failed[pid]
                self.training.add(pid)
        self.checked.clear()


class Running:
    """The trials a gate released that have not ended (what max_concurrent counts)."""

    def __init__(self):
        self.live: set[str] = set()
        self.errored: set[str] = set()

    def full(self, max_concurrent: int) -> bool:
        return bool(max_concurrent) and len(self.live) >= max_concurrent

    def ended(self, trial_id: str, error: bool) -> None:
        self.live.discard(trial_id)
        if error:
            self.errored.add(trial_id)

    def after_restore(self) -> None:
        """Tune resumes the errored trials of a restored stage (`resume_errored`): they run again."""
        self.live |= self.errored
        self.errored.clear()


class PrefixGate(Searcher):
    """Releases a sweep's (arm, seed) trials: representatives and solo trials first, each dependent as
    soon as its own prefix is stored; the dependents of a failed prefix are held (never started)."""

    def __init__(self, trials: list[dict], root: str, max_concurrent: int = 0):
        super().__init__()
        self.queue = sorted(trials, key=lambda t: (t["role"] != "rep", t["role"] != "solo"))
        self.prefixes = Prefixes(root)
        self.running = Running()
        self.max_concurrent = max_concurrent

    def set_search_properties(self, metric, mode, config, **spec):
        return True

    def suggest(self, trial_id):
        if self.running.full(self.max_concurrent):
            return None
        waiting = False
        for i, trial in enumerate(self.queue):
            if trial["role"] == "dependent":
                status = self.prefixes.status(trial["prefix"])
                if status in FAILED:
                    continue
                if status != STORED:
                    waiting = True
                    continue
            del self.queue[i]
            if trial["role"] == "rep":
                self.prefixes.train(trial["prefix"], trial_id)
            self.running.live.add(trial_id)
            return dict(trial)
        # Nothing to release now: the rest waits for a prefix being trained, or for one that failed.
        return None if waiting else Searcher.FINISHED

    def held(self) -> list[dict]:
        """The trials held because their prefix failed."""
        return [t for t in self.queue if t["role"] == "dependent" and self.prefixes.status(t["prefix"]) in FAILED]

    def on_trial_result(self, trial_id, result):
        self.prefixes.on_result(result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.prefixes.on_complete(trial_id, result, error, stopped_fails=True)
        self.running.ended(trial_id, error)

    def save(self, checkpoint_path):
        with open(checkpoint_path, "wb") as handle:
            pickle.dump({"queue": self.queue, "prefixes": self.prefixes, "running": self.running}, handle)

    def restore(self, checkpoint_path):
        with open(checkpoint_path, "rb") as handle:
            state = pickle.load(handle)
        self.queue, self.prefixes, self.running = state["queue"], state["prefixes"], state["running"]
        self.prefixes.after_restore()
        self.running.after_restore()


class SearchGate(Searcher):
    """An adaptive searcher's suggestions, each run once per seed, released as the seed's prefix is stored.

    A new suggestion is asked for only when one of its seeds can start now, so the searcher learns
    from every trial that ended before. The inner searcher sees one trial per suggestion: with one
    seed, that trial's reports (its intermediate values); with several, the mean of the seeds' final
    metrics, as Tune's `Repeater` gives it. A seed whose prefix diverged or failed drops out: later
    suggestions run on the other seeds, and the search ends when none is left.
    """

    def __init__(self, searcher: Searcher, seeds: list[int], prefix_of_seed: dict[int, str], root: str,
                 num_samples: int, max_concurrent: int = 0):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.max_concurrent = max_concurrent
        self.running = Running()
        self.seeds = list(seeds)
        self.prefix_of_seed = dict(prefix_of_seed)
        self.num_samples = num_samples
        self.prefixes = Prefixes(root)
        # one per suggestion: its id (the Tune id of its first trial, which the inner searcher knows it
        # by), the config, the seeds still to start, and the trials started -> their score once ended
        self.groups: list[dict] = []
        self.group_of: dict[str, int] = {}

    def set_search_properties(self, metric, mode, config, **spec):
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def _role(self, seed: int) -> Optional[str]:
        """How a trial of `seed` would start now: rep, dependent, solo; None: wait; 'drop': its prefix failed."""
        pid = self.prefix_of_seed.get(seed)
        if not pid:
            return "solo"
        status = self.prefixes.status(pid)
        return {STORED: "dependent", UNTRAINED: "rep", TRAINING: None}.get(status, "drop")

    def _start(self, index: int, trial_id: str) -> Optional[dict]:
        group = self.groups[index]
        for seed in list(group["todo"]):
            role = self._role(seed)
            if role == "drop":
                group["todo"].remove(seed)
            elif role is not None:
                group["todo"].remove(seed)
                if role == "rep":
                    self.prefixes.train(self.prefix_of_seed[seed], trial_id)
                group["trials"][trial_id] = None
                self.group_of[trial_id] = index
                self.running.live.add(trial_id)
                return {**group["config"], "seed": seed, "role": role}
        self._tell_if_done(group)
        return None

    def suggest(self, trial_id):
        if self.running.full(self.max_concurrent):
            return None
        for index, group in enumerate(self.groups):
            if group["todo"]:
                config = self._start(index, trial_id)
                if config is not None:
                    return config
        waiting = any(group["todo"] for group in self.groups)
        roles = {seed: self._role(seed) for seed in self.seeds}
        live = [seed for seed in self.seeds if roles[seed] != "drop"]
        if len(self.groups) >= self.num_samples or not live:
            return None if waiting else Searcher.FINISHED
        if not any(roles[seed] for seed in live):
            return None  # every seed waits for its prefix
        config = self.searcher.suggest(trial_id)
        if config is None:
            return None
        if config == Searcher.FINISHED:
            return None if waiting else Searcher.FINISHED
        self.groups.append({"id": trial_id, "config": config, "todo": live, "trials": {}, "told": False})
        return self._start(len(self.groups) - 1, trial_id)

    def on_trial_result(self, trial_id, result):
        self.prefixes.on_result(result)
        if len(self.seeds) == 1 and trial_id in self.group_of:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.prefixes.on_complete(trial_id, result, error, stopped_fails=False)
        self.running.ended(trial_id, error)
        index = self.group_of.get(trial_id)
        if index is None:
            return
        group = self.groups[index]
        value = (result or {}).get(self.metric)
        group["trials"][trial_id] = float(value) if isinstance(value, (int, float)) and not error else math.nan
        if len(self.seeds) == 1:  # the inner searcher sees the trial itself
            if not group["told"]:
                group["told"] = True
                self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        self._tell_if_done(group)

    def _tell_if_done(self, group: dict) -> None:
        group["todo"] = [seed for seed in group["todo"] if self._role(seed) != "drop"]
        scores = list(group["trials"].values())
        if group["told"] or group["todo"] or not scores or any(s is None for s in scores):
            return
        group["told"] = True
        finite = [s for s in scores if not math.isnan(s)]
        mean = sum(finite) / len(finite) if finite else math.nan
        self.searcher.on_trial_complete(group["id"], result={self.metric: mean})

    # Tune saves a wrapping searcher's state (get_state) beside the inner searcher's own (save);
    # max_concurrent is this run's setting, not saved state.
    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("searcher", "max_concurrent")}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)
        self.prefixes.after_restore()
        self.running.after_restore()


class GateGenerator(SearchGenerator):
    """Tune's `SearchGenerator` for a gate, asking the gate again after a restore.

    A gate says FINISHED when what it still holds waits for a failed prefix; Tune stores that with
    the stage, and a restored generator would never ask again - while the restored gate trains the
    prefix again and then releases the trials it held.
    """

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._finished = False
