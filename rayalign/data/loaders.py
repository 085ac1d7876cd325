"""Load SFT, preference and prompt data: the embedded world, a Hugging Face dataset by name,
or local JSONL / JSON / Parquet files. Every row is validated (rayalign.data.schema)."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, load_dataset

from rayalign.data.schema import KINDS, DatasetRowError, normalise_row

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DatasetSourceError(ValueError):
    """The source cannot be read or holds no rows."""


def read_source(source: str, split: str) -> Dataset:
    path = Path(source)
    if path.suffix in LOCAL_FORMATS or path.exists():
        if not path.exists():
            raise DatasetSourceError(f"data file not found: {path}")
        if path.is_dir():
            files = sorted(str(p) for ext in LOCAL_FORMATS for p in path.glob(f"*{ext}"))
            if not files:
                raise DatasetSourceError(f"no .jsonl/.json/.parquet files in directory {path}")
        else:
            files = [str(path)]
        fmt = LOCAL_FORMATS.get(Path(files[0]).suffix)
        if fmt is None:
            raise DatasetSourceError(f"unsupported data file type {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
        if any(Path(f).stat().st_size == 0 for f in files):
            raise DatasetSourceError(f"data file is empty: {next(f for f in files if Path(f).stat().st_size == 0)}")
        try:
            return load_dataset(fmt, data_files=files, split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            where = next((w for w in map(bad_json_line, files) if w), None) if fmt == "json" else None
            raise DatasetSourceError(where or f"cannot read {path} as {fmt}: {exc}") from exc
    try:  # a hub dataset name (needs network or a local HF cache)
        return load_dataset(source, split=split)
    except Exception as exc:
        raise DatasetSourceError(f"cannot load dataset {source!r} split {split!r}: {exc}") from exc


def bad_json_line(file: str) -> str | None:
    """For a .jsonl file that `datasets` cannot read: the file, line and reason of its first line that
    is not a JSON object (its message only says "An error occurred while generating the dataset")."""
    if not file.endswith(".jsonl"):
        return None
    with open(file, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                return f"{file}, line {n}: not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(row, dict):
                return f"{file}, line {n}: a JSON {type(row).__name__}, not an object"
    return None


def validate(ds: Dataset, kind: str, source: str) -> Dataset:
    """Check every row and return a Dataset in rayalign's schema."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    if len(ds) == 0:
        raise DatasetSourceError(f"{source}: dataset has no rows")
    rows = [normalise_row(row, kind, source, i) for i, row in enumerate(ds)]
    return Dataset.from_list(rows)


def load_rows(source: str, kind: str, split: str = "train", limit: int | None = None) -> Dataset:
    """Load and validate `kind` rows ('sft', 'preference' or 'prompt') from `source`.

    Examples: load_rows("HuggingFaceH4/ultrachat_200k", "sft", split="train_sft"),
    load_rows("HuggingFaceH4/ultrafeedback_binarized", "preference", split="train_prefs"),
    load_rows("my_pairs.jsonl", "preference")."""
    ds = read_source(source, split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return validate(ds, kind, source)


__all__ = ["DatasetRowError", "DatasetSourceError", "load_rows", "validate"]
