"""Preference losses on sequence log-probabilities: SPO (Sharifnassab et al. 2024), DPO (Rafailov
et al. 2023) and IPO (Azar et al. 2023). Inputs are summed log-probs of whole responses,
log pi(y|x) = sum_t log pi(y_t | x, y_<t); every function returns a scalar mean over pairs.

SPO's preference loss has no reference model inside it:

    L_pref = -(1/alpha) E[ mu * log sigmoid( alpha * (log pi(y_w|x) - log pi(y_l|x)) ) ]

Its regulariser is separate (`global_kl`): beta * E_{y ~ pi} sum_t KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t)),
on samples the rollout workers draw from the current policy.

The losses are registered (`PREFERENCE_LOSSES`, `@register_preference_loss`): `rayalign train NAME`
takes its methods from the registry, and the learner asks a loss whether it needs pi_ref's
log-probs and whether SPO's online global KL goes with it. Adding a loss is one registered
function plus its test.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rayalign.utils.registry import Registry


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


# ---- the registry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairLogprobs:
    """Summed log-probs of the chosen (w) and rejected (l) responses [pairs]; the reference's
    (ref_w, ref_l) only for losses that need pi_ref."""

    w: torch.Tensor
    l: torch.Tensor  # noqa: E741
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None


@dataclass(frozen=True)
class PreferenceLoss:
    name: str
    fn: Callable[[PairLogprobs, Any], torch.Tensor]  # (log-probs, algo config with the loss's parameters)
    needs_reference: bool  # pi_ref's log-probs of both responses enter the loss
    online_kl: bool        # SPO's global KL on online samples of the current policy is added
    paper: str


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")


def register_preference_loss(name: str, *, paper: str, needs_reference: bool, online_kl: bool = False
                             ) -> Callable[[Callable[[PairLogprobs, Any], torch.Tensor]],
                                           Callable[[PairLogprobs, Any], torch.Tensor]]:
    def add(fn: Callable[[PairLogprobs, Any], torch.Tensor]) -> Callable[[PairLogprobs, Any], torch.Tensor]:
        PREFERENCE_LOSSES.add(name, PreferenceLoss(name, fn, needs_reference, online_kl, paper))
        return fn
    return add


def preference_loss(name: str) -> PreferenceLoss:
    return PREFERENCE_LOSSES.lookup(name)


def _ref(p: PairLogprobs) -> tuple[torch.Tensor, torch.Tensor]:
    if p.ref_w is None or p.ref_l is None:
        raise ValueError("this preference loss needs pi_ref's log-probs of both responses")
    return p.ref_w, p.ref_l


@register_preference_loss("spo", paper="arXiv 2405.00747", needs_reference=False, online_kl=True)
def _spo(p: PairLogprobs, a: Any) -> torch.Tensor:
    return spo_loss(p.w, p.l, a.alpha, a.gamma)


@register_preference_loss("dpo", paper="arXiv 2305.18290", needs_reference=True)
def _dpo(p: PairLogprobs, a: Any) -> torch.Tensor:
    return dpo_loss(p.w, p.l, *_ref(p), a.dpo_beta)


@register_preference_loss("ipo", paper="arXiv 2310.12036", needs_reference=True)
def _ipo(p: PairLogprobs, a: Any) -> torch.Tensor:
    return ipo_loss(p.w, p.l, *_ref(p), a.ipo_tau)
