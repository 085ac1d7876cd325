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


def test_sequence_kl_of_a_policy_pair(tokenizer_and_preset):
    """Held-out sequence KL: zero against itself; against another model, the per-position
    full-vocabulary KL summed over each sampled response (recomputed here from the samples)."""
    from rayalign.data.tokenize import encode_prompt, response_batch
    from rayalign.eval.kl import sequence_kl
    from rayalign.models.checkpoint import load_causal_lm
    from rayalign.rollout.engine import SamplingConfig, hf_generate

    tok, path = tokenizer_and_preset
    pi, _ = load_causal_lm(path)
    ref, _ = load_causal_lm(path)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["what colour is the apple ?", "describe the bee ."]
    same = sequence_kl(pi, pi, tok, prompts, n=2, max_new_tokens=6, seed=3)
    assert same.per_sample.shape == (4,) and abs(same.mean) < 1e-6
    kl = sequence_kl(pi, ref, tok, prompts, n=2, max_new_tokens=6, seed=3)
    torch.manual_seed(3)
    rollouts = hf_generate(pi, tok, [encode_prompt(tok, p) for p in prompts],
                           SamplingConfig(temperature=1.0, max_new_tokens=6, n=2))
    batch = response_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], tok.pad_token_id)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        expected = (full_kl(pi(**inputs).logits, ref(**inputs).logits) * batch["response_mask"]).sum(1)
    assert kl.mean > 0
    torch.testing.assert_close(torch.tensor(kl.per_sample, dtype=torch.float32), expected, rtol=1e-4, atol=1e-5)
