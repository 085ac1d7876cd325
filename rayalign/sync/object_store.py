"""Weight sync learner -> rollout workers through Ray's object store: one `ray.put` per bucket
and one remote call per worker per sync (never one call per tensor).

The buckets come either from a learner group (`source.publish_buckets(bucket_bytes)`, put into
the object store by the learner's rank 0, so the weights never pass through the controller) or
from named tensors handed to `push`.
"""

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

    def as_metrics(self) -> dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/mb": self.bytes / 1e6, "sync/mb_per_s": self.mb_per_s}


class ObjectStoreSync:
    def __init__(self, workers: Sequence[Any], bucket_bytes: int = 256 * 1024**2, source: Any = None):
        self.workers = list(workers)
        self.bucket_bytes = bucket_bytes
        self.source = source

    def reset(self) -> None:
        """Nothing to re-form: every push reaches whichever workers are alive."""

    def resync(self, worker_index: int) -> SyncStats:
        """After worker `worker_index` restarted: send it the current weights."""
        return self.push(workers=[self.workers[worker_index]])

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
             workers: Sequence[Any] | None = None) -> SyncStats:
        t0 = time.perf_counter()
        if named_tensors is None:
            if self.source is None:
                raise ValueError("ObjectStoreSync.push needs named tensors or a source learner group")
            metas, refs, nbytes = self.source.publish_buckets(self.bucket_bytes)
        else:
            metas, refs, nbytes = [], [], 0
            for meta, flat in bucketize(named_tensors, self.bucket_bytes):
                metas.append(meta)
                refs.append(ray.put(flat))
                nbytes += flat.numel() * flat.element_size()
        targets = self.workers if workers is None else list(workers)
        counts = ray.get([w.load_buckets.remote(metas, refs) for w in targets])
        n = sum(len(m.names) for m in metas)
        if any(c != n for c in counts):
            raise RuntimeError(f"weight sync loaded {counts} tensors on the workers, sent {n}")
        return SyncStats(time.perf_counter() - t0, nbytes, len(metas), n)
