"""Each distinct task of a study built once on the CPU, before Ray: checks and the --dry-run layer listing.

A task here is what decides the network a trial starts from: task, init (a checkpoint) and the
pipeline's prunable-layer options. Building it once on the driver turns a user's mistake in their
own model, dataset or checkpoint into one line before any trial starts.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import RunSpec, SpecError, StudySpec, build_run_spec
from .plan import Arm, Plan


def distinct_runs(spec: StudySpec, plan: Plan) -> list[RunSpec]:
    """One run spec per distinct (task, init, prunable-layer options) among the study's arms."""
    arms = plan.arms or [Arm("base", {}, {})]
    runs: dict[str, RunSpec] = {}
    for arm in arms:
        run = build_run_spec(spec.base_run(), arm.assign, plan.seeds[0])
        run.task.data_dir = str(Path(run.task.data_dir).expanduser().resolve())
        key = json.dumps([run.task.model_dump(), run.init.model_dump(), run.pipeline.exclude_first,
                          run.pipeline.exclude], sort_keys=True, default=str)
        runs.setdefault(key, run)
    return list(runs.values())


def check_tasks(spec: StudySpec, plan: Plan) -> None:
    """Build every distinct task's pipeline on the CPU (dataset, model, checkpoint, init); SpecError on failure."""
    from ..data import DatasetUnavailable
    from ..pipeline import Pipeline
    for run in distinct_runs(spec, plan):
        run.task.loader_workers = 0  # one batch is all a check reads: no worker processes for it
        try:
            pipe = Pipeline(run, device="cpu")
        except DatasetUnavailable as err:
            raise SpecError(f"task.dataset: {err}") from None
        _check_one_batch(pipe)


def _check_one_batch(pipe) -> None:
    """A user's model must take the dataset's samples and return [batch, classes] logits."""
    import torch
    task = pipe.spec.task
    x, _ = next(iter(pipe.data.eval_batches("test", 2)))
    try:
        with torch.no_grad():
            logits = pipe.model.eval()(x)
    except Exception as err:
        raise SpecError(f"task.model: {task.model} fails on a batch of {task.dataset} of shape {list(x.shape)}: "
                        f"{type(err).__name__}: {' '.join(str(err).split())}") from None
    expected = [x.shape[0], pipe.data.num_classes]
    if not torch.is_tensor(logits) or list(logits.shape) != expected:
        got = list(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise SpecError(f"task.model: {task.model} returns {got} for a batch of shape {list(x.shape)}; it must "
                        f"return logits of shape {expected} (batch, classes)")


def describe_tasks(spec: StudySpec, plan: Plan) -> str:
    """Each distinct task's prunable layers with their sizes (what --dry-run prints)."""
    from ..data import DatasetUnavailable, load_dataset
    from ..models import build_model, load_init_checkpoint
    from ..sparsity.masks import describe_prunable
    lines = []
    for run in distinct_runs(spec, plan):
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
        lines.append(describe_prunable(model, run.pipeline.exclude_first, run.pipeline.exclude))
    return "\n".join(lines)
