"""An Optuna study's searcher: Ray's `OptunaSearch` over an Optuna study stored in the results folder.

The search stage writes its Optuna study (named like the dsdtune study) into a journal file,
`results/<study>/optuna.journal`, so that `optuna-dashboard results/<study>/optuna.journal` shows
the search while it runs and after, and `optuna.load_study` reads it. Optuna's journal storage
takes several writers (its file lock works on NFS too) and readers while it is written; SQLite
does not promise that. Its trials are the search's suggestions (with several seeds, one Optuna
trial per config, valued at the mean over the seeds); their params are the study file's dotted
paths and their intermediate values the metric per epoch.

The journal follows the Tune stage: a stage that Tune restores (`--resume`) restores the searcher
and with it the same study, and a stage that starts anew starts a new journal. A Ray module: only
`run.py` imports it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from .results import epochs_in_report

JOURNAL = "optuna.journal"


def open_journal(path: Path, fresh: bool) -> JournalStorage:
    """The study's journal storage; `fresh` discards what an earlier search stage left there."""
    path = Path(path)
    if fresh:
        for stale in (path, path.with_name(path.name + ".lock")):
            stale.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def distributions(space: dict) -> dict:
    """The study file's search space (`search.space`) as Optuna distributions, by dotted path."""
    result = {}
    for path, axis in space.items():
        if axis.kind in ("grid", "choice"):
            result[path] = CategoricalDistribution(axis.grid if axis.grid is not None else axis.choice)
        elif axis.kind == "uniform":
            result[path] = FloatDistribution(*axis.uniform)
        elif axis.kind == "loguniform":
            result[path] = FloatDistribution(*axis.loguniform, log=True)
        else:
            result[path] = IntDistribution(axis.int[0], axis.int[1])
    return result


class StudySearch(OptunaSearch):
    """`OptunaSearch` as a dsdtune stage uses it.

    - a suggestion is a trial's `assign` (its dotted-path values), so the Optuna study's params
      read like the study file;
    - intermediate values are the metric at each epoch (Tune's reports batch several epochs);
    - a trial that ends without a finite metric (diverged) is failed, not left running;
    - after a restore, trials the searcher had asked for after its last snapshot, which Tune will
      not run, are failed too: the stored study holds what really ran.
    """

    def __init__(self, space: dict, metric: str, mode: str, sampler, study_name: str, storage: Optional[JournalStorage]):
        super().__init__(space=distributions(space), metric=metric, mode=mode, sampler=sampler,
                         study_name=study_name, storage=storage)
        self._last_step: dict[str, int] = {}

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        return {"assign": params} if isinstance(params, dict) else params

    def on_trial_result(self, trial_id: str, result: dict):
        trial = self._ot_trials.get(trial_id)
        if trial is None or trial_id in self._completed_trials:
            return
        for epoch in epochs_in_report(result):
            value, step = epoch.get(self._metric), epoch.get("epoch")
            if step is None or step <= self._last_step.get(trial_id, -1):  # re-reported after a restore
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                trial.report(float(value), int(step))
                self._last_step[trial_id] = int(step)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        if result:  # Tune hands a trial's last report (e.g. the one a scheduler stopped it at) only here
            self.on_trial_result(trial_id, result)
        value = (result or {}).get(self._metric)
        if (isinstance(value, float) and not math.isfinite(value) and trial_id in self._ot_trials
                and trial_id not in self._completed_trials):
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self.__dict__.setdefault("_last_step", {})
        asked = {trial._trial_id for trial in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id not in asked:
                self._ot_study._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)


def make_searcher(spec, storage: Optional[JournalStorage]) -> StudySearch:
    return StudySearch(spec.search.space, spec.metric, spec.mode,
                       optuna.samplers.TPESampler(seed=spec.search.seed), spec.name, storage)
