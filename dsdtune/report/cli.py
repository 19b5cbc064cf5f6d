"""`python -m dsdtune.report`: the command line."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .drawing import FigureDrawing
from .types import ReportError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsdtune.report",
                                     description="Tables, significance tests, plots and report.md for a study.")
    parser.add_argument("results_dir", help="results/<study> folder written by dsdtune.study")
    parser.add_argument("--metric", default=None, help="trials.csv column to analyze (default: final_test_acc)")
    parser.add_argument("--control", default=None,
                        help="control arm as factor=value[,factor=value] (default: study.json control)")
    parser.add_argument("--margin", default=None,
                        help="equivalence margin in metric units, e.g. 0.005 = 0.5 pp of accuracy (default: the "
                             "study's report.margin; none: no equivalence claims)")
    parser.add_argument("--no-costs", action="store_true", help="skip parameter and FLOP counts")
    parser.add_argument("--out", default=None, help="output directory (default: the results folder)")
    args = parser.parse_args(argv)
    # The figures' helper imports matplotlib while this process imports the rest and analyzes (drawing.py).
    drawing = FigureDrawing.start()
    try:
        from .output import write_report
        written = write_report(args.results_dir, args.metric, args.control, args.out, margin=args.margin,
                               costs=not args.no_costs, drawing=drawing)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        drawing.cancel()  # nothing left to stop once the figures are written
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
