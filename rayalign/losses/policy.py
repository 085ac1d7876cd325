"""Policy losses as a registry of small pure functions: the surrogate an advantage is pushed
through. `algo.policy_loss` picks one; any estimator (rayalign.losses.advantages) goes with any.

    loss, metrics = POLICY_LOSSES["dual_clip"].fn(PolicyLossInputs(logp, old_logp, adv, mask, clip=0.2))

Tensors are [batch, T] over response tokens with a 0/1 `mask`. Token-level losses are averaged
over the batch's response tokens, or with `token_sum_norm` L summed and divided by (samples x L)
(Dr. GRPO's length-unbiased aggregation, arXiv 2503.20783).

- clip       PPO's clipped surrogate, arXiv 1707.06347: -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
- dual_clip  dual-clip PPO, arXiv 1912.09729: for A < 0 the surrogate is also bounded below by c A
             (c = algo.dual_clip > 1), so a token whose ratio has exploded cannot dominate the step
- gspo       Group Sequence Policy Optimization, arXiv 2507.18071: one importance ratio per sequence,
             s_i = exp(mean_t (log pi - log pi_old)), clipped as PPO's at the sequence level (the
             paper's eps is ~3e-4 to 4e-4: set algo.clip accordingly); A_i = the sequence's mean advantage

Register another with `@register_policy_loss("name", paper=...)`: one function plus its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rayalign.losses.ppo import aggregate, masked_mean, policy_loss
from rayalign.utils.registry import Registry

PolicyLossOut = tuple[torch.Tensor, dict[str, float]]


@dataclass(frozen=True)
class PolicyLossInputs:
    logp: torch.Tensor          # [B, T] log pi of the sampled tokens (with gradient)
    old_logp: torch.Tensor      # [B, T] log pi_old (the policy that sampled)
    advantages: torch.Tensor    # [B, T]
    mask: torch.Tensor          # [B, T] response tokens
    clip: float = 0.2
    dual_clip: float = 3.0
    token_sum_norm: float | None = None


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    fn: Callable[[PolicyLossInputs], PolicyLossOut]
    paper: str


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def register_policy_loss(name: str, *, paper: str
                         ) -> Callable[[Callable[[PolicyLossInputs], PolicyLossOut]],
                                       Callable[[PolicyLossInputs], PolicyLossOut]]:
    def add(fn: Callable[[PolicyLossInputs], PolicyLossOut]) -> Callable[[PolicyLossInputs], PolicyLossOut]:
        POLICY_LOSSES.add(name, PolicyLoss(name, fn, paper))
        return fn
    return add


def policy_loss_fn(name: str) -> PolicyLoss:
    return POLICY_LOSSES.lookup(name)


@register_policy_loss("clip", paper="arXiv 1707.06347")
def clipped(x: PolicyLossInputs) -> PolicyLossOut:
    return policy_loss(x.logp, x.old_logp, x.advantages, x.mask, x.clip, x.token_sum_norm)


@register_policy_loss("dual_clip", paper="arXiv 1912.09729")
def dual_clipped(x: PolicyLossInputs) -> PolicyLossOut:
    if x.dual_clip <= 1.0:
        raise ValueError(f"dual-clip PPO needs algo.dual_clip > 1, got {x.dual_clip}")
    ratio = torch.exp(x.logp - x.old_logp)
    surrogate = torch.minimum(ratio * x.advantages, ratio.clamp(1.0 - x.clip, 1.0 + x.clip) * x.advantages)
    bounded = torch.where(x.advantages < 0, torch.maximum(surrogate, x.dual_clip * x.advantages), surrogate)
    with torch.no_grad():
        clip_frac = masked_mean((ratio - 1.0).abs().gt(x.clip).float(), x.mask)
        dual_frac = masked_mean((bounded != surrogate).float(), x.mask)
    return -aggregate(bounded, x.mask, x.token_sum_norm), {"clip_fraction": float(clip_frac),
                                                            "dual_clip_fraction": float(dual_frac)}


@register_policy_loss("gspo", paper="arXiv 2507.18071")
def gspo(x: PolicyLossInputs) -> PolicyLossOut:
    log_ratio = masked_mean(x.logp - x.old_logp, x.mask, dim=1)   # [B]: length-normalised sequence log-ratio
    adv = masked_mean(x.advantages, x.mask, dim=1)                # [B]
    s = torch.exp(log_ratio)
    surrogate = torch.minimum(s * adv, s.clamp(1.0 - x.clip, 1.0 + x.clip) * adv)
    with torch.no_grad():
        clip_frac = (s - 1.0).abs().gt(x.clip).float().mean()
    return -surrogate.mean(), {"clip_fraction": float(clip_frac), "sequence_ratio": float(s.detach().mean())}
