"""The report's data classes, in one module that every step of the report imports (and that imports
none of them): what the report reads (`ReportInput`), the trials of one arm (`ArmTrials`), how a
metric reads (`MetricInfo`), who is compared with whom (`Reference`), the study's spec and costs
(`SpecSource`, `CostTable`), the ranks across tasks (`RankResult`) and the whole analysis (`Analysis`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsdtune import stats
from dsdtune.results import StudyResults

STATUSES = ("ok", "diverged", "stopped", "error")  # a trial's status as the report counts it


class ReportError(Exception):
    """A problem with the results folder or the report's options (one line, for the CLI)."""


@dataclass
class ReportInput:
    """A study's results as the report reads them: `dsdtune.load_results`, then the report's rules
    (see `load.load_for_report`): no prefix-stage rows, every status one of STATUSES."""

    results: StudyResults  # the files as written
    trials: pd.DataFrame
    history: pd.DataFrame | None  # None: the study wrote none (likewise layers, weights)
    layers: pd.DataFrame | None
    weights: pd.DataFrame | None

    @property
    def path(self) -> Path:
        return self.results.path

    @property
    def meta(self) -> dict[str, Any]:
        return self.results.meta

    @property
    def name(self) -> str:
        return self.results.name

    @property
    def factors(self) -> list[str]:
        """The study's factor columns present in trials.csv."""
        return self.results.factors

    @property
    def phase_labels(self) -> list[str]:
        return self.results.phase_labels

    @property
    def flow(self) -> str:
        return str(self.meta.get("flow") or "")


@dataclass
class SpecSource:
    """The study's resolved spec, if the report can know it, and where it came from (a sentence)."""

    spec: Any  # dsdtune.config.StudySpec | None
    description: str


@dataclass
class ArmTrials:
    """The trials of one factor combination within one stage, whatever their status (a planned arm
    is `dsdtune.study.plan.Arm`; this is what its trials left in trials.csv)."""

    key: str
    label: str
    factors: dict[str, Any]
    rows: pd.DataFrame
    # ok_rows per metric and the status counts: the analysis, the figures and report.md ask for the
    # same ones many times (each a pandas filter of its own)
    _ok: dict[str, pd.DataFrame] = field(default_factory=dict, init=False, repr=False, compare=False)
    _counts: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def ok_rows(self, metric: str) -> pd.DataFrame:
        """Trials with status ok and a finite metric value (a copy of its own: change it freely)."""
        return self._ok_rows(metric).copy()

    def _ok_rows(self, metric: str) -> pd.DataFrame:
        """ok_rows, computed once and shared: for reading only."""
        if metric not in self._ok:
            vals = pd.to_numeric(self.rows[metric], errors="coerce") if metric in self.rows else None
            if vals is None:
                out = self.rows.iloc[0:0]
            else:
                keep = (self.rows["status"] == "ok") & np.isfinite(vals.to_numpy(dtype=float))
                out = self.rows[keep].copy()
                out[metric] = vals[keep].astype(float)
            self._ok[metric] = out
        return self._ok[metric]

    def values(self, metric: str) -> np.ndarray:
        if metric not in self.rows:
            return np.array([])
        return self._ok_rows(metric)[metric].to_numpy(dtype=float, copy=True)

    def count(self, status: str) -> int:
        if self._counts is None:
            self._counts = {str(k): int(v) for k, v in self.rows["status"].value_counts().items()}
        return self._counts.get(status, 0)


@dataclass
class MetricInfo:
    """How to read and show a metric."""

    name: str
    higher_is_better: bool
    is_acc: bool

    @property
    def scale(self) -> float:
        return 100.0 if self.is_acc else 1.0

    @property
    def unit(self) -> str:
        return "%" if self.is_acc else ""

    @property
    def diff_unit(self) -> str:
        return " pp" if self.is_acc else ""

    def describe_name(self) -> str:
        """Plain words for the usual column names (final_test_acc -> test accuracy at the end)."""
        m = re.fullmatch(r"final_(val|test)_(acc|loss)", self.name)
        if m:
            return (f"{'validation' if m[1] == 'val' else 'test'} "
                    f"{'accuracy' if m[2] == 'acc' else 'loss'} at the end")
        m = re.fullmatch(r"(val_)?acc_after_(.+)", self.name)
        if m:
            return f"{'validation' if m[1] else 'test'} accuracy after {m[2]}"
        return self.name


