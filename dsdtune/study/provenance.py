"""Where a study's results come from: the resolved spec and its hash, versions, machine, git commit.

The spec hash (`config.spec_hash`) identifies a study by its resolved spec (every default filled
in, every `--set` applied, the fields that change no result left out): the same hash means the
same study, which is what `--resume` checks. Nothing here imports Ray or torch at module level.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

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


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(spec, study_file: Optional[Path], started: Optional[str] = None,
               ended: Optional[str] = None) -> dict:
    """Everything study.json records about where the results come from."""
    return {"spec": spec.model_dump(mode="json"), "spec_hash": spec_hash(spec),
            "study_file": str(Path(study_file).resolve()) if study_file else None,
            "git": git_commit(study_file), "versions": versions(), "machine": machine(),
            "started": started, "ended": ended or now()}
