"""Reward scorers: a trained reward model, or the embedded world's gold reward functions.

Both return, per (prompt, response), a vector of objective scores and their combination by the
configured weights. The Ray actor is a thin shell; the class is used in-process by evaluation.

    scorer = RewardScorer("gold", weights=[0.6, 0.2, 0.2])
    out = scorer.score(["what colour is the apple ?"], ["the apple is red ."])
    out["combined"], out["vector"]          # [n], [n, k]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from rayalign.data.tokenize import encode_conversation, pad
from rayalign.world.gold import OBJECTIVES, gold_vector


class RewardScorer:
    def __init__(self, kind: str, model: str | None = None, weights: list[float] | None = None,
                 max_len: int = 256, batch_size: int = 64):
        self.kind = kind
        self.max_len, self.batch_size = max_len, batch_size
        if kind == "gold":
            self.objectives = list(OBJECTIVES)
        elif kind == "model":
            if not model:
                raise ValueError("a reward scorer of kind 'model' needs a reward model directory")
            from rayalign.models.checkpoint import load_reward_model

            self.model, self.tok = load_reward_model(model)
            self.model.eval()
            k = int(self.model.config.num_labels)
            self.objectives = ["reward"] if k == 1 else list(OBJECTIVES[:k]) if k <= len(OBJECTIVES) \
                else [f"head{i}" for i in range(k)]
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
        out = []
        for b in range(0, len(prompts), self.batch_size):
            seqs = [encode_conversation(self.tok, [{"role": "user", "content": p},
                                                   {"role": "assistant", "content": r}], self.max_len)["input_ids"]
                    for p, r in zip(prompts[b:b + self.batch_size], responses[b:b + self.batch_size])]
            ids = pad(seqs, self.tok.pad_token_id)
            mask = pad([[1] * len(s) for s in seqs], 0)
            out.append(self.model(input_ids=ids, attention_mask=mask).logits.float())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(self.objectives)))


RewardActor = ray.remote(RewardScorer)
