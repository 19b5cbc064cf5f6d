"""The Ray Tune function trainable: config -> pipeline run, per-epoch reports, checkpoints, resume.

A trial's config names its arm (by label, or Optuna's dotted-path values), its seed and its role
for a shared prefix: `rep` trains the prefix and stores it in the study's storage on the way (the
moment its last phase ends), `dependent` starts from the stored prefix, `solo` shares nothing. The
study's base spec travels once per worker through `tune.with_parameters`. A trial starts from, in
order: its own last checkpoint (Ray restarted it, or the study was resumed), its stored prefix,
or scratch.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import ray
import torch
from ray import tune
from ray.experimental.internal_kv import _internal_kv_exists, _internal_kv_initialized

from . import registry
from .atomic import write_bytes
from .config import build_run_spec
from .cost import ModelCost, model_cost_key
from .pipeline import Pipeline, prefix_id
from .sparsity.mask_files import nonzero_masks, save_masks

STATE_FILE = "pipeline_state.pt"
MASKS_FILE = "masks.npz"
# Without a scheduler a trial reports at phase ends, checkpoints and at most every REPORT_EVERY_S
# seconds, each report carrying the epochs since the last one: every report is a round trip through
# the driver, which with short epochs costs as much as the training (schedulers get every epoch).
REPORT_EVERY_S = 2.0
# A stop request is asked for at most this often (one round trip to Ray's GCS); the driver
# waits for running trials to checkpoint for much longer (study.run.StopOnSignal.grace_s).
STOP_POLL_S = 1.0
STOP_NAMESPACE = "dsdtune"  # the key-value namespace of the drivers' stop flags
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


# ---- the stored prefixes: <storage>/prefixes/<prefix id>/pipeline_state.pt (a local path or a URI)

def _filesystem(root: str):
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(root)


def prefix_stored(root: str, pid: str) -> bool:
    import pyarrow.fs
    fs, path = _filesystem(root)
    return fs.get_file_info(f"{path}/{pid}/{STATE_FILE}").type == pyarrow.fs.FileType.File


def store_prefix(root: str, pid: str, state: dict) -> None:
    """Write atomically: a reader sees the whole state or none (a local folder through dsdtune.atomic;
    a URI through a temp object moved into place)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if "://" not in root:
        write_bytes(os.path.join(root, pid, STATE_FILE), buffer.getvalue())
        return
    fs, path = _filesystem(root)
    fs.create_dir(f"{path}/{pid}", recursive=True)
    tmp = f"{path}/{pid}/.{STATE_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as handle:
        handle.write(buffer.getvalue())
    fs.move(tmp, f"{path}/{pid}/{STATE_FILE}")


def load_prefix(root: str, pid: str) -> dict:
    fs, path = _filesystem(root)
    with fs.open_input_file(f"{path}/{pid}/{STATE_FILE}") as handle:
        data = handle.read()
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _worst(study: dict) -> float:
    return float("-inf") if study["mode"] == "max" else float("inf")


def run_trial(config: dict, *, study: dict) -> None:
    """Train one trial (its role, `rep`, `dependent` or `solo`, says what it does with a shared prefix)."""
    registry.install(study.get("registry"))  # the driver's search folders and registered models/datasets
    if "assign" in config:  # searched: Optuna's values, with the seed the search gave the trial
        assignments = config["assign"]
        seed = config.get("seed", study["seeds"][config.get("__trial_index__", 0)])
    else:
        assignments, seed = study["arms"][config["arm"]], config["seed"]
    spec = build_run_spec(study["base"], assignments, seed)
    # how many leading phases this trial shares with others (per arm; one length for a search's trials)
    length = study.get("prefix_lengths", {}).get(config.get("arm"), study["prefix_length"])
    role = config.get("role", "solo")
    my_prefix = prefix_id(spec, length) if length > 0 and role != "solo" else ""
    torch.set_num_threads(max(1, int(study["cpus_per_trial"])))
    stores_prefix = role == "rep" and bool(my_prefix)
    # The trial that trains a shared prefix keeps the weights every arm sharing it will rewind to.
    snapshots = study.get("prefix_snapshots", {}).get(my_prefix, []) if stores_prefix else []
    pipeline = Pipeline(spec, device=_device(study["gpus_per_trial"]), snapshots=[tuple(p) for p in snapshots])

    checkpoint = tune.get_checkpoint()
    started_from = "scratch"
    if checkpoint is not None:
        _load_checkpoint(pipeline, checkpoint)
        started_from = "checkpoint"
    elif role == "dependent":
        pipeline.load_state_dict(load_prefix(study["prefix_root"], my_prefix))
        started_from = "prefix"
    reporter = TrialReporter(study, spec, prefix=my_prefix if stores_prefix else "", prefix_phases=length,
                             last_phase=len(pipeline.phases) - 1,
                             extras={"prefix_id": my_prefix, "prefix_phases": length if my_prefix else 0,
                                     "started_from": started_from, "role": role,
                                     "node_id": ray.get_runtime_context().get_node_id()})
    pipeline.run(on_epoch=reporter.on_epoch)


class StopRequests:
    """Whether the driver asked the study to stop: its stop flag is a key in the cluster's key-value store.

    On a cluster the driver's disk is not the trial's, and the study's storage may be an object store
    whose every stat costs a request; the key lives in Ray's GCS, which every node reaches (a round
    trip of about a millisecond, answered by the GCS itself: no process of our own), so a trial asks at
    epoch ends, at most every STOP_POLL_S. A trial outside Ray (or a flag it cannot reach) asks nothing.
    """

    def __init__(self, name: str):
        self.name = name
        self.seen = False
        self._asked = -float("inf")

    def requested(self) -> bool:
        if self.seen or not self.name or time.monotonic() - self._asked < STOP_POLL_S:
            return self.seen
        self._asked = time.monotonic()
        try:
            if not _internal_kv_initialized():  # not in a Ray worker: nobody can ask it to stop
                self.name = ""
                return False
            self.seen = bool(_internal_kv_exists(self.name, namespace=STOP_NAMESPACE))
        except ray.exceptions.RayError:  # the GCS did not answer: ask again later
            pass
        return self.seen


