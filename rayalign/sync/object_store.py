"""Weight sync learner -> rollout workers through Ray's object store: one `ray.put` per bucket
and one remote call per worker per sync (never one call per tensor).

The buckets come either from a learner group (`source.publish_buckets(bucket_bytes)`, put into
the object store by the learner's rank 0, so the weights never pass through the controller) or
from named tensors handed to `push`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from rayalign.sync.base import SyncStats, WeightSyncError, register_sync
from rayalign.sync.buckets import bucketize

__all__ = ["ObjectStoreSync", "SyncStats"]


class ObjectStoreSync:
    def __init__(self, workers: Sequence[Any], bucket_bytes: int = 256 * 1024**2, source: Any = None):
        self.workers = list(workers)
        self.bucket_bytes = bucket_bytes
        self.source = source

    def resync(self, worker_index: int) -> SyncStats:
        """After worker `worker_index` restarted: send it the current weights."""
        return self.push(workers=[self.workers[worker_index]])

    def recover(self, restarted: list[int]) -> SyncStats:
        """The restarted workers were re-synced on their own; the others get this push again (a
        worker that failed mid-load may hold a mix of old and new buckets)."""
        return self.push(workers=[w for i, w in enumerate(self.workers) if i not in restarted])

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
        try:
            counts = ray.get([w.load_buckets.remote(metas, refs) for w in targets])
        except (RayActorError, ActorUnavailableError) as exc:
            raise WeightSyncError(f"a rollout worker failed while loading the weights: {type(exc).__name__}") from exc
        n = sum(len(m.names) for m in metas)
        if any(c != n for c in counts):
            raise RuntimeError(f"weight sync loaded {counts} tensors on the workers, sent {n}")
        return SyncStats(time.perf_counter() - t0, nbytes, len(metas), n)


@register_sync("object_store")
def _object_store(learners: Any, workers: Sequence[Any], bucket_bytes: int, gpus: bool = False,
                  timeout_s: float = 120.0) -> ObjectStoreSync:
    return ObjectStoreSync(workers, bucket_bytes, source=learners)
