"""Bradley-Terry reward-model loss (Ouyang et al. 2022; Stiennon et al. 2020).

    L = -E[ log sigmoid(r(x, y_w) - r(x, y_l)) ]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    return float((r_chosen > r_rejected).float().mean().detach())


def select_objective(rewards: torch.Tensor, objective: torch.Tensor | None) -> torch.Tensor:
    """rewards [B, K] -> [B]: the column each row's pair was labelled on (K = 1: the only one)."""
    if rewards.dim() == 1:
        return rewards
    if objective is None:
        if rewards.size(-1) != 1:
            raise ValueError(f"a {rewards.size(-1)}-head reward model needs each pair's objective index")
        return rewards[:, 0]
    return rewards.gather(1, objective.view(-1, 1)).squeeze(1)
