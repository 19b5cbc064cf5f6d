"""Reading a results/<study>/ directory: study.json, trials.csv and the optional CSVs."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

STATUSES = ("ok", "diverged", "stopped", "error")


class StudyError(Exception):
    """A problem with the study directory or the options (one line, for the CLI)."""


# ------------------------------------------------------------------------------------ loading


@dataclass
class Study:
    """The files of one results/<study>/ directory, read and lightly normalized."""

    dir: Path
    meta: dict[str, Any]
    trials: pd.DataFrame
    history: pd.DataFrame | None
    layers: pd.DataFrame | None
    weights: pd.DataFrame | None
    factors: list[str]  # factor columns present in trials.csv
    phase_labels: list[str]

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.dir.name)

    @property
    def flow(self) -> str:
        return str(self.meta.get("flow") or "")


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame | None:
    """An optional CSV, or None when it is absent, empty or lacks a required column."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    if df.empty or any(c not in df.columns for c in required):
        return None
    return df


def load_study(study_dir: str | os.PathLike) -> Study:
    """Read a results directory; StudyError with a one-line message when it is not one."""
    d = Path(study_dir)
    if not d.is_dir():
        raise StudyError(f"{d} is not a directory; pass results/<study> as written by dsdtune.study")
    meta_path, trials_path = d / "study.json", d / "trials.csv"
    if not meta_path.is_file():
        raise StudyError(f"{meta_path} is missing; is {d} a study results directory?")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StudyError(f"{meta_path} is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise StudyError(f"{meta_path} must hold a JSON object")
    if not trials_path.is_file():
        raise StudyError(f"{trials_path} is missing; the study has not written any trials yet")
    try:
        trials = pd.read_csv(trials_path)
    except pd.errors.EmptyDataError:
        raise StudyError(f"{trials_path} is empty; the study has not written any trials yet") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise StudyError(f"{trials_path} cannot be parsed as CSV ({exc})") from None
    if "trial_id" not in trials.columns:
        raise StudyError(f"{trials_path} has no trial_id column; not a dsdtune trials table")

    trials = trials.copy()
    if "stage" in trials.columns:
        # Prefix-stage rows are shared starting points (e.g. the dense baseline per seed), not
        # trials of an arm: their numbers reach the report as each trial's acc_after_<phase>.
        trials = trials[trials["stage"].astype(str) != "prefix"].reset_index(drop=True)
    if "status" not in trials.columns:
        trials["status"] = "ok"
    # Anything but ok/diverged (failed, missing, unknown) is counted as an error.
    status = trials["status"].astype(str).str.strip().str.lower()
    # "stopped" (ended early by ASHA in a search) is neither a failure nor a finished trial.
    trials["status"] = status.where(status.isin(["ok", "diverged", "stopped"]), "error")
    if "stage" not in trials.columns:
        trials["stage"] = "sweep"
    trials["stage"] = trials["stage"].fillna("sweep").astype(str)
    if "seed" not in trials.columns:
        trials["seed"] = np.arange(len(trials))
    factors = [f for f in (meta.get("factors") or []) if f in trials.columns]
    labels = [str(x) for x in (meta.get("phase_labels") or [])]
    return Study(
        dir=d,
        meta=meta,
        trials=trials,
        history=_read_csv(d / "history.csv", ["trial_id", "epoch"]),
        layers=_read_csv(d / "layers.csv", ["trial_id", "layer", "density"]),
        weights=_read_csv(d / "weights.csv", ["trial_id", "phase_label", "bin_left", "bin_right", "count"]),
        factors=factors,
        phase_labels=labels,
    )


