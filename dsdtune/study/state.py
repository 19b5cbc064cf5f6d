"""What the runner keeps beside a study's results, in `<results>/.dsdtune/`.

- `lock`: the pid and host of the driver running the study; a second driver is refused, and the
  lock of a process that no longer runs (on this host) is taken over.
- `spec.json`: the resolved spec and its hash, stored when the study starts; `--resume` refuses a
  spec that differs, naming the first field that does.
- `stop`: written on Ctrl-C/SIGTERM; running trials that see it checkpoint at their next epoch end.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from ..config import SpecError, StudySpec, first_difference, get_by_path, spec_hash, study_identity

STATE_DIR = ".dsdtune"


def state_dir(results_dir: Path) -> Path:
    return results_dir / STATE_DIR


def stop_file(results_dir: Path) -> Path:
    return state_dir(results_dir) / "stop"


class StudyLock:
    """An exclusive lock file; `release()` removes it only while this process holds it."""

    def __init__(self, results_dir: Path):
        self.path = state_dir(results_dir) / "lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    print(f"dsdtune: taking over the lock of process {holder.get('pid')}, which no longer runs",
                          file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                raise SpecError(f"another driver (pid {holder.get('pid')} on {holder.get('host')}, since "
                                f"{holder.get('since')}) is running this study in {self.path.parent.parent}; "
                                f"wait for it to finish, or stop it first") from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spec_file(results_dir: Path) -> Path:
    return state_dir(results_dir) / "spec.json"


def store_spec(results_dir: Path, spec: StudySpec) -> None:
    path = spec_file(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"hash": spec_hash(spec), "spec": study_identity(spec)}, indent=2) + "\n")
    os.replace(tmp, path)


def check_same_spec(results_dir: Path, spec: StudySpec) -> None:
    """`--resume` continues the stored study only: a changed spec is refused, naming the first difference."""
    path = spec_file(results_dir)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SpecError(f"--resume: {results_dir} has no stored study spec to check this one against (it was "
                        f"started by an older dsdtune, or never started); use --fresh to start over") from None
    if stored.get("hash") == spec_hash(spec):
        return
    field = first_difference(stored.get("spec", {}), study_identity(spec)) or "the spec"
    old, new = _value(stored.get("spec", {}), field), _value(study_identity(spec), field)
    raise SpecError(f"--resume: {field} differs from the stored study ({old!r} then, {new!r} now); resume with the "
                    f"same study file and --set values, or use --fresh to start over")


def _value(tree: dict, path: str):
    try:
        return get_by_path(tree, path)
    except (KeyError, IndexError, TypeError, ValueError):  # the field exists on one side only
        return None
