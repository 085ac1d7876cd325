"""Atomic writes: nothing half-written is ever left where a reader looks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
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
