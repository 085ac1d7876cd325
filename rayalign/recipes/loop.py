"""The supervised training loop shared by pre-training, SFT and reward-model recipes.

Data order is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
interrupted one would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from rayalign.config.schema import LearnerConfig
from rayalign.learner.engine import Learner, LossFn
from rayalign.utils.logging import RunLogger, log


class TrainState(Protocol):
    """Where a supervised run keeps its resumable state: a local directory here, Ray Train's
    checkpoints under Ray Train (rayalign.distributed.train.RayTrainState)."""

    where: str

    def load(self, learner: Learner) -> dict[str, Any] | None:
        """Load the latest state into `learner`; its client state, or None when there is none."""

    def save(self, learner: Learner, client_state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Save the learner's whole training state with `client_state` (collective)."""


class DirState:
    """DeepSpeed checkpoints in one directory (shared by the ranks of a torchrun)."""

    def __init__(self, directory: str | Path):
        self.where = str(directory)

    def load(self, learner: Learner) -> dict[str, Any] | None:
        return learner.load_state(self.where)

    def save(self, learner: Learner, client_state: dict[str, Any], metrics: dict[str, float]) -> None:
        learner.save_state(self.where, client_state)


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def plan_steps(n_examples: int, cfg: LearnerConfig, epochs: float, world_size: int = 1) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps)."""
    per_step = cfg.micro_batch_size * cfg.grad_accum * world_size
    if n_examples < per_step:
        raise ValueError(f"{n_examples} training examples is fewer than one batch "
                         f"(micro_batch_size*grad_accum*ranks = {per_step})")
    per_epoch = n_examples // per_step
    return per_epoch, max(1, math.ceil(epochs * per_epoch))


def batch_indices(n: int, seed: int, step: int, per_epoch: int, per_step: int) -> np.ndarray:
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[k * per_step:(k + 1) * per_step]


def fit(
    learner: Learner,
    examples: list[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    loss_fn: LossFn,
    epochs: float,
    seed: int,
    logger: RunLogger,
    desc: str,
    state: TrainState | None = None,
    save_every: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train; returns the last step's metrics. With `state`, resumes from its latest state and
    saves state every `save_every` steps and at the end."""
    cfg = learner.cfg
    rank, size = world()
    per_epoch, total = plan_steps(len(examples), cfg, epochs, size)
    per_rank = cfg.micro_batch_size * cfg.grad_accum
    start = 0
    if state is not None:
        client = state.load(learner)
        if client is not None:
            start = int(client["step"])
            log.info("%s: resuming from step %d/%d (%s)", desc, start, total, state.where)
    metrics: dict[str, float] = {}
    bar = tqdm(range(start, total), desc=desc, initial=start, total=total, disable=rank != 0, leave=False)
    for step in bar:
        idx = batch_indices(len(examples), seed, step, per_epoch, per_rank * size)
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        micro = [collate([examples[i] for i in mine[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size]])
                 for j in range(cfg.grad_accum)]
        metrics = learner.step(micro, loss_fn)
        logger.log(step + 1, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if on_step is not None:
            on_step(step + 1, metrics)
        if state is not None and ((save_every and (step + 1) % save_every == 0) or step + 1 == total):
            state.save(learner, {"step": step + 1, "seed": seed, "total": total, "world_size": size}, metrics)
    return metrics
