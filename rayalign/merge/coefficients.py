"""Merge coefficients: Bone Soups' backbone matrix and its closed-form inverse
(Xie et al. 2025, "Bone Soups", papers/bone-soups-2502.10762.md).

B is n x n symmetric circulant with diagonal beta in (1/2, 1) and off-diagonal c = (1-beta)/(n-1),
so rows sum to 1. Backbone j is trained on h_j = sum_i B_ji r_i. For a user preference mu the
merging coefficients are lambda = B^-1 mu, in closed form

    lambda = (mu - c * sum(mu) * 1 / (beta + (n-1) c)) / (beta - c) = (mu - c * sum(mu)) / (beta - c)

(the second form because beta + (n-1)c = 1). With sum(mu) = 1 this is (mu - c) / (beta - c): the
coefficients sum to 1 and may be negative -- they are used as they are, never renormalised.
"""

from __future__ import annotations

import numpy as np


def _check_beta(beta: float) -> None:
    if not 0.5 < beta < 1.0:
        raise ValueError(f"Bone Soup beta must lie in (1/2, 1), got {beta}")


def bone_matrix(n: int, beta: float) -> np.ndarray:
    """The symmetric circulant backbone matrix B (rows: backbones, columns: objectives)."""
    if n < 2:
        raise ValueError(f"Bone Soups need at least 2 objectives, got {n}")
    _check_beta(beta)
    c = (1.0 - beta) / (n - 1)
    return np.full((n, n), c) + np.eye(n) * (beta - c)


def bone_soup_coefficients(mu: np.ndarray | list[float], beta: float) -> np.ndarray:
    """lambda = B^-1 mu in closed form, for any number of objectives."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 1 or mu.size < 2:
        raise ValueError(f"preference vector mu needs at least 2 entries, got {mu.tolist()}")
    if not np.all(np.isfinite(mu)):
        raise ValueError(f"preference vector mu must be finite, got {mu.tolist()}")
    _check_beta(beta)
    n = mu.size
    c = (1.0 - beta) / (n - 1)
    return (mu - c * mu.sum()) / (beta - c)


def extrapolated(lam: np.ndarray | list[float], k: float) -> list[float]:
    """Coefficients of k * sum_j lam_j theta_j + (1 - k) theta_SFT on [theta_1..theta_n, theta_SFT]
    (Bone Soups' extrapolation against the SFT model; k = 1 gives the anchor weight 0)."""
    return [float(k * x) for x in lam] + [1.0 - k]


def backbone_rewards(rewards: np.ndarray, beta: float) -> np.ndarray:
    """h = B r for reward vectors r (last axis: objectives)."""
    r = np.asarray(rewards, dtype=np.float64)
    return r @ bone_matrix(r.shape[-1], beta).T
