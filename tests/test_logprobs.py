"""Token log-probs and full-vocabulary KL against direct computation."""

import math

import pytest
import torch

from rayalign.losses.logprobs import full_kl, token_logprobs


def test_token_logprobs_pick_the_next_token():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[2, 1, 0]])  # position 0 predicts ids[1] = 1, position 1 predicts ids[2] = 0
    torch.testing.assert_close(token_logprobs(logits, ids), torch.tensor([[math.log(0.25), math.log(0.1)]]))
    # temperature rescales the logits before normalising
    t2 = token_logprobs(logits, ids, temperature=2.0)
    p = torch.softmax(logits[0, 0] / 2, -1)[1]
    assert t2[0, 0].item() == pytest.approx(math.log(p.item()))


def test_full_kl_matches_definition_and_is_zero_on_itself():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    kl = full_kl(a, b)
    p, q = torch.softmax(a[:, :-1], -1), torch.softmax(b[:, :-1], -1)
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(-1))
    assert (kl >= 0).all()
    torch.testing.assert_close(full_kl(a, a), torch.zeros(2, 4), atol=1e-6, rtol=0)
