"""Log-probabilities of sampled tokens and full-vocabulary KL, from logits.

- token_logprobs: log pi(y_t | x, y_<t) of the tokens that were actually generated (PPO's
  policy and reference log-probs; reference workers return these)
- full_kl:        sum over the vocabulary of KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t)) at every
  position (SPO's global regulariser, which covers the whole output distribution)

Positions: logits[:, t] predict input_ids[:, t + 1]; the returned tensors are aligned with
input_ids[:, 1:].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T-1]: log-prob of input_ids[:, t+1] under logits[:, t] / temperature."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: sum_v p(v) (log p(v) - log q(v)) at every position, p from logits, q from ref_logits."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)
