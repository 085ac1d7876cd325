"""Learner groups on Ray: N rank actors forming one torch.distributed group (gloo on CPU, NCCL on
GPU), placed by the run's placement plan. Every method fans out to all ranks (they are
collective) and batches are split evenly across them. `LearnerGroup` holds PPO's actor-critic
ranks; `rayalign.learner.preference.PreferenceGroup` the SPO/DPO/IPO ranks.

    group = LearnerGroup(plan, cfg.learner, policy=..., critic=..., temperature=1.0, seed=0)
    old = group.forward(batch)                       # {"logp", "values"}, concatenated over ranks
    metrics = group.train(batch, algo, iteration)   # averaged over ranks
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from rayalign.config.schema import LearnerGroupConfig
from rayalign.learner.actor_critic import ActorCriticRank
from rayalign.sync.buckets import BucketMeta


def shard(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    size = batch["input_ids"].shape[0]
    if size % n:
        raise ValueError(f"a batch of {size} cannot be split evenly over {n} learner ranks")
    k = size // n
    return [{key: v[r * k:(r + 1) * k] for key, v in batch.items()} for r in range(n)]


class RankGroup:
    """`count` actors of `rank_cls` (a PolicyRank) in one torch.distributed group; `setup` is called
    on every rank with (rank, world_size, master_addr, master_port, **setup_kwargs)."""

    def __init__(self, plan: Any, count: int, rank_cls: type, wait: bool = True, **setup_kwargs: Any):
        """With wait False the ranks load their models in the background while the caller starts
        the run's other actors; `ready()` then waits for them (and raises a setup error)."""
        if plan.demands["learner"].count != count:
            raise ValueError(f"the placement plan has {plan.demands['learner'].count} learner ranks, not {count}")
        self.ranks = plan.spawn(ray.remote(rank_cls), "learner")
        address = self.ranks[0].address.remote()  # Ray hands its value to every setup once rank 0 is up
        self._setup = [a.setup_at.remote(r, count, address, **setup_kwargs) for r, a in enumerate(self.ranks)]
        if wait:
            self.ready()

    def ready(self) -> None:
        if self._setup:
            ray.get(self._setup)
            self._setup = []

    def call_sharded(self, method: str, shards: list[Any], *args: Any) -> list[Any]:
        """rank r runs method(shards[r], *args); the results in rank order."""
        if len(shards) != len(self.ranks):
            raise ValueError(f"{len(shards)} shards for {len(self.ranks)} learner ranks")
        self.ready()
        return ray.get([getattr(a, method).remote(s, *args) for a, s in zip(self.ranks, shards)])

    # weight sync sources (see rayalign.sync)
    def publish_buckets(self, bucket_bytes: int) -> tuple[list[BucketMeta], list[Any], int]:
        self.ready()
        return ray.get([a.publish_buckets.remote(bucket_bytes) for a in self.ranks])[0]

    def bucket_metas(self, bucket_bytes: int) -> list[BucketMeta]:
        self.ready()
        return ray.get(self.ranks[0].bucket_metas.remote(bucket_bytes))

    def rank0_address(self) -> tuple[str, int]:
        self.ready()  # a rank that failed to set up says so here, not as a sync error
        return ray.get(self.ranks[0].address.remote())

    def join_weight_group(self, addr: str, port: int, world_size: int, backend: str,
                          timeout_s: float = 300.0) -> Any:
        return self.ranks[0].join_weight_group.remote(addr, port, world_size, backend, timeout_s)

    def broadcast_weights_async(self, bucket_bytes: int) -> list[Any]:
        return [a.broadcast_weights.remote(bucket_bytes) for a in self.ranks]

    # run state
    def save_state(self, directory: str, client_state: dict[str, Any], tag: str) -> None:
        ray.get([a.save_state.remote(directory, client_state, tag) for a in self.ranks])

    def load_state(self, directory: str, tag: str) -> dict[str, Any] | None:
        return ray.get([a.load_state.remote(directory, tag) for a in self.ranks])[0]

    def save_policy(self, out: str, extra: dict[str, Any] | None = None) -> str:
        return ray.get([a.save_policy.remote(out, extra) for a in self.ranks])[0]

    def shutdown(self) -> None:
        for a in self.ranks:
            ray.kill(a)


class LearnerGroup(RankGroup):
    """PPO's learner group: every rank holds the actor and, unless `critic` is None, the critic (ActorCriticRank)."""

    def __init__(self, plan: Any, cfg: LearnerGroupConfig, policy: str, critic: str | None, temperature: float = 1.0,
                 seed: int = 0, own_reference: bool = False, total_steps: int | None = None, wait: bool = True):
        super().__init__(plan, cfg.ranks, ActorCriticRank, wait=wait, policy=policy, critic=critic,
                         actor_cfg=cfg.actor.model_dump(), critic_cfg=cfg.critic.model_dump(),
                         temperature=temperature, seed=seed, own_reference=own_reference, total_steps=total_steps)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = self.call_sharded("forward", shard(batch, len(self.ranks)))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def train(self, batch: dict[str, torch.Tensor], algo: dict[str, Any], iteration: int) -> dict[str, float]:
        outs = self.call_sharded("train", shard(batch, len(self.ranks)), algo, iteration)
        return mean_metrics(outs)


def mean_metrics(outs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([o[k] for o in outs])) for k in outs[0]}
