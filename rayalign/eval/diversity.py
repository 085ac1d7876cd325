"""How varied a policy's outputs are on given prompts: the mean next-token entropy along its own
samples (in nats per response token) and the share of distinct responses among n samples of one
prompt (1.0: every sample differs; 1/n: the policy always says the same thing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rayalign.eval.kl import sampled_batches
from rayalign.losses.ppo import entropy


@dataclass
class Diversity:
    token_entropy: float
    distinct: float

    def as_dict(self) -> dict[str, float]:
        return {"token_entropy": self.token_entropy, "distinct": self.distinct}


@torch.no_grad()
def diversity(model: Any, tok: Any, prompts: list[str], n: int = 8, max_new_tokens: int = 32, seed: int = 0,
              batch_size: int = 64) -> Diversity:
    if n < 2:
        raise ValueError("diversity needs at least 2 samples per prompt")
    model.eval()
    rollouts, batches = sampled_batches(model, tok, prompts, n, max_new_tokens, 1.0, seed, batch_size)
    ents, weights = [], []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["response_mask"]
        ents.append(float(entropy(logits[:, :-1], mask)))
        weights.append(float(mask.sum()))
    by_prompt: dict[int, set[tuple[int, ...]]] = {}
    for r in rollouts:
        by_prompt.setdefault(r.prompt_index, set()).add(tuple(r.response_ids))
    distinct = float(np.mean([len(s) / n for s in by_prompt.values()]))
    return Diversity(float(np.average(ents, weights=weights)), distinct)
