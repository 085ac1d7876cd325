"""Reward scorers: a trained reward model, or the embedded world's gold reward functions.

Both return, per (prompt, response), a vector of objective scores and their combination by the
configured weights. The Ray actor is a thin shell; the class is used in-process by evaluation.

    scorer = RewardScorer("gold", weights=[0.6, 0.2, 0.2])
    out = scorer.score(["what colour is the apple ?"], ["the apple is red ."])
    out["combined"], out["vector"]          # [n], [n, k]
    RewardScorer("model", ["rm-helpful", "rm-harmless"], weights=[0.7, 0.3])   # heads stacked
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from rayalign.data.tokenize import encode_conversation, pad
from rayalign.utils.device import place
from rayalign.world.gold import OBJECTIVES, gold_vector


class RewardScorer:
    """kind 'gold': the world's objective vector. kind 'model': one reward model directory, or
    several (e.g. one per objective, as Rewarded and Bone Soups use with separate helpful and
    harmless models), whose heads are stacked into one vector in the order given."""

    def __init__(self, kind: str, model: str | list[str] | None = None, weights: list[float] | None = None,
                 max_len: int = 2048, batch_size: int = 64, dtype: str = "auto"):
        self.kind = kind
        self.max_len, self.batch_size = max_len, batch_size
        self.models: list[tuple[Any, Any]] = []
        if kind == "gold":
            self.objectives = list(OBJECTIVES)
        elif kind == "model":
            paths = reward_model_paths(model)
            if not paths:
                raise ValueError("a reward scorer of kind 'model' needs a reward model directory")
            from rayalign.models.checkpoint import load_reward_model

            for p in paths:
                m, tok = load_reward_model(p)
                self.models.append((place(m, dtype).eval(), tok))
            self.objectives = _head_names(paths, [int(m.config.num_labels) for m, _ in self.models])
        else:
            raise ValueError(f"unknown reward kind {kind!r}; use 'gold' or 'model'")
        k = len(self.objectives)
        self.weights = np.asarray(weights if weights is not None and k > 1 else [1.0] * k, dtype=np.float64)
        if self.weights.shape != (k,):
            raise ValueError(f"reward.weights has {len(self.weights)} entries, the scorer gives {k} "
                             f"objectives {self.objectives}")

    def score(self, prompts: list[str], responses: list[str]) -> dict[str, Any]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        vec = self._gold(prompts, responses) if self.kind == "gold" else self._model(prompts, responses)
        combined = vec @ self.weights
        return {"vector": vec, "combined": combined, "objectives": self.objectives}

    def score_items(self, items: list[tuple[str, str]]) -> list[list[float]]:
        """[(prompt, response)] -> [[combined, *vector]]: the form the actor pool splits and joins."""
        out = self.score([p for p, _ in items], [r for _, r in items])
        return [[float(c), *map(float, v)] for c, v in zip(out["combined"], out["vector"])]

    def objective_names(self) -> list[str]:
        return list(self.objectives)

    @staticmethod
    def _gold(prompts: list[str], responses: list[str]) -> np.ndarray:
        return np.stack([gold_vector(p, r) for p, r in zip(prompts, responses)]) if prompts \
            else np.zeros((0, len(OBJECTIVES)))

    @torch.no_grad()
    def _model(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return np.concatenate([self._one_model(m, tok, prompts, responses) for m, tok in self.models], axis=1)

    def _one_model(self, model: Any, tok: Any, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Each reward model reads the conversation through its own tokenizer and chat template."""
        out = []
        for b in range(0, len(prompts), self.batch_size):
            seqs = [encode_conversation(tok, [{"role": "user", "content": p},
                                              {"role": "assistant", "content": r}], self.max_len)["input_ids"]
                    for p, r in zip(prompts[b:b + self.batch_size], responses[b:b + self.batch_size])]
            ids = pad(seqs, tok.pad_token_id).to(model.device)
            mask = pad([[1] * len(s) for s in seqs], 0).to(model.device)
            out.append(model(input_ids=ids, attention_mask=mask).logits.float().cpu())
        k = int(model.config.num_labels)
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, k))


def reward_model_paths(model: str | list[str] | None) -> list[str]:
    """`reward.model` as a list: one directory, several, or none."""
    return [model] if isinstance(model, str) else list(model or [])


def _head_names(paths: list[str], heads: list[int]) -> list[str]:
    """One model: 'reward' for a scalar head, the world's objectives for a head per objective.
    Several: each model's directory name (with /i per head of a multi-head model)."""
    if len(paths) == 1:
        k = heads[0]
        return ["reward"] if k == 1 else list(OBJECTIVES[:k]) if k <= len(OBJECTIVES) else [f"head{i}" for i in range(k)]
    names = []
    for i, (p, k) in enumerate(zip(paths, heads)):
        path = Path(p.rstrip("/"))
        stem = path.parent.name if path.name == "model" else path.name  # RUN/rm/model -> rm
        names += [stem] if k == 1 else [f"{stem}/{j}" for j in range(k)]
    return [n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names)]


RewardActor = ray.remote(RewardScorer)
