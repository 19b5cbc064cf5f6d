"""Every check a study gets before Ray starts (and in `--dry-run`).

Cheap checks first (storage, GPU, factors, search settings), then each distinct task is built
once on the CPU exactly as a trial builds it - its dataset loaded with its `dataset_args`, its
model built with its `model_args`, its init scheme set up with its options - and one batch goes
forward and backward through it. A failed check raises `SpecError`: one line naming the field, the
bad value and what is allowed.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from ..config import RunSpec, SpecError, StudySpec, build_run_spec, same_value
from .plan import Plan, check_unused_settings, confirm_arms


def check_storage(spec: StudySpec, results_root: Path) -> tuple[Path, str]:
    """(local results directory, Ray storage path or URI); the local one must be creatable."""
    results_dir = (results_root / spec.name).resolve()
    storage = spec.storage
    if storage and "://" in storage:
        ray_storage = storage
    else:
        if storage:
            results_dir = Path(storage).expanduser().resolve()
        ray_storage = str(results_dir / "ray")
    probe = results_dir
    while not probe.exists():
        probe = probe.parent
    if not _can_create_in(probe):
        raise SpecError(f"storage: {results_dir} cannot be created ({probe} is not a writable directory); "
                        f"choose another path with --set storage=/some/writable/dir")
    return results_dir, ray_storage


def _can_create_in(directory: Path) -> bool:
    """Really try (os.access says yes to root even on read-only file systems); leaves nothing behind."""
    if not directory.is_dir():
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dsdtune-probe-", dir=directory))
        return True
    except OSError:
        return False


def check_gpu(spec: StudySpec, address: Optional[str]) -> None:
    if spec.resources.gpu > 0 and not address:
        import torch
        if not torch.cuda.is_available():
            raise SpecError(f"resources.gpu: {spec.resources.gpu} GPU per trial was requested but this machine has "
                            f"no GPU; use --set resources.gpu=0, or --address to run on a GPU cluster")


def check_control(spec: StudySpec) -> None:
    """The control names factors of the study, each at a value an arm has (found here, not by the report
    after the whole study has run)."""
    if not spec.control or spec.search.algorithm == "optuna":
        return
    space = spec.search.space
    for key in spec.control:
        if key not in space and key != "variant":
            raise SpecError(f"control: {key!r} is not a factor of this study; factors: "
                            f"{', '.join(list(space) + (['variant'] if spec.variants else []))}")
    for key, value in spec.control.items():
        if key == "variant":
            allowed = list(spec.variants or {})
            if not allowed:
                raise SpecError("control: 'variant' names a variant, but the study has no variants")
        elif space[key].kind not in ("grid", "choice"):
            raise SpecError(f"control: {key} is sampled ({space[key].kind}), so no arm has a value known in "
                            f"advance; name a grid or choice value, or a variant")
        else:
            allowed = list(space[key].grid if space[key].grid is not None else space[key].choice)
        if not any(same_value(value, v) for v in allowed):  # arms are all combinations: each value suffices
            raise SpecError(f"control: {key}={value!r} matches no arm; {key} takes "
                            f"{', '.join(str(v) for v in allowed)}")


def check_search(spec: StudySpec) -> None:
    """Search settings that would otherwise be ignored, or fail only after the search has run."""
    from ..phases import check_flow  # a kind's settings block is known to the kinds only
    search = spec.search
    sampled = [p for p, axis in search.space.items() if axis.kind not in ("grid", "choice")]
    if search.algorithm == "optuna":
        if spec.variants:
            raise SpecError("variants: an optuna search does not run variants; make the variant a searched "
                            "choice (search.space) or run one study per variant")
        if spec.scheduler.kind == "asha" and len(spec.seed_list) > 1:
            raise SpecError(f"seeds: asha with {len(spec.seed_list)} seeds per config would stop single seeds by "
                            f"their luck; search with one seed (seeds: [0]) and repeat the best config over "
                            f"confirm.seeds")
        if spec.confirm:
            probe = {p: (axis.grid or axis.choice or getattr(axis, axis.kind))[0] for p, axis in search.space.items()}
            arms, runs = confirm_arms(spec, probe), []
            for label, arm in zip(("the best config", "confirm.control"), arms):
                try:
                    runs.append(build_run_spec(spec.base_run(), arm.assign, spec.confirm.first_seed))
                    check_flow(runs[-1].pipeline)
                except SpecError as err:
                    raise SpecError(f"confirm.control: {err}" if label == "confirm.control" else str(err)) from None
            check_confirm_control(spec)
            try:
                check_unused_settings([arms[1]], runs[1:], own_only=True)
            except SpecError as err:
                raise SpecError(f"confirm.control: {err}") from None
    elif spec.scheduler.kind != "none":
        raise SpecError(f"scheduler.kind: {spec.scheduler.kind} stops trials early, which only a search "
                        f"(search.algorithm: optuna) uses; a grid or random study runs every trial to the end")
    if search.algorithm == "random" and search.num_samples > 1 and not sampled:
        raise SpecError(f"search.num_samples: {search.num_samples} samples but no sampled axis (uniform, "
                        f"loguniform or int) in search.space; add one, or drop num_samples")
    if search.algorithm == "grid" and search.num_samples > 1:
        raise SpecError(f"search.num_samples: {search.num_samples} is only used by random and optuna searches; "
                        f"repeat arms with seeds instead")


def check_confirm_control(spec: StudySpec) -> None:
    """The confirm stage's control must differ from the best config: a change to a field the search does
    not set that changes the run spec (a searched field's value may differ from the best one)."""
    control = spec.confirm.control
    if not control:
        raise SpecError("confirm.control: is empty, so the control would re-run the best config; name what the "
                        "control changes, e.g. {pipeline.sparsity: 0.0}")
    if any(key in spec.search.space for key in control):
        return
    seed = spec.confirm.first_seed
    base = build_run_spec(spec.base_run(), {}, seed).model_dump()
    if build_run_spec(spec.base_run(), control, seed).model_dump() == base:
        given = ", ".join(f"{k}={v}" for k, v in control.items())
        raise SpecError(f"confirm.control: {given} changes nothing: every searched config has it already, so the "
                        f"control would re-run the best config; name a value that differs")


def check_tasks(plan: Plan) -> None:
    """Build each distinct task of the plan's arms once on the CPU and push one batch through it.

    Also downloads or generates each dataset here, once, before trials race for it. Warnings raised
    on the way (torch's, a user's code's) are shown once the tasks pass: a task refused is one line.
    """
    with warnings.catch_warnings(record=True) as caught:
        _check_tasks(plan)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _check_tasks(plan: Plan) -> None:
    from ..cost import model_cost_key
    from ..data import DatasetUnavailable, load_dataset
    from ..sparsity.init import check_options
    check_options([run.init for run in plan.runs])
    datasets: dict[str, object] = {}
    built: set[str] = set()
    for run in plan.runs:
        task = run.task
        data_key = json.dumps([task.dataset, task.dataset_args, task.val_fraction, task.data_dir, task.stream],
                              sort_keys=True, default=str)
        if data_key not in datasets:
            try:  # no loader worker processes: one batch is all a check reads
                datasets[data_key] = load_dataset(task.dataset, device="cpu", val_fraction=task.val_fraction,
                                                  data_dir=task.data_dir, stream=task.stream, loader_workers=0,
                                                  **task.dataset_args)
            except DatasetUnavailable as err:
                raise SpecError(f"task.dataset: {err}") from None
            except SpecError:
                raise
            except (TypeError, ValueError) as err:
                raise SpecError(f"task.dataset_args: {_first_line(err)}") from None
            except Exception as err:  # e.g. a negative size in dataset_args: say so before every trial does
                raise SpecError(f"task.dataset_args: {task.dataset} fails with {task.dataset_args}: "
                                f"{type(err).__name__}: {_first_line(err)}") from None
            _check_splits(task, datasets[data_key])
        build_key = json.dumps([data_key, task.model, task.model_args, task.augment, task.batch_size,
                                run.init.model_dump(), run.pipeline.exclude_first, run.pipeline.exclude],
                               sort_keys=True, default=str)
        if build_key not in built:
            built.add(build_key)
            pipeline = _build_once(run, datasets[data_key])
            cost_key = model_cost_key(task)
            if cost_key not in plan.model_costs:  # measured once per model and data, shipped to the trials
                try:
                    plan.model_costs[cost_key] = pipeline.measure().as_dict()
                except Exception as err:
                    raise SpecError(f"task.model: the FLOPs of {task.model} on a batch of {task.dataset} cannot be "
                                    f"counted: {type(err).__name__}: {_first_line(err)}") from None
        check_phase_steps(run, datasets[data_key].num_train)


def check_phase_steps(run: RunSpec, num_train: int) -> None:
    """Each kind's checks that need the task's steps per epoch (a RigL update that never comes, a rewind
    point beyond the first phase), for every arm: arms that share a task are built only once."""
    from ..phases import expand_phases, kind_of, steps_per_epoch
    phases = expand_phases(run.pipeline, run.init)
    per_epoch = steps_per_epoch(num_train, run.task.batch_size)
    for phase in phases:
        kind_of(phase.kind).check_steps(phase, phases, per_epoch)


def _split_size(task, data, split: str) -> int:
    if not data.streaming:
        return int((data.val_y if split == "val" else data.test_y).shape[0])
    try:  # a user's torch Dataset: its own __len__
        return len(data.val if split == "val" else data.test)
    except Exception as err:
        raise SpecError(f"task.dataset: the {split} split of {task.dataset} has no length ({type(err).__name__}: "
                        f"{_first_line(err)}); its Dataset's __len__ must return an int") from None


def _check_splits(task, data) -> None:
    """A split of no samples scores nothing: the search would compare NaNs, the report no test metric."""
    n_val = _split_size(task, data, "val")
    if n_val == 0:
        total = data.num_train
        raise SpecError(f"task.val_fraction: the validation split of {task.dataset} is empty ({task.val_fraction:g} "
                        f"of {total} training samples rounds to none), so no configuration could be scored; raise "
                        f"task.val_fraction to at least {0.5 / max(total, 1):.2g} or use more samples")
    if _split_size(task, data, "test") == 0:
        raise SpecError(f"task.dataset: {task.dataset} has an empty test split, so no trial could report a test "
                        f"metric; give it test samples")


def _build_once(run: RunSpec, data):
    import torch
    import torch.nn.functional as F
    from ..models import build_model
    from ..pipeline import Pipeline

    task = run.task
    if task.augment and not data.is_image:
        raise SpecError(f"task.augment: true crops and flips images, but {task.dataset} samples have shape "
                        f"{tuple(data.input_shape)}; use augment: false")
    try:
        model = build_model(task.model, data.input_shape, data.num_classes, **task.model_args)
    except SpecError:
        raise
    except Exception as err:  # whatever a user's or zoo factory raises (timm: RuntimeError, KeyError...): one line
        field = "task.model_args" if isinstance(err, (TypeError, ValueError)) else "task.model"
        args = f" with model_args {json.dumps(task.model_args, default=str)}" if task.model_args else ""
        message = _first_line(err)
        raised = type(err).__name__ + (f": {message}" if message != type(err).__name__ else "")
        raise SpecError(f"{field}: building {task.model}{args} raised {raised}") from None
    empty = next((name for name, p in model.named_parameters() if p.numel() == 0), None)
    if empty is not None:  # a layer of width 0: nothing to train, prune or measure
        raise SpecError(f"task.model_args: {task.model} with {task.model_args} has a parameter without entries "
                        f"({empty}); give every layer a size > 0")
    try:
        pipeline = Pipeline(run, dataset=data, device="cpu")
    except SpecError:
        raise
    except Exception as err:  # the init scheme failed on this model: say so before every trial does
        raise SpecError(f"init: {run.init.density}/{run.init.weights} cannot be set up on {task.model}: "
                        f"{_first_line(err)}") from None
    model = pipeline.model
    x, y = next(iter(data.eval_batches("test", 2)))  # two samples: batch norm needs more than one
    try:
        with torch.enable_grad():
            logits = model.train()(x)
            if torch.is_tensor(logits) and list(logits.shape) == [x.shape[0], data.num_classes]:
                F.cross_entropy(logits, y).backward()
    except Exception as err:
        raise SpecError(f"task.model: {task.model} fails on a batch of {task.dataset} of shape {list(x.shape)}: "
                        f"{type(err).__name__}: {_first_line(err)}") from None
    expected = [x.shape[0], data.num_classes]
    if not torch.is_tensor(logits) or list(logits.shape) != expected:
        got = list(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise SpecError(f"task.model: {task.model} returns {got} for a batch of shape {list(x.shape)}; it must "
                        f"return logits of shape {expected} (batch, classes)")
    model.zero_grad(set_to_none=True)
    return pipeline


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
