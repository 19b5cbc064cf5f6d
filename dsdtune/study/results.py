"""Result files of a study: the trial table, per-epoch histories, layer densities, each trial's final
masks (masks/<trial_id>.npz, `dsdtune.sparsity.mask_files.load_masks`) and study.json.

The names come from `dsdtune.results` (the layout, and its reader); every file is written through
`dsdtune.atomic`, so a reader finds the previous file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from ..atomic import write_atomic, write_csv, write_text
from ..config import StudySpec, build_run_spec, get_by_path, spec_hash
from ..results import HISTORY_CSV, LAYERS_CSV, MASKS_DIR, STUDY_JSON, TRIALS_CSV, WEIGHTS_CSV, not_started_ids
from .plan import STAGE_CONFIRM, STAGE_SEARCH, STAGE_SWEEP, Arm, Plan, phase_labels

FINAL_STATUSES = ("ok", "diverged", "prefix_diverged", "prefix_error")


def trial_status(result, interrupted: bool) -> str:
    """ok / diverged / prefix_diverged / prefix_error as the trial said; error; else interrupted or stopped."""
    metrics = result.metrics or {}
    if result.error is not None:
        return "error"
    if metrics.get("status") in FINAL_STATUSES:
        return metrics["status"]
    # No final word: the study was stopped under it, or a scheduler (ASHA) ended it early.
    return "interrupted" if interrupted else "stopped"


def epochs_in_report(report: dict) -> list[dict]:
    """The epochs one report carries (a trial without a scheduler reports several at once)."""
    text = report.get("history_json")
    return json.loads(text) if isinstance(text, str) else [report]


def reported_epochs(result) -> list[dict]:
    """Every epoch a trial reported, in order: each report carries the epochs since the previous one."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    # The rows as to_dict("records") gives them (Python scalars), a column at a time: pandas 3 builds
    # records row by row through iloc, 5 ms a trial.
    columns = [str(c) for c in frame.columns]
    rows = zip(*(frame[c].tolist() for c in frame.columns))
    return [epoch for row in rows for epoch in epochs_in_report(dict(zip(columns, row)))]


def _history_rows(trial_id: str, own: list[dict], before: list[dict]) -> list[dict]:
    """Exactly one row per epoch, epochs strictly increasing.

    A restored or retried trial reports again the epochs after its checkpoint: the last report of an
    epoch is the one its final state grew from. A 0-epoch phase (a transition only) reports the
    previous epoch's number again: that epoch keeps its trained row, and the transition's numbers
    stay in the trial's acc_after_<phase> columns.
    """
    first_own = min((h.get("epoch", 0) for h in own), default=math.inf)
    by_epoch: dict[int, dict] = {}
    for h in [h for h in before if h.get("epoch", 0) < first_own] + own:
        kept = by_epoch.get(h.get("epoch"))
        if kept is None or kept.get("phase") == h.get("phase"):
            by_epoch[h.get("epoch")] = h
    return [{"trial_id": trial_id, **{k: by_epoch[e].get(k) for k in HISTORY_COLUMNS}} for e in sorted(by_epoch)]


def _nodes_reported(result) -> list[str]:
    """Every node the trial reported from, in order (a trial restarted elsewhere after a lost node has two)."""
    frame = result.metrics_dataframe
    if frame is None or "node_id" not in frame:
        return []
    return list(dict.fromkeys(str(n) for n in frame["node_id"].dropna()))


def _copy_masks(checkpoint, target: Path) -> None:
    """The final masks the trial stored with its last checkpoint, as masks/<trial_id>.npz (atomically)."""
    with checkpoint.as_directory() as directory:
        source = Path(directory) / "masks.npz"
        if source.exists():
            with open(source, "rb") as masks:
                write_atomic(target, lambda handle: shutil.copyfileobj(masks, handle))


def _copy_all_masks(copies: list[tuple]) -> None:
    """_copy_masks for every (checkpoint, target), side by side: each waits on its fsyncs (a few ms a
    file, 48 files in the default study), which let the others go on."""
    if not copies:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(copies)), thread_name_prefix="dsdtune-masks") as pool:
        for done in [pool.submit(_copy_masks, checkpoint, target) for checkpoint, target in copies]:
            done.result()  # an error reaches the caller


