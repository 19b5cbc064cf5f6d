"""What the runner keeps beside a study's results, in `<results>/.dsdtune/`, and which folders are its own.

- `lock`: the pid and host of the driver running the study; a second driver is refused, and the
  lock of a process that no longer runs (on this host) is taken over.
- `spec.json`: the resolved spec and its hash, and what else shaped the trials (`inputs`: the content
  of its checkpoints, the source of the user modules it names, dsdtune's version and source; see
  `provenance.study_inputs`), stored when the study starts; `--resume` refuses a spec that differs,
  naming the first field that does, and a changed checkpoint, user module or dsdtune, naming it.
- `confirm.json`: the config an Optuna study's confirm stage runs, stored when the stage starts: a
  resumed confirm stage continues with it (a resumed search, whose errored trials run again, may rank
  another config first).
- `.dsdtune-made` (in the results folder and in its `ray/` folder): dsdtune made this folder (or
  found it empty), so `--fresh` may clear it. `--fresh` removes only the files dsdtune's writers
  write in a marked results folder (`dsdtune.results.result_files`) and a marked `ray/` folder as a
  whole; on a folder without the marker it refuses, before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from ..atomic import write_text
from ..config import SpecError, StudySpec, first_difference, get_by_path, spec_hash, study_identity
from ..results import MASKS_DIR, STUDY_JSON, result_files

STATE_DIR = ".dsdtune"
MARKER = ".dsdtune-made"


def state_dir(results_dir: Path) -> Path:
    return results_dir / STATE_DIR


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


def confirm_file(results_dir: Path) -> Path:
    return state_dir(results_dir) / "confirm.json"


def store_spec(results_dir: Path, spec: StudySpec, inputs: dict) -> None:
    stored = {"hash": spec_hash(spec), "spec": study_identity(spec), "inputs": inputs}
    write_text(spec_file(results_dir), json.dumps(stored, indent=2) + "\n")


def nothing_to_resume(results_dir: Path, study: str) -> SpecError:
    """`--resume` where nothing of this study is stored: the one line that says how to start it."""
    return SpecError(f"--resume: nothing to resume in {results_dir} (no run of study {study!r} is stored there); "
                    f"start it without --resume")


def check_same_spec(results_dir: Path, spec: StudySpec, inputs: dict) -> None:
    """`--resume` continues the stored study only: a changed spec is refused, naming the first difference,
    and so is a changed checkpoint, user module or dsdtune (`inputs`), naming which."""
    path = spec_file(results_dir)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SpecError(f"--resume: {results_dir} has no stored study spec to check this one against (it was "
                        f"started by an older dsdtune, or never started); use --fresh to start over") from None
    if stored.get("hash") != spec_hash(spec):
        field = first_difference(stored.get("spec", {}), study_identity(spec)) or "the spec"
        old, new = _value(stored.get("spec", {}), field), _value(study_identity(spec), field)
        raise SpecError(f"--resume: {field} differs from the stored study ({old!r} then, {new!r} now); resume with "
                        f"the same study file and --set values, or use --fresh to start over")
    if "inputs" not in stored:
        raise SpecError("--resume: the stored study does not record its checkpoints, user modules and dsdtune "
                        "version (an older dsdtune started it), so a resume could mix them; use --fresh to start over")
    changed = changed_input(stored["inputs"], inputs)
    if changed:
        raise SpecError(f"--resume: {changed} since the study started, so its trials would mix two versions; "
                        f"restore it, or use --fresh to start over")


def changed_input(old: dict, new: dict) -> Optional[str]:
    """What differs between two `provenance.study_inputs`, in words (None: nothing)."""
    def short(digest) -> str:
        return f"sha256 {digest[:12]}" if digest else "missing"

    for path in sorted(set(old.get("checkpoints", {})) | set(new.get("checkpoints", {}))):
        before, now = old.get("checkpoints", {}).get(path), new.get("checkpoints", {}).get(path)
        if before != now:
            return f"init.checkpoint {path} changed ({short(before)} then, {short(now)} now)"
    for name in sorted(set(old.get("modules", {})) | set(new.get("modules", {}))):
        before, now = old.get("modules", {}).get(name), new.get("modules", {}).get(name)
        if before != now:
            where = (now or before or {}).get("file") or "no file"
            return (f"the source of module {name} ({where}) changed "
                    f"({short((before or {}).get('sha256'))} then, {short((now or {}).get('sha256'))} now)")
    before, now = old.get("dsdtune", {}), new.get("dsdtune", {})
    if before != now:
        return (f"dsdtune changed (version {before.get('version')}, source {short(before.get('sha256'))} then; "
                f"version {now.get('version')}, source {short(now.get('sha256'))} now)")
    return None


def _value(tree: dict, path: str):
    try:
        return get_by_path(tree, path)
    except (KeyError, IndexError, TypeError, ValueError):  # the field exists on one side only
        return None


# ------------------------------------------------------------------------ folders dsdtune made


def is_marked(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _holds_nothing_else(folder: Path) -> bool:
    """Absent, empty, or holding only dsdtune's own state and marker."""
    return not folder.exists() or (folder.is_dir() and all(p.name in (STATE_DIR, MARKER) for p in folder.iterdir()))


