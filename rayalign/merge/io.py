"""Streaming safetensors I/O for the merge engine.

Reading: a checkpoint (one file or shards with an index) is opened lazily; a tensor is read with
`readinto` into a caller-owned buffer, so nothing stays resident after use (memory-mapped pages
would count in RSS for as long as the mapping lives).

Writing: the shapes and dtypes of every output tensor are known before the merge starts, so each
shard's safetensors header is computed up front and tensors are appended one by one as they are
merged -- peak memory is one tensor, not one shard. The files follow the safetensors format
(8-byte little-endian header length, JSON header, raw little-endian data) and are read back by
the safetensors library in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class MergeInputError(ValueError):
    """A merge input (model directory, checkpoint or config) that cannot be used; names it."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise MergeInputError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise MergeInputError(f"{path}: corrupt safetensors header (claims {n} bytes)")
            header = json.loads(f.read(n))
            size = f.seek(0, 2)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MergeInputError(f"{path}: cannot read safetensors header: {exc}") from exc
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise MergeInputError(f"{path}: corrupt safetensors header: entry {name!r} is not an object")
        if meta.get("dtype") not in DTYPES:
            raise MergeInputError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')!r}")
        offsets, shape = meta.get("data_offsets"), meta.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) and x >= 0 for x in offsets)
                and offsets[0] <= offsets[1]):
            raise MergeInputError(f"{path}: corrupt safetensors header: tensor {name} has no valid data_offsets "
                                  f"(got {offsets!r})")
        if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
            raise MergeInputError(f"{path}: corrupt safetensors header: tensor {name} has no valid shape (got {shape!r})")
        begin, end = offsets
        if end - begin != tensor_nbytes(tuple(shape), DTYPES[meta["dtype"]]):
            raise MergeInputError(f"{path}: corrupt safetensors header: tensor {name} has {end - begin} bytes for "
                                  f"shape {shape} of {meta['dtype']}")
        start = 8 + n + begin
        if start + (end - begin) > size:
            raise MergeInputError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
        out[name] = TensorInfo(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), start, end - begin)
    return out


class Checkpoint:
    """A Hugging Face model directory's safetensors weights, read lazily tensor by tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeInputError(f"model directory not found: {self.path}")
        if (self.path / INDEX).is_file():
            try:
                weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise MergeInputError(f"{self.path / INDEX}: corrupt shard index: {exc}") from exc
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise MergeInputError(f"{self.path} has no safetensors weights ({SINGLE} or {INDEX})")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise MergeInputError(f"{self.path}: shard {fname} named in the index is missing")
            self.tensors.update(read_header(fpath))
        self._handles: dict[Path, BinaryIO] = {}
        cfg = self.path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text()) if cfg.is_file() else {}
        except json.JSONDecodeError as exc:
            raise MergeInputError(f"{cfg} is corrupt: {exc}") from exc

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def keys(self) -> list[str]:
        return list(self.tensors)

    def numel(self, name: str) -> int:
        info = self.tensors[name]
        return info.nbytes // torch.empty((), dtype=info.dtype).element_size()

    def read_flat(self, name: str, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, start + count) of tensor `name`, flat, read into `out` (a buffer of
        the tensor's dtype with at least `count` elements) or a new tensor."""
        info = self.tensors[name]
        size = torch.empty((), dtype=info.dtype).element_size()
        buf = torch.empty(count, dtype=info.dtype) if out is None else out[:count]
        if count == 0:
            return buf
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb", buffering=0)
        got = os.preadv(f.fileno(), [memoryview(buf.view(torch.uint8).numpy())], info.start + start * size)
        if got != count * size:
            raise MergeInputError(f"{info.file}: short read for tensor {name} ({got} of {count * size} bytes)")
        return buf

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor `name`."""
        return self.read_flat(name, 0, self.numel(name)).view(self.tensors[name].shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, in memory (optionally cast): the ingredients that are
    merged again and again in place (searches over merges, Serve replicas). An adapter directory
    gives the full weights it stands for (base + B A)."""
    from rayalign.merge.lora import open_checkpoint

    ck = open_checkpoint(path)
    try:
        return {n: ck.read(n) if dtype is None else ck.read(n).to(dtype) for n in ck.keys()}
    finally:
        ck.close()


def shard_plan(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Split tensors (in order) into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(tensors):
        nbytes = tensor_nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class StreamingShardWriter:
    """Writes one safetensors shard whose tensors arrive one at a time, in header order."""

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for name, shape, dtype in tensors:
            nbytes = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, shape, dtype, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the safetensors library writes
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.i = 0
        self.written = 0
        self.total = offset
        self._skip_empty()

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next piece (flat, any length) of the current tensor `name`."""
        exp_name, _, dtype, nbytes = self.expected[self.i]
        if name != exp_name or chunk.dtype != dtype:
            raise RuntimeError(f"shard writer expected {exp_name} ({dtype}), got {name} ({chunk.dtype})")
        t = chunk.contiguous().reshape(-1)
        if t.numel():
            self.f.write(memoryview(t.view(torch.uint8).numpy()))
        self.written += t.numel() * t.element_size()
        if self.written > nbytes:
            raise RuntimeError(f"shard writer got {self.written} bytes for {name}, expected {nbytes}")
        if self.written == nbytes:
            self.i += 1
            self.written = 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        while self.i < len(self.expected) and self.expected[self.i][3] == 0:
            self.i += 1  # empty tensors have no bytes to wait for

    def close(self) -> None:
        if self.i != len(self.expected):
            raise RuntimeError(f"shard closed after {self.i} of {len(self.expected)} tensors")
        self.f.flush()
        self.f.close()
