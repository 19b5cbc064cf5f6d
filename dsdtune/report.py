"""Study report: per-arm tables, comparisons with the control and the baseline, figures, report.md.

    python -m dsdtune.report results/<study> [--metric final_test_acc] [--control "pipeline.sparsity=0"]
                             [--out DIR]

or `write_report(study_dir)` from the study runner. Reads the files a study writes (study.json,
trials.csv; optionally history.csv, layers.csv, weights.csv) and writes summary.csv,
comparisons.csv, report.md and PNG figures. Every statistic (mean, SD, CI, tests, effect sizes,
corrections, power) comes from `dsdtune.stats`; this module only selects, pairs and renders.

Rules (report.md states them too):
- Only trials with status "ok" and a finite metric value enter means and tests. Diverged and
  failed trials are counted in the n columns, never silently dropped. Any status other than "ok" or
  "diverged" counts as "error".
- An arm is one combination of the factor columns (study.json "factors"); repeats differ in seed.
- Control matching: the control arms are those whose factors equal the control values. Each other
  arm is compared with the control arm that agrees with it on every remaining factor that varies
  among the control arms (e.g. sparsity 0 within the same init scheme); factors constant among the
  control arms are not matched (one shared control). No such arm -> the comparison is skipped with a
  sentence. Without a control the reference is the arm best on validation, flagged as post hoc.
- Paired t (by seed) where study.json shared_prefix is true and the paired trials share prefix_id;
  Welch t otherwise. Holm within each family (arms vs control; arms vs their own baseline), with
  its size m; BH alongside.
- Optuna studies (or any study with stage "confirm" rows): the sweep selects the best config on the
  validation metric only; the confirm rows are what is summarized and compared.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # object API: never touches pyplot's global backend

from dsdtune import stats

__all__ = ["StudyError", "write_report", "load_study", "analyze", "parse_control", "main"]

ALPHA = 0.05
POWER = 0.8
MAX_CURVES = 10  # more lines than this make a learning-curve plot unreadable
MAX_HIST_ARMS = 4
STATUSES = ("ok", "diverged", "error")
RANK_FLAGS = {"rank_test_cannot_reach_alpha": "rank test cannot reach p < 0.05 at this n",
              "insufficient_n": "rank test: n too small", "no_variance": "rank test: all tied"}


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


# ------------------------------------------------------------------------------ arms & values


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _as_number(v: Any) -> float | None:
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


def _canon(v: Any) -> str:
    """Canonical text of a factor value, so 0, 0.0 and "0" are one level."""
    if _is_missing(v):
        return "NA"
    x = _as_number(v)
    if x is not None:
        return f"{x:.12g}"
    return str(v).strip().lower()


def _same(a: Any, b: Any) -> bool:
    return _canon(a) == _canon(b)


def _fmt_level(v: Any) -> str:
    if _is_missing(v):
        return "NA"
    x = _as_number(v)
    return f"{x:g}" if x is not None and not isinstance(v, str) else str(v)


def _sort_key(v: Any) -> tuple:
    if _is_missing(v):
        return (2, 0.0, "")
    x = _as_number(v)
    return (0, x, "") if x is not None else (1, 0.0, str(v))


@dataclass
class Arm:
    """One factor combination within one stage; rows are all its trials, whatever their status."""

    key: str
    label: str
    factors: dict[str, Any]
    rows: pd.DataFrame

    def ok_rows(self, metric: str) -> pd.DataFrame:
        """Trials with status ok and a finite metric value."""
        vals = pd.to_numeric(self.rows[metric], errors="coerce") if metric in self.rows else None
        if vals is None:
            return self.rows.iloc[0:0]
        keep = (self.rows["status"] == "ok") & np.isfinite(vals.to_numpy(dtype=float))
        out = self.rows[keep].copy()
        out[metric] = vals[keep].astype(float)
        return out

    def values(self, metric: str) -> np.ndarray:
        return self.ok_rows(metric)[metric].to_numpy(dtype=float) if metric in self.rows else np.array([])

    def count(self, status: str) -> int:
        return int((self.rows["status"] == status).sum())


def _arms(df: pd.DataFrame, factors: list[str]) -> list[Arm]:
    """Group trials into arms by their factor values (by the arm label when there are no factors)."""
    if df.empty:
        return []
    keys = (df[factors].apply(lambda r: "|".join(_canon(v) for v in r), axis=1)
            if factors else df["arm"].astype(str) if "arm" in df.columns else pd.Series("all", index=df.index))
    arms = []
    for key, rows in df.groupby(keys, sort=False):
        first = rows.iloc[0]
        levels = {f: first[f] for f in factors}
        label = first.get("arm") if "arm" in rows.columns else None
        if _is_missing(label) or not str(label).strip():
            label = ", ".join(f"{f}={_fmt_level(v)}" for f, v in levels.items()) or "all trials"
        arms.append(Arm(str(key), str(label), levels, rows))
    arms.sort(key=lambda a: tuple(_sort_key(a.factors[f]) for f in factors) + (a.label,))
    return arms


# ------------------------------------------------------------------------------------ metrics


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


def _metric_info(name: str, meta: dict) -> MetricInfo:
    low = name.lower()
    higher = not any(s in low for s in ("loss", "err", "wer", "perplex", "time"))
    if name in (f"final_{meta.get('metric')}", meta.get("metric")) and meta.get("mode") in ("max", "min"):
        higher = meta.get("mode") == "max"
    return MetricInfo(name, higher, "acc" in low)


def _numeric_columns(df: pd.DataFrame) -> list[str]:
    skip = {"trial_id", "seed", "epochs_trained", "wall_time_s"}
    return [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]


def _resolve_metric(study: Study, metric: str | None) -> str:
    cols = study.trials.columns
    if metric is None:
        test = str(study.meta.get("test_metric") or "test_acc")
        for cand in (f"final_{test}", test, "final_test_acc"):
            if cand in cols:
                return cand
        raise StudyError("trials.csv has no final_test_acc column; choose one with --metric "
                         f"(numeric columns: {', '.join(_numeric_columns(study.trials)) or 'none'})")
    if metric not in cols:
        raise StudyError(f"metric {metric!r} is not a column of trials.csv; numeric columns: "
                         f"{', '.join(_numeric_columns(study.trials)) or 'none'}")
    return metric


def _val_metric(study: Study) -> str | None:
    """The searched (validation) metric's column, used for selection; never a test column."""
    m = str(study.meta.get("metric") or "val_acc")
    for cand in (f"final_{m}", m, "final_val_acc"):
        if cand in study.trials.columns and "test" not in cand:
            return cand
    return None


def _baseline_column(study: Study, metric: str) -> str | None:
    """Per-trial baseline (end of the first D phase) in the same kind as the metric, if any."""
    if not study.flow.upper().startswith("D") or len(study.phase_labels) < 2:
        return None
    first = study.phase_labels[0]
    if metric.startswith("final_val_acc") or metric.startswith("val_acc_after_"):
        col = f"val_acc_after_{first}"
    elif metric == "final_test_acc" or metric.startswith("acc_after_"):
        col = f"acc_after_{first}"
    else:
        return None
    return col if col in study.trials.columns and col != metric else None


