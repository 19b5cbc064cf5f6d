"""The Ray Tune function trainable: config -> pipeline run, per-epoch reports, checkpoints, resume.

A trial's config names its arm (a dict of dotted-path values) and its seed; the study's base spec
travels once per worker through `tune.with_parameters`. A trial starts from, in order: its own
last checkpoint (Ray restarted it after a failure), the shared prefix the study trained for it,
or scratch.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import ray
import torch
from ray import tune

from . import plugins
from .config import build_run_spec
from .pipeline import Pipeline, prefix_id

STATE_FILE = "pipeline_state.pt"
_GAUGES: dict[str, Any] = {}


def _gauges() -> dict[str, Any]:
    """Per-process gauges shown on each node's metrics endpoint (prefix `ray_`) and the dashboard."""
    if not _GAUGES:
        from ray.util.metrics import Gauge
        tags = ("study", "trial")
        for name, text in [("epoch", "epochs trained"), ("phase", "current phase index"),
                           ("sparsity", "measured sparsity of the prunable weights"),
                           ("val_metric", "the study's validation metric")]:
            _GAUGES[name] = Gauge(f"dsdtune_{name}", description=text, tag_keys=tags)
    return _GAUGES


def _device(gpu_share: float) -> torch.device:
    """The GPU Ray assigned (capping our memory share when it is a fraction), else the CPU."""
    if gpu_share > 0 and torch.cuda.is_available():
        if gpu_share < 1:
            torch.cuda.set_per_process_memory_fraction(gpu_share, 0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _load_checkpoint(pipeline: Pipeline, checkpoint: tune.Checkpoint) -> None:
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True, map_location="cpu")
    pipeline.load_state_dict(state)


def run_trial(config: dict, *, study: dict, prefix_length: int, prefixes: Optional[dict] = None,
              stage: str = "sweep") -> None:
    """Train one trial. `stage="prefix"` trains only the first `prefix_length` phases."""
    plugins.install(study.get("plugins"))  # the driver's search folders and registered models/datasets
    if "prefix" in config:  # stage "prefix": a representative trial of the prefix
        assignments, seed = study["arms"][config["prefix"]["arm"]], config["prefix"]["seed"]
    elif "arm" in config:  # grid arms x seeds
        assignments, seed = study["arms"][config["arm"]], config["seed"]
    else:  # searched: Optuna's values; seeds by the Repeater's index
        assignments = config["assign"]
        seed = config.get("seed", study["seeds"][config.get("__trial_index__", 0)])
    spec = build_run_spec(study["base"], assignments, seed)
    torch.set_num_threads(max(1, int(study["cpus_per_trial"])))
    pipeline = Pipeline(spec, device=_device(study["gpus_per_trial"]))
    trial_name = tune.get_context().get_trial_name() or "trial"
    tags = {"study": study["name"], "trial": trial_name}
    metric = study["metric"]

    my_prefix = prefix_id(spec, prefix_length) if prefix_length > 0 else ""
    checkpoint = tune.get_checkpoint()
    started_from = "scratch"
    if checkpoint is not None:
        _load_checkpoint(pipeline, checkpoint)
        started_from = "checkpoint"
    elif stage != "prefix" and prefixes and my_prefix in prefixes:
        _load_checkpoint(pipeline, prefixes[my_prefix])
        started_from = "prefix"
    stop_after = prefix_length - 1 if stage == "prefix" else None
    last_phase = (stop_after if stop_after is not None else len(pipeline.phases) - 1)
    epochs_at_start = pipeline.global_epoch
    last_checkpoint = time.monotonic()
    uses_prefix = stage == "prefix" or bool(prefixes and my_prefix in prefixes)
    extras = {"prefix_id": my_prefix if uses_prefix else "", "started_from": started_from, "stage": stage,
              "node_id": ray.get_runtime_context().get_node_id()}

    def on_epoch(metrics: dict, pipe: Pipeline) -> None:
        nonlocal last_checkpoint
        report = dict(metrics)
        report.update(pipe.phase_end)
        report.update(extras)
        finished = pipe.status == "diverged" or pipe.phase_index > last_phase
        # The trial itself says when it is done: "running" in the last row means a scheduler stopped it.
        report["status"] = "ok" if finished and pipe.status != "diverged" else pipe.status
        report["epochs_trained"] = pipe.global_epoch - epochs_at_start
        if finished:
            report["layer_densities_json"] = json.dumps(pipe.layer_densities or pipe.extra.get("gsm_layer_densities", {}))
            report["weight_histograms_json"] = json.dumps(pipe.histograms)
            report["gsm_overlap_json"] = json.dumps(pipe.extra.get("gsm_overlap", []))
        if report.get(metric) is None or report[metric] != report[metric]:
            report[metric] = float("-inf") if study["mode"] == "max" else float("inf")  # NaN breaks schedulers
        gauges = _gauges()
        gauges["epoch"].set(pipe.global_epoch, tags=tags)
        gauges["phase"].set(metrics["phase"], tags=tags)
        if metrics.get("sparsity") == metrics.get("sparsity"):
            gauges["sparsity"].set(metrics["sparsity"], tags=tags)
        gauges["val_metric"].set(report[metric], tags=tags)
        at_boundary = pipe.epoch_in_phase == 0  # a phase just ended
        due = time.monotonic() - last_checkpoint >= study["checkpoint_every_s"]
        if (at_boundary or due or finished) and pipe.status != "diverged":
            directory = tempfile.mkdtemp(prefix="dsdtune-ckpt-")  # fresh for every checkpoint
            try:
                torch.save(pipe.state_dict(), os.path.join(directory, STATE_FILE))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
            finally:  # report() has persisted it, or a scheduler stopped the trial inside report()
                shutil.rmtree(directory, ignore_errors=True)
            last_checkpoint = time.monotonic()
        else:
            tune.report(report)

    pipeline.run(on_epoch=on_epoch, stop_after_phase=stop_after)
