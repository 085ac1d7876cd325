"""KL(pi || pi_ref) of a trained policy on held-out prompts: the x-axis of every reward-versus-KL
comparison (as in arXiv 2411.01798 and 2210.10760).

Responses are sampled from pi; at every response position the KL between the two next-token
distributions is summed over the whole vocabulary (exact per position, so the only noise is
which responses were sampled), then summed over the response:

    KL(x) = E_{y ~ pi(.|x)} sum_t KL(pi(.|x, y<t) || pi_ref(.|x, y<t))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rayalign.data.tokenize import encode_prompt, response_batch
from rayalign.losses.logprobs import full_kl
from rayalign.rollout.engine import Rollout, SamplingConfig, hf_generate


@dataclass
class KLResult:
    per_sample: np.ndarray  # [N] sequence KL of each sampled response

    @property
    def mean(self) -> float:
        return float(self.per_sample.mean())

    @property
    def se(self) -> float:
        return float(self.per_sample.std(ddof=1) / np.sqrt(len(self.per_sample))) if len(self.per_sample) > 1 else 0.0


def sampled_batches(policy: Any, tok: Any, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                    seed: int, batch_size: int) -> tuple[list[Rollout], list[dict[str, torch.Tensor]]]:
    """n samples per prompt from the policy (seeded), and the same samples as padded
    prompt+response batches of `batch_size` (`response_mask` marks the response positions)."""
    torch.manual_seed(seed)
    rollouts = hf_generate(policy, tok, [encode_prompt(tok, p) for p in prompts],
                           SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, n=n), batch_size)
    batches = [response_batch([r.prompt_ids for r in chunk], [r.response_ids or [tok.eos_token_id] for r in chunk],
                              tok.pad_token_id)
               for chunk in (rollouts[b:b + batch_size] for b in range(0, len(rollouts), batch_size))]
    return rollouts, batches


@torch.no_grad()
def sequence_kl(policy: Any, reference: Any, tok: Any, prompts: list[str], n: int = 2, max_new_tokens: int = 40,
                temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> KLResult:
    """Sequence-level KL(policy || reference) on responses sampled from the policy."""
    policy.eval()
    reference.eval()
    _, batches = sampled_batches(policy, tok, prompts, n, max_new_tokens, temperature, seed, batch_size)
    out: list[float] = []
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        kl = full_kl(policy(**inputs).logits / temperature, reference(**inputs).logits / temperature)
        out += (kl * batch["response_mask"]).sum(1).tolist()
    return KLResult(np.asarray(out))
