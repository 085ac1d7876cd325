"""Preference losses on sequence log-probabilities: SPO (Sharifnassab et al. 2024), DPO (Rafailov
et al. 2023) and IPO (Azar et al. 2023). Inputs are summed log-probs of whole responses,
log pi(y|x) = sum_t log pi(y_t | x, y_<t); every function returns a scalar mean over pairs.

SPO's preference loss has no reference model inside it:

    L_pref = -(1/alpha) E[ mu * log sigmoid( alpha * (log pi(y_w|x) - log pi(y_l|x)) ) ]

Its regulariser is separate (`global_kl`): beta * E_{y ~ pi} sum_t KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t)),
on samples the rollout workers draw from the current policy.

The weight mu (no gradient). mu = 1 is SPO-basic. The weighted form we ship is

    mu = (4 * p * (1 - p)) ** gamma,   p = sigmoid(alpha * (log pi(y_w) - log pi(y_l)))

It is 1 where the model is undecided about a pair (p = 1/2) and falls towards 0 where the model
is already confident either way, so pairs the model has settled stop pushing log-probs to
extremes (the instability of sequence-level preference losses), and gamma = 0 is SPO-basic.
We chose a weight that is symmetric in (y_w, y_l) on purpose: mu(y_w, y_l) = mu(y_l, y_w), so
for the two labellings of one pair the stationarity condition of the expected loss,
mu * [P(w > l) * (1 - p) - P(l > w) * p] = 0, keeps the root p = P(w > l). The fixed point of
SPO's Theorem 1, pi = softmax(r / alpha), is therefore unchanged for any gamma (checked on the
bandit in tests/test_preference_math.py); a weight that depended on which side won would move it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logprob(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] per-token log-probs and a 0/1 mask of response tokens -> [B] summed log-probs."""
    return (token_logp * mask).sum(-1)


def spo_weight(logp_w: torch.Tensor, logp_l: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """mu = (4 p (1 - p)) ** gamma with p = sigmoid(alpha * margin); detached; 1 when gamma = 0."""
    if gamma == 0:
        return torch.ones_like(logp_w)
    with torch.no_grad():
        p = torch.sigmoid(alpha * (logp_w - logp_l).float())
        return (4.0 * p * (1.0 - p)).clamp_min(1e-12) ** gamma


def spo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, alpha: float, gamma: float = 0.0) -> torch.Tensor:
    """SPO's preference loss -(1/alpha) E[mu log sigmoid(alpha (log pi(y_w) - log pi(y_l)))]."""
    if alpha <= 0:
        raise ValueError(f"SPO's alpha must be > 0, got {alpha}")
    mu = spo_weight(logp_w, logp_l, alpha, gamma)
    return -(mu * F.logsigmoid(alpha * (logp_w - logp_l).float())).mean() / alpha


def dpo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """DPO: -E[log sigmoid(beta ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))]."""
    h = (logp_w - ref_w) - (logp_l - ref_l)
    return -F.logsigmoid(beta * h.float()).mean()


def ipo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             tau: float) -> torch.Tensor:
    """IPO: E[(h - 1/(2 tau))^2] with h the same log-ratio difference as DPO's."""
    if tau <= 0:
        raise ValueError(f"IPO's tau must be > 0, got {tau}")
    h = (logp_w - ref_w) - (logp_l - ref_l)
    return ((h.float() - 1.0 / (2.0 * tau)) ** 2).mean()


def global_kl(per_position_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E_samples sum_t KL_t: full-vocabulary KL at every response position (losses.logprobs.full_kl),
    summed over the response and averaged over the samples. Its value is an unbiased estimate of
    the sequence-level KL(pi(.|x) || pi_ref(.|x)) only when the samples are fresh draws y ~ pi; its
    gradient, which differentiates the per-position KL but not the sampling distribution, is not
    the gradient of that KL, and with samples refreshed every algo.kl_every steps they come from
    a policy up to kl_every - 1 updates old (arXiv 2405.00747 refreshes its samples every T steps too)."""
    return (per_position_kl * mask).sum(-1).mean()