class TrialReporter:
    """What one trial tells Tune, one method per duty: every epoch is kept and sent in batches (at phase
    ends, checkpoints, a stop request, and at most every REPORT_EVERY_S; every epoch under a
    scheduler), the node's gauges follow the trial, the shared prefix is stored the moment it ends,
    checkpoints are taken at phase ends and every `checkpoint_every_s`, and the final report carries
    the trial's per-layer densities, weight histograms and cost."""

    def __init__(self, study: dict, spec, prefix: str, prefix_phases: int, last_phase: int, extras: dict):
        self.study, self.spec, self.metric = study, spec, study["metric"]
        self.prefix = prefix  # the shared prefix this trial stores ("" if none)
        self.prefix_phases = prefix_phases
        self.last_phase = last_phase
        self.extras = extras
        self.tags = {"study": study["name"], "trial": tune.get_context().get_trial_name() or "trial"}
        self.unreported: list[dict] = []  # the epochs since the last report
        self.stop = StopRequests(study.get("stop_flag") or "")
        self.last_report = self.last_checkpoint = time.monotonic()

    def on_epoch(self, metrics: dict, pipeline: Pipeline) -> None:
        self.unreported.append(dict(metrics))
        finished = pipeline.status == "diverged" or pipeline.phase_index > self.last_phase
        report = self.report(metrics, pipeline, finished)
        self.set_gauges(metrics, pipeline, report)
        at_boundary = pipeline.epoch_in_phase == 0  # a phase just ended
        checkpoint_due = time.monotonic() - self.last_checkpoint >= self.study["checkpoint_every_s"]
        stop_requested = self.stop.requested()  # the driver is stopping the study
        if not (self.study.get("report_every_epoch") or at_boundary or checkpoint_due or finished or stop_requested
                or time.monotonic() - self.last_report >= REPORT_EVERY_S):
            return
        report["history_json"] = json.dumps(self.unreported)
        self.unreported.clear()
        self.last_report = time.monotonic()
        if at_boundary and pipeline.phase_index == self.prefix_phases:
            self.store_prefix(pipeline, report)
        if (at_boundary or checkpoint_due or finished or stop_requested) and pipeline.status != "diverged":
            self.checkpoint(pipeline, report, finished)
        else:
            tune.report(report)

    def report(self, metrics: dict, pipeline: Pipeline, finished: bool) -> dict:
        report = {**metrics, **pipeline.phase_end, **self.extras}
        # The trial itself says when it is done: "running" in the last row means a scheduler stopped it.
        report["status"] = "ok" if finished and pipeline.status != "diverged" else pipeline.status
        report["epochs_trained"] = pipeline.global_epoch  # the whole flow, its shared prefix included
        if finished:
            report.update(self.final_fields(pipeline))
        if report.get(self.metric) is None or report[self.metric] != report[self.metric]:
            report[self.metric] = _worst(self.study)  # NaN breaks schedulers
        return report

    def final_fields(self, pipeline: Pipeline) -> dict:
        fields = {"layer_densities_json": json.dumps(pipeline.layer_densities),
                  "weight_histograms_json": json.dumps(pipeline.histograms),
                  "phase_layer_densities_json": json.dumps(pipeline.extra.get("phase_layer_densities", {})),
                  "extra_json": json.dumps({k: v for k, v in pipeline.extra.items()
                                            if k not in ("phase_layer_densities", "phase_costs")}, default=str)}
        if pipeline.status != "diverged":
            known = self.study.get("model_costs", {}).get(model_cost_key(self.spec.task))
            cost = pipeline.cost(ModelCost.from_dict(known) if known else None)
            fields.update(cost.as_row())
        return fields

    def set_gauges(self, metrics: dict, pipeline: Pipeline, report: dict) -> None:
        gauges = _gauges()
        gauges["epoch"].set(pipeline.global_epoch, tags=self.tags)
        gauges["phase"].set(metrics["phase"], tags=self.tags)
        if metrics.get("sparsity") == metrics.get("sparsity"):
            gauges["sparsity"].set(metrics["sparsity"], tags=self.tags)
        gauges["val_metric"].set(report[self.metric], tags=self.tags)

    def store_prefix(self, pipeline: Pipeline, report: dict) -> None:
        """The shared prefix, before the report that says so (dependents start from it once they read it)."""
        root = self.study["prefix_root"]
        if self.prefix and pipeline.status != "diverged" and not prefix_stored(root, self.prefix):
            store_prefix(root, self.prefix, pipeline.state_dict())
            report["prefix_stored"] = self.prefix

    def checkpoint(self, pipeline: Pipeline, report: dict, finished: bool) -> None:
        directory = tempfile.mkdtemp(prefix="dsdtune-ckpt-")  # fresh for every checkpoint
        try:
            torch.save(pipeline.state_dict(), os.path.join(directory, STATE_FILE))
            if finished:  # the trial's final masks (its nonzero pattern), 1 bit per weight
                save_masks(nonzero_masks(pipeline.prunable), os.path.join(directory, MASKS_FILE))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
        finally:  # report() has persisted it, or a scheduler stopped the trial inside report()
            shutil.rmtree(directory, ignore_errors=True)
        self.last_checkpoint = time.monotonic()
