"""PPO for RLHF as small pure functions (Schulman et al. 2017; Ziegler et al. 2019;
Ouyang et al. 2022), shared by PPO and SALSA (SALSA only changes what pi_ref is).

Tensors are [batch, T] over response tokens with a 0/1 `mask` for real (non-padding) tokens.

- kl_penalty:      per-token KL estimate from log-probs (k1, k2, k3 of Schulman's "Approximating
                   KL divergence" note)
- token_rewards:   r_t = -beta * kl_t, plus the scalar score R(x, y) on the last real token
- gae:             generalised advantage estimation (Schulman et al. 2016) with V = 0 after the end
- policy_loss:     clipped surrogate
- value_loss:      clipped value loss
- AdaptiveKL:      the adaptive KL coefficient of Ziegler et al. 2019
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, token_sum_norm: float | None = None) -> torch.Tensor:
    """A per-token loss over the batch: the mean over response tokens, or with `token_sum_norm` L
    the sum divided by (samples x L), Dr. GRPO's length-unbiased aggregation (arXiv 2503.20783)."""
    if token_sum_norm is None:
        return masked_mean(per_token, mask)
    return (per_token * mask).sum() / (mask.size(0) * token_sum_norm)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean kept when shift_mean is False)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs.
    k1 = log r, k2 = (log r)^2 / 2, k3 = (1/r - 1) + log r, with log r = logp - logp_ref."""
    log_ratio = logp - logp_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """r_t = -beta * kl_t on every response token, plus score on the last real token."""
    rewards = -beta * kl * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
    return rewards + last.to(rewards.dtype) * score.view(-1, 1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns). delta_t = r_t + gamma V_{t+1} - V_t; A_t = sum_l (gamma lam)^l delta_{t+l};
    V beyond the last real token is 0 (the episode ends there)."""
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # padding after the end carries nothing back
        next_value = values[:, t] * m
        next_adv = a * m
    returns = (adv + values) * mask
    return adv, returns


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, token_sum_norm: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: -E[min(rho A, clip(rho, 1-eps, 1+eps) A)], rho = pi / pi_old, averaged
    over the response tokens; with `token_sum_norm` L the per-token terms are summed and divided
    by (samples x L), Dr. GRPO's length-unbiased aggregation (arXiv 2503.20783)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = -aggregate(torch.minimum(unclipped, clipped), mask, token_sum_norm)
    with torch.no_grad():
        clip_frac = masked_mean((clipped < unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp).square(), mask)
    return loss, {"clip_fraction": float(clip_frac), "approx_kl": float(approx_kl)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 E[max((V - R)^2, (V_clipped - R)^2)], V_clipped = V_old + clip(V - V_old, -c, c)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns).square()
    clipped = (v_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, {"value_clip_fraction": float(frac)}


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the policy's distributions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


@dataclass
class AdaptiveKL:
    """beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019).
    With target None the coefficient stays fixed."""

    beta: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None:
            err = max(-0.2, min(0.2, (kl - self.target) / self.target))
            self.beta *= 1.0 + err * n_samples / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, float | int | None]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.beta = float(state["beta"])  # type: ignore[arg-type]
        self.target = state["target"]  # type: ignore[assignment]
        self.horizon = int(state["horizon"])  # type: ignore[arg-type]


@dataclass
class RunningMoments:
    """Running mean and standard deviation of scalar scores (for reward normalisation),
    merged batch by batch with Chan et al.'s parallel update."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        x = x.double().flatten()
        n = x.numel()
        if n == 0:
            return self.mean, self.std
        b_mean, b_var = float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        return self.mean, self.std

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def normalise_scores(scores: torch.Tensor, how: str, moments: RunningMoments | None = None,
                     clip: float | None = None, eps: float = 1e-6) -> torch.Tensor:
    """'none', 'batch' ((s - mean) / std of this batch) or 'running' (by running moments, which
    are updated with this batch first); then clipped to [-clip, clip]."""
    if how == "batch":
        out = (scores - scores.mean()) / (scores.std(unbiased=False) + eps)
    elif how == "running":
        if moments is None:
            raise ValueError("running reward normalisation needs RunningMoments")
        mean, std = moments.update(scores)
        out = (scores - mean) / (std + eps)
    elif how == "none":
        out = scores
    else:
        raise ValueError(f"unknown reward normalisation {how!r}; use none, batch or running")
    return out.clamp(-clip, clip) if clip is not None else out
