"""The rollout workers of a run with their weight sync: created in the placement plan's bundles,
kept in an ActorPool that restarts and re-syncs a dead worker, and fed the learner group's
weights through the object store or a bucketed collective broadcast.

    fleet = RolloutFleet(plan, cfg.rollout, cfg.sync, cfg.policy, learners, seed=0)
    fleet.push_weights()                                  # learner -> every worker, timed
    outs = fleet.generate(prompt_ids, sampling)           # balanced across workers
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray

from rayalign.config.schema import LoraConfig, RolloutConfig, SyncConfig
from rayalign.distributed.pool import ActorPool
from rayalign.rollout.worker import RolloutActor
from rayalign.sync import SyncStats, WeightSyncError, make_sync
from rayalign.utils.logging import log


class RolloutFleet:
    def __init__(self, plan: Any, cfg: RolloutConfig, sync: SyncConfig, policy: str, learners: Any,
                 learner_gpus: float = 0.0, seed: int = 0, lora: LoraConfig | None = None):
        """`lora`: the policy is a LoRA adapter on `policy`; every sync sends the adapter only."""
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                    "n": cfg.n, "seed": seed}
        workers = plan.spawn(RolloutActor, "rollout", cfg.engine, policy, sampling, cfg.gpu_memory_utilization,
                             lora.model_dump() if lora is not None and lora.enabled else None, cfg.vllm.model_dump(),
                             max_restarts=cfg.max_restarts)
        gpus = learner_gpus > 0 and cfg.resources.num_gpus > 0
        self.sync = make_sync(sync.kind, learners, workers, int(sync.bucket_mb * 1024**2), gpus, sync.timeout_s)
        self.pool = ActorPool("rollout", workers, on_restart=self._resync)
        self.engine = ray.get(workers[0].engine_name.remote())

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    def _resync(self, i: int) -> None:
        stats = self.sync.resync(i)
        log.info("re-synced rollout worker %d: %.1f MB in %.2fs", i, stats.bytes / 1e6, stats.seconds)

    def generate(self, prompt_ids: list[list[int]], sampling: dict[str, Any]) -> list[dict[str, Any]]:
        return self.pool.map("generate", prompt_ids, sampling)

    def push_weights(self) -> SyncStats:
        """The learner's weights to every rollout worker. A worker that dies during the sync (in the
        middle of a collective broadcast too) is restarted by Ray; the pool brings it back and
        re-syncs it, and the sync makes sure every other worker holds the new weights."""
        t0 = time.perf_counter()
        try:
            return self.sync.push()
        except WeightSyncError as exc:
            log.warning("weight sync failed (%s); recovering", exc)
            back = self.pool.recover_restarted()
            stats = self.sync.recover(back)
            log.warning("weight sync recovered (rollout workers restarted: %s)", back or "none")
            return dataclasses.replace(stats, seconds=time.perf_counter() - t0, recovered=True)

    def close(self) -> None:
        for a in self.pool.actors:
            ray.kill(a, no_restart=True)