def _holds_its_results(folder: Path, study: str) -> bool:
    """This study's results as a dsdtune from before the markers wrote them (study.json names the study)."""
    try:
        meta = json.loads((folder / STUDY_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("name") == study and "factors" in meta


def holds_ray_state(ray_dir: Path) -> bool:
    """Whether a Ray state folder holds anything of a run (its marker alone is not a run)."""
    return ray_dir.is_dir() and any(p.name != MARKER for p in ray_dir.iterdir())


def _results_folder_is_ours(results_dir: Path, study: str) -> bool:
    return is_marked(results_dir) or _holds_nothing_else(results_dir) or _holds_its_results(results_dir, study)


def claim_folders(results_dir: Path, ray_dir: Optional[Path], study: str) -> None:
    """Mark the results folder and its Ray state folder (None: remote storage) as dsdtune's where dsdtune
    makes them now or finds them empty; a results folder also where it holds this study's results
    written before markers existed. A folder left unmarked is never cleared by `--fresh`."""
    if not is_marked(results_dir) and _results_folder_is_ours(results_dir, study):
        _mark(results_dir, f"the results folder of study {study!r}")
    if ray_dir is not None and not is_marked(ray_dir) and _holds_nothing_else(ray_dir):
        _mark(ray_dir, f"the Ray state of study {study!r}")


def _mark(folder: Path, what: str) -> None:
    write_text(folder / MARKER, f"dsdtune made this folder: {what}. `python -m dsdtune.study ... --fresh` removes "
                                f"what dsdtune wrote here; other files are left alone.\n")


def check_fresh(results_dir: Path, ray_dir: Optional[Path], study: str) -> None:
    """`--fresh` clears only folders dsdtune made: a SpecError (one line, nothing written) otherwise."""
    if results_dir.exists() and not _results_folder_is_ours(results_dir, study):
        raise SpecError(f"--fresh: {results_dir} was not made by dsdtune (it holds other files and no {MARKER} "
                        f"marker), so nothing in it is removed; move your files out of it or choose another "
                        f"folder with --results or storage")
    if ray_dir is not None and not is_marked(ray_dir) and not _holds_nothing_else(ray_dir):
        raise SpecError(f"--fresh: {ray_dir} was not made by this dsdtune (no {MARKER} marker), so it is not "
                        f"deleted; delete it yourself if it only holds an earlier run of this study")


def start_fresh(results_dir: Path, ray_dir: Optional[Path]) -> None:
    """Remove the previous run (after `check_fresh`): the files dsdtune wrote in the results folder
    (tables, study.json, the report and its figures, masks/*.npz), the stored spec, and the Ray state
    folder when it is marked as dsdtune's. A user's own files in the results folder stay."""
    for path in result_files(results_dir):
        path.unlink(missing_ok=True)
    masks = results_dir / MASKS_DIR
    if masks.is_dir() and not any(masks.iterdir()):
        masks.rmdir()
    spec_file(results_dir).unlink(missing_ok=True)
    confirm_file(results_dir).unlink(missing_ok=True)
    if ray_dir is not None and is_marked(ray_dir):
        shutil.rmtree(ray_dir)
