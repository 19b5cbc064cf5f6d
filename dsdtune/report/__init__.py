"""Study report: per-arm tables, comparisons with the control and the baseline, figures, report.md.

    python -m dsdtune.report results/<study> [--metric final_test_acc] [--control "pipeline.sparsity=0"]
                             [--margin 0.005] [--out DIR]

or `write_report(results_dir)` from the study runner, or `analyze(load_for_report(results_dir))` for
the numbers alone. Reads the files a study writes (study.json, trials.csv; optionally history.csv,
layers.csv, weights.csv) through `dsdtune.load_results`, the one reader of result files, and writes
summary.csv, comparisons.csv, costs.csv, report.md and PNG figures. Every statistic (mean, SD, CI,
tests, effect sizes, corrections, power) comes from `dsdtune.stats` and every FLOP count from
`dsdtune.cost`; this package only selects, pairs and renders.

Modules: `types` (the data classes every other module shares: ReportInput, ArmTrials, MetricInfo,
Reference, CostTable, RankResult, Analysis), `load` (the results as the report reads them, the
study's spec), `arms` (trials -> arms, metrics), `compare` (control matching, tests, the analysis),
`costs` (per-trial parameters and FLOPs), `ranks` (methods ranked across tasks), `text` (numbers and
sentences), `figures`, `drawing` (the figures drawn beside the analysis), `markdown` (report.md), `output`
(write_report), `cli`.

Rules (report.md states them too):
- Only trials with status "ok" and a finite metric value enter means and tests. Diverged and
  failed trials are counted in the n columns, never silently dropped. Any status other than "ok",
  "diverged" or "stopped" (ended early by a scheduler) counts as "error" (an interrupted study's
  unfinished trials among them). Prefix-stage rows (shared starting points) are not trials of an arm.
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

import importlib

__all__ = ["ReportError", "write_report", "load_for_report", "analyze", "parse_control", "main", "Analysis",
           "ArmTrials", "ReportInput"]
_WHERE = {"main": "cli", "analyze": "compare", "parse_control": "compare", "load_for_report": "load",
          "write_report": "output", "Analysis": "types", "ArmTrials": "types", "ReportError": "types",
          "ReportInput": "types"}


def __getattr__(name: str):
    # Lazy, so that `python -m dsdtune.report` can start its figures' helper before the analysis's
    # imports (drawing.py): the names above come from their modules on first use.
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'dsdtune.report' has no attribute {name!r}")
