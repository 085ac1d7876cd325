"""The rollout Ray actor: a thin shell around a rollout engine (rayalign.rollout.engine)."""

from __future__ import annotations

import itertools
from typing import Any

import ray

from rayalign.rollout.engine import SamplingConfig, make_engine
from rayalign.sync.buckets import BucketMeta, unbucketize


class RolloutWorker:
    """Generates with vLLM (or the transformers fallback) and takes new weights as buckets."""

    def __init__(self, kind: str, model_path: str, sampling: dict[str, Any]):
        self.engine = make_engine(kind, model_path, SamplingConfig(**sampling))  # type: ignore[arg-type]

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


RolloutActor = ray.remote(RolloutWorker)
