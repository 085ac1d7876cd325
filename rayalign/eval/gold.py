"""Gold evaluation: generate on held-out prompts, score every objective with the gold rewards,
report means with spread and win rates. Success in rayalign is always measured here, never on
a learned reward model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rayalign.data.tokenize import encode_prompt
from rayalign.rollout.engine import SamplingConfig, hf_generate
from rayalign.world.gold import OBJECTIVES, gold_vector


@dataclass
class GoldResult:
    """Gold scores of one model: `scores[i, j, k]` = prompt i, sample j, objective k."""

    name: str
    prompts: list[str]
    responses: list[list[str]]
    scores: np.ndarray
    weights: np.ndarray = field(default_factory=lambda: np.array([0.6, 0.2, 0.2]))
    objectives: tuple[str, ...] = OBJECTIVES  # a reward scorer's own names when it scored instead of gold

    @property
    def combined(self) -> np.ndarray:
        return self.scores @ self.weights

    def summary(self) -> dict[str, Any]:
        """Mean and standard error (over prompts) of each objective and of the combination."""
        per_prompt = self.scores.mean(axis=1)  # [P, K]
        n = per_prompt.shape[0]
        out: dict[str, Any] = {"model": self.name, "prompts": n, "samples": int(self.scores.shape[1])}
        for k, o in enumerate(self.objectives):
            out[o] = float(per_prompt[:, k].mean())
            out[f"{o}_se"] = float(per_prompt[:, k].std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        comb = self.combined.mean(axis=1)
        out["combined"] = float(comb.mean())
        out["combined_se"] = float(comb.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        out["mean_words"] = float(np.mean([len(r.split()) for rs in self.responses for r in rs]))
        return out


def win_rate(a: GoldResult, b: GoldResult) -> float:
    """P(a's combined gold reward > b's) over matched (prompt, sample) pairs; ties count 1/2."""
    if a.prompts != b.prompts or a.scores.shape != b.scores.shape:
        raise ValueError(f"win_rate needs both models evaluated on the same prompts and sample counts "
                         f"({a.name}: {a.scores.shape}, {b.name}: {b.scores.shape})")
    ca, cb = a.combined, b.combined
    return float(np.mean((ca > cb) + 0.5 * (ca == cb)))


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[str], n: int = 1, max_new_tokens: int = 40,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 64, top_p: float = 1.0,
             top_k: int = 0) -> list[list[str]]:
    """HF generate (the fallback rollout path): n responses per prompt, decoded without specials."""
    model.eval()
    torch.manual_seed(seed)
    rollouts = hf_generate(model, tok, [encode_prompt(tok, p) for p in prompts],
                           SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k,
                                          max_new_tokens=max_new_tokens, n=n), batch_size)
    texts = tok.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    return [[t.strip() for t in texts[j * n:(j + 1) * n]] for j in range(len(prompts))]


def score(name: str, prompts: list[str], responses: list[list[str]], weights: Any = (0.6, 0.2, 0.2),
          scorer: Any = None) -> GoldResult:
    """Gold scores, or a RewardScorer's (its objectives and weights) when one is given."""
    if scorer is None:
        scores = np.array([[gold_vector(p, r) for r in rs] for p, rs in zip(prompts, responses)])
        return GoldResult(name, prompts, responses, scores, np.asarray(weights, dtype=np.float64))
    flat = scorer.score([p for p, rs in zip(prompts, responses) for _ in rs], [r for rs in responses for r in rs])
    scores = flat["vector"].reshape(len(prompts), -1, len(flat["objectives"]))
    return GoldResult(name, prompts, responses, scores, scorer.weights, tuple(flat["objectives"]))


def evaluate(name: str, model: Any, tok: Any, prompts: list[str], n: int = 2, max_new_tokens: int = 40,
             temperature: float = 1.0, seed: int = 0, weights: Any = (0.6, 0.2, 0.2), scorer: Any = None) -> GoldResult:
    responses = generate(model, tok, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return score(name, prompts, responses, weights, scorer)