@dataclass
class Reference:
    """Who each arm is compared with, and how that was decided (for the report)."""

    kind: str  # "control" | "best_on_validation" | "none"
    name: str  # how sentences call it, e.g. "the direct fine-tune control"
    spec: dict[str, Any] | None
    description: str
    match_on: list[str]
    matched: dict[str, ArmTrials | None]  # arm key -> reference arm (None: no match)
    reference_keys: set[str]


COST_COLUMNS = ["params", "params_final", "inference_flops", "inference_flops_dense", "training_flops",
                "training_flops_dense", "cost_exact"]


@dataclass
class CostTable:
    """trial_id + COST_COLUMNS + cost_note per trial (None when costs could not be computed)."""

    trials: pd.DataFrame | None
    description: str  # how they were computed, or why not (a sentence for report.md)
    # the numeric cost columns by trial id, built once: every arm x metric of the summary asks
    _by_trial: pd.DataFrame | None = field(default=None, init=False, repr=False, compare=False)

    def arm_means(self, arm: ArmTrials, metric: str) -> dict[str, float]:
        """Mean cost over the arm's ok trials (NaN when costs are unknown)."""
        if self.trials is None or metric not in arm.rows:
            return {c: math.nan for c in COST_COLUMNS}
        if self._by_trial is None:
            numeric = {c: pd.to_numeric(self.trials[c]).to_numpy(dtype=float) for c in COST_COLUMNS
                       if c != "cost_exact"}
            numeric["cost_exact"] = self.trials["cost_exact"].to_numpy(dtype=bool)
            self._by_trial = pd.DataFrame(numeric, index=self.trials["trial_id"].to_numpy(dtype=object))
        ids = arm.ok_rows(metric)["trial_id"].to_numpy(dtype=object)
        sub = self._by_trial[self._by_trial.index.isin(ids)]
        if sub.empty:
            return {c: math.nan for c in COST_COLUMNS}
        out = {c: float(sub[c].mean()) for c in COST_COLUMNS if c != "cost_exact"}
        out["cost_exact"] = bool(sub["cost_exact"].all())
        return out


@dataclass
class RankResult:
    task_factors: list[str]
    tasks: list[str]  # complete tasks, in order
    methods: list[str]  # method labels, in the order of `average_ranks`
    means: np.ndarray  # tasks x methods
    friedman: stats.RankSummary
    pairs: list[dict] = field(default_factory=list)  # method_a, method_b, n_tasks, mean_diff, p, p_holm, status
    dropped_tasks: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Analysis:
    """Everything the report needs, computed once."""

    study: ReportInput
    info: MetricInfo
    arms: list[ArmTrials]  # analysis arms (confirm arms for a search study)
    sweep_arms: list[ArmTrials]  # search arms (search studies only)
    search_mode: bool
    best_sweep: ArmTrials | None
    val_metric: str | None
    reference: Reference
    baseline_col: str | None
    phase_metrics: list[str]
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    control_m: int
    baseline_m: int
    margin: float | None = None
    margin_source: str = ""
    spec_source: SpecSource | None = None
    costs: CostTable | None = None
    ranks: RankResult | None = None

    def arm_cost(self, arm: ArmTrials) -> dict[str, float]:
        """Mean cost over the arm's ok trials (NaN when costs are unknown)."""
        return arm_cost(self.costs, arm, self.info.name)


def arm_cost(costs: CostTable | None, arm: ArmTrials, metric: str) -> dict[str, float]:
    if costs is None:
        return {c: math.nan for c in COST_COLUMNS}
    return costs.arm_means(arm, metric)
