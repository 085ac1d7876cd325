"""Next-token cross-entropy on labelled tokens (labels == -100 are ignored)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over labelled positions. logits [B, T, V], labels [B, T] aligned with the
    inputs (the shift by one happens here)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE)
