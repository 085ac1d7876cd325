"""Weight sync learner -> rollout workers through Ray's object store: one `ray.put` per bucket
and one remote call per worker per sync (never one call per tensor)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from rayalign.sync.buckets import bucketize


@dataclass
class SyncStats:
    seconds: float
    bytes: int
    buckets: int
    tensors: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


class ObjectStoreSync:
    def __init__(self, workers: Sequence[Any], bucket_bytes: int = 256 * 1024**2):
        self.workers = list(workers)
        self.bucket_bytes = bucket_bytes

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        t0 = time.perf_counter()
        metas, refs, nbytes = [], [], 0
        for meta, flat in bucketize(named_tensors, self.bucket_bytes):
            metas.append(meta)
            refs.append(ray.put(flat))
            nbytes += flat.numel() * flat.element_size()
        counts = ray.get([w.load_buckets.remote(metas, refs) for w in self.workers])
        n = sum(len(m.names) for m in metas)
        if any(c != n for c in counts):
            raise RuntimeError(f"weight sync loaded {counts} tensors on the workers, sent {n}")
        return SyncStats(time.perf_counter() - t0, nbytes, len(metas), n)
