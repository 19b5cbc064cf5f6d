"""report.md: design, per-arm tables, comparison tables with one sentence each, figures."""
from __future__ import annotations

import math
import os
from pathlib import Path
import pandas as pd

from dsdtune import stats

from .arms import canon, describe_arm, fmt_level, metric_info, same, sort_key
from .text import (BOOTSTRAP_SEED, fmt_d, fmt_flops, fmt_n, fmt_p, fmt_v, margin_text, md_table, nan_if_none,
                   test_name)
from .types import STATUSES, Analysis, ArmTrials, MetricInfo

RANK_FLAGS = {"rank_test_cannot_reach_alpha": "rank test cannot reach p < 0.05 at this n",
              "insufficient_n": "rank test: n too small", "no_variance": "rank test: all tied"}


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
        lv = sorted({canon(v): v for v in t[f]}.values(), key=sort_key)
        shown = ", ".join(fmt_level(v) for v in lv[:12]) + (f", … ({len(lv)} levels)" if len(lv) > 12 else "")
        levels.append(f"`{f}` ∈ {{{shown}}}")
    alg = meta.get("search_alg", "grid")
    lines.append(f"- **Search**: {alg}" + (f" over {'; '.join(levels)}." if levels else " (no factors)."))
    seeds = meta.get("seeds") or []
    if an.search_mode:
        conf = t[t["stage"] == "confirm"]
        confirm_seeds = meta.get("confirm_seeds") or sorted({int(x) for x in conf["seed"]})
        if seeds:
            lines.append(f"- **Seeds (search)**: {len(seeds)} per searched configuration ({_seed_list(seeds)}).")
        if confirm_seeds:
            arm_names = ", ".join(a.label for a in an.arms) or "none yet"
            lines.append(f"- **Seeds (confirm)**: {len(confirm_seeds)} fresh seeds per arm ({_seed_list(confirm_seeds)}); "
                         f"arms: {arm_names}.")
        else:
            lines.append("- **Seeds (confirm)**: no confirm stage yet.")
    elif seeds:
        lines.append(f"- **Seeds**: {len(seeds)} per arm ({_seed_list(seeds)}).")
    if an.search_mode:
        parts = [_count_text(t[t["stage"] != "confirm"], "search"), _count_text(t[t["stage"] == "confirm"], "confirm")]
    else:
        parts = [_count_text(t, "")]
    lines.append(f"- **Trials**: {'; '.join(parts)}. Diverged and failed trials are counted in the n columns "
                 "and excluded from every mean, SD and test; trials stopped early by the scheduler (ASHA) "
                 "hold an earlier epoch's value, so they are counted but enter no mean or test either.")
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
        + ". 95% CIs are t-intervals (primary); beside them a percentile-bootstrap 95% CI of the same "
          f"difference (scipy.stats.bootstrap, 9999 resamples, seed {BOOTSTRAP_SEED}; it runs narrow below "
          "about 15 seeds). Holm correction within each family (family size m given with each "
          "table), Benjamini-Hochberg (BH) alongside for screening. `significant` = Holm-adjusted p < 0.05. "
          "MDE = smallest true difference detectable with 80% power at α = 0.05/m, Holm's strictest step "
          "(two-sided; statsmodels TTestIndPower, or TTestPower for paired tests), so a true difference "
          "that large is flagged `significant` with at least 80% power; `underpowered` = the observed "
          "|difference| is below the MDE (or n is too small to compute it); on a significant row it warns "
          "that the estimate is likely inflated (winner's curse). Hedges' g uses the pooled SD; P(better) "
          "is the probability that a random trial of the arm beats a random trial of the reference.")
    if an.margin is not None:
        lines.append(
            f"- **Equivalence**: margin {margin_text(an.margin, info)} (from {an.margin_source}). Each comparison "
            "adds two one-sided tests (TOST: " + ("paired" if paired else "Welch") + " t, statsmodels "
            + ("ttost_paired" if paired else "ttost_ind with unequal variances") + ") of H0: |difference| ≥ "
            "margin; its p-value is Holm-adjusted within the family like the others, and a row reads "
            "`equivalent` when that Holm p < 0.05. The 90% t-interval inside the margin is the same test "
            "before the correction.")
    else:
        lines.append("- **Equivalence**: no margin declared (`report: {margin: ...}` in the study file or "
                     "`--margin`), so no comparison claims \"no practical difference\"; a non-significant "
                     "row only says that no effect larger than its MDE was detected.")
    if an.costs is not None:
        lines.append(f"- **Cost**: {an.costs.description}" + (
            " Inference FLOPs are per sample of the final model, each masked layer scaled by its density; "
            "training FLOPs ≈ 3 × forward FLOPs per sample at each phase's densities × training samples × "
            "epochs, summed over the flow (prefix phases included: the cost of running the method once); "
            "a multiply-add is 2 FLOPs, only matmuls and convolutions are counted. These are the FLOPs an "
            "ideal sparse kernel spends (as the sparse-training literature counts them); dsdtune's masked "
            "dense kernels take the dense time." if an.costs.trials is not None else ""))
    if an.baseline_col:
        lines.append(f"- **Baseline**: each trial's own `{an.baseline_col}` (end of {study.phase_labels[0]}, "
                     "the dense baseline before pruning) — a paired comparison within the same trial.")
    return lines


