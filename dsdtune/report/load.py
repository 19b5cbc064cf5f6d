"""What the report reads: `dsdtune.load_results` (the one reader of result files), then the report's
own rules on top (`load_for_report`); and the study's resolved spec (`study_spec`)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dsdtune.results import ResultsError, load_results

from .types import STATUSES, ReportError, ReportInput, SpecSource


# ------------------------------------------------------------------------------------ loading


def load_for_report(results_dir: str | os.PathLike) -> ReportInput:
    """A study's results folder as the report analyzes it; ReportError with a one-line message.

    On top of the reader's rules: study.json is required; prefix-stage rows are left out (shared
    starting points, not trials of an arm); a status other than ok/diverged/stopped counts as
    error; a missing stage is "sweep", a missing seed the row number; empty tables are None.
    """
    try:
        results = load_results(results_dir, report_tables=False, require_meta=True)
    except ResultsError as exc:
        raise ReportError(str(exc)) from None
    trials = results.trials.copy()
    if "stage" in trials.columns:
        # Prefix-stage rows are shared starting points (e.g. the dense baseline per seed), not
        # trials of an arm: their numbers reach the report as each trial's acc_after_<phase>.
        trials = trials[trials["stage"].astype(str) != "prefix"].reset_index(drop=True)
    if "status" not in trials.columns:
        trials["status"] = "ok"
    # Anything but ok/diverged (failed, interrupted, missing, unknown) is counted as an error.
    status = trials["status"].astype(str).str.strip().str.lower()
    # "stopped" (ended early by ASHA in a search) is neither a failure nor a finished trial.
    trials["status"] = status.where(status.isin(STATUSES[:3]), "error")
    if "stage" not in trials.columns:
        trials["stage"] = "sweep"
    trials["stage"] = trials["stage"].fillna("sweep").astype(str)
    if "seed" not in trials.columns:
        trials["seed"] = np.arange(len(trials))

    def table(frame: pd.DataFrame) -> pd.DataFrame | None:
        return None if frame.empty else frame

    return ReportInput(results=results, trials=trials, history=table(results.history),
                       layers=table(results.layers), weights=table(results.weights))


# ------------------------------------------------------------------------------- the study's spec


def study_spec(study: ReportInput, studies_dir: str | os.PathLike | None = None) -> SpecSource:
    """The resolved StudySpec: study.json "spec" when the runner stored it, else the study file of
    the same name if it reproduces what study.json recorded (flow, phases, factors, seeds, epochs).

    The fallback cannot see `--set` overrides that leave those fields alone (e.g. model widths);
    the report says which source it used.
    """
    from dsdtune.config import SpecError, StudySpec, load_study as load_study_file

    stored = study.meta.get("spec")
    if isinstance(stored, dict):
        try:
            return SpecSource(StudySpec.model_validate(stored), "the resolved spec stored in study.json")
        except ValueError as exc:
            return SpecSource(None, f"study.json's spec does not validate ({str(exc).splitlines()[0]})")
    try:
        spec = load_study_file(study.name, studies_dir=studies_dir)
    except SpecError as exc:
        return SpecSource(None, f"study.json stores no spec and the study file is unusable ({exc})")
    mismatch = _spec_mismatch(study, spec)
    if mismatch:
        return SpecSource(None, f"study.json stores no spec, and studies/{study.name}.yaml differs from "
                                f"this run ({mismatch}), so it was not used")
    return SpecSource(spec, f"studies/{study.name}.yaml (study.json stores no spec; it matches this run's "
                            "flow, phases, factors, seeds and epochs, but overrides of other fields "
                            "would not show)")


def _spec_mismatch(study: ReportInput, spec: Any) -> str:
    """What the study file contradicts in study.json, or ''."""
    from dsdtune.phases import expand_phases

    meta = study.meta
    if meta.get("seeds") is not None and list(meta["seeds"]) != spec.seed_list:
        return "seeds"
    space = list(spec.search.space)
    if spec.search.algorithm == "optuna" and spec.confirm:
        space += [k for k in spec.confirm.control if k not in space]
    expected = (["variant"] if spec.variants else []) + space
    if meta.get("factors") is not None and list(meta["factors"]) != expected:
        return "factors"
    runs = arm_run_specs(study, spec)
    if runs is None:
        return "arms"
    flows = list(dict.fromkeys(r.pipeline.flow for r in runs.values())) or [spec.pipeline.flow]
    # Compared as sets: the runner lists flows and labels in its arm order, trials.csv in label order.
    if meta.get("flow") and set(flows) != set(str(meta["flow"]).split(", ")) and spec.search.algorithm != "optuna":
        return "flow"
    if spec.search.algorithm == "optuna":
        if meta.get("flow") != spec.pipeline.flow:
            return "flow"
        return ""
    labels = list(dict.fromkeys(p.label for r in runs.values() for p in expand_phases(r.pipeline, r.init)))
    if meta.get("phase_labels") is not None and set(meta["phase_labels"]) != set(labels):
        return "phase labels"
    total = meta.get("epochs_without_sharing")
    if total is not None:
        planned = sum(sum(p.epochs for p in expand_phases(r.pipeline, r.init)) for r in runs.values()) * len(spec.seed_list)
        if planned != total:
            return f"epochs: {planned} planned by the file, {total} in study.json"
    return ""


def arm_assignments(row: Any, factors: Sequence[str], spec: Any) -> dict[str, Any]:
    """The dotted-path values that make a trial's run spec from the study's base spec."""
    assign: dict[str, Any] = {}
    if "variant" in factors:
        assign.update((spec.variants or {}).get(str(row["variant"]), {}))
    for f in factors:
        if f != "variant" and f.split(".")[0] in ("task", "init", "pipeline"):
            value = row[f]
            if isinstance(value, (np.integer, np.floating, np.bool_)):
                value = value.item()
            if isinstance(value, float) and value.is_integer() and _is_int_field(spec, f):
                value = int(value)
            assign[f] = value
    return assign


def _is_int_field(spec: Any, path: str) -> bool:
    from dsdtune.config import get_by_path
    try:
        return isinstance(get_by_path(spec.base_run(), path), int)
    except (KeyError, IndexError, TypeError):
        return False


def arm_run_specs(study: ReportInput, spec: Any) -> dict[str, Any] | None:
    """One run spec (seed of the arm's first trial) per distinct factor combination in trials.csv,
    keyed by the trials' arm label; None when a trial's values do not make a valid spec."""
    from dsdtune.config import SpecError, build_run_spec

    runs: dict[str, Any] = {}
    t = study.trials
    for _, row in t.drop_duplicates([*study.factors] or ["arm"]).iterrows() if not t.empty else []:
        try:
            runs[str(row.get("arm", ""))] = build_run_spec(spec.base_run(), arm_assignments(row, study.factors, spec),
                                                           int(row["seed"]))
        except (SpecError, KeyError, ValueError):
            return None
    return runs
