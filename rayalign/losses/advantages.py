"""Advantage estimators as a registry of small pure functions: PPO's GAE with a learned critic,
and the critic-free estimators that score each sample against the other samples of its prompt.

    est = ADVANTAGES["grpo"]
    adv, returns = est.fn(AdvantageInputs(scores=r, token_kl=kl, mask=m, beta=0.05, groups=g))

Every estimator takes the same inputs and any reference: what pi_ref is (one checkpoint, a soup)
only changes `token_kl`. Tensors are [batch, T] over response tokens with a 0/1 `mask`; `scores`
is the sequence score per sample [batch]; `groups` [batch] says which prompt a sample answers.

- gae          Schulman et al. 2016 (arXiv 1506.02438), with the per-token reward -beta kl_t and the
               score on the last token; needs the critic's values.
- grpo         DeepSeekMath, arXiv 2402.03300: A_i = (r_i - mean_g r) / (std_g r + eps), the same on
               every token of sample i; the KL is a k3 loss term (or, with kl_in_reward, part of r_i).
- dr_grpo      Dr. GRPO, arXiv 2503.20783: A_i = r_i - mean_g r (no std: no question-level
               difficulty bias); paired with a token-sum loss.
- rloo         REINFORCE leave-one-out, arXiv 2402.14740: A_i = r_i - mean_{j != i} r_j, with the
               KL in the reward as in its paper.
- reinforce_pp REINFORCE++ (with baseline), arXiv 2501.03262: r_i minus its group's mean, plus the
               token rewards -beta kl_t summed to the end (gamma = 1), whitened over the whole batch.

Register another with `@register_advantage("name", ...)`: one function plus its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rayalign.losses.ppo import gae, masked_whiten, token_rewards
from rayalign.utils.registry import Registry


@dataclass(frozen=True)
class AdvantageInputs:
    scores: torch.Tensor                 # [B] sequence scores (normalised as configured)
    token_kl: torch.Tensor               # [B, T] per-token KL estimate to pi_ref (0 on padding)
    mask: torch.Tensor                   # [B, T] response tokens
    beta: float = 0.0
    values: torch.Tensor | None = None   # [B, T] the critic's values (gae only)
    groups: torch.Tensor | None = None   # [B] prompt index of each sample
    gamma: float = 1.0
    lam: float = 0.95
    kl_in_reward: bool = False           # critic-free: -beta * sum_t kl_t joins the sequence score
    eps: float = 1e-6


Estimate = tuple[torch.Tensor, torch.Tensor | None]  # (advantages [B, T], returns [B, T] or None)


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    fn: Callable[[AdvantageInputs], Estimate]
    needs_values: bool      # a critic is built and trained only for these
    needs_groups: bool      # needs several samples per prompt (rollout.n >= 2)
    kl_in_loss: bool        # the KL to pi_ref is a loss term (k3) unless kl_in_reward
    token_sum_loss: bool    # the policy loss sums over tokens (divided by a constant), not a mean
    paper: str


ADVANTAGES: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_advantage(name: str, *, paper: str, needs_values: bool = False, needs_groups: bool = True,
                       kl_in_loss: bool = True, token_sum_loss: bool = False
                       ) -> Callable[[Callable[[AdvantageInputs], Estimate]], Callable[[AdvantageInputs], Estimate]]:
    def add(fn: Callable[[AdvantageInputs], Estimate]) -> Callable[[AdvantageInputs], Estimate]:
        ADVANTAGES.add(name, AdvantageEstimator(name, fn, needs_values, needs_groups, kl_in_loss, token_sum_loss,
                                                paper))
        return fn
    return add


def advantage_estimator(name: str) -> AdvantageEstimator:
    return ADVANTAGES.lookup(name)


def critic_free_estimators() -> list[str]:
    """The estimators without a critic: each is a `rayalign train NAME` method of its own."""
    return [name for name, est in ADVANTAGES.items() if not est.needs_values]


# ---- helpers ---------------------------------------------------------------------------------------

def _groups(x: AdvantageInputs) -> torch.Tensor:
    if x.groups is None:
        raise ValueError("this estimator compares the samples of a prompt: pass groups (rollout.n >= 2)")
    return x.groups.long()


def group_mean(values: torch.Tensor, groups: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
    """Each sample's group mean [B]; with leave_one_out, the mean of the group's other samples."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=values.dtype).index_add_(0, inverse, values)
    n = counts.to(values.dtype)[inverse]
    if leave_one_out:
        if (counts < 2).any():
            raise ValueError("leave-one-out baselines need at least 2 samples per prompt (rollout.n >= 2)")
        return (sums[inverse] - values) / (n - 1)
    return sums[inverse] / n


def group_std(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each sample's group standard deviation [B] (unbiased, n - 1, as torch.std)."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError("a group standard deviation needs at least 2 samples per prompt (rollout.n >= 2)")
    centred = values - group_mean(values, groups)
    ss = torch.zeros(len(counts), dtype=values.dtype).index_add_(0, inverse, centred.square())
    return (ss / (counts.to(values.dtype) - 1)).sqrt()[inverse]


def _sequence_scores(x: AdvantageInputs) -> torch.Tensor:
    """r_i, with -beta * sum_t kl_t added when the KL goes in the reward."""
    if x.kl_in_reward:
        return x.scores - x.beta * (x.token_kl * x.mask).sum(1)
    return x.scores


def _per_token(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return adv.view(-1, 1) * mask


# ---- the estimators ----------------------------------------------------------------------------------

@register_advantage("gae", paper="arXiv 1506.02438", needs_values=True, needs_groups=False, kl_in_loss=False)
def gae_advantages(x: AdvantageInputs) -> Estimate:
    """GAE over r_t = -beta kl_t (+ the score on the last token) with the critic's values."""
    if x.values is None:
        raise ValueError("gae needs the critic's values")
    return gae(token_rewards(x.scores, x.token_kl, x.beta, x.mask), x.values * x.mask, x.mask, x.gamma, x.lam)


@register_advantage("grpo", paper="arXiv 2402.03300")
def grpo_advantages(x: AdvantageInputs) -> Estimate:
    r, g = _sequence_scores(x), _groups(x)
    return _per_token((r - group_mean(r, g)) / (group_std(r, g) + x.eps), x.mask), None


@register_advantage("dr_grpo", paper="arXiv 2503.20783", token_sum_loss=True)
def dr_grpo_advantages(x: AdvantageInputs) -> Estimate:
    r, g = _sequence_scores(x), _groups(x)
    return _per_token(r - group_mean(r, g), x.mask), None


@register_advantage("rloo", paper="arXiv 2402.14740", kl_in_loss=False)
def rloo_advantages(x: AdvantageInputs) -> Estimate:
    r, g = _sequence_scores(x), _groups(x)
    return _per_token(r - group_mean(r, g, leave_one_out=True), x.mask), None


@register_advantage("reinforce_pp", paper="arXiv 2501.03262", kl_in_loss=False)
def reinforce_pp_advantages(x: AdvantageInputs) -> Estimate:
    """REINFORCE++-baseline: the group-centred score on the last token and -beta kl_t on every
    token, returns-to-go with gamma, then whitened over every token of the batch."""
    g = _groups(x)
    centred = x.scores - group_mean(x.scores, g)
    rewards = token_rewards(centred, x.token_kl, x.beta, x.mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + x.gamma * running * x.mask[:, t]
        returns[:, t] = running * x.mask[:, t]
    return masked_whiten(returns, x.mask), None
