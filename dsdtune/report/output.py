"""write_report: analyze a study directory and write its CSVs, figures and report.md atomically."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from . import figures as F
from .compare import analyze
from .ranks import ranks_frame
from .load import StudyError, load_study
from .markdown import render_markdown


# ------------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
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


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_fig(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------- entry points


def write_report(study_dir: str | os.PathLike, metric: str | None = None,
                 control: str | dict | None = None, out_dir: str | os.PathLike | None = None,
                 figures: bool = True, margin: float | None = None, costs: bool = True) -> dict[str, Path]:
    """Analyze results/<study>/ and write summary.csv, comparisons.csv, costs.csv, report.md, figures.

    `metric` defaults to final_<test_metric>; `control` ("factor=value,..." or a dict) defaults to
    study.json "control"; `margin` (metric units) to the study's `report.margin` (none: no
    equivalence claims); `costs=False` skips the FLOP counts. Returns {name: path} of every file
    written. Raises StudyError.
    """
    study = load_study(study_dir)
    an = analyze(study, metric, control, margin=margin, costs=costs)
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
        fv = F.plot_factor(an)
        if fv is not None:
            candidates.append((fv[0][:-4], fv[1]))
        candidates += [("fig_metric_by_arm", F.plot_arms(an)), ("fig_learning_curves", F.plot_curves(an)),
                       ("fig_layer_density", F.plot_layers(an)), ("fig_weight_hist", F.plot_weights(an)),
                       ("fig_search", F.plot_search(an)), ("fig_metric_vs_training_flops", F.plot_cost(an))]
        for name, fig in candidates:
            if fig is not None:
                path = out / f"{name}.png"
                save_fig(fig, path)
                figs[name] = path
    written["summary"] = out / "summary.csv"
    atomic_write_text(written["summary"], an.summary.to_csv(index=False))
    written["comparisons"] = out / "comparisons.csv"
    atomic_write_text(written["comparisons"], an.comparisons.to_csv(index=False))
    if an.costs is not None and an.costs.trials is not None:
        written["costs"] = out / "costs.csv"
        atomic_write_text(written["costs"], an.costs.trials.to_csv(index=False))
    if an.ranks is not None:
        written["ranks"] = out / "ranks.csv"
        atomic_write_text(written["ranks"], ranks_frame(an.ranks).to_csv(index=False))
    written["report"] = out / "report.md"
    atomic_write_text(written["report"], render_markdown(an, figs, out))
    written.update(figs)
    return written


