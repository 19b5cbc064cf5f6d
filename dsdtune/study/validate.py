"""Every check a study gets before Ray starts: storage, GPU, control, and each task built once.

A failed check raises `SpecError` with one line naming the field, the bad value and what is allowed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..config import SpecError, StudySpec, build_run_spec
from .plan import Arm, Plan


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
    import tempfile
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


def prepare_datasets(spec: StudySpec, plan: Plan) -> None:
    """Download or generate each dataset once, here, before trials race for it (and fail offline)."""
    from ..data import DatasetUnavailable, load_dataset
    arms = plan.arms or [Arm("base", {}, {})]
    tasks = {json.dumps(build_run_spec(spec.base_run(), a.assign, plan.seeds[0]).task.model_dump(), sort_keys=True)
             for a in arms}
    for text in tasks:
        task = json.loads(text)
        try:
            load_dataset(task["dataset"], device="cpu", val_fraction=task["val_fraction"],
                         data_dir=str(Path(task["data_dir"]).expanduser().resolve()), **task["dataset_args"])
        except DatasetUnavailable as err:
            raise SpecError(f"task.dataset: {err}") from None


def check_control(spec: StudySpec) -> None:
    if spec.control:
        for key in spec.control:
            if spec.search.algorithm != "optuna" and key not in (spec.search.space or {}) and key != "variant":
                raise SpecError(f"control: {key!r} is not a factor of this study; factors: "
                                f"{', '.join(list(spec.search.space) + (['variant'] if spec.variants else []))}")


