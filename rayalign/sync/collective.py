"""Weight sync learner -> rollout workers as a bucketed collective broadcast.

One small process group spans the learner's rank 0 (group rank 0, the source) and every rollout
worker (group ranks 1..n). It is separate from the learners' own torch.distributed group and is
built without touching the default group (a TCPStore plus a ProcessGroupGloo/ProcessGroupNCCL),
so a vLLM engine and a DeepSpeed learner can both take part. The same code runs gloo on CPU and
NCCL on GPU; only the buffer device differs.

    group = CollectiveGroup.join(addr, port, rank, world_size, backend)   # on every member
    group.send(bucketize(named_tensors))                                   # learner rank 0
    named = group.receive(metas)                                           # each rollout worker

Faults: every collective is bounded by the group's timeout, and a member whose broadcast fails
drops its group at once, which closes its connections, so its peers fail too instead of
waiting out the timeout. The controller (`CollectiveSync`) waits for every member within the
timeout; when one died it waits for Ray to restart it, re-forms the group with a fresh
rendezvous and broadcasts again, so every worker ends the sync with the learner's weights.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from rayalign.sync.base import SyncStats, WeightSyncError, register_sync
from rayalign.sync.buckets import BucketMeta, unbucketize


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
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout  # bounds every collective; torch has no public setter here
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
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
        if self.pg is None:
            raise RuntimeError("the weight-sync group was dropped after a failed broadcast; re-form it")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([flat], opts).wait()

    def send(self, buckets: Iterable[tuple[BucketMeta, torch.Tensor]]) -> tuple[int, int]:
        """Source side: broadcast every bucket; returns (bytes, buckets). On failure the group is
        dropped (its connections close, so the receivers fail too) and the error raised."""
        if self.rank != 0:
            raise RuntimeError("only group rank 0 (the learner) sends weights")
        nbytes = n = 0
        buckets = iter(buckets)
        try:
            for _, flat in buckets:
                flat = flat.to(self.device)
                self._broadcast(flat)
                nbytes += flat.numel() * flat.element_size()
                n += 1
        except BaseException:
            self.close()
            for _ in buckets:  # the rest is still gathered (ZeRO-3: a collective of every learner rank)
                pass
            raise
        return nbytes, n

    def receive(self, metas: Sequence[BucketMeta]) -> Iterator[tuple[str, torch.Tensor]]:
        """Receiver side: one broadcast per bucket into a fresh buffer; yields the named tensors.
        Every bucket is received before the first tensor is yielded, so a failure half-way leaves
        the worker's weights as they were (and drops the group, as `send` does)."""
        flats = []
        try:
            for meta in metas:
                flat = torch.empty(meta.numel, dtype=meta.dtype, device=self.device)
                self._broadcast(flat)
                flats.append(flat)
        except BaseException:
            self.close()
            raise
        for meta, flat in zip(metas, flats):
            yield from unbucketize(meta, flat)

    def close(self) -> None:
        pg, self.pg = self.pg, None
        if pg is None:
            return
        try:
            pg.shutdown()
        except Exception:  # a peer may already be gone; dropping the object closes the rest
            pass
        self._store = None


class CollectiveSync:
    """The controller's side: forms the group (learner rank 0 + workers) and drives a broadcast.

    `learners` is the LearnerGroup, `workers` the rollout actor handles. Every member's part of a
    push must finish within `timeout_s` (the group's own collective timeout too); a push that
    does not reach every worker raises WeightSyncError and leaves the group to be re-formed."""

    def __init__(self, learners: Any, workers: Sequence[Any], bucket_bytes: int, backend: str,
                 timeout_s: float = 120.0):
        self.learners, self.workers = learners, list(workers)
        self.bucket_bytes, self.backend, self.timeout_s = bucket_bytes, backend, timeout_s
        self._metas: list[BucketMeta] | None = None
        self._last: SyncStats | None = None
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        """(Re-)form the group: every member joins a fresh rendezvous on learner rank 0."""
        import ray

        self.generation += 1
        addr, port = self.learners.rank0_address()
        n = len(self.workers) + 1
        ray.get([self.learners.join_weight_group(addr, port, n, self.backend, self.timeout_s)]
                + [w.join_weight_group.remote(addr, port, i + 1, n, self.backend, self.timeout_s)
                   for i, w in enumerate(self.workers)])

    def resync(self, worker_index: int) -> SyncStats:
        """After worker `worker_index` restarted: re-form the group (its old one lost a member)
        and send the current weights again."""
        self.reset()
        return self.push()

    def recover(self, restarted: list[int]) -> SyncStats:
        """After a failed push: a restarted worker's `resync` already re-formed the group and sent the
        weights to everyone; with no restart (a timeout, a transient error) re-form and send again."""
        if restarted and self._last is not None:
            return self._last
        self.reset()
        return self.push()

    def push(self) -> SyncStats:
        import ray

        t0 = time.perf_counter()
        self._last = None
        if self._metas is None:
            self._metas = self.learners.bucket_metas(self.bucket_bytes)
        send = self.learners.broadcast_weights_async(self.bucket_bytes)
        recv = [w.receive_weights.remote(self._metas) for w in self.workers]
        ready, pending = ray.wait(send + recv, num_returns=len(send) + len(recv), timeout=self.timeout_s)
        failures = [f"{len(pending)} member(s) still broadcasting after {self.timeout_s:g}s"] if pending else []
        results = {}
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except Exception as exc:
                who = "learner" if ref in send else f"rollout worker {recv.index(ref)}"
                failures.append(f"{who}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if failures:
            raise WeightSyncError("collective weight sync failed: " + "; ".join(failures))
        nbytes, nbuckets = results[send[0]]
        n = sum(len(m.names) for m in self._metas)
        counts = [results[r] for r in recv]
        if any(c != n for c in counts):
            raise RuntimeError(f"weight sync loaded {counts} tensors on the workers, sent {n}")
        self._last = SyncStats(time.perf_counter() - t0, nbytes, nbuckets, n)
        return self._last


@register_sync("collective")
def _collective(learners: Any, workers: Sequence[Any], bucket_bytes: int, gpus: bool = False,
                timeout_s: float = 120.0) -> CollectiveSync:
    return CollectiveSync(learners, workers, bucket_bytes, "nccl" if gpus else "gloo", timeout_s)