def _seed_list(seeds) -> str:
    return ", ".join(str(x) for x in list(seeds)[:20]) + (", …" if len(seeds) > 20 else "")


def _count_text(t: pd.DataFrame, stage: str) -> str:
    counts = {s: int((t["status"] == s).sum()) for s in STATUSES}
    where = f" in stage {stage}" if stage else " in trials.csv"
    return (f"{len(t)}{where}: {counts['ok']} ok, {counts['stopped']} stopped early, "
            f"{counts['diverged']} diverged, {counts['error']} error")


def _summary_table(an: Analysis, arms: list[ArmTrials], metric: str) -> str:
    minfo = metric_info(metric, an.study.meta)
    u = minfo.unit
    stopped = any(a.count("stopped") for a in arms)
    headers = ["arm", "n total", "n ok", "n diverged", *(["n stopped"] if stopped else []), "n error", "n used",
               f"mean ({u or 'value'})",
               f"SD ({'pp' if minfo.is_acc else 'value'})", f"SEM ({'pp' if minfo.is_acc else 'value'})",
               f"95% t-CI of mean ({u or 'value'})", f"median ({u or 'value'})", f"min ({u or 'value'})",
               f"max ({u or 'value'})"]
    if minfo.is_acc:
        headers.append("mean error (%) = 100 − acc")
    with_cost = an.costs is not None and an.costs.trials is not None
    if with_cost:
        headers += ["params (final non-zero)", "inference FLOPs/sample (× dense)", "training FLOPs (× dense)"]
    rows = []
    for a in arms:
        s = describe_arm(a, metric)
        row = [a.label + (" (reference)" if a.key in an.reference.reference_keys else ""), len(a.rows),
               a.count("ok"), a.count("diverged"), *([a.count("stopped")] if stopped else []), a.count("error"), s.n,
               fmt_v(nan_if_none(s.mean), minfo), fmt_v(nan_if_none(s.sd), minfo), fmt_v(nan_if_none(s.sem), minfo),
               (f"[{fmt_v(nan_if_none(s.ci_low), minfo)}, {fmt_v(nan_if_none(s.ci_high), minfo)}]"
                if s.ci_low is not None else "–"),
               fmt_v(nan_if_none(s.median), minfo), fmt_v(nan_if_none(s.min), minfo), fmt_v(nan_if_none(s.max), minfo)]
        if minfo.is_acc:
            row.append("–" if s.mean is None else f"{100 - s.mean * 100:.2f}")
        if with_cost:
            row += _cost_cells(an.arm_cost(a))
        rows.append(row)
    return md_table(headers, rows)


