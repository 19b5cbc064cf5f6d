"""`dsdtune.load_results(path)`: a finished study's files as pandas DataFrames, for notebooks.

    r = dsdtune.load_results("results/sparsity_sweep")
    r.trials            # one row per trial: stage, arm, factors, seed, status, final metrics
    r.history           # one row per trial and epoch, with the trial's stage/arm/factors/seed/status
    r.summary           # per arm and metric: n, mean, SD, 95% CI (written by the report)
    r.comparisons       # each arm against the control: test, difference, CI, p, Holm p, effect size
    r.layers            # per trial and layer: density (studies with per-layer densities)
    r.meta              # study.json: the study's metadata and provenance (spec, hash, versions...)

A table the study did not write (no report yet, no per-layer densities) is an empty DataFrame.
Reads files only: no Ray, no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import pandas as pd

TRIAL_KEYS = ["stage", "arm", "seed", "status"]


@dataclass
class StudyResults:
    path: Path
    meta: dict
    trials: pd.DataFrame
    history: pd.DataFrame
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    layers: pd.DataFrame
    weights: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def factors(self) -> list[str]:
        return list(self.meta.get("factors", []))

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "val_acc")

    def __repr__(self) -> str:
        counts = self.trials.groupby("status").size().to_dict() if "status" in self.trials else {}
        return (f"StudyResults({self.name!r}: {len(self.trials)} trials {counts}, {len(self.history)} epochs, "
                f"{len(self.summary)} summary rows, {len(self.comparisons)} comparisons; {self.path})")


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _with_trial_columns(frame: pd.DataFrame, trials: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """`frame` (keyed by trial_id) with each trial's stage, arm, factors, seed and status beside it."""
    if frame.empty or trials.empty or "trial_id" not in frame:
        return frame
    keys = ["trial_id"] + [c for c in TRIAL_KEYS[:2] + factors + TRIAL_KEYS[2:] if c in trials.columns]
    merged = frame.merge(trials[keys], on="trial_id", how="left", validate="many_to_one")
    return merged[keys + [c for c in frame.columns if c not in keys]]


def load_results(path: Union[str, Path]) -> StudyResults:
    """The result files of one study (its folder, e.g. `results/sparsity_sweep`, or its study.json)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not (folder / "trials.csv").exists():
        raise FileNotFoundError(f"{folder} holds no trials.csv: give the results folder of a finished study "
                                f"(e.g. results/<study>)")
    meta = json.loads((folder / "study.json").read_text()) if (folder / "study.json").exists() else {}
    trials = pd.read_csv(folder / "trials.csv")
    factors = [f for f in meta.get("factors", []) if f in trials.columns]
    return StudyResults(
        path=folder, meta=meta, trials=trials,
        history=_with_trial_columns(_read(folder / "history.csv"), trials, factors),
        summary=_read(folder / "summary.csv"), comparisons=_read(folder / "comparisons.csv"),
        layers=_with_trial_columns(_read(folder / "layers.csv"), trials, factors),
        weights=_with_trial_columns(_read(folder / "weights.csv"), trials, factors))
