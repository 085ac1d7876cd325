"""Pack named tensors into a few large flat buffers ("buckets") and back.

Weight sync (learner -> rollout workers) moves buckets, never one tensor per call: through the
object store one `ray.put` per bucket, or one collective broadcast per bucket (gloo on CPU, NCCL
on GPU). A bucket holds tensors of one dtype, in order, up to `bucket_bytes` (a tensor larger
than that gets a bucket of its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BucketMeta:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)


def bucketize(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 256 * 1024**2,
              allocate: bool = True) -> Iterator[tuple[BucketMeta, torch.Tensor | None]]:
    """Yield (meta, flat buffer) buckets; tensors are copied into the buffer in input order.
    With allocate=False only the layout is computed (buffer None; tensors may be on 'meta')."""
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> tuple[BucketMeta, torch.Tensor | None]:
        dtype = pending[0][1].dtype
        meta = BucketMeta(tuple(n for n, _ in pending), tuple(tuple(t.shape) for _, t in pending), dtype)
        if not allocate:
            return meta, None
        flat = torch.empty(sum(t.numel() for _, t in pending), dtype=dtype)
        offset = 0
        for _, t in pending:
            flat[offset:offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        return meta, flat

    for name, t in named_tensors:
        t = t.detach().to("cpu") if allocate and t.device.type != "cpu" else t.detach()
        nbytes = t.numel() * t.element_size()
        if pending and (t.dtype != pending[0][1].dtype or size + nbytes > bucket_bytes):
            yield flush()
            pending, size = [], 0
        pending.append((name, t))
        size += nbytes
    if pending:
        yield flush()


def unbucketize(meta: BucketMeta, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one bucket, as views into `flat` (no copy)."""
    if flat.numel() != meta.numel or flat.dtype != meta.dtype:
        raise ValueError(f"bucket buffer has {flat.numel()} {flat.dtype} elements, metadata says "
                         f"{meta.numel} {meta.dtype}")
    offset = 0
    for name, shape, n in zip(meta.names, meta.shapes, meta.numels):
        yield name, flat[offset:offset + n].view(shape)
        offset += n
