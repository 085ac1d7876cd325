"""A learner group on Ray: N `ActorCriticRank` actors forming one torch.distributed group
(gloo on CPU, NCCL on GPU), placed by the run's placement plan. Every method fans out to all
ranks (they are collective) and batches are split evenly across them.

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


class LearnerGroup:
    def __init__(self, plan: Any, cfg: LearnerGroupConfig, policy: str, critic: str, temperature: float = 1.0,
                 seed: int = 0):
        remote = ray.remote(ActorCriticRank)
        self.ranks = [remote.options(**plan.options("learner", r)).remote() for r in range(cfg.ranks)]
        addr, port = ray.get(self.ranks[0].address.remote())
        ray.get([a.setup.remote(r, cfg.ranks, addr, port, policy, critic, cfg.actor.model_dump(),
                                cfg.critic.model_dump(), temperature, seed)
                 for r, a in enumerate(self.ranks)])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = ray.get([a.forward.remote(s) for a, s in zip(self.ranks, shard(batch, len(self.ranks)))])
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def train(self, batch: dict[str, torch.Tensor], algo: dict[str, Any], iteration: int) -> dict[str, float]:
        outs = ray.get([a.train.remote(s, algo, iteration)
                        for a, s in zip(self.ranks, shard(batch, len(self.ranks)))])
        return {k: float(np.mean([o[k] for o in outs])) for k in outs[0]}

    # weight sync sources (see rayalign.sync)
    def publish_buckets(self, bucket_bytes: int) -> tuple[list[BucketMeta], list[Any], int]:
        return ray.get([a.publish_buckets.remote(bucket_bytes) for a in self.ranks])[0]

    def bucket_metas(self, bucket_bytes: int) -> list[BucketMeta]:
        return ray.get(self.ranks[0].bucket_metas.remote(bucket_bytes))

    def rank0_address(self) -> tuple[str, int]:
        return ray.get(self.ranks[0].address.remote())

    def join_weight_group(self, addr: str, port: int, world_size: int, backend: str) -> Any:
        return self.ranks[0].join_weight_group.remote(addr, port, world_size, backend)

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
