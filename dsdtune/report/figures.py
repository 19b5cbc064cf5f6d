"""The report's figures (matplotlib's object API: never touches pyplot's global backend)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dsdtune import stats

from .arms import as_number, canon, describe_arm, fmt_level, metric_info
from .types import Analysis, ArmTrials, MetricInfo

MAX_CURVES = 10  # more lines than this make a learning-curve plot unreadable
MAX_HIST_ARMS = 4


# -------------------------------------------------------------------------------------- figures


def _ylabel(metric: str, info: MetricInfo) -> str:
    return f"{info.describe_name()} ({info.unit})" if info.unit else info.describe_name()


def plot_factor(an: Analysis) -> tuple[str, Figure] | None:
    """Metric vs a numeric factor, 95% CI bars, one line per level of the other factors; returned with
    its file name (no suffix), fig_metric_vs_<factor>."""
    study, info, arms = an.study, an.info, an.arms
    numeric = [f for f in study.factors
               if all(as_number(a.factors[f]) is not None for a in arms)
               and len({canon(a.factors[f]) for a in arms}) > 1]
    if not numeric or len(arms) < 2:
        return None
    x_f = next((f for f in numeric if f.endswith("sparsity")), numeric[0])
    others = [f for f in study.factors if f != x_f and len({canon(a.factors[f]) for a in arms}) > 1]
    strata: dict[str, list[ArmTrials]] = {}
    for a in arms:
        strata.setdefault(", ".join(f"{f}={fmt_level(a.factors[f])}" for f in others), []).append(a)
    fig = Figure(figsize=(9, 5.6 + 0.2 * len(strata)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(strata))]
    width = max((as_number(a.factors[x_f]) for a in arms)) - min((as_number(a.factors[x_f]) for a in arms))
    jitter = 0.012 * (width or 1.0)
    drawn_bands: set[str] = set()
    for (name, group), col in zip(strata.items(), colors):
        group = sorted(group, key=lambda a: as_number(a.factors[x_f]))
        xs, ys, lo, hi, ns = [], [], [], [], []
        for k, a in enumerate(group):
            s = describe_arm(a, info.name)
            x = as_number(a.factors[x_f])
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
            s = describe_arm(ref, info.name)
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
    return f"fig_metric_vs_{x_f.split('.')[-1]}", fig


def plot_arms(an: Analysis) -> Figure | None:
    """One row per arm: single trials, mean and 95% t-CI; the control's CI as a band."""
    info, arms = an.info, an.arms
    if not arms:
        return None
    fig = Figure(figsize=(9, 2.2 + 0.42 * len(arms)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, a in enumerate(arms):
        vals = a.values(info.name)
        ax.scatter(vals * info.scale, np.full(len(vals), i), s=14, color="C0", alpha=0.45, zorder=2)
        s = describe_arm(a, info.name)
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
        s = describe_arm(ref, info.name) if ref is not None else None
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


def plot_curves(an: Analysis) -> Figure | None:
    """Mean over seeds (ok trials) of val/test accuracy (and sparsity) per epoch, per arm.

    Arms are grouped by their phase layout (flow and epochs): each group gets its own column with
    its own phases shaded, so DSD, DSDSD and DSDSDSD arms are not drawn on one flow's phases.
    """
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
    groups: dict[tuple, list[tuple[int, ArmTrials, pd.DataFrame]]] = {}
    for i, a in enumerate(arms):
        ids = a.rows.loc[a.rows["status"] == "ok", "trial_id"]
        h = hist[hist["trial_id"].isin(ids)]
        if h.empty:
            continue
        spans = tuple(_phase_spans(h))
        groups.setdefault(spans, []).append((i, a, h))
    if not groups:
        return None
    ncol = len(groups)
    fig = Figure(figsize=(11 if ncol == 1 else 4.2 * ncol + 3, 2.6 * len(panels) + 0.9), dpi=100,
                 layout="constrained")
    axes = fig.subplots(len(panels), ncol, sharex="col", sharey="row", squeeze=False)
    labels = {"val_acc": "validation accuracy (%)", "test_acc": "test accuracy (%)",
              "sparsity": "sparsity (% zeros)"}
    for col, (spans, members) in enumerate(groups.items()):
        for i, a, h in members:
            # Plain per-epoch mean over seeds, for the picture only (the tables use stats.describe).
            mean = h.groupby("epoch")[panels].mean(numeric_only=True)
            n = h["trial_id"].nunique()
            for ax, c in zip(axes[:, col], panels):
                ax.plot(mean.index, mean[c] * 100.0, color=f"C{i % 10}", lw=1.5, label=f"{a.label} (n={n})")
        for k, ax in enumerate(axes[:, col]):
            for j, (x0, x1, lab) in enumerate(spans):
                ax.axvspan(x0, x1, color="0.85" if j % 2 == 0 else "0.95", zorder=0)
                if k == 0:
                    ax.text((x0 + x1) / 2, 1.01, lab, transform=ax.get_xaxis_transform(), ha="center",
                            va="bottom", fontsize=9, fontweight="bold")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(labels[panels[k]])
        axes[-1, col].set_xlabel("epoch (shaded: phases)")
        if ncol > 1:
            axes[0, col].set_title("phases " + " → ".join(lab for _, _, lab in spans), fontsize=9, pad=16)
        axes[0, col].legend(fontsize=7 if ncol > 1 else 8, loc="lower right" if ncol > 1 else "upper left",
                            **({} if ncol > 1 else {"bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0}),
                            title="arm (n ok trials)", title_fontsize=7 if ncol > 1 else 8)
    for k, c in enumerate(panels):
        if c == "sparsity":
            continue
        lines = [ln.get_ydata() for ax in axes[k] for ln in ax.get_lines()]
        late = np.concatenate([np.asarray(y)[len(y) // 5:] for y in lines if len(y)]) if lines else []
        if len(late) and np.isfinite(late).any():
            lo, hi = np.nanmin(late), np.nanmax(late)
            pad = max(0.5, 0.1 * (hi - lo))
            axes[k, 0].set_ylim(lo - pad, hi + pad)  # zoom on where arms differ, not the first epochs
    shown = sum(len(m) for m in groups.values())
    extra = f"; {shown} of {len(an.arms)} arms shown" if shown < len(an.arms) else ""
    per_flow = "; one column per phase layout" if ncol > 1 else ""
    fig.suptitle(f"{an.study.name}: learning curves, mean over seeds (ok trials){extra}{per_flow}\n"
                 "accuracy axes zoomed to the last 80% of epochs", fontsize=11)
    return fig


def plot_cost(an: Analysis) -> Figure | None:
    """Final metric (mean, 95% t-CI) against training FLOPs per arm; the reference arms in red."""
    if an.costs is None or an.costs.trials is None or not an.arms:
        return None
    info = an.info
    pts = []
    for a in an.arms:
        c = an.arm_cost(a)
        s = describe_arm(a, info.name)
        if s.mean is None or np.isnan(c["training_flops"]):
            continue
        pts.append((a, c["training_flops"], s))
    if not pts:
        return None
    fig = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    xs = [x for _, x, _ in pts]
    unit, prefix = next(((u, p) for u, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
                         if max(xs) >= u), (1.0, ""))
    others = [f"C{i}" for i in range(10) if i != 3]  # C3 (red) marks the reference arms
    for k, (a, x, s) in enumerate(pts):
        is_ref = a.key in an.reference.reference_keys
        err = None if s.ci_low is None else [[(s.mean - s.ci_low) * info.scale], [(s.ci_high - s.mean) * info.scale]]
        ax.errorbar([x / unit], [s.mean * info.scale], yerr=err, fmt="s" if is_ref else "o", capsize=4,
                    color="C3" if is_ref else others[k % len(others)],
                    label=f"{a.label} (n={s.n})" + (" — reference" if is_ref else ""))
    if max(xs) > 10 * min(xs):
        ax.set_xscale("log")
    dense = an.arm_cost(pts[0][0])["training_flops_dense"]
    if all(abs(an.arm_cost(a)["training_flops_dense"] - dense) <= 1e-9 * dense for a, _, _ in pts):
        ax.axvline(dense / unit, color="0.4", ls="--", lw=1, label="same epochs, all dense")
    ax.set_xlabel(f"training {prefix}FLOPs per trial (whole flow; masked layers scaled by density)")
    ax.set_ylabel(_ylabel(info.name, info))
    ax.set_title(f"{an.study.name}: {info.describe_name()} vs training cost\n"
                 "mean with 95% t-CI over seeds, one point per arm", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    return fig


def _trial_arm(arms: list[ArmTrials]) -> dict[Any, ArmTrials]:
    return {tid: a for a in arms for tid in a.rows["trial_id"]}


def plot_layers(an: Analysis) -> Figure | None:
    """Mean per-layer density per arm (ok trials)."""
    lay = an.study.layers
    if lay is None:
        return None
    t2a = _trial_arm(an.arms)
    ok = {tid for a in an.arms for tid in a.rows.loc[a.rows["status"] == "ok", "trial_id"]}
    lay = lay[lay["trial_id"].isin(ok)]
    if "phase_label" in lay.columns:  # a trial's init (or GSM) densities, else its last masked phase's
        labelled = lay["phase_label"].notna()
        plain = set(lay.loc[~labelled, "trial_id"])
        last = lay.loc[labelled].groupby("trial_id")["phase_label"].transform("last").reindex(lay.index)
        lay = lay[~labelled | (~lay["trial_id"].isin(plain) & (lay["phase_label"] == last))]
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


def plot_weights(an: Analysis) -> Figure | None:
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


def plot_search(an: Analysis) -> Figure | None:
    """Search progress: validation metric per sweep trial and the running best."""
    val = an.val_metric
    if not an.search_mode or val is None:
        return None
    t = an.study.trials
    sweep = t[(t["stage"] != "confirm")].sort_values("trial_id")
    if sweep.empty:
        return None
    vinfo = metric_info(val, an.study.meta)
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


