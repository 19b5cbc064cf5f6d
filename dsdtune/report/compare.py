"""Who is compared with whom (control matching), the tests of each comparison, and the analysis."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from dsdtune import stats

from .arms import (as_number, baseline_column, canon, fmt_level, group_arms, metric_info, phase_kind,
                   resolve_metric, same, val_metric)
from .costs import trial_costs
from .load import study_spec
from .ranks import rank_summary
from .text import ALPHA, BOOTSTRAP_SEED, POWER, comparison_sentence, nan_if_none, subject_of
from .types import (Analysis, ArmTrials, CostTable, MetricInfo, Reference, ReportError, ReportInput, SpecSource,
                    arm_cost)


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
            raise ReportError(f"--control {spec!r}: expected factor=value[,factor=value], e.g. "
                             "'pipeline.sparsity=0'")
        k, v = part.split("=", 1)
        v = v.strip()
        num = as_number(v)
        out[k.strip()] = num if num is not None else v
    return out or None


def resolve_reference(study: ReportInput, arms: list[ArmTrials], control: dict | None) -> Reference:
    if control:
        allowed = set(study.factors) | {"arm"}
        bad = [k for k in control if k not in allowed]
        if bad:
            raise ReportError(f"control factor {bad[0]!r} is not a factor of this study; factors: "
                             f"{', '.join(study.factors) or 'none'}")

        def is_control(a: ArmTrials) -> bool:
            return all(same(a.label if k == "arm" else a.factors.get(k), v) for k, v in control.items())

        ctrl = [a for a in arms if is_control(a)]
        spec_text = ", ".join(f"{k}={fmt_level(v)}" for k, v in control.items())
        if not ctrl:
            return Reference("none", "the control", control, f"No trial matches the control ({spec_text}); "
                             "comparisons with the control are skipped.", [], {}, set())
        others = [f for f in study.factors if f not in control]
        match_on = [f for f in others if len({canon(a.factors[f]) for a in ctrl}) > 1]
        matched = {}
        for a in arms:
            if a in ctrl:
                continue
            cand = [c for c in ctrl if all(same(c.factors[f], a.factors[f]) for f in match_on)]
            matched[a.key] = cand[0] if cand else None
        name, why = "the control", ""
        prunes = any(phase_kind(study, c).get("sparse") for c in set(study.flow) if c.isalpha())
        if any(k.endswith("sparsity") and same(v, 0) for k, v in control.items()) and prunes:
            name, why = "the direct fine-tune control", " (no pruning; same phases, epochs and LRs)"
        desc = f"Control: {spec_text} — {name}{why}."
        if match_on:
            desc += (f" Each arm is compared with the control arm that has the same {', '.join(match_on)}"
                     " (rule: match on every other factor that varies among the control arms).")
        elif len(study.factors) > len(control):
            desc += " All arms share this one control arm."
        return Reference("control", name, control, desc, match_on, matched, {a.key for a in ctrl})

    val = val_metric(study)
    if len(arms) < 2 or val is None:
        return Reference("none", "the control", None, "The study names no control and there is no second arm or "
                         "validation metric to compare with; no comparisons with a control.", [], {}, set())
    info = metric_info(val, study.meta)
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


def _pooled_sd(sa: stats.Summary, sb: stats.Summary) -> float | None:
    if sa.sd is None or sb.sd is None:
        return None
    nu = sa.n + sb.n - 2
    return math.sqrt(((sa.n - 1) * sa.sd**2 + (sb.n - 1) * sb.sd**2) / nu)


def compare_arms(a: ArmTrials, b: ArmTrials | None, metric: str, want_paired: bool, info: MetricInfo,
                 b_metric: str | None = None, margin: float | None = None) -> dict[str, Any]:
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
        mde_args: tuple = ("paired", int(keep.sum()), stats.describe(xa[keep] - xb[keep]).sd)
    else:
        test = stats.welch_t(xa, xb)
        rank = stats.mann_whitney(xa, xb)
        mde_args = ("independent", len(xa), len(xb), _pooled_sd(stats.describe(xa), stats.describe(xb)))
    boot = stats.bootstrap_ci_diff(xa, xb, paired=paired, seed=BOOTSTRAP_SEED)
    tost = None
    if margin is not None:
        tost = (stats.tost_paired if paired else stats.tost_welch)(xa, xb, margin, ALPHA)
    sa, sb = stats.describe(xa), stats.describe(xb)
    g = stats.hedges_g(xa, xb)
    ps = stats.prob_superiority(xa, xb)
    p_better = None if ps.value is None else (ps.value if info.higher_is_better else 1.0 - ps.value)
    note = "; ".join(x for x in [*note_parts, test.note] if x)
    return {
        "metric": metric,
        "test": test.test,
        "status": test.status,
        "n_a": test.n_a,
        "n_b": test.n_b if test.n_b is not None else np.nan,
        "mean_a": nan_if_none(sa.mean),
        "mean_ref": nan_if_none(sb.mean),
        "diff": nan_if_none(test.diff),
        "ci_low": nan_if_none(test.ci_low),
        "ci_high": nan_if_none(test.ci_high),
        "boot_ci_low": nan_if_none(boot.ci_low),
        "boot_ci_high": nan_if_none(boot.ci_high),
        "statistic": nan_if_none(test.statistic),
        "df": nan_if_none(test.df),
        "p_value": nan_if_none(test.p_value),
        "hedges_g": nan_if_none(g.value),
        "p_better": nan_if_none(p_better),
        "margin": nan_if_none(margin),
        "tost_test": tost.test if tost is not None else "",
        "tost_status": tost.status if tost is not None else "",
        "tost_p": nan_if_none(tost.p_value if tost is not None else None),
        "tost_ci_low": nan_if_none(tost.ci_low if tost is not None else None),
        "tost_ci_high": nan_if_none(tost.ci_high if tost is not None else None),
        "rank_test": rank.test,
        "rank_status": rank.status,
        "rank_p": nan_if_none(rank.p_value),
        "note": note,
        "_mde_args": mde_args,
    }


def adjust_family(rows: list[dict[str, Any]]) -> int:
    """Holm and BH over one family in place, the MDE at Holm's strictest level and the equivalence
    verdicts; returns the family size m (comparisons with a p).

    MDE: a true difference this large reaches p < alpha / m with 80% power, so Holm (which rejects
    at least what Bonferroni rejects) flags it `significant` with at least that power.
    Equivalence: TOST p-values are Holm-adjusted over the same family; `equivalent` = margin given
    and Holm-adjusted TOST p < alpha.
    """
    ps = [None if math.isnan(r["p_value"]) else r["p_value"] for r in rows]
    h, bh = stats.holm(ps), stats.benjamini_hochberg(ps)
    mde_alpha = ALPHA / max(h.m, 1)
    tost_holm = stats.holm([None if math.isnan(r["tost_p"]) else r["tost_p"] for r in rows])
    for r, ph, pb, pt in zip(rows, h.p_adjusted, bh.p_adjusted, tost_holm.p_adjusted):
        r["p_holm"], r["p_bh"], r["family_m"] = nan_if_none(ph), nan_if_none(pb), h.m
        r["significant"] = ph is not None and ph < ALPHA
        args = r.pop("_mde_args")
        if args[0] == "paired":
            mde = stats.minimum_detectable_effect_paired(args[1], mde_alpha, POWER, args[2])
        else:
            mde = stats.minimum_detectable_effect(args[1], args[2], mde_alpha, POWER, args[3])
        # No variance (deterministic runs): an MDE of 0 would read as "any effect detectable".
        usable = mde.status == "ok" and r["status"] == "ok"
        r["mde"] = nan_if_none(mde.effect_metric if usable else None)
        r["mde_d"] = nan_if_none(mde.effect_size)
        r["mde_alpha"] = mde_alpha
        r["underpowered"] = bool(math.isnan(r["mde"]) or (not math.isnan(r["diff"]) and abs(r["diff"]) < r["mde"]))
        r["tost_p_holm"] = nan_if_none(pt)
        r["equivalent"] = pt is not None and pt < ALPHA
    return h.m


# ------------------------------------------------------------------------------------ analysis


def summary_rows(arms: list[ArmTrials], stage: str, metrics: list[str], factors: list[str],
                 costs: CostTable | None = None) -> list[dict]:
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
                "n_diverged": a.count("diverged"), "n_stopped": a.count("stopped"), "n_error": a.count("error"),
                "n": s.n, "mean": nan_if_none(s.mean), "sd": nan_if_none(s.sd), "sem": nan_if_none(s.sem),
                "ci_low": nan_if_none(s.ci_low), "ci_high": nan_if_none(s.ci_high),
                "median": nan_if_none(s.median), "min": nan_if_none(s.min), "max": nan_if_none(s.max),
                "status": s.status,
            })
            if costs is not None and costs.trials is not None:
                row.update(arm_cost(costs, a, m))
            rows.append(row)
    return rows


def resolve_margin(study: ReportInput, source: SpecSource, margin: float | None) -> tuple[float | None, str]:
    """The equivalence margin and where it came from: the argument, study.json, or the spec."""
    where = "the --margin option"
    if margin is None:
        stored = study.meta.get("report")
        if isinstance(stored, dict) and stored.get("margin") is not None:
            margin, where = stored["margin"], "study.json"
        elif source.spec is not None and source.spec.report.margin is not None:
            margin, where = source.spec.report.margin, "the study's `report.margin`"
    if margin is None:
        return None, ""
    value = as_number(margin)
    if value is None or not math.isfinite(value) or value <= 0:
        raise ReportError(f"margin {margin!r}: give the equivalence margin in metric units as a number > 0, "
                         "e.g. --margin 0.005 for 0.5 pp of accuracy")
    return value, where


def analyze(study: ReportInput, metric: str | None = None, control: str | dict | None = None,
            margin: float | None = None, costs: bool = True) -> Analysis:
    """Arms, per-arm summaries, both comparison families, costs and the rank summary over tasks."""
    return test_arms(design(study, metric, control, margin=margin, costs=costs))


def design(study: ReportInput, metric: str | None = None, control: str | dict | None = None,
           margin: float | None = None, costs: bool = True) -> Analysis:
    """The analysis before any statistic: arms, the reference, the metric, costs (what the figures
    draw). Its summary and comparisons are empty until `test_arms`."""
    metric = resolve_metric(study, metric)
    info = metric_info(metric, study.meta)
    source = study_spec(study)
    margin, margin_source = resolve_margin(study, source, margin)
    cost_table = trial_costs(study, source) if costs else CostTable(None, "Costs not computed (switched off).")
    t = study.trials
    has_confirm = bool((t["stage"] == "confirm").any())
    search_mode = str(study.meta.get("search_alg", "")).lower() == "optuna" or has_confirm
    val = val_metric(study)
    sweep_arms: list[ArmTrials] = []
    best = None
    if search_mode:
        sweep_arms = group_arms(t[t["stage"] != "confirm"], study.factors)
        arms = group_arms(t[t["stage"] == "confirm"], study.factors)
        if val is not None:
            vinfo = metric_info(val, study.meta)
            scored = [(stats.describe(a.values(val)).mean, a) for a in sweep_arms]
            scored = [(m, a) for m, a in scored if m is not None]
            if scored:
                best = (max if vinfo.higher_is_better else min)(scored, key=lambda x: x[0])[1]
    else:
        arms = group_arms(t, study.factors)

    ctrl = parse_control(control) if control is not None else parse_control(study.meta.get("control"))
    reference = resolve_reference(study, arms, ctrl)
    baseline_col = baseline_column(study, metric)
    phase_metrics = [f"acc_after_{lab}" for lab in study.phase_labels
                     if f"acc_after_{lab}" in t.columns and f"acc_after_{lab}" != metric]

    return Analysis(study, info, arms, sweep_arms, search_mode, best, val, reference, baseline_col,
                    phase_metrics, pd.DataFrame(), pd.DataFrame(), 0, 0, margin, margin_source, source, cost_table)


def test_arms(an: Analysis) -> Analysis:
    """`an` with the per-arm summaries, both comparison families and the rank summary over tasks."""
    study, info, arms, sweep_arms, reference = an.study, an.info, an.arms, an.sweep_arms, an.reference
    metric, val, search_mode, margin = info.name, an.val_metric, an.search_mode, an.margin
    baseline_col = an.baseline_col
    metrics = [metric] + an.phase_metrics + ([val] if val and val != metric else [])
    srows = summary_rows(arms, "confirm" if search_mode else "all", metrics, study.factors, an.costs)
    if search_mode:
        srows += summary_rows(sweep_arms, "sweep", metrics, study.factors, an.costs)
    summary = pd.DataFrame(srows)

    paired = bool(study.meta.get("shared_prefix"))
    ref_kind = {"control": "control", "best_on_validation": "best arm on validation"}.get(reference.kind, "")
    ctrl_rows: list[dict[str, Any]] = []
    ctrl_arms: list[ArmTrials] = []  # aligned with ctrl_rows (labels need not be unique)
    for a in arms:
        if a.key in reference.reference_keys or a.key not in reference.matched:
            continue
        ref = reference.matched[a.key]
        if ref is None:
            continue
        r = {"family": "vs_control", "arm": a.label, "reference": ref.label,
             "reference_kind": ref_kind, **{f: a.factors[f] for f in study.factors}}
        r.update(compare_arms(a, ref, metric, paired, info, margin=margin))
        ctrl_rows.append(r)
        ctrl_arms.append(a)
    control_m = adjust_family(ctrl_rows)

    base_rows: list[dict[str, Any]] = []
    if baseline_col:
        for a in arms:
            r = {"family": "vs_baseline", "arm": a.label,
                 "reference": f"{baseline_col} (same trial)", "reference_kind": "baseline",
                 **{f: a.factors[f] for f in study.factors}}
            r.update(compare_arms(a, None, metric, True, info, b_metric=baseline_col, margin=margin))
            base_rows.append(r)
    baseline_m = adjust_family(base_rows)

    for r, a in zip(ctrl_rows, ctrl_arms):
        r["sentence"] = comparison_sentence(r, subject_of(study, a, reference),
                                            f"{reference.name} ({r['reference']})", info)
    base_label = study.phase_labels[0] if study.phase_labels else "D1"
    for r, a in zip(base_rows, arms):
        r["sentence"] = comparison_sentence(r, subject_of(study, a, reference),
                                            f"its own baseline (end of {base_label}, same trial)", info)
    comparisons = pd.DataFrame(ctrl_rows + base_rows)
    if not comparisons.empty:
        first = ["family", "arm", "reference", "reference_kind", *study.factors, "metric", "test",
                 "status", "n_a", "n_b", "mean_a", "mean_ref", "diff", "ci_low", "ci_high", "boot_ci_low",
                 "boot_ci_high", "statistic", "df", "p_value", "p_holm", "p_bh", "family_m", "significant",
                 "mde", "mde_alpha", "underpowered", "margin", "tost_test", "tost_status", "tost_p",
                 "tost_p_holm", "tost_ci_low", "tost_ci_high", "equivalent"]
        comparisons = comparisons[first + [c for c in comparisons.columns if c not in first]]
    return replace(an, summary=summary, comparisons=comparisons, control_m=control_m, baseline_m=baseline_m,
                   ranks=rank_summary(study, arms, info))
