"""Per-tensor merge kernels: small pure functions, accumulating in float32.

Each takes the matching tensor of every input model and returns the merged tensor. The
floating-point operations follow mergekit's (0.1.5) so outputs are bit-identical in float32:
linear accumulates with a fused multiply-add (`acc.addcmul_(x, w)`) and divides by sum(w) when
normalising; task arithmetic multiplies the deltas `x_i - base` by their weights and sums them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

F32 = torch.float32


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i, accumulated in float32 in input order (one accumulator, one scratch)."""
    acc = torch.mul(tensors[0].to(F32), weights[0])
    scratch = torch.empty_like(acc)
    for x, w in zip(tensors[1:], weights[1:]):
        torch.mul(x.to(F32), w, out=scratch)
        acc += scratch
    return acc


def fused_weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i with one rounding per term (fused multiply-add), in float32, in input order."""
    acc = torch.zeros(tensors[0].shape, dtype=F32)
    for x, w in zip(tensors, weights):
        acc.addcmul_(x.to(F32), torch.tensor(w, dtype=F32))
    return acc


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = False) -> torch.Tensor:
    """Weighted linear merge. Weights may be negative; divided by their sum only if asked."""
    out = fused_weighted_sum(tensors, weights)
    if normalize:
        out /= torch.tensor(weights, dtype=F32).sum()
    return out


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    normalize: bool = False) -> torch.Tensor:
    """theta_base + sum_i w_i (theta_i - theta_base) (Ilharco et al. 2023)."""
    b = base.to(F32)
    deltas = [x.to(F32) - b for x in tensors]
    mixed = weighted_sum(deltas, weights)
    if normalize:
        total = torch.tensor(weights, dtype=F32).sum()
        mixed /= total if total.abs() >= 1e-8 else torch.tensor(1.0)
    return b + mixed


def expo(theta0: torch.Tensor, theta1: torch.Tensor, alpha: float) -> torch.Tensor:
    """ExPO (Zheng et al. 2024): theta_2 = theta_1 + alpha (theta_1 - theta_0)."""
    t1 = theta1.to(F32)
    return t1 + alpha * (t1 - theta0.to(F32))


def extrapolate(merged: torch.Tensor, anchor: torch.Tensor, k: float) -> torch.Tensor:
    """k * merged + (1 - k) * anchor (Bone Soups' extrapolation against the SFT model, k >= 1)."""
    return k * merged.to(F32) + (1.0 - k) * anchor.to(F32)