def _trial_rows(results: list, stage: str, factor_of, prefix_histories: dict[str, list[dict]], seeds: list[int],
                interrupted: bool, masks_dir: Path):
    trials, histories, layers, weights, masks = [], [], [], [], []
    for result in results:
        config, metrics = result.config or {}, result.metrics or {}
        if not ("arm" in config or "assign" in config):
            continue  # created but never configured before a stop: written as a missing trial
        if "assign" in config:
            seed = config.get("seed", seeds[config.get("__trial_index__", 0)] if seeds else 0)
        else:
            seed = config.get("seed", 0)
        trial_id = metrics.get("trial_id") or Path(result.path).name
        status = trial_status(result, interrupted)
        if "assign" in config:
            arm = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config["assign"].items())
            factors = factor_of(config["assign"])
        else:
            arm = config.get("arm", "")
            factors = factor_of(arm)
        row = {"trial_id": trial_id, "stage": stage, "arm": arm, **factors, "seed": seed,
               "status": status, "prefix_id": metrics.get("prefix_id", config.get("prefix", "")),
               "epochs_trained": metrics.get("epochs_trained", 0), "node_id": metrics.get("node_id", ""),
               "node_ids": " ".join(_nodes_reported(result)),
               "wall_time_s": round(float(metrics.get("time_total_s", 0.0)), 3)}
        for key in ("val_acc", "val_loss", "test_acc", "test_loss", "sparsity"):
            row[f"final_{key}"] = metrics.get(key) if status not in ("prefix_diverged", "prefix_error") else None
        for key, value in metrics.items():
            if key.startswith(("acc_after_", "val_acc_after_", "jacobian_", "init_")) or key in COST_COLUMNS:
                row[key] = value
        trials.append(row)
        own = [] if status in ("prefix_diverged", "prefix_error") else reported_epochs(result)
        before = prefix_histories.get(row["prefix_id"], []) if metrics.get("role") == "dependent" else []
        histories += _history_rows(trial_id, own, before)
        if status in ("ok", "stopped") and result.checkpoint is not None:
            masks.append((result.checkpoint, masks_dir / f"{trial_id}.npz"))
        for name, density in json.loads(metrics.get("layer_densities_json") or "{}").items():
            layers.append({"trial_id": trial_id, "layer": name, "density": density})
        # the masked phases' own per-layer densities (exact training FLOPs in the report)
        for label, by_layer in json.loads(metrics.get("phase_layer_densities_json") or "{}").items():
            layers += [{"trial_id": trial_id, "layer": name, "density": density, "phase_label": label}
                       for name, density in by_layer.items()]
        for label, hist in json.loads(metrics.get("weight_histograms_json") or "{}").items():
            counts = hist["counts"]
            width = (hist["max"] - hist["min"]) / len(counts)
            for i, count in enumerate(counts):
                weights.append({"trial_id": trial_id, "phase_label": label, "bin_left": hist["min"] + i * width,
                                "bin_right": hist["min"] + (i + 1) * width, "count": count})
    if masks:
        masks_dir.mkdir(parents=True, exist_ok=True)
        _copy_all_masks(masks)
    return trials, histories, layers, weights


# What each trial's final report says it cost (dsdtune.cost.TrialCost.as_row), as trials.csv columns.
COST_COLUMNS = ("params", "params_final", "inference_flops", "inference_flops_dense", "training_flops",
                "training_flops_dense")
HISTORY_COLUMNS = ["epoch", "phase", "phase_kind", "phase_label", "lr", "sparsity", "train_loss", "val_loss",
                   "val_acc", "test_loss", "test_acc"]


def phase_kinds(labels: list[str]) -> dict[str, dict]:
    """What the report needs to know of each kind in the study's flows (letter -> name, dense, sparse)."""
    from ..phases import kind_of
    return {letter: kind_of(letter).describe() for letter in dict.fromkeys(label[0] for label in labels)}


