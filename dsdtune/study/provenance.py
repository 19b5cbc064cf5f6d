"""Where a study's results come from: the resolved spec and its hash, what else shaped the trials,
versions, machine, git commits.

The spec hash (`config.spec_hash`) identifies a study by its resolved spec (every default filled
in, every `--set` applied, the fields that change no result left out). What the spec only names is
pinned by content (`study_inputs`): the checkpoints it starts from, the source of the user modules
its names resolve to, dsdtune's own version and source. Together they are the study's identity,
which `--resume` checks (`state.check_same_spec`). Nothing here imports Ray or torch at module level.
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Optional

from ..config import spec_hash

PACKAGES = ("dsdtune", "torch", "ray", "optuna")


def versions() -> dict[str, Optional[str]]:
    found: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    if found["dsdtune"] is None:  # run from a checkout without installing
        from .. import __version__
        found["dsdtune"] = __version__
    return found


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """The driver's GPUs (torch's view), none when CUDA is absent; never initializes CUDA needlessly."""
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine() -> dict:
    import os
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "gpus": gpu_names()}


def git_commit(path: Optional[Path]) -> Optional[dict]:
    """The commit (and whether the tree has changes) of the git repository holding `path`, if any."""
    if path is None:
        return None
    folder = Path(path).resolve()
    folder = folder if folder.is_dir() else folder.parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty, "repository": git("rev-parse", "--show-toplevel")}
    except (OSError, subprocess.SubprocessError):
        return None


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # dsdtune/


def dsdtune_source() -> dict:
    """dsdtune's version and the sha256 of its source (every .py file but the report's, which only
    reads finished results): a resumed study must train with the code it started with."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR)
        if relative.parts[0] == "report":
            continue
        digest.update(relative.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {"version": versions()["dsdtune"], "sha256": digest.hexdigest()}


def _checkpoint_paths(tree: Any, key: str = "") -> set[str]:
    """Every `init.checkpoint` value in a spec tree: the init section, variants, controls, search axes."""
    found: set[str] = set()
    if isinstance(tree, dict):
        for name, value in tree.items():
            if name == "init.checkpoint" or (name == "checkpoint" and key == "init"):
                values = (value.get("grid") or value.get("choice") or []) if isinstance(value, dict) else value
                found |= {v for v in (values if isinstance(values, list) else [values]) if isinstance(v, str) and v}
            found |= _checkpoint_paths(value, name)
    elif isinstance(tree, list):
        for value in tree:
            found |= _checkpoint_paths(value, key)
    return found


def checkpoint_digests(spec, runs: Iterable) -> dict[str, Optional[str]]:
    """path -> sha256 of each checkpoint the study's trials start from (None: not a readable file)."""
    paths = _checkpoint_paths(spec.model_dump(mode="json")) | {r.init.checkpoint for r in runs if r.init.checkpoint}
    return {path: file_digest(path) if os.path.isfile(path) else None for path in sorted(paths)}


def _add_module(found: dict, module) -> None:
    name, path = getattr(module, "__name__", None), getattr(module, "__file__", None)
    if name and name not in found and path and os.path.isfile(path):
        found[name] = {"file": str(path), "sha256": file_digest(path)}


def _add_object(found: dict, target: Any) -> None:
    """The module that defines `target`; a function or class of a notebook (no file): its own source."""
    module = sys.modules.get(getattr(target, "__module__", None) or "")
    if module is not None and getattr(module, "__file__", None):
        _add_module(found, module)
        return
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):  # nothing to read it from
        return
    name = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', '?')}"
    found[name] = {"file": None, "sha256": hashlib.sha256(source.encode()).hexdigest()}


def module_digests(spec, runs: Iterable) -> dict[str, dict]:
    """module -> {file, sha256} of every user module that shaped the trials: the modules the study's
    `module:attr` names (task.model, task.dataset, phase_kinds) import and the ones their objects are
    defined in, and the modules of the registered models, datasets and phase kinds the study uses."""
    from .. import registry
    from ..data.datasets import DATASETS
    from ..models import MODELS
    from ..phases import PHASE_KINDS
    runs = list(runs)
    names = [(r.task.model, MODELS) for r in runs] + [(r.task.dataset, DATASETS) for r in runs]
    names += [(path, PHASE_KINDS) for path in spec.phase_kinds.values()]
    letters = {letter for r in runs for letter in r.pipeline.flow}
    found: dict[str, dict] = {}
    for name, names_of in names:
        if registry.is_import_path(name):
            _add_module(found, registry.import_module(name.partition(":")[0], names_of.field))
            _add_object(found, names_of.resolve(name))
        elif name in names_of.registered:
            _add_object(found, names_of.registered[name])
    for letter in sorted(letters):
        if letter in PHASE_KINDS.registered:
            _add_object(found, PHASE_KINDS.registered[letter])
    return dict(sorted(found.items()))


def study_inputs(spec, runs: Iterable) -> dict:
    """What shaped the trials besides the spec (stored with its identity; `--resume` refuses a change)."""
    runs = list(runs)
    return {"checkpoints": checkpoint_digests(spec, runs), "modules": module_digests(spec, runs),
            "dsdtune": dsdtune_source()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(spec, study_file: Optional[Path], started: Optional[str] = None,
               ended: Optional[str] = None, inputs: Optional[dict] = None) -> dict:
    """Everything study.json records about where the results come from."""
    return {"spec": spec.model_dump(mode="json"), "spec_hash": spec_hash(spec),
            "study_file": str(Path(study_file).resolve()) if study_file else None,
            "git": git_commit(study_file), "dsdtune_git": git_commit(PACKAGE_DIR), "inputs": inputs,
            "versions": versions(), "machine": machine(), "started": started, "ended": ended or now()}