def _cost_cells(c: dict) -> list[str]:
    if math.isnan(c["training_flops"]):
        return ["–", "–", "–"]
    mark = "" if c["cost_exact"] else " ≈"
    return [f"{c['params_final']:,.0f} of {c['params']:,.0f}",
            f"{fmt_flops(c['inference_flops'])} ({c['inference_flops'] / c['inference_flops_dense']:.2f}×){mark}",
            f"{fmt_flops(c['training_flops'])} ({c['training_flops'] / c['training_flops_dense']:.2f}×){mark}"]


def _phase_table(an: Analysis) -> str | None:
    cols = an.phase_metrics + [an.info.name]
    if not an.phase_metrics:
        return None
    headers = ["arm"] + [c.replace("acc_after_", "after ") for c in an.phase_metrics] + ["final: " + an.info.name]
    rows = []
    for a in an.arms:
        row = [a.label]
        for c in cols:
            minfo = metric_info(c, an.study.meta)
            s = describe_arm(a, c)
            if s.mean is None:
                row.append("–")
            elif s.sd is None:
                row.append(f"{fmt_v(s.mean, minfo)} (n=1)")
            else:
                row.append(f"{fmt_v(s.mean, minfo)} ± {fmt_v(s.sd, minfo)} SD (n={s.n})")
        rows.append(row)
    return md_table(headers, rows)


def _comparison_table(rows: pd.DataFrame, info: MetricInfo, margin: float | None) -> str:
    du = "pp" if info.is_acc else "value"
    headers = ["arm", "reference", "test", "status", "n (arm, ref)", f"diff ({du}) [95% t-CI]",
               "bootstrap 95% CI", "p", "p Holm", "p BH", "Hedges' g", "P(better)",
               f"MDE 80%, α = 0.05/m ({du})", "rank test p"]
    if margin is not None:
        headers.append(f"TOST ±{fmt_v(margin, info)}: p Holm [90% CI]")
    headers.append("flags")
    out = []
    for _, r in rows.iterrows():
        flags = [f for f, on in (("significant", r["significant"]), ("underpowered", r["underpowered"])) if on]
        if margin is not None and r["equivalent"]:
            flags.append(f"equivalent {margin_text(margin, info)}")
        if r["rank_status"] != "ok":
            flags.append(RANK_FLAGS.get(r["rank_status"], f"rank test: {r['rank_status']}"))
        if r["status"] != "ok":
            flags.append(r["status"])
        ci = (f" [{fmt_d(r['ci_low'], info)}, {fmt_d(r['ci_high'], info)}]"
              if not math.isnan(r["ci_low"]) else "")
        boot = (f"[{fmt_d(r['boot_ci_low'], info)}, {fmt_d(r['boot_ci_high'], info)}]"
                if not math.isnan(r["boot_ci_low"]) else "–")
        row = [
            r["arm"], r["reference"], test_name(r["test"]), r["status"],
            f"{fmt_n(r['n_a'])}, {fmt_n(r['n_b'])}", f"{fmt_d(r['diff'], info)}{ci}", boot,
            fmt_p(r["p_value"]), fmt_p(r["p_holm"]), fmt_p(r["p_bh"]),
            "–" if math.isnan(r["hedges_g"]) else f"{r['hedges_g']:+.2f}",
            "–" if math.isnan(r["p_better"]) else f"{r['p_better']:.2f}",
            "–" if math.isnan(r["mde"]) else fmt_v(r["mde"], info),
            f"{fmt_p(r['rank_p'])} ({test_name(r['rank_test'])})"]
        if margin is not None:
            row.append(f"{fmt_p(r['tost_p_holm'])} [{fmt_d(r['tost_ci_low'], info)}, {fmt_d(r['tost_ci_high'], info)}]"
                       if r["tost_status"] == "ok" else r["tost_status"])
        row.append(", ".join(flags) or "–")
        out.append(row)
    return md_table(headers, out)