# ------------------------------------------------------------------------------------ control


def parse_control(spec: str | dict | None) -> dict[str, Any] | None:
    """'pipeline.sparsity=0,init.weights=base' (or a dict) -> {factor: value}; '' / None -> None."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        return dict(spec) or None
    out: dict[str, Any] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise StudyError(f"--control {spec!r}: expected factor=value[,factor=value], e.g. "
                             "'pipeline.sparsity=0'")
        k, v = part.split("=", 1)
        v = v.strip()
        num = _as_number(v)
        out[k.strip()] = num if num is not None else v
    return out or None


@dataclass
class Reference:
    """Who each arm is compared with, and how that was decided (for the report)."""

    kind: str  # "control" | "best_on_validation" | "none"
    name: str  # how sentences call it, e.g. "the direct fine-tune control"
    spec: dict[str, Any] | None
    description: str
    match_on: list[str]
    matched: dict[str, Arm | None]  # arm key -> reference arm (None: no match)
    reference_keys: set[str]


def _resolve_reference(study: Study, arms: list[Arm], control: dict | None) -> Reference:
    if control:
        allowed = set(study.factors) | {"arm"}
        bad = [k for k in control if k not in allowed]
        if bad:
            raise StudyError(f"control factor {bad[0]!r} is not a factor of this study; factors: "
                             f"{', '.join(study.factors) or 'none'}")

        def is_control(a: Arm) -> bool:
            return all(_same(a.label if k == "arm" else a.factors.get(k), v) for k, v in control.items())

        ctrl = [a for a in arms if is_control(a)]
        spec_text = ", ".join(f"{k}={_fmt_level(v)}" for k, v in control.items())
        if not ctrl:
            return Reference("none", "the control", control, f"No trial matches the control ({spec_text}); "
                             "comparisons with the control are skipped.", [], {}, set())
        others = [f for f in study.factors if f not in control]
        match_on = [f for f in others if len({_canon(a.factors[f]) for a in ctrl}) > 1]
        matched = {}
        for a in arms:
            if a in ctrl:
                continue
            cand = [c for c in ctrl if all(_same(c.factors[f], a.factors[f]) for f in match_on)]
            matched[a.key] = cand[0] if cand else None
        name, why = "the control", ""
        if any(k.endswith("sparsity") and _same(v, 0) for k, v in control.items()) and "S" in study.flow.upper():
            name, why = "the direct fine-tune control", " (no pruning; same phases, epochs and LRs)"
        desc = f"Control: {spec_text} — {name}{why}."
        if match_on:
            desc += (f" Each arm is compared with the control arm that has the same {', '.join(match_on)}"
                     " (rule: match on every other factor that varies among the control arms).")
        elif len(study.factors) > len(control):
            desc += " All arms share this one control arm."
        return Reference("control", name, control, desc, match_on, matched, {a.key for a in ctrl})

    val = _val_metric(study)
    if len(arms) < 2 or val is None:
        return Reference("none", "the control", None, "The study names no control and there is no second arm or "
                         "validation metric to compare with; no comparisons with a control.", [], {}, set())
    info = _metric_info(val, study.meta)
    scored = [(stats.describe(a.values(val)).mean, a) for a in arms]
    scored = [(m, a) for m, a in scored if m is not None]
    if not scored:
        return Reference("none", "the control", None, "The study names no control and no arm has a validation "
                         "value; no comparisons with a control.", [], {}, set())
    best = (max if info.higher_is_better else min)(scored, key=lambda t: t[0])[1]
    desc = (f"The study names no control (study.json \"control\" is null; use --control to choose one). "
            f"Each arm is compared with the arm best on validation ({val}): {best.label}. That "
            "reference was chosen after seeing the data, so these p-values are descriptive only.")
    return Reference("best_on_validation", "the best arm on validation", None, desc, [],
                     {a.key: best for a in arms if a is not best}, {best.key})


# -------------------------------------------------------------------------------- comparisons


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _pooled_sd(sa: stats.Summary, sb: stats.Summary) -> float | None:
    if sa.sd is None or sb.sd is None:
        return None
    nu = sa.n + sb.n - 2
    return math.sqrt(((sa.n - 1) * sa.sd**2 + (sb.n - 1) * sb.sd**2) / nu)


def _compare(a: Arm, b: Arm | None, metric: str, want_paired: bool, info: MetricInfo,
             b_metric: str | None = None) -> dict[str, Any]:
    """One comparison of arm a with reference b (or with another column of a's own trials).

    b is None with b_metric set: a within-trial paired comparison metric vs b_metric (the baseline).
    """
    note_parts: list[str] = []
    if b is None:
        ra = a.ok_rows(metric)
        bvals = pd.to_numeric(ra[b_metric], errors="coerce").to_numpy(dtype=float) if b_metric else np.array([])
        keep = np.isfinite(bvals)
        xa, xb = ra[metric].to_numpy(dtype=float)[keep], bvals[keep]
        if not keep.all():
            note_parts.append(f"{int((~keep).sum())} trial(s) without a baseline value left out")
        paired = True
    else:
        ra, rb = a.ok_rows(metric), b.ok_rows(metric)
        paired = False
        if want_paired:
            pa = ra.drop_duplicates("seed")
            pb = rb.drop_duplicates("seed")
            m = pa.merge(pb, on="seed", suffixes=("_a", "_b"))
            prefix_ok = True
            if "prefix_id_a" in m.columns:
                ida = m["prefix_id_a"].astype(str).replace("nan", "")
                idb = m["prefix_id_b"].astype(str).replace("nan", "")
                both = (ida != "") & (idb != "")
                prefix_ok = bool((ida[both] == idb[both]).all())
            if not prefix_ok:
                note_parts.append("prefix_id differs between the arms, so seeds are not paired: Welch t")
            elif len(m) < 2 and min(len(ra), len(rb)) >= 2:
                note_parts.append(f"only {len(m)} seed(s) in common: Welch t instead of paired t")
            else:
                paired = True
                unpaired = len(ra) + len(rb) - 2 * len(m)
                if unpaired:
                    note_parts.append(f"{unpaired} trial(s) without a partner seed left out of the paired test")
                xa = m[f"{metric}_a"].to_numpy(dtype=float)
                xb = m[f"{metric}_b"].to_numpy(dtype=float)
        if not paired:
            xa, xb = ra[metric].to_numpy(dtype=float), rb[metric].to_numpy(dtype=float)

    if paired:
        test = stats.paired_t(xa, xb)
        rank = stats.wilcoxon_signed_rank(xa, xb)
        keep = np.isfinite(xa) & np.isfinite(xb)
        sd_diff = stats.describe(xa[keep] - xb[keep]).sd
        mde = stats.minimum_detectable_effect_paired(int(keep.sum()), ALPHA, POWER, sd_diff)
    else:
        test = stats.welch_t(xa, xb)
        rank = stats.mann_whitney(xa, xb)
        mde = stats.minimum_detectable_effect(len(xa), len(xb), ALPHA, POWER,
                                              _pooled_sd(stats.describe(xa), stats.describe(xb)))
    sa, sb = stats.describe(xa), stats.describe(xb)
    g = stats.hedges_g(xa, xb)
    ps = stats.prob_superiority(xa, xb)
    p_better = None if ps.value is None else (ps.value if info.higher_is_better else 1.0 - ps.value)
    diff = test.diff
    mde_metric = mde.effect_metric if mde.status == "ok" else None
    underpowered = mde_metric is None or (diff is not None and abs(diff) < mde_metric)
    note = "; ".join(x for x in [*note_parts, test.note] if x)
    return {
        "metric": metric,
        "test": test.test,
        "status": test.status,
        "n_a": test.n_a,
        "n_b": test.n_b if test.n_b is not None else np.nan,
        "mean_a": _num(sa.mean),
        "mean_ref": _num(sb.mean),
        "diff": _num(diff),
        "ci_low": _num(test.ci_low),
        "ci_high": _num(test.ci_high),
        "statistic": _num(test.statistic),
        "df": _num(test.df),
        "p_value": _num(test.p_value),
        "hedges_g": _num(g.value),
        "p_better": _num(p_better),
        "mde": _num(mde_metric),
        "mde_d": _num(mde.effect_size),
        "rank_test": rank.test,
        "rank_status": rank.status,
        "rank_p": _num(rank.p_value),
        "underpowered": bool(underpowered),
        "note": note,
    }


def _adjust_family(rows: list[dict[str, Any]]) -> int:
    """Holm and BH over one family in place; returns the family size m (comparisons with a p)."""
    ps = [None if math.isnan(r["p_value"]) else r["p_value"] for r in rows]
    h, bh = stats.holm(ps), stats.benjamini_hochberg(ps)
    for r, ph, pb in zip(rows, h.p_adjusted, bh.p_adjusted):
        r["p_holm"], r["p_bh"], r["family_m"] = _num(ph), _num(pb), h.m
        r["significant"] = ph is not None and ph < ALPHA
    return h.m


# -------------------------------------------------------------------------------- formatting


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "–"
    if p < 1e-4:
        return f"{p:.1e}"
    return f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def _fmt_v(x: float, info: MetricInfo) -> str:
    """Accuracies in % with 2 decimals (the DSD paper's precision); other metrics to 4 digits."""
    if x is None or math.isnan(x):
        return "–"
    return f"{x * info.scale:.2f}" if info.is_acc else f"{x:.4g}"


def _fmt_d(x: float, info: MetricInfo) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x * info.scale:+.2f}" if info.is_acc else f"{x:+.3g}"


def _test_name(test: str) -> str:
    return {"welch_t": "Welch", "paired_t": "paired t", "mann_whitney": "Mann-Whitney",
            "wilcoxon_signed_rank": "Wilcoxon"}.get(test, test)


def _subject(study: Study, arm: Arm, reference: Reference) -> str:
    if arm.key in reference.reference_keys and "fine-tune" in reference.name:
        return f"Direct fine-tuning ({arm.label})"
    flow = study.flow
    # One flow names the method ("DSD with sparsity=0.5"); several (variants) are in the arm label.
    if flow and "," not in flow and not any("flow" in f for f in study.factors):
        return f"{flow} with {arm.label}"
    return arm.label


def _sentence(r: dict[str, Any], subject: str, ref_name: str, info: MetricInfo) -> str:
    """One plain sentence saying what the data say about one comparison."""
    u, du = info.unit, info.diff_unit
    n_txt = (f"n = {_fmt_n(r['n_a'])} pairs" if r["test"] == "paired_t"
             else f"n = {_fmt_n(r['n_a'])} vs {_fmt_n(r['n_b'])}")
    means = f"{_fmt_v(r['mean_a'], info)}{u} vs {_fmt_v(r['mean_ref'], info)}{u}"
    if r["status"] == "insufficient_n":
        return (f"{subject} could not be tested against {ref_name}: {n_txt} usable trials (a t-test "
                f"needs at least 2 per arm); means {means}.")
    if r["status"] == "no_variance":
        return (f"{subject} vs {ref_name}: {means} ({n_txt}), with no run-to-run variance at all (deterministic "
                "runs?), so no t-test is possible; the difference is exact for these seeds only.")
    better = (r["diff"] > 0) == info.higher_is_better and r["diff"] != 0
    p_txt = (f"{_test_name(r['test'])} p = {_fmt_p(r['p_value'])}, Holm p = {_fmt_p(r['p_holm'])} "
             f"(m = {r['family_m']})")
    numbers = (f"{means} ({n_txt}; diff {_fmt_d(r['diff'], info)}{du}, 95% CI [{_fmt_d(r['ci_low'], info)}, "
               f"{_fmt_d(r['ci_high'], info)}]), {p_txt}")
    if r["significant"]:
        verb = "beat" if better else "did worse than"
        return f"{subject} {verb} {ref_name}: {numbers}."
    if better:
        verb = "was not significantly better than"
    elif r["diff"] == 0:
        verb = "did not differ from"
    else:
        verb = "did not beat"
    tail = ""
    if not math.isnan(r["mde"]):
        tail = f"; no effect larger than {_fmt_v(abs(r['mde']), info)}{du} detected (80% power)"
    if r["p_value"] < ALPHA:
        tail += "; nominally p < 0.05, but not after Holm correction"
    return f"{subject} {verb} {ref_name}: {numbers}{tail}."


def _fmt_n(n: Any) -> str:
    return "–" if n is None or (isinstance(n, float) and math.isnan(n)) else str(int(n))


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------- atomic writes


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _save_fig(fig: Figure, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------ analysis


@dataclass
class Analysis:
    """Everything the report needs, computed once."""

    study: Study
    info: MetricInfo
    arms: list[Arm]  # analysis arms (confirm arms for a search study)
    sweep_arms: list[Arm]  # search arms (search studies only)
    search_mode: bool
    best_sweep: Arm | None
    val_metric: str | None
    reference: Reference
    baseline_col: str | None
    phase_metrics: list[str]
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    control_m: int
    baseline_m: int


def _summary_rows(arms: list[Arm], stage: str, metrics: list[str], factors: list[str]) -> list[dict]:
    rows = []
    for a in arms:
        for m in metrics:
            if m not in a.rows.columns:
                continue
            s = stats.describe(a.values(m))
            row: dict[str, Any] = {"stage": stage, "arm": a.label}
            row.update({f: a.factors[f] for f in factors})
            row.update({
                "metric": m, "n_total": len(a.rows), "n_ok": a.count("ok"),
                "n_diverged": a.count("diverged"), "n_error": a.count("error"), "n": s.n,
                "mean": _num(s.mean), "sd": _num(s.sd), "sem": _num(s.sem), "ci_low": _num(s.ci_low),
                "ci_high": _num(s.ci_high), "median": _num(s.median), "min": _num(s.min),
                "max": _num(s.max), "status": s.status,
            })
            rows.append(row)
    return rows


def analyze(study: Study, metric: str | None = None, control: str | dict | None = None) -> Analysis:
    """Arms, per-arm summaries and both comparison families."""
    metric = _resolve_metric(study, metric)
    info = _metric_info(metric, study.meta)
    t = study.trials
    has_confirm = bool((t["stage"] == "confirm").any())
    search_mode = str(study.meta.get("search_alg", "")).lower() == "optuna" or has_confirm
    val = _val_metric(study)
    sweep_arms: list[Arm] = []
    best = None
    if search_mode:
        sweep_arms = _arms(t[t["stage"] != "confirm"], study.factors)
        arms = _arms(t[t["stage"] == "confirm"], study.factors)
        if val is not None:
            vinfo = _metric_info(val, study.meta)
            scored = [(stats.describe(a.values(val)).mean, a) for a in sweep_arms]
            scored = [(m, a) for m, a in scored if m is not None]
            if scored:
                best = (max if vinfo.higher_is_better else min)(scored, key=lambda x: x[0])[1]
    else:
        arms = _arms(t, study.factors)

    ctrl = parse_control(control) if control is not None else parse_control(study.meta.get("control"))
    reference = _resolve_reference(study, arms, ctrl)
    baseline_col = _baseline_column(study, metric)
    phase_metrics = [f"acc_after_{lab}" for lab in study.phase_labels
                     if f"acc_after_{lab}" in t.columns and f"acc_after_{lab}" != metric]

    metrics = [metric] + phase_metrics + ([val] if val and val != metric else [])
    srows = _summary_rows(arms, "confirm" if search_mode else "all", metrics, study.factors)
    if search_mode:
        srows += _summary_rows(sweep_arms, "sweep", metrics, study.factors)
    summary = pd.DataFrame(srows)

    paired = bool(study.meta.get("shared_prefix"))
    ref_kind = {"control": "control", "best_on_validation": "best arm on validation"}.get(reference.kind, "")
    ctrl_rows: list[dict[str, Any]] = []
    ctrl_arms: list[Arm] = []  # aligned with ctrl_rows (labels need not be unique)
    for a in arms:
        if a.key in reference.reference_keys or a.key not in reference.matched:
            continue
        ref = reference.matched[a.key]
        if ref is None:
            continue
        r = {"family": "vs_control", "arm": a.label, "reference": ref.label,
             "reference_kind": ref_kind, **{f: a.factors[f] for f in study.factors}}
        r.update(_compare(a, ref, metric, paired, info))
        ctrl_rows.append(r)
        ctrl_arms.append(a)
    control_m = _adjust_family(ctrl_rows)

    base_rows: list[dict[str, Any]] = []
    if baseline_col:
        for a in arms:
            r = {"family": "vs_baseline", "arm": a.label,
                 "reference": f"{baseline_col} (same trial)", "reference_kind": "baseline",
                 **{f: a.factors[f] for f in study.factors}}
            r.update(_compare(a, None, metric, True, info, b_metric=baseline_col))
            base_rows.append(r)
    baseline_m = _adjust_family(base_rows)

    for r, a in zip(ctrl_rows, ctrl_arms):
        r["sentence"] = _sentence(r, _subject(study, a, reference), f"{reference.name} ({r['reference']})", info)
    base_label = study.phase_labels[0] if study.phase_labels else "D1"
    for r, a in zip(base_rows, arms):
        r["sentence"] = _sentence(r, _subject(study, a, reference),
                                  f"its own baseline (end of {base_label}, same trial)", info)
    comparisons = pd.DataFrame(ctrl_rows + base_rows)
    if not comparisons.empty:
        first = ["family", "arm", "reference", "reference_kind", *study.factors, "metric", "test",
                 "status", "n_a", "n_b", "mean_a", "mean_ref", "diff", "ci_low", "ci_high", "statistic",
                 "df", "p_value", "p_holm", "p_bh", "family_m", "significant", "underpowered"]
        comparisons = comparisons[first + [c for c in comparisons.columns if c not in first]]
    return Analysis(study, info, arms, sweep_arms, search_mode, best, val, reference, baseline_col,
                    phase_metrics, summary, comparisons, control_m, baseline_m)


# -------------------------------------------------------------------------------------- figures


def _ylabel(metric: str, info: MetricInfo) -> str:
    return f"{info.describe_name()} ({info.unit})" if info.unit else info.describe_name()


def _summ(arm: Arm, metric: str) -> stats.Summary:
    return stats.describe(arm.values(metric))


def _plot_factor(an: Analysis) -> tuple[str, Figure] | None:
    """Metric vs a numeric factor, 95% CI bars, one line per level of the other factors."""
    study, info, arms = an.study, an.info, an.arms
    numeric = [f for f in study.factors
               if all(_as_number(a.factors[f]) is not None for a in arms)
               and len({_canon(a.factors[f]) for a in arms}) > 1]
    if not numeric or len(arms) < 2:
        return None
    x_f = next((f for f in numeric if f.endswith("sparsity")), numeric[0])
    others = [f for f in study.factors if f != x_f and len({_canon(a.factors[f]) for a in arms}) > 1]
    strata: dict[str, list[Arm]] = {}
    for a in arms:
        strata.setdefault(", ".join(f"{f}={_fmt_level(a.factors[f])}" for f in others), []).append(a)
    fig = Figure(figsize=(9, 5.6 + 0.2 * len(strata)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(strata))]
    width = max((_as_number(a.factors[x_f]) for a in arms)) - min((_as_number(a.factors[x_f]) for a in arms))
    jitter = 0.012 * (width or 1.0)
    drawn_bands: set[str] = set()
    for (name, group), col in zip(strata.items(), colors):
        group = sorted(group, key=lambda a: _as_number(a.factors[x_f]))
        xs, ys, lo, hi, ns = [], [], [], [], []
        for k, a in enumerate(group):
            s = _summ(a, info.name)
            x = _as_number(a.factors[x_f])
            vals = a.values(info.name)
            ax.scatter(np.full(len(vals), x) + jitter * (np.linspace(-1, 1, len(vals)) if len(vals) > 1 else 0),
                       vals * info.scale, s=10, color=col, alpha=0.35, zorder=2)
            if s.mean is None:
                continue
            xs.append(x)
            ys.append(s.mean * info.scale)
            lo.append((s.mean - (s.ci_low if s.ci_low is not None else s.mean)) * info.scale)
            hi.append(((s.ci_high if s.ci_high is not None else s.mean) - s.mean) * info.scale)
            ns.append(s.n)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], color=col, marker="o", capsize=4, lw=1.8,
                        label=f"{name}: mean ± 95% t-CI" if name else "mean ± 95% t-CI", zorder=3)
            for x, y, n in zip(xs, ys, ns):
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(6, -12),
                            fontsize=8, color=col)
        # Control band of this stratum (its matched control), drawn once per control arm.
        ref = next((an.reference.matched.get(a.key) for a in group if an.reference.matched.get(a.key)), None)
        if ref is None and an.reference.kind == "control":
            ref = next((a for a in group if a.key in an.reference.reference_keys), None)
        if ref is not None and ref.key not in drawn_bands:
            s = _summ(ref, info.name)
            if s.ci_low is not None:
                ax.axhspan(s.ci_low * info.scale, s.ci_high * info.scale, color=col, alpha=0.12, zorder=1,
                           label=f"control {ref.label}: 95% CI (n={s.n})")
            drawn_bands.add(ref.key)
    if an.baseline_col and len(strata) == 1:
        rows = pd.concat([a.ok_rows(info.name) for a in arms])
        if "prefix_id" in rows.columns:
            # Arms sharing a prefix share its baseline: count each trained prefix once.
            pid = rows["prefix_id"].astype(str).replace("nan", "")
            rows = pd.concat([rows[pid == ""], rows[pid != ""].drop_duplicates("prefix_id")])
        base = stats.describe(rows[an.baseline_col].to_numpy(dtype=float))
        if base.mean is not None:
            ax.axhline(base.mean * info.scale, color="0.3", ls="--", lw=1.2,
                       label=f"baseline (end of {study.phase_labels[0]}): mean, n={base.n} trained baselines")
    xlabel = x_f + (" (fraction of weights set to zero)" if x_f.endswith("sparsity") else "")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_ylabel(info.name, info))
    ax.set_title(f"{study.name}: {info.describe_name()} vs {x_f}\n"
                 "points: means with 95% t-CI over seeds; dots: single trials", fontsize=11)
    ax.grid(alpha=0.3)
    ax.margins(x=0.08)  # room for the n= labels at the ends
    # Below the axes: inside it would cover points whatever corner it picks.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    return f"fig_metric_vs_{x_f.split('.')[-1]}.png", fig


