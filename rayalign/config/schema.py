"""The configs of rayalign's commands. Every section forbids unknown keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rayalign.config.core import Strict
from rayalign.world.gold import OBJECTIVES


class LearnerConfig(Strict):
    """The DeepSpeed learner (rayalign.learner.engine.Learner)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters live on the CPU")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    seed: int = 0

    @field_validator("offload_params")
    @classmethod
    def _offload_params_needs_zero3(cls, v: bool, info):  # type: ignore[no-untyped-def]
        if v and info.data.get("zero_stage") != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        return v


class WorldConfig(Strict):
    """The embedded synthetic task (rayalign.world)."""

    seed: int = 0
    sft_per_prompt: int = Field(6, ge=1)
    pretrain_docs: int = Field(6000, ge=1)
    pairs_per_prompt: int = Field(8, ge=1)
    noise: float = Field(0.0, ge=0, description="Bradley-Terry temperature of preference labels; 0 = noise-free")
    weights: list[float] = Field(default_factory=lambda: [0.6, 0.2, 0.2],
                                 description=f"preference weights over {OBJECTIVES}")

    @field_validator("weights")
    @classmethod
    def _weights_len(cls, v: list[float]) -> list[float]:
        if len(v) != len(OBJECTIVES):
            raise ValueError(f"needs {len(OBJECTIVES)} entries, one per objective {OBJECTIVES}")
        return v


class DataConfig(Strict):
    """Where training rows come from: 'world' (the embedded task), a Hugging Face dataset name,
    or a local .jsonl / .json / .parquet file."""

    source: str = "world"
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    max_seq_len: int = Field(96, ge=8)


class PretrainConfig(Strict):
    model: str = Field(..., description="a model directory (e.g. a preset) with its tokenizer")
    output: str
    world: WorldConfig = WorldConfig()
    learner: LearnerConfig = LearnerConfig(lr=2e-3, micro_batch_size=32)
    epochs: float = Field(1.0, gt=0)
    max_seq_len: int = Field(96, ge=8)
    save_every: int = Field(100, ge=0, description="optimiser steps between resumable states (0: only at the end)")


class SFTConfig(Strict):
    base: str = Field(..., description="the base model every SFT seed starts from")
    output: str = Field(..., description="directory; seed s is written to OUTPUT/sft-s")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    learner: LearnerConfig = LearnerConfig(lr=1e-3, micro_batch_size=16)
    epochs: float = Field(2.0, gt=0)
    save_every: int = Field(100, ge=0, description="optimiser steps between resumable states (0: only at the end)")


class RMConfig(Strict):
    base: str = Field(..., description="model the reward model starts from (usually an SFT model)")
    output: str
    objectives: Literal["combined", "each"] = Field(
        "combined", description="'combined': one scalar on world.weights; 'each': one head per objective")
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    learner: LearnerConfig = LearnerConfig(lr=5e-4, micro_batch_size=16)
    epochs: float = Field(2.0, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share of real preference data")
    save_every: int = Field(100, ge=0, description="optimiser steps between resumable states (0: only at the end)")


class EvalConfig(Strict):
    models: list[str] = Field(..., min_length=1)
    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, ge=0)
    split: Literal["train", "dev", "test"] = "test"
    limit: int | None = Field(None, ge=1)
    weights: list[float] = Field(default_factory=lambda: [0.6, 0.2, 0.2])
    seed: int = 0