def _search_section(an: Analysis) -> list[str]:
    study, val = an.study, an.val_metric
    t = study.trials
    sweep = t[t["stage"] != "confirm"]
    counts = {s: int((sweep["status"] == s).sum()) for s in STATUSES}
    out = ["## Search", "",
           f"{len(sweep)} search trials ({counts['ok']} ok, {counts['stopped']} stopped early by the scheduler, "
           f"{counts['diverged']} diverged, {counts['error']} error) over {len(an.sweep_arms)} configurations, "
           f"searched with {study.meta.get('search_alg', '?')} on `{val}` (validation; the test set is never "
           "used to select). A configuration ranks on its completed (ok) trials only: a stopped trial's "
           "value is from an earlier epoch."]
    if an.best_sweep is None:
        out += ["", "No sweep trial has a validation value yet, so there is no best configuration."]
        return out + [""]
    vinfo = metric_info(val, study.meta)
    s = describe_arm(an.best_sweep, val)
    out += ["", f"Best configuration by mean `{val}`: **{an.best_sweep.label}** "
                f"({fmt_v(s.mean, vinfo)}{vinfo.unit}, n={s.n})."]
    scored = [(stats.describe(a.values(val)), a) for a in an.sweep_arms]
    scored = [(sm, a) for sm, a in scored if sm.mean is not None]
    scored.sort(key=lambda x: x[0].mean, reverse=vinfo.higher_is_better)
    rows = [[i + 1, a.label, sm.n, a.count("stopped"), a.count("diverged") + a.count("error"), fmt_v(sm.mean, vinfo)]
            for i, (sm, a) in enumerate(scored[:10])]
    out += ["", f"Top {len(rows)} configurations by validation (mean over ok trials; test values are "
                "deliberately not shown for the search):", "",
            md_table(["rank", "config", "n ok", "n stopped", "n failed/diverged",
                      f"mean {val} ({vinfo.unit or 'value'})"], rows)]
    if an.arms:
        confirm_best = [a for a in an.arms if all(same(a.factors[f], an.best_sweep.factors[f]) for f in study.factors)]
        if study.factors and not confirm_best:
            out += ["", "Note: no confirm arm has exactly the best sweep configuration's factor values; "
                        "the confirm arms are compared as they are."]
    else:
        out += ["", "No confirm trials yet: the best configuration has not been re-run on fresh seeds, "
                    "so nothing is compared on the test set."]
    return out + [""]


def _cost_section(an: Analysis) -> list[str]:
    out = ["## Cost", ""]
    if an.costs is None or an.costs.trials is None:
        return out + [an.costs.description if an.costs is not None else "Costs not computed.", ""]
    info = an.info
    cc = an.comparisons[an.comparisons["family"] == "vs_control"] if not an.comparisons.empty else an.comparisons
    verdict = {r["arm"]: r for _, r in cc.iterrows()}
    headers = ["arm", f"mean {info.name} ({info.unit or 'value'})", "training FLOPs", "× dense", "× its reference",
               "inference FLOPs/sample", "params (non-zero)", "vs reference"]
    rows = []
    for a in an.arms:
        c = an.arm_cost(a)
        if math.isnan(c["training_flops"]):
            continue
        ref = a if a.key in an.reference.reference_keys else an.reference.matched.get(a.key)
        rc = an.arm_cost(ref) if ref is not None else None
        ratio = (f"{c['training_flops'] / rc['training_flops']:.2f}×"
                 if rc is not None and not math.isnan(rc["training_flops"]) else "–")
        r = verdict.get(a.label)
        if a.key in an.reference.reference_keys:
            said = "reference"
        elif r is None:
            said = "–"
        else:
            said = ("significantly better" if r["significant"] and (r["diff"] > 0) == info.higher_is_better
                    else "significantly worse" if r["significant"] else "no significant difference")
            if an.margin is not None:
                said += (f"; equivalent {margin_text(an.margin, info)}" if r["equivalent"]
                         else "; not shown equivalent")
        rows.append([a.label, fmt_v(nan_if_none(describe_arm(a, info.name).mean), info),
                     fmt_flops(c["training_flops"]) + ("" if c["cost_exact"] else " ≈"),
                     f"{c['training_flops'] / c['training_flops_dense']:.2f}×", ratio,
                     fmt_flops(c["inference_flops"]), f"{c['params_final']:,.0f}", said])
    return out + [an.costs.description, "", md_table(headers, rows), ""]


