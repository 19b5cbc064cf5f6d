"""Trials grouped into arms, factor values compared canonically, and which metric means what."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from dsdtune import stats

from .types import ArmTrials, MetricInfo, ReportError, ReportInput


# ------------------------------------------------------------------------------ arms & values


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def describe_arm(arm: ArmTrials, metric: str) -> stats.Summary:
    """The arm's mean, SD, CI, ... of `metric` over its ok trials (what the tables and figures show)."""
    return stats.describe(arm.values(metric))


def as_number(v: Any) -> float | None:
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def canon(v: Any) -> str:
    """Canonical text of a factor value, so 0, 0.0 and "0" are one level."""
    if is_missing(v):
        return "NA"
    x = as_number(v)
    if x is not None:
        return f"{x:.12g}"
    return str(v).strip().lower()


def same(a: Any, b: Any) -> bool:
    return canon(a) == canon(b)


def fmt_level(v: Any) -> str:
    if is_missing(v):
        return "NA"
    x = as_number(v)
    return f"{x:g}" if x is not None and not isinstance(v, str) else str(v)


def sort_key(v: Any) -> tuple:
    if is_missing(v):
        return (2, 0.0, "")
    x = as_number(v)
    return (0, x, "") if x is not None else (1, 0.0, str(v))


def group_arms(df: pd.DataFrame, factors: list[str]) -> list[ArmTrials]:
    """Group trials into arms by their factor values (by the arm label when there are no factors)."""
    if df.empty:
        return []
    keys = (df[factors].apply(lambda r: "|".join(canon(v) for v in r), axis=1)
            if factors else df["arm"].astype(str) if "arm" in df.columns else pd.Series("all", index=df.index))
    arms = []
    for key, rows in df.groupby(keys, sort=False):
        first = rows.iloc[0]
        levels = {f: first[f] for f in factors}
        label = first.get("arm") if "arm" in rows.columns else None
        if is_missing(label) or not str(label).strip():
            label = ", ".join(f"{f}={fmt_level(v)}" for f, v in levels.items()) or "all trials"
        arms.append(ArmTrials(str(key), str(label), levels, rows))
    arms.sort(key=lambda a: tuple(sort_key(a.factors[f]) for f in factors) + (a.label,))
    return arms


# ------------------------------------------------------------------------------------ metrics


def metric_info(name: str, meta: dict) -> MetricInfo:
    low = name.lower()
    higher = not any(s in low for s in ("loss", "err", "wer", "perplex", "time"))
    if name in (f"final_{meta.get('metric')}", meta.get("metric")) and meta.get("mode") in ("max", "min"):
        higher = meta.get("mode") == "max"
    return MetricInfo(name, higher, "acc" in low)


def _numeric_columns(df: pd.DataFrame) -> list[str]:
    skip = {"trial_id", "seed", "epochs_trained", "wall_time_s"}
    return [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]


def resolve_metric(study: ReportInput, metric: str | None) -> str:
    cols = study.trials.columns
    if metric is None:
        test = str(study.meta.get("test_metric") or "test_acc")
        for cand in (f"final_{test}", test, "final_test_acc"):
            if cand in cols:
                return cand
        raise ReportError("trials.csv has no final_test_acc column; choose one with --metric "
                         f"(numeric columns: {', '.join(_numeric_columns(study.trials)) or 'none'})")
    if metric not in cols:
        raise ReportError(f"metric {metric!r} is not a column of trials.csv; numeric columns: "
                         f"{', '.join(_numeric_columns(study.trials)) or 'none'}")
    return metric


def val_metric(study: ReportInput) -> str | None:
    """The searched (validation) metric's column, used for selection; never a test column."""
    m = str(study.meta.get("metric") or "val_acc")
    for cand in (f"final_{m}", m, "final_val_acc"):
        if cand in study.trials.columns and "test" not in cand:
            return cand
    return None


# What results written before study.json recorded its phase kinds knew of them.
_OLD_KINDS = {"D": {"dense": True, "sparse": False}, "S": {"dense": False, "sparse": True},
              "G": {"dense": False, "sparse": True}}


def phase_kind(study: ReportInput, letter: str) -> dict:
    """A phase kind's attributes as the run recorded them (study.json "phase_kinds")."""
    kinds = study.meta.get("phase_kinds") or _OLD_KINDS
    return kinds.get(letter) or {"dense": False, "sparse": False}


def baseline_column(study: ReportInput, metric: str) -> str | None:
    """Per-trial baseline (end of a leading dense phase) in the same kind as the metric, if any."""
    if not study.phase_labels or len(study.phase_labels) < 2:
        return None
    if not phase_kind(study, study.phase_labels[0][0]).get("dense"):
        return None
    first = study.phase_labels[0]
    if metric.startswith("final_val_acc") or metric.startswith("val_acc_after_"):
        col = f"val_acc_after_{first}"
    elif metric == "final_test_acc" or metric.startswith("acc_after_"):
        col = f"acc_after_{first}"
    else:
        return None
    return col if col in study.trials.columns and col != metric else None