def _plot_arms(an: Analysis) -> Figure | None:
    """One row per arm: single trials, mean and 95% t-CI; the control's CI as a band."""
    info, arms = an.info, an.arms
    if not arms:
        return None
    fig = Figure(figsize=(9, 2.2 + 0.42 * len(arms)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, a in enumerate(arms):
        vals = a.values(info.name)
        ax.scatter(vals * info.scale, np.full(len(vals), i), s=14, color="C0", alpha=0.45, zorder=2)
        s = _summ(a, info.name)
        if s.mean is not None:
            err = None
            if s.ci_low is not None:
                err = [[(s.mean - s.ci_low) * info.scale], [(s.ci_high - s.mean) * info.scale]]
            is_ref = a.key in an.reference.reference_keys
            ax.errorbar([s.mean * info.scale], [i], xerr=err, fmt="D", color="C3" if is_ref else "k",
                        capsize=4, zorder=3)
        bad = a.count("diverged") + a.count("error")
        ax.annotate(f"n={s.n}" + (f" (+{bad} failed/diverged)" if bad else ""), (1.01, i),
                    xycoords=("axes fraction", "data"), va="center", fontsize=8)
    # Each row gets the CI band of its own (matched) reference, so several controls do not mix.
    shaded = False
    for i, a in enumerate(arms):
        ref = a if a.key in an.reference.reference_keys else an.reference.matched.get(a.key)
        s = _summ(ref, info.name) if ref is not None else None
        if s is not None and s.ci_low is not None:
            ax.fill_betweenx([i - 0.45, i + 0.45], s.ci_low * info.scale, s.ci_high * info.scale,
                             color="C3", alpha=0.12, lw=0, zorder=0)
            shaded = True
    ax.set_yticks(range(len(arms)), [a.label for a in arms], fontsize=8)
    ax.set_ylim(len(arms) - 0.5, -0.5)  # first arm on top, half a row of margin
    ax.set_xlabel(_ylabel(info.name, info))
    # The key lives in the title: a legend box would sit on top of some arm's row.
    ref_txt = "\nred: reference arm; shaded: 95% CI of each row's reference" if shaded else ""
    ax.set_title(f"{an.study.name}: {info.describe_name()} per arm\n"
                 f"dots: single trials; diamond: mean with 95% t-CI{ref_txt}", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _phase_spans(hist: pd.DataFrame) -> list[tuple[float, float, str]]:
    if "phase" not in hist.columns:
        return []
    per = hist.groupby(["trial_id", "phase"])["epoch"].agg(["min", "max"]).reset_index()
    spans = []
    for ph, g in per.groupby("phase"):
        lab = str(ph)
        if "phase_label" in hist.columns:
            labs = hist.loc[hist["phase"] == ph, "phase_label"].dropna()
            if not labs.empty:
                lab = str(labs.mode().iloc[0])
        spans.append((float(g["min"].median()) - 0.5, float(g["max"].median()) + 0.5, lab))
    return spans


def _plot_curves(an: Analysis) -> Figure | None:
    """Mean over seeds (ok trials) of val/test accuracy (and sparsity) per epoch, per arm."""
    hist = an.study.history
    if hist is None:
        return None
    arms = an.arms
    if len(arms) > MAX_CURVES:
        ref = [a for a in arms if a.key in an.reference.reference_keys]
        rest = [a for a in arms if a.key not in an.reference.reference_keys]
        idx = np.linspace(0, len(rest) - 1, MAX_CURVES - len(ref[:1])).round().astype(int)
        arms = ref[:1] + [rest[i] for i in sorted(set(idx))]
    panels = [c for c in ("val_acc", "test_acc", "sparsity") if c in hist.columns]
    if not panels:
        return None
    fig = Figure(figsize=(11, 2.6 * len(panels) + 0.9), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    spans = None
    for i, a in enumerate(arms):
        ids = a.rows.loc[a.rows["status"] == "ok", "trial_id"]
        h = hist[hist["trial_id"].isin(ids)]
        if h.empty:
            continue
        if spans is None:
            spans = _phase_spans(h)
        # Plain per-epoch mean over seeds, for the picture only (the tables use stats.describe).
        mean = h.groupby("epoch")[panels].mean(numeric_only=True)
        n = h["trial_id"].nunique()
        for ax, col in zip(axes, panels):
            ax.plot(mean.index, mean[col] * 100.0, color=f"C{i % 10}", lw=1.5,
                    label=f"{a.label} (n={n})")
    if spans is None:
        return None
    labels = {"val_acc": "validation accuracy (%)", "test_acc": "test accuracy (%)",
              "sparsity": "sparsity (% zeros)"}
    for k, ax in enumerate(axes):
        for j, (x0, x1, lab) in enumerate(spans):
            ax.axvspan(x0, x1, color="0.85" if j % 2 == 0 else "0.95", zorder=0)
            if k == 0:
                ax.text((x0 + x1) / 2, 1.01, lab, transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=9, fontweight="bold")
        ax.set_ylabel(labels[panels[k]])
        ax.grid(alpha=0.3)
        if panels[k] != "sparsity":
            lines = [ln.get_ydata() for ln in ax.get_lines()]
            late = np.concatenate([np.asarray(y)[len(y) // 5:] for y in lines if len(y)]) if lines else []
            if len(late) and np.isfinite(late).any():
                lo, hi = np.nanmin(late), np.nanmax(late)
                pad = max(0.5, 0.1 * (hi - lo))
                ax.set_ylim(lo - pad, hi + pad)  # zoom on where arms differ, not the first epochs
    axes[-1].set_xlabel("epoch (shaded: phases)")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                   title="arm (n ok trials)", title_fontsize=8)
    extra = f"; {len(arms)} of {len(an.arms)} arms shown" if len(arms) < len(an.arms) else ""
    fig.suptitle(f"{an.study.name}: learning curves, mean over seeds (ok trials){extra}\n"
                 "accuracy axes zoomed to the last 80% of epochs", fontsize=11)
    return fig


def _trial_arm(arms: list[Arm]) -> dict[Any, Arm]:
    return {tid: a for a in arms for tid in a.rows["trial_id"]}


def _plot_layers(an: Analysis) -> Figure | None:
    """Mean per-layer density per arm (ok trials)."""
    lay = an.study.layers
    if lay is None:
        return None
    t2a = _trial_arm(an.arms)
    ok = {tid for a in an.arms for tid in a.rows.loc[a.rows["status"] == "ok", "trial_id"]}
    lay = lay[lay["trial_id"].isin(ok)]
    if lay.empty:
        return None
    order = list(dict.fromkeys(lay["layer"]))
    arms = [a for a in an.arms if a.rows["trial_id"].isin(lay["trial_id"]).any()][:MAX_CURVES]
    fig = Figure(figsize=(min(24, max(7, 0.25 * len(order) * (len(arms) + 1) + 3)), 5), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(order))
    width = 0.8 / max(1, len(arms))
    # Grouped bars, not lines: arms with identical densities (uniform allocation) stay visible.
    for i, a in enumerate(arms):
        sub = lay[lay["trial_id"].map(lambda tid: t2a.get(tid)) == a]
        dens = sub.groupby("layer")["density"].mean().reindex(order)
        ax.bar(x - 0.4 + width * (i + 0.5), dens.to_numpy(dtype=float), width=width, color=f"C{i % 10}",
               label=a.label)
    ax.set_xticks(x, order, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("density (fraction of weights kept)")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{an.study.name}: per-layer density (mean over ok trials)", fontsize=11)
    return fig


def _plot_weights(an: Analysis) -> Figure | None:
    """Weight-value histograms at each phase end, one trial per arm (the DSD paper's Figure 2)."""
    w = an.study.weights
    if w is None:
        return None
    arms = [a for a in an.arms
            if a.rows.loc[a.rows["status"] == "ok", "trial_id"].isin(w["trial_id"]).any()]
    if not arms:
        return None
    if len(arms) > MAX_HIST_ARMS:
        arms = [arms[i] for i in sorted(set(np.linspace(0, len(arms) - 1, MAX_HIST_ARMS).round().astype(int)))]
    present = list(dict.fromkeys(w["phase_label"].astype(str)))
    labels = [p for p in an.study.phase_labels if p in present] + [p for p in present if p not in an.study.phase_labels]
    # A fixed grid layout: the constrained solver is slow with a dozen axes.
    fig = Figure(figsize=(3.3 * len(labels) + 0.9, 2.5 * len(arms) + 1.0), dpi=100)
    axes = fig.subplots(len(arms), len(labels), squeeze=False, sharex=True)
    fig.subplots_adjust(left=0.9 / fig.get_figwidth() + 0.04, right=0.98, bottom=0.6 / fig.get_figheight(),
                        top=1 - 0.75 / fig.get_figheight(), hspace=0.45, wspace=0.3)
    for r, a in enumerate(arms):
        ok = a.rows[(a.rows["status"] == "ok") & a.rows["trial_id"].isin(w["trial_id"])].sort_values("seed")
        tid, seed = ok["trial_id"].iloc[0], ok["seed"].iloc[0]
        for c, lab in enumerate(labels):
            ax = axes[r, c]
            h = w[(w["trial_id"] == tid) & (w["phase_label"].astype(str) == lab)].sort_values("bin_left")
            if not h.empty:
                # One step artist per panel: hundreds of bar patches make saving slow.
                left = h["bin_left"].to_numpy(dtype=float)
                right = h["bin_right"].to_numpy(dtype=float)
                counts = h["count"].to_numpy(dtype=float)
                ax.stairs(counts, np.append(left, right[-1]), fill=True, color="C0")
                # Pruned weights pile up in the bin holding 0; clip it (as the paper's linear plot
                # would be unreadable otherwise) and say how tall it is.
                zero = (left <= 0) & (right > 0)
                rest = counts[~zero]
                if zero.any() and rest.size and rest.max() > 0 and counts[zero].max() > 2 * rest.max():
                    ax.set_ylim(0, 1.15 * rest.max())
                    ax.annotate(f"bin at 0: {int(counts[zero].max()):,}\n(clipped)", (0.98, 0.96),
                                xycoords="axes fraction", ha="right", va="top", fontsize=7, color="C3",
                                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.9})
            ax.set_title(f"{a.label}\nend of {lab} (trial {tid}, seed {seed})", fontsize=8)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("count (weights)")
            if r == len(arms) - 1:
                ax.set_xlabel("weight value")
    fig.suptitle(f"{an.study.name}: weight distribution of prunable layers at each phase end", fontsize=11)
    return fig


def _plot_search(an: Analysis) -> Figure | None:
    """Search progress: validation metric per sweep trial and the running best."""
    val = an.val_metric
    if not an.search_mode or val is None:
        return None
    t = an.study.trials
    sweep = t[(t["stage"] != "confirm")].sort_values("trial_id")
    if sweep.empty:
        return None
    vinfo = _metric_info(val, an.study.meta)
    y = pd.to_numeric(sweep[val], errors="coerce").to_numpy(dtype=float)
    ok = (sweep["status"] == "ok").to_numpy() & np.isfinite(y)
    x = np.arange(1, len(sweep) + 1)
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(x[ok], y[ok] * vinfo.scale, s=16, color="C0", label="ok trial")
    if (~ok).any():
        floor = 0.0
        if ok.any():
            lo, hi = np.nanmin(y[ok]), np.nanmax(y[ok])
            floor = (lo - 0.08 * (hi - lo or 1e-2)) * vinfo.scale
        ax.scatter(x[~ok], np.full((~ok).sum(), floor), marker="x", color="C3",
                   label="diverged / failed (no value; drawn below the lowest)")
    if ok.any():
        yy = np.where(ok, y, -np.inf if vinfo.higher_is_better else np.inf)
        run = np.maximum.accumulate(yy) if vinfo.higher_is_better else np.minimum.accumulate(yy)
        ax.step(x, np.where(np.isfinite(run), run * vinfo.scale, np.nan), where="post", color="k",
                label="best so far")
    ax.set_xlabel("sweep trial (in trial_id order)")
    ax.set_ylabel(_ylabel(val, vinfo))
    ax.set_title(f"{an.study.name}: search on {val} (validation; test never used for selection)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


# -------------------------------------------------------------------------------------- report.md


def _design_lines(an: Analysis) -> list[str]:
    study, info, t = an.study, an.info, an.study.trials
    meta = study.meta
    lines = []
    if study.flow:
        phases = " → ".join(study.phase_labels) if study.phase_labels else study.flow
        lines.append(f"- **Flow**: {study.flow} (phases {phases}).")
    levels = []
    for f in study.factors:
        lv = sorted({_canon(v): v for v in t[f]}.values(), key=_sort_key)
        shown = ", ".join(_fmt_level(v) for v in lv[:12]) + (f", … ({len(lv)} levels)" if len(lv) > 12 else "")
        levels.append(f"`{f}` ∈ {{{shown}}}")
    alg = meta.get("search_alg", "grid")
    lines.append(f"- **Search**: {alg}" + (f" over {'; '.join(levels)}." if levels else " (no factors)."))
    seeds = meta.get("seeds") or []
    if seeds:
        lines.append(f"- **Seeds**: {len(seeds)} per arm ({', '.join(str(s) for s in seeds[:20])}"
                     f"{', …' if len(seeds) > 20 else ''}).")
    counts = {s: int((t['status'] == s).sum()) for s in STATUSES}
    lines.append(f"- **Trials**: {len(t)} in trials.csv: {counts['ok']} ok, {counts['diverged']} diverged, "
                 f"{counts['error']} error. Diverged and failed trials are counted in the n columns and "
                 "excluded from every mean, SD and test.")
    better = "higher is better" if info.higher_is_better else "lower is better"
    acc = (" Accuracies are shown in % and differences in percentage points (pp); accuracy is the "
           "primary measure, error = 100 − accuracy is added for comparison with the DSD paper."
           if info.is_acc else "")
    lines.append(f"- **Metric**: `{info.name}` ({info.describe_name()}; {better}).{acc}")
    paired = bool(meta.get("shared_prefix"))
    lines.append(f"- **Comparisons**: {an.reference.description}")
    lines.append("- **Tests**: " + (
        "paired t on per-seed differences (shared_prefix: arms with the same seed start from the same "
        "trained prefix and data order), Wilcoxon signed-rank as the secondary test"
        if paired else
        "Welch's unequal-variance t (as the DSD paper's unpaired test), Mann-Whitney U as the secondary test")
        + ". 95% CIs are t-intervals. Holm correction within each family (family size m given with each "
          "table), Benjamini-Hochberg (BH) alongside for screening. `significant` = Holm-adjusted p < 0.05. "
          "MDE = smallest true difference detectable with 80% power at α = 0.05 (two-sided; statsmodels "
          "TTestIndPower, or TTestPower for paired tests); `underpowered` = the observed |difference| is "
          "below the MDE (or n is too small to compute it); on a significant row it warns that the "
          "estimate is likely inflated (winner's curse). Hedges' g uses the pooled SD; P(better) is the "
          "probability that a random trial of the arm beats a random trial of the reference.")
    if an.baseline_col:
        lines.append(f"- **Baseline**: each trial's own `{an.baseline_col}` (end of {study.phase_labels[0]}, "
                     "the dense baseline before pruning) — a paired comparison within the same trial.")
    return lines


def _summary_table(an: Analysis, arms: list[Arm], metric: str) -> str:
    minfo = _metric_info(metric, an.study.meta)
    u = minfo.unit
    headers = ["arm", "n total", "n ok", "n diverged", "n error", "n used", f"mean ({u or 'value'})",
               f"SD ({'pp' if minfo.is_acc else 'value'})", f"SEM ({'pp' if minfo.is_acc else 'value'})",
               f"95% t-CI of mean ({u or 'value'})", f"median ({u or 'value'})", f"min ({u or 'value'})",
               f"max ({u or 'value'})"]
    if minfo.is_acc:
        headers.append("mean error (%) = 100 − acc")
    rows = []
    for a in arms:
        s = _summ(a, metric)
        row = [a.label + (" (reference)" if a.key in an.reference.reference_keys else ""), len(a.rows),
               a.count("ok"), a.count("diverged"), a.count("error"), s.n,
               _fmt_v(_num(s.mean), minfo), _fmt_v(_num(s.sd), minfo), _fmt_v(_num(s.sem), minfo),
               (f"[{_fmt_v(_num(s.ci_low), minfo)}, {_fmt_v(_num(s.ci_high), minfo)}]"
                if s.ci_low is not None else "–"),
               _fmt_v(_num(s.median), minfo), _fmt_v(_num(s.min), minfo), _fmt_v(_num(s.max), minfo)]
        if minfo.is_acc:
            row.append("–" if s.mean is None else f"{100 - s.mean * 100:.2f}")
        rows.append(row)
    return _md_table(headers, rows)


def _phase_table(an: Analysis) -> str | None:
    cols = an.phase_metrics + [an.info.name]
    if not an.phase_metrics:
        return None
    headers = ["arm"] + [c.replace("acc_after_", "after ") for c in an.phase_metrics] + ["final: " + an.info.name]
    rows = []
    for a in an.arms:
        row = [a.label]
        for c in cols:
            minfo = _metric_info(c, an.study.meta)
            s = _summ(a, c)
            if s.mean is None:
                row.append("–")
            elif s.sd is None:
                row.append(f"{_fmt_v(s.mean, minfo)} (n=1)")
            else:
                row.append(f"{_fmt_v(s.mean, minfo)} ± {_fmt_v(s.sd, minfo)} SD (n={s.n})")
        rows.append(row)
    return _md_table(headers, rows)


def _comparison_table(rows: pd.DataFrame, info: MetricInfo) -> str:
    du = "pp" if info.is_acc else "value"
    headers = ["arm", "reference", "test", "status", "n (arm, ref)", f"diff ({du}) [95% CI]", "p",
               "p Holm", "p BH", "Hedges' g", "P(better)", f"MDE 80% ({du})", "rank test p", "flags"]
    out = []
    for _, r in rows.iterrows():
        flags = [f for f, on in (("significant", r["significant"]), ("underpowered", r["underpowered"])) if on]
        if r["rank_status"] != "ok":
            flags.append(RANK_FLAGS.get(r["rank_status"], f"rank test: {r['rank_status']}"))
        if r["status"] != "ok":
            flags.append(r["status"])
        ci = (f" [{_fmt_d(r['ci_low'], info)}, {_fmt_d(r['ci_high'], info)}]"
              if not math.isnan(r["ci_low"]) else "")
        out.append([
            r["arm"], r["reference"], _test_name(r["test"]), r["status"],
            f"{_fmt_n(r['n_a'])}, {_fmt_n(r['n_b'])}", f"{_fmt_d(r['diff'], info)}{ci}",
            _fmt_p(r["p_value"]), _fmt_p(r["p_holm"]), _fmt_p(r["p_bh"]),
            "–" if math.isnan(r["hedges_g"]) else f"{r['hedges_g']:+.2f}",
            "–" if math.isnan(r["p_better"]) else f"{r['p_better']:.2f}",
            "–" if math.isnan(r["mde"]) else _fmt_v(r["mde"], info),
            f"{_fmt_p(r['rank_p'])} ({_test_name(r['rank_test'])})", ", ".join(flags) or "–",
        ])
    return _md_table(headers, out)


def _search_section(an: Analysis) -> list[str]:
    study, val = an.study, an.val_metric
    t = study.trials
    sweep = t[t["stage"] != "confirm"]
    counts = {s: int((sweep["status"] == s).sum()) for s in STATUSES}
    out = ["## Search (stage sweep)", "",
           f"{len(sweep)} sweep trials ({counts['ok']} ok, {counts['diverged']} diverged, "
           f"{counts['error']} error) over {len(an.sweep_arms)} configurations, searched with "
           f"{study.meta.get('search_alg', '?')} on `{val}` (validation; the test set is never used to "
           "select)."]
    if an.best_sweep is None:
        out += ["", "No sweep trial has a validation value yet, so there is no best configuration."]
        return out + [""]
    vinfo = _metric_info(val, study.meta)
    s = _summ(an.best_sweep, val)
    out += ["", f"Best configuration by mean `{val}`: **{an.best_sweep.label}** "
                f"({_fmt_v(s.mean, vinfo)}{vinfo.unit}, n={s.n})."]
    scored = [(stats.describe(a.values(val)), a) for a in an.sweep_arms]
    scored = [(sm, a) for sm, a in scored if sm.mean is not None]
    scored.sort(key=lambda x: x[0].mean, reverse=vinfo.higher_is_better)
    rows = [[i + 1, a.label, sm.n, a.count("diverged") + a.count("error"), _fmt_v(sm.mean, vinfo)]
            for i, (sm, a) in enumerate(scored[:10])]
    out += ["", f"Top {len(rows)} configurations by validation (mean over ok trials; test values are "
                "deliberately not shown for the sweep):", "",
            _md_table(["rank", "config", "n ok", "n failed/diverged", f"mean {val} ({vinfo.unit or 'value'})"], rows)]
    if an.arms:
        confirm_best = [a for a in an.arms if all(_same(a.factors[f], an.best_sweep.factors[f]) for f in study.factors)]
        if study.factors and not confirm_best:
            out += ["", "Note: no confirm arm has exactly the best sweep configuration's factor values; "
                        "the confirm arms are compared as they are."]
    else:
        out += ["", "No confirm trials yet: the best configuration has not been re-run on fresh seeds, "
                    "so nothing is compared on the test set."]
    return out + [""]


def render_markdown(an: Analysis, figures: dict[str, Path], out_dir: Path) -> str:
    study, info = an.study, an.info
    lines = [f"# {study.name}: study report", ""]
    if study.meta.get("description"):
        lines += [str(study.meta["description"]).strip(), ""]
    lines += ["## Design", "", *_design_lines(an), ""]
    if an.search_mode:
        lines += _search_section(an)
    stage = ("confirm trials: best configuration re-run on fresh seeds beside the control"
             if an.search_mode else "all trials")
    lines += [f"## Results: `{info.name}` ({stage})", ""]
    if not an.arms:
        lines += ["No trials to summarize yet.", ""]
    else:
        lines += ["Per arm; mean, SD (standard deviation over seeds), SEM (standard error of the mean) and "
                  "the 95% t-interval of the mean use the n used (ok trials with a value).", "",
                  _summary_table(an, an.arms, info.name), ""]
        pt = _phase_table(an)
        if pt:
            lines += ["### Per phase (test accuracy at the end of each phase, %)", "",
                      "Cells: mean ± SD over seeds (n = ok trials with a value), like the DSD paper's tables.", "",
                      pt, ""]
    comp = an.comparisons
    lines += ["## Comparisons with the control", "", an.reference.description, ""]
    cc = comp[comp["family"] == "vs_control"] if not comp.empty else comp
    unmatched = [a.label for a in an.arms
                 if a.key in an.reference.matched and an.reference.matched[a.key] is None]
    if unmatched:
        lines += [f"No matching control arm for: {', '.join(unmatched)} (skipped).", ""]
    if not cc.empty:
        lines += [f"Family: {len(cc)} arm(s) vs their control; Holm over m = {an.control_m} comparison(s) "
                  "with a p-value; BH alongside. Differences are arm − reference.", "",
                  _comparison_table(cc, info), "", *[f"- {s}" for s in cc["sentence"]], ""]
    elif an.reference.kind != "none":
        lines += ["No arm besides the reference has trials yet; nothing to compare.", ""]
    if an.baseline_col:
        bc = comp[comp["family"] == "vs_baseline"] if not comp.empty else comp
        lines += [f"## Comparisons with the per-seed baseline (`{an.baseline_col}`)", ""]
        if bc.empty:
            lines += ["No trials to compare yet.", ""]
        else:
            lines += [f"Paired t of `{info.name}` against the same trial's `{an.baseline_col}`; family: "
                      f"{len(bc)} arm(s), Holm over m = {an.baseline_m}. Differences are final − baseline.", "",
                      _comparison_table(bc, info), "", *[f"- {s}" for s in bc["sentence"]], ""]
    if figures:
        lines += ["## Figures", ""]
        titles = {"fig_metric_by_arm": "Metric per arm", "fig_learning_curves": "Learning curves",
                  "fig_layer_density": "Per-layer density", "fig_weight_hist": "Weight distributions",
                  "fig_search": "Search progress"}
        for key, path in figures.items():
            title = titles.get(key, "Metric vs factor")
            rel = os.path.relpath(path, out_dir)
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["---", "Generated by `python -m dsdtune.report`. Numbers in summary.csv and comparisons.csv "
              "are in metric units (fractions for accuracies)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- entry points


def write_report(study_dir: str | os.PathLike, metric: str | None = None,
                 control: str | dict | None = None, out_dir: str | os.PathLike | None = None,
                 figures: bool = True) -> dict[str, Path]:
    """Analyze results/<study>/ and write summary.csv, comparisons.csv, report.md and figures.

    `metric` defaults to final_<test_metric>; `control` ("factor=value,..." or a dict) defaults to
    study.json "control". Returns {name: path} of every file written. Raises StudyError.
    """
    study = load_study(study_dir)
    an = analyze(study, metric, control)
    out = Path(out_dir) if out_dir is not None else study.dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot create output directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise StudyError(f"output directory {out} is not writable; pass --out DIR")
    written: dict[str, Path] = {}
    figs: dict[str, Path] = {}
    if figures:
        candidates: list[tuple[str, Figure | None]] = []
        fv = _plot_factor(an)
        if fv is not None:
            candidates.append((fv[0][:-4], fv[1]))
        candidates += [("fig_metric_by_arm", _plot_arms(an)), ("fig_learning_curves", _plot_curves(an)),
                       ("fig_layer_density", _plot_layers(an)), ("fig_weight_hist", _plot_weights(an)),
                       ("fig_search", _plot_search(an))]
        for name, fig in candidates:
            if fig is not None:
                path = out / f"{name}.png"
                _save_fig(fig, path)
                figs[name] = path
    written["summary"] = out / "summary.csv"
    _atomic_write_text(written["summary"], an.summary.to_csv(index=False))
    written["comparisons"] = out / "comparisons.csv"
    _atomic_write_text(written["comparisons"], an.comparisons.to_csv(index=False))
    written["report"] = out / "report.md"
    _atomic_write_text(written["report"], render_markdown(an, figs, out))
    written.update(figs)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsdtune.report",
                                     description="Tables, significance tests, plots and report.md for a study.")
    parser.add_argument("study_dir", help="results/<study> directory written by dsdtune.study")
    parser.add_argument("--metric", default=None, help="trials.csv column to analyze (default: final_test_acc)")
    parser.add_argument("--control", default=None,
                        help="control arm as factor=value[,factor=value] (default: study.json control)")
    parser.add_argument("--out", default=None, help="output directory (default: the study directory)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.study_dir, args.metric, args.control, args.out)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
