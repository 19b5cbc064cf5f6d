"""Per-trial parameters and FLOPs, as each trial recorded them (trials.csv's cost columns).

A trial computes its own cost when it ends (`dsdtune.cost`): training FLOPs from the densities its
phases' kinds trained at step by step (and their extra work, e.g. RigL's dense gradients), with the
model's per-layer forward FLOPs measured once per model by the study's validation; the final model's
parameters and inference FLOPs from its non-zero entries. The report only reads them, so it builds
no model and loads no data. Results written before trials recorded their costs have none.
"""
from __future__ import annotations

from typing import Any

from .types import COST_COLUMNS, CostTable, ReportInput

RECORDED = [c for c in COST_COLUMNS if c != "cost_exact"]


def trial_costs(study: ReportInput, source: Any = None) -> CostTable:
    """Every trial's recorded cost, or a table of None with the reason."""
    trials = study.trials
    missing = [c for c in RECORDED if c not in trials.columns]
    if missing:
        return CostTable(None, "Costs not recorded: these results were written before trials recorded their "
                               f"FLOPs (trials.csv has no {missing[0]} column).")
    table = trials[["trial_id", *RECORDED]].copy()
    table = table[table[RECORDED].notna().all(axis=1)]  # diverged and never-started trials have none
    table["params_final"] = table["params_final"].astype(float)
    table["cost_exact"] = True
    table["cost_note"] = ""
    return CostTable(table.reset_index(drop=True),
                     "Recorded by each trial: its phases' per-layer densities step by step (and extra work such "
                     "as RigL's dense gradients) times each layer's forward FLOPs, measured once per model with "
                     "torch's flop counter; the final model's non-zero entries.")
