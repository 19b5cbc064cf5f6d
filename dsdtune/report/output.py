"""write_report: analyze a study's results folder and write its CSVs, figures and report.md, each
file atomically (`dsdtune.atomic`), under the names `dsdtune.results` lists for the report."""
from __future__ import annotations

import io
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Callable

from matplotlib.figure import Figure

from dsdtune.atomic import write_bytes, write_csv, write_text
from dsdtune.results import COMPARISONS_CSV, COSTS_CSV, FIGURE_SUFFIX, RANKS_CSV, REPORT_MD, SUMMARY_CSV

from . import figures as F
from .compare import design, test_arms
from .load import load_for_report
from .markdown import render_markdown
from .ranks import ranks_frame
from .types import ReportError


def save_fig(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes(path, buf.getvalue())


def _named(name: str, plot: Callable) -> Callable:
    def build(an) -> tuple[str, Figure] | None:
        fig = plot(an)
        return None if fig is None else (name, fig)
    return build


# Every figure a report may draw, in order: builders returning (file name without suffix, Figure),
# or None when the study has nothing for that figure.
FIGURES: list[Callable] = [
    F.plot_factor, _named("fig_metric_by_arm", F.plot_arms), _named("fig_learning_curves", F.plot_curves),
    _named("fig_layer_density", F.plot_layers), _named("fig_weight_hist", F.plot_weights),
    _named("fig_search", F.plot_search), _named("fig_metric_vs_training_flops", F.plot_cost),
]

_JOB: tuple = ()  # (analysis, out folder): what forked children inherit


def _draw(index: int, job: tuple = ()) -> str | None:
    """Build figure `index` of FIGURES for `job` (default: the inherited one) and write its PNG; its
    name, or None when it has nothing to show."""
    an, out = job or _JOB
    built = FIGURES[index](an)
    if built is None:
        return None
    name, fig = built
    save_fig(fig, out / f"{name}{FIGURE_SUFFIX}")
    return name


class FigureDrawing:
    """Builds and draws the figures, about half of a report's own time. With several cores and no
    other thread in this process (forking a process with threads can deadlock the child), forked
    children do it side by side while the caller runs the tests and writes the tables (`start`, then
    `finish`); else `finish` does it in this process."""

    def __init__(self, an, out: Path):
        self.job = (an, out)
        self.pool = self.pending = None

    def start(self) -> "FigureDrawing":
        global _JOB
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cores > 1 and threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
            _JOB = self.job
            try:
                self.pool = multiprocessing.get_context("fork").Pool(min(cores, len(FIGURES)))
                self.pending = self.pool.map_async(_draw, range(len(FIGURES)), chunksize=1)
            finally:
                _JOB = ()
        return self

    def cancel(self) -> None:
        """Stop the children (after their work, or when the caller failed before it needed it)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def finish(self) -> dict[str, Path]:
        """{figure name: path} of the figures written, in FIGURES order."""
        if self.pool is None:
            names = [_draw(i, self.job) for i in range(len(FIGURES))]
        else:
            try:
                names = self.pending.get()
            finally:
                self.cancel()
        out = self.job[1]
        return {name: out / f"{name}{FIGURE_SUFFIX}" for name in names if name is not None}


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
    an = design(study, metric, control, margin=margin, costs=costs)
    out = Path(out_dir) if out_dir is not None else study.path
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create output directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ReportError(f"output directory {out} is not writable; pass --out DIR")
    written: dict[str, Path] = {}
    drawing = FigureDrawing(an, out).start() if figures else None  # the figures need no statistic
    try:
        an = test_arms(an)
        written["summary"] = write_csv(an.summary, out / SUMMARY_CSV)
        written["comparisons"] = write_csv(an.comparisons, out / COMPARISONS_CSV)
        if an.costs is not None and an.costs.trials is not None:
            written["costs"] = write_csv(an.costs.trials, out / COSTS_CSV)
        if an.ranks is not None:
            written["ranks"] = write_csv(ranks_frame(an.ranks), out / RANKS_CSV)
    except BaseException:
        if drawing is not None:
            drawing.cancel()
        raise
    figs = drawing.finish() if drawing is not None else {}
    written["report"] = write_text(out / REPORT_MD, render_markdown(an, figs, out))
    written.update(figs)
    return written


