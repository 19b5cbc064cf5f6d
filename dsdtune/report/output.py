"""write_report: analyze a study's results folder and write its CSVs, figures and report.md, each
file atomically (`dsdtune.atomic`), under the names `dsdtune.results` lists for the report."""
from __future__ import annotations

import io
import os
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
        for name, fig in candidates:
            if fig is not None:
                path = out / f"{name}{FIGURE_SUFFIX}"
                save_fig(fig, path)
                figs[name] = path
    written["summary"] = write_csv(an.summary, out / SUMMARY_CSV)
    written["comparisons"] = write_csv(an.comparisons, out / COMPARISONS_CSV)
    if an.costs is not None and an.costs.trials is not None:
        written["costs"] = write_csv(an.costs.trials, out / COSTS_CSV)
    if an.ranks is not None:
        written["ranks"] = write_csv(ranks_frame(an.ranks), out / RANKS_CSV)
    written["report"] = write_text(out / REPORT_MD, render_markdown(an, figs, out))
    written.update(figs)
    return written


