"""Atomic writes: nothing half-written is ever left where a reader looks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
    """Raised instead of silently overwriting an existing output."""


def claim_output(out: Path, resume: bool) -> None:
    """Refuse to overwrite an existing output unless resuming (then it is kept as it is)."""
    if out.exists() and not resume:
        raise OutputExistsError(f"output already exists: {out} (pass --resume to continue that run, or choose another output)")


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to `target`.

    On any exception the temporary directory is removed and `target` is untouched.
    An existing `target` is an error unless overwrite=True (then it is replaced only
    after the new content is complete)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output directory already exists: {target} (choose another path or remove it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove what a killed writer of `target` left beside it (`.NAME.tmp-PID-*`, `.NAME.old-PID`) when
    that process is gone; a leftover whose owner cannot be told (no PID in its name) is named in a
    warning and kept. Returns what was removed."""
    removed = []
    for p in target.parent.glob(f".{target.name}.*"):
        kind, _, rest = p.name[len(target.name) + 2:].partition("-")
        if kind not in ("tmp", "old"):
            continue
        pid = rest.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
            log.warning("removed %s, left by process %s that was killed while writing %s", p, pid, target)
        elif not pid.isdigit():
            log.warning("%s looks like an unfinished write of %s by an unknown process; remove it if none is running",
                        p, target)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one line; a crash can lose at most the line being written, never earlier ones."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def scratch_dir(prefix: str) -> str:
    """A new temporary directory in memory (tmpfs, /dev/shm) where there is one, else in the
    system's temporary directory: adapters and weights handed to vLLM by path. The caller removes it."""
    return tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
