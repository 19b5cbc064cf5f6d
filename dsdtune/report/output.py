"""write_report: analyze a study's results folder and write its CSVs, figures and report.md, each
file atomically (`dsdtune.atomic`), under the names `dsdtune.results` lists for the report."""
from __future__ import annotations

import os
from pathlib import Path

from dsdtune.atomic import write_csv, write_text
from dsdtune.results import COMPARISONS_CSV, COSTS_CSV, RANKS_CSV, REPORT_MD, SUMMARY_CSV

from .compare import design, test_arms
from .drawing import FigureDrawing
from .load import load_for_report
from .markdown import render_markdown
from .ranks import ranks_frame
from .types import ReportError


# ------------------------------------------------------------------------------------- entry points


def write_report(results_dir: str | os.PathLike, metric: str | None = None,
                 control: str | dict | None = None, out_dir: str | os.PathLike | None = None,
                 figures: bool = True, margin: float | None = None, costs: bool = True,
                 drawing: FigureDrawing | None = None) -> dict[str, Path]:
    """Analyze a results folder (results/<study>); write summary.csv, comparisons.csv, costs.csv, report.md
    and the figures (fig_*.png).

    `metric` defaults to final_<test_metric>; `control` ("factor=value,..." or a dict) defaults to
    study.json "control"; `margin` (metric units) to the study's `report.margin` (none: no
    equivalence claims); `costs=False` skips the FLOP counts; `drawing` is one the caller started
    earlier (`FigureDrawing.start()`, the command line does), else it is started here. Returns
    {name: path} of every file written. Raises ReportError.
    """
    if not figures and drawing is not None:
        drawing.cancel()
        drawing = None
    elif figures and drawing is None:
        drawing = FigureDrawing.start()
    try:
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
        if drawing is not None:
            drawing.draw(an, out)  # the figures need no statistic
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


