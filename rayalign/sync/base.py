"""The weight-sync protocol, its statistics and the registry of kinds (see rayalign.sync)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


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


class WeightSync(Protocol):
    def push(self) -> SyncStats:
        """Send the learner's weights to every worker; raises WeightSyncError when one is not reached."""

    def resync(self, worker_index: int) -> SyncStats:
        """Worker `worker_index` was restarted (holds its initial weights): bring it up to date."""

    def recover(self, restarted: list[int]) -> SyncStats:
        """After a failed push, once the restarted workers are back (and re-synced by `resync`): make
        sure every worker holds the current weights."""


SyncFactory = Callable[..., WeightSync]
SYNC_KINDS: dict[str, SyncFactory] = {}


def register_sync(name: str) -> Callable[[SyncFactory], SyncFactory]:
    def add(factory: SyncFactory) -> SyncFactory:
        if name in SYNC_KINDS:
            raise ValueError(f"weight sync {name!r} is already registered")
        SYNC_KINDS[name] = factory
        return factory
    return add


def make_sync(kind: str, learners: Any, workers: Sequence[Any], bucket_bytes: int, gpus: bool = False,
              timeout_s: float = 120.0) -> WeightSync:
    _register_builtins()
    try:
        factory = SYNC_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown weight sync {kind!r}; registered: {', '.join(sorted(SYNC_KINDS))}") from None
    return factory(learners, workers, bucket_bytes=bucket_bytes, gpus=gpus, timeout_s=timeout_s)


def sync_kinds() -> list[str]:
    _register_builtins()
    return sorted(SYNC_KINDS)


def _register_builtins() -> None:
    """The built-in kinds register on import (kept lazy: they import Ray and torch.distributed)."""
    import rayalign.sync.collective  # noqa: F401
    import rayalign.sync.object_store  # noqa: F401
