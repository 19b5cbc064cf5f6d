"""write_report: analyze a study's results folder and write its CSVs, figures and report.md, each
file atomically (`dsdtune.atomic`), under the names `dsdtune.results` lists for the report."""
from __future__ import annotations

import io
import multiprocessing
import os
import threading
from pathlib import Path

from matplotlib.figure import Figure

from dsdtune.atomic import write_bytes, write_csv, write_text
from dsdtune.results import COMPARISONS_CSV, COSTS_CSV, FIGURE_SUFFIX, RANKS_CSV, REPORT_MD, SUMMARY_CSV

from . import figures as F
from .compare import analyze
from .load import load_for_report
from .markdown import render_markdown
from .ranks import ranks_frame
from .types import ReportError


def save_fig(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes(path, buf.getvalue())


_PENDING: list[tuple[Figure, Path]] = []  # what forked children draw: they inherit it


def _save_pending(index: int) -> None:
    save_fig(*_PENDING[index])


def save_figs(pending: list[tuple[Figure, Path]]) -> None:
    """Draw and encode the figures, about half of a report's own time. With several cores and no
    other thread in this process (forking a process with threads can deadlock the child), forked
    children draw them side by side, each inheriting the figures it draws; else one after another."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if (len(pending) < 2 or cores < 2 or threading.active_count() > 1
            or "fork" not in multiprocessing.get_all_start_methods()):
        for fig, path in pending:
            save_fig(fig, path)
        return
    global _PENDING
    _PENDING = pending
    try:
        with multiprocessing.get_context("fork").Pool(min(cores, len(pending))) as pool:
            pool.map(_save_pending, range(len(pending)), chunksize=1)
    finally:
        _PENDING = []


# ------------------------------------------------------------------------------------- entry points


def write_report(results_dir: str | os.PathLike, metric: str | None = None,
                 control: str | dict | None = None, out_dir: str | os.PathLike | None = None,
                 figures: bool = True, margin: float | None = None, costs: bool = True) -> dict[str, Path]:
    """Analyze a results folder (results/<study>); write summary.csv, comparisons.csv, costs.csv, report.md
    and the figures (fig_*.png).

    `metric` defaults to final_<test_metric>; `control` ("factor=value,..." or a dict) defaults to
    study.json "control"; `margin` (metric units) to the study's `report.margin` (none: no
    equivalence claims); `costs=False` skips the FLOP counts. Returns {name: path} of every file
    written. Raises ReportError.
    """
    study = load_for_report(results_dir)
    an = analyze(study, metric, control, margin=margin, costs=costs)
    out = Path(out_dir) if out_dir is not None else study.path
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create output directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ReportError(f"output directory {out} is not writable; pass --out DIR")
    written: dict[str, Path] = {}
    figs: dict[str, Path] = {}
    if figures:
        candidates: list[tuple[str, Figure | None]] = []
        fv = F.plot_factor(an)
        if fv is not None:
            candidates.append((fv[0][:-4], fv[1]))
        candidates += [("fig_metric_by_arm", F.plot_arms(an)), ("fig_learning_curves", F.plot_curves(an)),
                       ("fig_layer_density", F.plot_layers(an)), ("fig_weight_hist", F.plot_weights(an)),
                       ("fig_search", F.plot_search(an)), ("fig_metric_vs_training_flops", F.plot_cost(an))]
        figs = {name: out / f"{name}{FIGURE_SUFFIX}" for name, fig in candidates if fig is not None}
        save_figs([(fig, figs[name]) for name, fig in candidates if fig is not None])
    written["summary"] = write_csv(an.summary, out / SUMMARY_CSV)
    written["comparisons"] = write_csv(an.comparisons, out / COMPARISONS_CSV)
    if an.costs is not None and an.costs.trials is not None:
        written["costs"] = write_csv(an.costs.trials, out / COSTS_CSV)
    if an.ranks is not None:
        written["ranks"] = write_csv(ranks_frame(an.ranks), out / RANKS_CSV)
    written["report"] = write_text(out / REPORT_MD, render_markdown(an, figs, out))
    written.update(figs)
    return written


