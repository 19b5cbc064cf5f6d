"""What `--dry-run` shows of each distinct task: its prunable layers with their sizes.

A task here is what decides the network a trial starts from: task, init (a checkpoint) and the
pipeline's prunable-layer options. The checks before Ray that build each task are in `validate`.
"""
from __future__ import annotations

import json

from ..config import RunSpec
from .plan import Plan


def distinct_runs(plan: Plan) -> list[RunSpec]:
    """One run spec per distinct (task, init, prunable-layer options) among the plan's arms (or probes)."""
    runs: dict[str, RunSpec] = {}
    for run in plan.runs:
        key = json.dumps([run.task.model_dump(), run.init.model_dump(), run.pipeline.exclude_first,
                          run.pipeline.exclude], sort_keys=True, default=str)
        runs.setdefault(key, run)
    return list(runs.values())


def describe_tasks(plan: Plan) -> str:
    """Each distinct task's prunable layers with their sizes (what --dry-run prints)."""
    from ..data import DatasetUnavailable, load_dataset
    from ..models import build_model
    from ..phases import resolve_exclude_first
    from ..sparsity.checkpoint import load_init_checkpoint
    from ..sparsity.masks import describe_prunable
    lines = []
    for run in distinct_runs(plan):
        task = run.task
        title = f"task {task.model} on {task.dataset}" + (f" from {run.init.checkpoint}" if run.init.checkpoint else "")
        try:
            data = load_dataset(task.dataset, device="cpu", val_fraction=task.val_fraction, data_dir=task.data_dir,
                                stream=task.stream, loader_workers=0, **task.dataset_args)
        except DatasetUnavailable as err:
            lines.append(f"{title}: layers not listed, the dataset is not available ({err})")
            continue
        model = build_model(task.model, data.input_shape, data.num_classes, **task.model_args)
        load_init_checkpoint(model, run.init)
        kind = "streamed" if data.streaming else "tensors"
        lines.append(f"{title} ({data.num_train} training samples of shape {list(data.input_shape)}, "
                     f"{data.num_classes} classes, {kind}):")
        lines.append(describe_prunable(model, resolve_exclude_first(run.pipeline), run.pipeline.exclude))
    return "\n".join(lines)
