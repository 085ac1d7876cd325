"""The rollout Ray actor: a thin shell around a rollout engine (rayalign.rollout.engine).

New weights arrive either as object-store buckets (`load_buckets`) or by a collective broadcast
from the learner's rank 0 (`join_weight_group` once, then `receive_weights` per sync)."""

from __future__ import annotations

import itertools
from typing import Any

import ray

from rayalign.config.schema import LoraConfig, VLLMOptions
from rayalign.rollout.engine import SamplingConfig, make_engine
from rayalign.sync.buckets import BucketMeta, unbucketize
from rayalign.sync.collective import CollectiveGroup


class RolloutWorker:
    """Generates with vLLM (or the transformers fallback) and takes new weights as buckets."""

    def __init__(self, kind: str, model_path: str, sampling: dict[str, Any], gpu_memory_utilization: float = 0.5,
                 lora: dict[str, Any] | None = None, vllm: dict[str, Any] | None = None):
        """`lora`: the policy trains a LoRA adapter (a LoraConfig dict); weight syncs carry it alone.
        `vllm`: the engine's VLLMOptions (a dict)."""
        self.engine = make_engine(kind, model_path, SamplingConfig(**sampling),  # type: ignore[arg-type]
                                  gpu_memory_utilization=gpu_memory_utilization,
                                  lora=LoraConfig(**lora) if lora else None,
                                  options=VLLMOptions(**vllm) if vllm else None)
        self.group: CollectiveGroup | None = None

    def engine_name(self) -> str:
        return self.engine.name

    def generate(self, prompts: list[list[int]], sampling: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        s = SamplingConfig(**sampling) if sampling else None
        return [r.__dict__ for r in self.engine.generate(prompts, s)]

    def load_buckets(self, metas: list[BucketMeta], refs: list[ray.ObjectRef]) -> int:
        """Fetch the buckets (object store) and load every tensor in them; returns the count."""
        flats = ray.get(refs)
        return self.engine.load_weights(itertools.chain.from_iterable(
            unbucketize(m, f) for m, f in zip(metas, flats)))

    def join_weight_group(self, addr: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float = 300.0) -> None:
        if self.group is not None:
            self.group.close()
        self.group = CollectiveGroup.join(addr, port, rank, world_size, backend, timeout_s)

    def receive_weights(self, metas: list[BucketMeta]) -> int:
        if self.group is None:
            raise RuntimeError("receive_weights before join_weight_group")
        return self.engine.load_weights(self.group.receive(metas))


RolloutActor = ray.remote(RolloutWorker)
