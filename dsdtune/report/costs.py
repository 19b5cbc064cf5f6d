"""Per-trial parameters and FLOPs, from the study's resolved spec and the densities trials recorded.

Which densities: layers.csv rows with a `phase_label` give that phase's per-layer densities as
trained (exact; every masked phase's, written by the runner); rows without one hold a sparse init's
densities (flows that start with S) or GSM's after truncation (flows with G), used as recorded;
otherwise (results from before phases recorded them) layer-wise criteria (DSD's default) keep an exact count per layer, so an S phase's
densities follow from its sparsity, and global magnitude pruning's target density stands in
(flagged `cost_exact` False).
Every trial gets the cost of its planned flow; per-arm means use the ok trials.
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

from .load import arm_assignments
from .types import COST_COLUMNS, CostTable, ReportInput, SpecSource

def trial_costs(study: ReportInput, source: SpecSource) -> CostTable:
    """Cost of every trial in trials.csv, or a table of None with the reason."""
    if source.spec is None:
        return CostTable(None, f"Costs not computed: {source.description}.")
    from dsdtune.config import SpecError, build_run_spec
    from dsdtune.cost import model_cost_for, trial_cost
    from dsdtune.data import DatasetUnavailable, load_dataset

    from dsdtune.pipeline import expand_phases

    spec = source.spec
    densities: dict[Any, dict[str, float]] = {}  # a sparse init's, or GSM's after truncation
    per_phase: dict[Any, dict[str, dict[str, float]]] = {}  # trial -> phase label -> densities
    if study.layers is not None:
        lay = study.layers
        labelled = lay["phase_label"].notna() if "phase_label" in lay.columns else pd.Series(False, index=lay.index)
        for tid, rows in lay[~labelled].groupby("trial_id"):
            densities[tid] = dict(zip(rows["layer"].astype(str), rows["density"].astype(float)))
        for (tid, label), rows in lay[labelled].groupby(["trial_id", "phase_label"]):
            per_phase.setdefault(tid, {})[str(label)] = dict(zip(rows["layer"].astype(str),
                                                                 rows["density"].astype(float)))
    datasets: dict[str, Any] = {}
    models: dict[str, Any] = {}
    out = []
    try:
        for _, row in study.trials.iterrows():
            run = build_run_spec(spec.base_run(), arm_assignments(row, study.factors, spec), int(row["seed"]))
            task_key = json.dumps(run.task.model_dump(), sort_keys=True, default=str)
            if task_key not in datasets:
                t = run.task
                datasets[task_key] = load_dataset(t.dataset, device="cpu", val_fraction=t.val_fraction,
                                                  data_dir=t.data_dir, **t.dataset_args)
            model_key = json.dumps([task_key, run.pipeline.exclude_first, run.pipeline.exclude])
            if model_key not in models:
                models[model_key] = model_cost_for(run, datasets[task_key])
            recorded = densities.get(row["trial_id"])
            flow = run.pipeline.flow
            sparse_init = run.init.density != "dense"
            phases = per_phase.get(row["trial_id"])
            cost = trial_cost(run, [phases.get(p.label) for p in expand_phases(run.pipeline, run.init)] if phases else None,
                              model_cost=models[model_key],
                              init_densities=recorded if sparse_init and flow.startswith("S") else None,
                              final_densities=recorded if "G" in flow and not sparse_init else None)
            out.append({"trial_id": row["trial_id"], **cost.as_row(), "cost_note": cost.note})
    except (SpecError, DatasetUnavailable, ValueError, OSError, RuntimeError) as exc:
        return CostTable(None, f"Costs not computed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.")
    table = pd.DataFrame(out, columns=["trial_id", *COST_COLUMNS, "cost_note"])
    exact = bool(table["cost_exact"].all()) if len(table) else True
    how = ("exact per-layer densities" if exact else
           "per-layer densities exact where the rule or layers.csv gives them, target densities elsewhere "
           "(see costs.csv cost_note)")
    return CostTable(table, f"Spec: {source.description}. FLOPs measured per layer with torch's flop counter on "
                            f"one training batch; {how}.")
