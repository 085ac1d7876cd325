"""Evaluating many merges of the same ingredients: the weights are read once, one model is re-merged
in place for each coefficient vector (ExPO's alpha search, Bone Soup's k, soup fronts over a
preference grid), and rollouts on a prompt set are scored by a RewardScorer (gold or a model).

    merged = MergedModel(["runs/sft/sft-0", "runs/dpo/policy"])
    merged.set([-0.3, 1.3])                         # ExPO with alpha = 0.3
    scores = rollout_scores(merged.model, merged.tok, prompts, RewardScorer("gold"), n=2)   # [P, n, K]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayalign.eval.gold import generate
from rayalign.merge.engine import merge_into, validate_paths
from rayalign.merge.io import read_state_dict
from rayalign.models.checkpoint import load_causal_lm
from rayalign.reward.scorer import RewardScorer


class MergedModel:
    """Ingredient weights held in memory (validated mergeable) and one model re-merged in place."""

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise ValueError("MergedModel needs at least one model")
        validate_paths(paths)
        self.paths = [str(p) for p in paths]
        self.model, self.tok = load_causal_lm(paths[0])
        self.model.eval()
        self.sources = [read_state_dict(p) for p in paths]
        self.coefficients: list[float] = [1.0] + [0.0] * (len(paths) - 1)

    def set(self, coefficients: Sequence[float]) -> Any:
        coefs = [float(c) for c in coefficients]
        if coefs != self.coefficients:
            merge_into(self.model, self.sources, coefs)
            self.coefficients = coefs
        return self.model


def sample_flat(model: Any, tok: Any, prompts: list[str], n: int = 2, max_new_tokens: int = 40,
                temperature: float = 1.0, seed: int = 0, inputs: list[Any] | None = None, top_p: float = 1.0,
                top_k: int = 0) -> tuple[list[str], list[str]]:
    """n seeded samples per prompt, flattened prompt-major: (prompt of each sample, its response).

    `inputs` replaces what the model is shown (e.g. preference-conditioned messages); the returned
    prompts are always the bare ones, for scorers."""
    responses = generate(model, tok, inputs if inputs is not None else prompts, n=n,
                         max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, top_p=top_p, top_k=top_k)
    return [p for p in prompts for _ in range(n)], [r for rs in responses for r in rs]


def rollout_scores(model: Any, tok: Any, prompts: list[str], scorer: RewardScorer, n: int = 2,
                   max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0,
                   inputs: list[Any] | None = None) -> np.ndarray:
    """Sample n responses per prompt and score them: [P, n, K] over the scorer's objectives."""
    flat_p, flat_r = sample_flat(model, tok, prompts, n, max_new_tokens, temperature, seed, inputs)
    vec = scorer.score(flat_p, flat_r)["vector"]
    return np.asarray(vec, dtype=np.float64).reshape(len(prompts), n, -1)
