"""The weight-sync protocol, its statistics and the registry of kinds (see rayalign.sync)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rayalign.utils.registry import Registry


@dataclass
class SyncStats:
    seconds: float
    bytes: int
    buckets: int
    tensors: int
    recovered: bool = False  # a worker failed during this sync and was brought back


    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def as_metrics(self) -> dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/mb": self.bytes / 1e6, "sync/mb_per_s": self.mb_per_s,
                "sync/recovered": float(self.recovered)}


class WeightSyncError(RuntimeError):
    """A push that did not reach every worker (a worker died, a collective failed or timed out)."""


class WeightSource(Protocol):
    """Where a sync takes the policy's weights from: a learner group (rayalign.learner.group). All its
    methods are collective over the learner ranks (ZeRO-3 gathers), rank 0 serving the result."""

    def bucket_metas(self, bucket_bytes: int) -> list[Any]:
        """The bucket layout of the weights a sync sends (names, shapes, dtypes)."""

    def publish_buckets(self, bucket_bytes: int) -> tuple[list[Any], list[Any], int]:
        """The weights as buckets in Ray's object store: (metas, object refs, bytes)."""

    def rank0_address(self) -> tuple[str, int]:
        """Where a collective group's rendezvous can listen (learner rank 0's node, a free port)."""

    def join_weight_group(self, addr: str, port: int, world_size: int, backend: str, timeout_s: float) -> Any:
        """Rank 0 joins the weight-sync group as its rank 0 (an ObjectRef to wait on)."""

    def broadcast_weights_async(self, bucket_bytes: int) -> list[Any]:
        """Rank 0 broadcasts the weights in the group (ObjectRefs, one per learner rank)."""


class WeightSync(Protocol):
    def push(self) -> SyncStats:
        """Send the learner's weights to every worker; raises WeightSyncError when one is not reached."""

    def resync(self, worker_index: int) -> SyncStats:
        """Worker `worker_index` was restarted (holds its initial weights): bring it up to date."""

    def recover(self, restarted: list[int]) -> SyncStats:
        """After a failed push, once the restarted workers are back (and re-synced by `resync`): make
        sure every worker holds the current weights."""


SyncFactory = Callable[..., WeightSync]
SYNC_KINDS: Registry[SyncFactory] = Registry("weight sync")


def register_sync(name: str) -> Callable[[SyncFactory], SyncFactory]:
    def add(factory: SyncFactory) -> SyncFactory:
        return SYNC_KINDS.add(name, factory)
    return add


def make_sync(kind: str, learners: WeightSource, workers: Sequence[Any], bucket_bytes: int, gpus: bool = False,
              timeout_s: float = 120.0) -> WeightSync:
    _register_builtins()
    return SYNC_KINDS.lookup(kind)(learners, workers, bucket_bytes=bucket_bytes, gpus=gpus, timeout_s=timeout_s)


def sync_kinds() -> list[str]:
    _register_builtins()
    return sorted(SYNC_KINDS)


def _register_builtins() -> None:
    """The built-in kinds register on import (kept lazy: they import Ray and torch.distributed)."""
    import rayalign.sync.collective  # noqa: F401
    import rayalign.sync.object_store  # noqa: F401
