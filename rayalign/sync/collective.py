"""Weight sync learner -> rollout workers as a bucketed collective broadcast.

One small process group spans the learner's rank 0 (group rank 0, the source) and every rollout
worker (group ranks 1..n). It is separate from the learners' own torch.distributed group and is
built without touching the default group (a TCPStore plus a ProcessGroupGloo/ProcessGroupNCCL),
so a vLLM engine and a DeepSpeed learner can both take part. The same code runs gloo on CPU and
NCCL on GPU; only the buffer device differs.

    group = CollectiveGroup.join(addr, port, rank, world_size, backend)   # on every member
    group.send(bucketize(named_tensors))                                   # learner rank 0
    named = group.receive(metas)                                           # each rollout worker
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from rayalign.sync.buckets import BucketMeta, unbucketize
from rayalign.sync.object_store import SyncStats


class CollectiveGroup:
    def __init__(self, pg: Any, rank: int, world_size: int, device: torch.device):
        self.pg, self.rank, self.world_size, self.device = pg, rank, world_size, device

    @classmethod
    def join(cls, master_addr: str, master_port: int, rank: int, world_size: int, backend: str = "gloo",
             timeout_s: float = 300.0) -> CollectiveGroup:
        """Collective: every member calls it with the same address and size (rank 0 hosts the store)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout)
        prefixed = dist.PrefixStore("rayalign-weight-sync", store)
        if backend == "nccl":
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size)
            device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
            device = torch.device("cpu")
        else:
            raise ValueError(f"unknown collective backend {backend!r}; use gloo or nccl")
        group = cls(pg, rank, world_size, device)
        group._store = store  # keep the store alive as long as the group
        return group

    def _broadcast(self, flat: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([flat], opts).wait()

    def send(self, buckets: Iterable[tuple[BucketMeta, torch.Tensor]]) -> tuple[int, int]:
        """Source side: broadcast every bucket; returns (bytes, buckets)."""
        if self.rank != 0:
            raise RuntimeError("only group rank 0 (the learner) sends weights")
        nbytes = n = 0
        for _, flat in buckets:
            flat = flat.to(self.device)
            self._broadcast(flat)
            nbytes += flat.numel() * flat.element_size()
            n += 1
        return nbytes, n

    def receive(self, metas: Sequence[BucketMeta]) -> Iterator[tuple[str, torch.Tensor]]:
        """Receiver side: one broadcast per bucket into a fresh buffer; yields the named tensors.
        Every bucket is received before the first tensor is yielded, so a consumer that fails
        half-way cannot leave the sender blocked."""
        flats = []
        for meta in metas:
            flat = torch.empty(meta.numel, dtype=meta.dtype, device=self.device)
            self._broadcast(flat)
            flats.append(flat)
        for meta, flat in zip(metas, flats):
            yield from unbucketize(meta, flat)

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # a peer may already be gone; nothing left to release
            pass


class CollectiveSync:
    """The controller's side: forms the group (learner rank 0 + workers) and drives a broadcast.

    `learners` is the LearnerGroup, `workers` the rollout actor handles. Re-forming the group
    (after a worker restart) is `reset()`."""

    def __init__(self, learners: Any, workers: Sequence[Any], bucket_bytes: int, backend: str):
        self.learners, self.workers = learners, list(workers)
        self.bucket_bytes, self.backend = bucket_bytes, backend
        self._metas: list[BucketMeta] | None = None
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        import ray

        self.generation += 1
        addr, port = self.learners.rank0_address()
        n = len(self.workers) + 1
        ray.get([self.learners.join_weight_group(addr, port, n, self.backend)]
                + [w.join_weight_group.remote(addr, port, i + 1, n, self.backend) for i, w in enumerate(self.workers)])

    def resync(self, worker_index: int) -> SyncStats:
        """After worker `worker_index` restarted: re-form the group (its old one lost a member)
        and send the current weights again."""
        self.reset()
        return self.push()

    def push(self) -> SyncStats:
        import ray

        t0 = time.perf_counter()
        if self._metas is None:
            self._metas = self.learners.bucket_metas(self.bucket_bytes)
        send = self.learners.broadcast_weights_async(self.bucket_bytes)
        counts = ray.get([w.receive_weights.remote(self._metas) for w in self.workers])
        nbytes, nbuckets = ray.get(send)[0]
        n = sum(len(m.names) for m in self._metas)
        if any(c != n for c in counts):
            raise RuntimeError(f"weight sync loaded {counts} tensors on the workers, sent {n}")
        return SyncStats(time.perf_counter() - t0, nbytes, nbuckets, n)
