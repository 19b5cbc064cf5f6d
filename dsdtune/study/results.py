"""Result files of a study: the trial table, per-epoch histories, layer densities and study.json.

Every file is written atomically (temp file, then rename), so a reader never sees half a file.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from ..config import StudySpec, build_run_spec, get_by_path
from .plan import Arm, Plan, phase_labels
from .run import STAGE_CONFIRM, STAGE_PREFIX, STAGE_SEARCH, STAGE_SWEEP



def _trial_rows(results: list, stage: str, factor_of, plan_factors: list[str],
                prefix_histories: dict[str, list[dict]], seeds: list[int]):
    trials, histories, layers, weights = [], [], [], []
    for result in results:
        config, metrics = result.config, result.metrics or {}
        if "prefix" in config:
            arm, seed = config["prefix"]["arm"], config["prefix"]["seed"]
        else:
            arm = config.get("arm", "searched")
            seed = config.get("seed", seeds[config.get("__trial_index__", 0)] if seeds else 0)
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if result.error is not None:
            status = "error"
        elif metrics.get("status") == "diverged":
            status = "diverged"
        elif metrics.get("status") == "ok":
            status = "ok"
        else:
            status = "stopped"  # ended early by the scheduler (ASHA)
        if stage == STAGE_PREFIX:  # a shared starting point, not a trial of an arm
            arm, factors = "prefix", {}
        elif "assign" in config:
            arm = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config["assign"].items())
            factors = factor_of(config["assign"])
        else:
            factors = factor_of(arm)
        row = {"trial_id": trial_id, "stage": stage, "arm": arm, **factors, "seed": seed,
               "status": status, "prefix_id": metrics.get("prefix_id", ""),
               "epochs_trained": metrics.get("epochs_trained", 0), "node_id": metrics.get("node_id", ""),
               "wall_time_s": round(float(metrics.get("time_total_s", 0.0)), 3)}
        for key in ("val_acc", "val_loss", "test_acc", "test_loss", "sparsity"):
            row[f"final_{key}"] = metrics.get(key)
        for key, value in metrics.items():
            if key.startswith(("acc_after_", "val_acc_after_")):
                row[key] = value
        trials.append(row)
        frame = result.metrics_dataframe
        own = [] if frame is None else frame.to_dict("records")
        before = prefix_histories.get(row["prefix_id"], []) if stage != STAGE_PREFIX else []
        first_own = min((h.get("epoch", 0) for h in own), default=math.inf)
        for h in [h for h in before if h.get("epoch", 0) < first_own] + own:
            histories.append({"trial_id": trial_id, **{k: h.get(k) for k in HISTORY_COLUMNS}})
        for name, density in json.loads(metrics.get("layer_densities_json") or "{}").items():
            layers.append({"trial_id": trial_id, "layer": name, "density": density})
        for label, hist in json.loads(metrics.get("weight_histograms_json") or "{}").items():
            counts = hist["counts"]
            width = (hist["max"] - hist["min"]) / len(counts)
            for i, count in enumerate(counts):
                weights.append({"trial_id": trial_id, "phase_label": label, "bin_left": hist["min"] + i * width,
                                "bin_right": hist["min"] + (i + 1) * width, "count": count})
    return trials, histories, layers, weights


HISTORY_COLUMNS = ["epoch", "phase", "phase_kind", "phase_label", "lr", "sparsity", "train_loss", "val_loss",
                   "val_acc", "test_loss", "test_acc"]


def write_atomic_csv(frame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def write_atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(results_dir: Path, spec: StudySpec, plan: Plan, stages: dict[str, list], arms: list[Arm],
                  seeds_by_stage: dict[str, list[int]], provenance: Optional[dict] = None) -> dict[str, int]:
    import pandas as pd
    results_dir.mkdir(parents=True, exist_ok=True)
    by_label = {a.label: a for a in arms}

    def factor_of(arm_or_assign) -> dict:
        """Factor values as the trial's run spec holds them (an arm by label, or searched values)."""
        arm = by_label.get(arm_or_assign) if isinstance(arm_or_assign, str) else None
        assign = arm.assign if arm is not None else arm_or_assign
        values = {"variant": arm.factors["variant"]} if arm is not None and "variant" in arm.factors else {}
        tree = build_run_spec(spec.base_run(), assign, plan.seeds[0]).model_dump()
        values.update({f: get_by_path(tree, f) for f in plan.factors if f != "variant"})
        return values

    prefix_histories = {}
    for result in stages.get(STAGE_PREFIX, []):
        frame = result.metrics_dataframe
        if result.metrics and frame is not None:
            prefix_histories[result.metrics.get("prefix_id", "")] = frame.to_dict("records")
    trials, histories, layers, weights = [], [], [], []
    for stage, results in stages.items():
        t, h, l, w = _trial_rows(results, stage, factor_of, plan.factors, prefix_histories,
                                 seeds_by_stage.get(stage, plan.seeds))
        trials += t
        histories += h
        layers += l
        weights += w
    trial_frame = pd.DataFrame(trials)
    labels = phase_labels(spec, plan)
    phase_columns = [c for label in labels for c in (f"acc_after_{label}", f"val_acc_after_{label}")
                     if c in trial_frame.columns]
    trial_frame = trial_frame[[c for c in trial_frame.columns if c not in phase_columns] + phase_columns]
    order = {STAGE_PREFIX: 0, STAGE_SWEEP: 1, STAGE_SEARCH: 1, STAGE_CONFIRM: 2}
    if not trial_frame.empty:
        trial_frame = trial_frame.sort_values(by=["stage", "arm", "seed"], key=lambda c: c.map(order) if c.name == "stage" else c,
                                              kind="stable")
    write_atomic_csv(trial_frame, results_dir / "trials.csv")
    write_atomic_csv(pd.DataFrame(histories, columns=["trial_id"] + HISTORY_COLUMNS), results_dir / "history.csv")
    if layers:
        write_atomic_csv(pd.DataFrame(layers), results_dir / "layers.csv")
    if weights:
        write_atomic_csv(pd.DataFrame(weights), results_dir / "weights.csv")
    flows = list(dict.fromkeys(build_run_spec(spec.base_run(), a.assign, plan.seeds[0]).pipeline.flow
                               for a in plan.arms)) or [spec.pipeline.flow]
    meta = {"name": spec.name, "description": spec.description.strip(), "metric": spec.metric, "mode": spec.mode,
            "test_metric": spec.test_metric, "factors": plan.factors, "flow": ", ".join(flows),
            "phase_labels": labels, "seeds": plan.seeds,
            "search_alg": spec.search.algorithm, "control": spec.control,
            "shared_prefix": bool(plan.prefixes), "prefix_length": plan.prefix_length,
            "epochs_with_sharing": plan.epochs_with_sharing if plan.arms else None,
            "epochs_without_sharing": plan.epochs_without_sharing if plan.arms else None}
    if spec.search.algorithm == "optuna" and spec.confirm:
        meta["control"] = dict(spec.confirm.control)
        meta["confirm_seeds"] = seeds_by_stage.get(STAGE_CONFIRM)
    meta.update(provenance or {})  # resolved spec + hash, versions, machine, git commit, start/end
    write_atomic_text(json.dumps(meta, indent=2, default=str) + "\n", results_dir / "study.json")
    counts: dict[str, int] = {}
    for row in trials:
        if row["stage"] != STAGE_PREFIX:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