def write_results(results_dir: Path, spec: StudySpec, plan: Plan, stages: dict[str, list], arms: list[Arm],
                  seeds_by_stage: dict[str, list[int]], interrupted: bool = False,
                  missing: tuple = (), provenance: Optional[dict] = None) -> dict[str, int]:
    """Write trials.csv, history.csv, layers.csv, weights.csv and study.json; returns status counts.

    `interrupted`: the study was stopped, so trials without a final status are `interrupted`.
    `missing` lists (stage, arm label, seed, status, prefix id) of the trials that never started
    (`run.unstarted_trials`; (stage, arm label, seed) means `interrupted`): held because their shared prefix diverged or failed (`prefix_diverged`,
    `prefix_error`), or not reached before a stop (`interrupted`); they are written with the ids
    `not-started-<n>` (n in table order; `dsdtune.results`), 0 epochs and no metrics.
    """
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

    # The epochs of each shared prefix, as the representative that stored it trained them (dependents
    # start after them). In a search, a representative that a scheduler stopped inside the prefix
    # left it to a later trial of its seed: the one that trained past the prefix is the one that stored it.
    prefix_histories, complete = {}, set()
    for results in stages.values():
        for result in results:
            metrics = result.metrics or {}
            pid = metrics.get("prefix_id")
            if metrics.get("role") == "rep" and pid and pid not in complete:
                shared = metrics.get("prefix_phases", plan.prefix_length)  # the phases its prefix holds
                reported = reported_epochs(result)
                prefix_histories[pid] = [h for h in reported if h.get("phase", 0) < shared]
                if any(h.get("phase", 0) >= shared for h in reported):
                    complete.add(pid)
    trials, histories, layers, weights = [], [], [], []
    for stage, results in stages.items():
        t, h, l, w = _trial_rows(results, stage, factor_of, prefix_histories, seeds_by_stage.get(stage, plan.seeds),
                                 interrupted, results_dir / MASKS_DIR)
        trials += t
        histories += h
        layers += l
        weights += w
    for stage, arm, seed, *why in missing:  # never started
        status, pid = why if why else ("interrupted", "")
        trials.append({"trial_id": None, "stage": stage, "arm": arm, **factor_of(arm), "seed": seed,
                       "status": status, "prefix_id": pid, "epochs_trained": 0})
    trial_frame = pd.DataFrame(trials)
    labels = phase_labels(spec, plan)
    phase_columns = [c for label in labels for c in (f"acc_after_{label}", f"val_acc_after_{label}")
                     if c in trial_frame.columns]
    trial_frame = trial_frame[[c for c in trial_frame.columns if c not in phase_columns] + phase_columns]
    order = {STAGE_SWEEP: 1, STAGE_SEARCH: 1, STAGE_CONFIRM: 2}
    if not trial_frame.empty:
        trial_frame = trial_frame.sort_values(by=["stage", "arm", "seed"], key=lambda c: c.map(order) if c.name == "stage" else c,
                                              kind="stable")
        unnamed = trial_frame["trial_id"].isna()
        trial_frame.loc[unnamed, "trial_id"] = not_started_ids(int(unnamed.sum()))
    write_csv(trial_frame, results_dir / TRIALS_CSV)
    write_csv(pd.DataFrame(histories, columns=["trial_id"] + HISTORY_COLUMNS), results_dir / HISTORY_CSV)
    if layers:
        write_csv(pd.DataFrame(layers), results_dir / LAYERS_CSV)
    if weights:
        write_csv(pd.DataFrame(weights), results_dir / WEIGHTS_CSV)
    flows = list(dict.fromkeys(build_run_spec(spec.base_run(), a.assign, plan.seeds[0]).pipeline.flow
                               for a in plan.arms)) or [spec.pipeline.flow]
    meta = {"name": spec.name, "description": spec.description.strip(), "metric": spec.metric, "mode": spec.mode,
            "test_metric": spec.test_metric, "factors": plan.factors, "flow": ", ".join(flows),
            "phase_labels": labels, "seeds": plan.seeds,
            "search_alg": spec.search.algorithm, "control": spec.control,
            "shared_prefix": bool(plan.prefixes), "prefix_length": plan.prefix_length,
            "prefix_lengths": dict(plan.arm_prefix_length),
            "epochs_with_sharing": plan.epochs_with_sharing if plan.arms else None,
            "epochs_without_sharing": plan.epochs_without_sharing if plan.arms else None,
            "spec": spec.model_dump(mode="json"), "spec_hash": spec_hash(spec), "interrupted": interrupted,
            "phase_kinds": phase_kinds(labels)}
    if spec.search.algorithm == "optuna" and spec.confirm:
        meta["control"] = dict(spec.confirm.control)
        meta["confirm_seeds"] = seeds_by_stage.get(STAGE_CONFIRM)
    meta.update(provenance or {})  # resolved spec + hash, versions, machine, git commit, start/end
    write_text(results_dir / STUDY_JSON, json.dumps(meta, indent=2, default=str) + "\n")
    counts: dict[str, int] = {}
    for row in trials:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