def _rank_section(an: Analysis) -> list[str]:
    rk = an.ranks
    if rk is None:
        return []
    info = an.info
    out = ["## Ranks across tasks", "",
           f"Tasks: {', '.join(rk.tasks) or 'none complete'} (factor{'s' if len(rk.task_factors) > 1 else ''} "
           f"{', '.join(rk.task_factors)}); one value per task and method: the mean `{info.name}` over its "
           "ok trials. Rank 1 = best in a task (ties share the mean rank)."]
    if rk.dropped_tasks:
        out += ["", f"Left out (not every method has a value): {', '.join(rk.dropped_tasks)}."]
    order = sorted(range(len(rk.methods)), key=lambda i: rk.friedman.average_ranks[i])
    rows = [[rk.methods[i], f"{rk.friedman.average_ranks[i]:.2f}",
             *[fmt_v(rk.means[t, i], info) for t in range(len(rk.tasks))]] for i in order]
    out += ["", md_table(["method", "average rank", *rk.tasks], rows), ""]
    fr = rk.friedman
    if fr.status == "ok":
        out += [f"Friedman χ² = {fr.statistic:.3g} (df = {rk.friedman.k - 1}), p = {fmt_p(fr.p_value)}; "
                f"Iman-Davenport F = {fr.f_statistic:.3g} (df = {fr.df_num:g}, {fr.df_den:g}), "
                f"p = {fmt_p(fr.f_p_value)} ({fr.n_blocks} tasks, {fr.k} methods).", ""]
    else:
        out += [f"No Friedman test: {fr.note}.", ""]
    pairs = sorted(rk.pairs, key=lambda p: (p["p"] is None, p["p"] if p["p"] is not None else 1.0))
    shown = pairs[:15]
    prow = [[p["method_a"], p["method_b"], p["n_tasks"], fmt_d(p["mean_diff"], info),
             fmt_p(nan_if_none(p["p"])), fmt_p(nan_if_none(p["p_holm"])),
             RANK_FLAGS.get(p["status"], p["status"]) if p["status"] != "ok" else "–"] for p in shown]
    du = "pp" if info.is_acc else "value"
    out += [f"Pairwise Wilcoxon signed-rank on the per-task means, Holm over all {len(pairs)} pairs"
            + (f" (the {len(shown)} smallest p shown; all in ranks.csv)" if len(pairs) > len(shown) else "") + ":",
            "", md_table(["method A", "method B", "tasks", f"mean diff A − B ({du})", "p", "p Holm", "flags"], prow), ""]
    return out


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
                  _comparison_table(cc, info, an.margin), "", *[f"- {s}" for s in cc["sentence"]], ""]
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
                      _comparison_table(bc, info, an.margin), "", *[f"- {s}" for s in bc["sentence"]], ""]
    lines += _cost_section(an)
    lines += _rank_section(an)
    if figures:
        lines += ["## Figures", ""]
        titles = {"fig_metric_by_arm": "Metric per arm", "fig_learning_curves": "Learning curves",
                  "fig_metric_vs_training_flops": "Metric vs training FLOPs",
                  "fig_layer_density": "Per-layer density", "fig_weight_hist": "Weight distributions",
                  "fig_search": "Search progress"}
        for key, path in figures.items():
            title = titles.get(key, "Metric vs factor")
            rel = os.path.relpath(path, out_dir)
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["---", "Generated by `python -m dsdtune.report`. Numbers in summary.csv and comparisons.csv "
              "are in metric units (fractions for accuracies); costs.csv holds each trial's parameters and FLOPs."]
    return "\n".join(lines) + "\n"


