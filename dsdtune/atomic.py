"""The one way dsdtune writes a file that someone may read while it is being written.

Every result file (trials.csv, history.csv, study.json, report.md, figures, masks), every state file
(the stored spec, cached datasets) goes through `write_atomic`: the bytes go to a unique temp file in
the target's folder (so the rename stays on one file system), are flushed and fsync'ed, and the temp
file is renamed over the target; the folder is fsync'ed too, so after a crash a reader finds the old
file or the new one, never half of one. Imports nothing of dsdtune.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def write_atomic(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` through `write(binary file object)`; the target appears whole or not at all."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)
    return target


def write_bytes(path: PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda handle: handle.write(data))


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_csv(frame, path: PathLike) -> Path:
    """A pandas DataFrame as CSV without its index."""
    return write_bytes(path, frame.to_csv(index=False).encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is; some file systems refuse O_RDONLY on dirs.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
