"""Inference workers in-process: reward scorers over one or several reward models, and the
reference worker's dtype choice (the GPU clusters run both in bfloat16; here float32 on CPU)."""

import shutil

import numpy as np
import pytest
import torch

from rayalign.reference.worker import ReferenceWorker
from rayalign.reward.scorer import RewardScorer
from rayalign.world.build import split_prompts

PROMPTS = split_prompts(0)["test"][:4]
RESPONSES = ["hello !", "", "thank you for asking . " * 3, "the answer is not known ."]


def test_several_reward_models_stack_their_heads(quick_demo, tmp_path):
    rm = quick_demo / "rm" / "model"
    other = tmp_path / "harmless" / "model"
    shutil.copytree(rm, other)
    alone = RewardScorer("model", str(rm)).score(PROMPTS, RESPONSES)
    both = RewardScorer("model", [str(rm), str(other)], weights=[0.7, 0.3])
    assert both.objectives == ["rm", "harmless"]  # named by directory ('model' -> its parent)
    out = both.score(PROMPTS, RESPONSES)
    assert out["vector"].shape == (4, 2)
    np.testing.assert_allclose(out["vector"][:, 0], alone["vector"][:, 0], rtol=1e-6)
    np.testing.assert_allclose(out["vector"][:, 1], alone["vector"][:, 0], rtol=1e-6)
    np.testing.assert_allclose(out["combined"], out["vector"] @ [0.7, 0.3])
    assert len(set(np.round(alone["vector"][:, 0], 5))) > 1  # the responses are told apart
    with pytest.raises(ValueError, match=r"reward.weights has 3 entries, the scorer gives 2 objectives"):
        RewardScorer("model", [str(rm), str(other)], weights=[0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="needs a reward model directory"):
        RewardScorer("model", [])


def test_reference_worker_dtype(checkpoints):
    sft = [str(checkpoints["a"]), str(checkpoints["b"])]
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 7, 11, 2, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    fp32 = ReferenceWorker(sft, dtype="auto")  # float32 on the CPU
    assert next(fp32.model.parameters()).dtype == torch.float32
    ref = fp32.logprobs(batch)
    bf16 = ReferenceWorker(sft, dtype="bfloat16").logprobs(batch)
    assert ref.shape == bf16.shape == (2, 5) and bf16.dtype == torch.float32 and bf16.device.type == "cpu"
    assert float((ref - bf16).abs().max()) < 0.25  # bfloat16 rounding, not another model
    assert float((ref - bf16).abs().max()) > 0      # it did run in bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        ReferenceWorker(sft[:1], dtype="fp8")


def test_eval_on_a_prompt_file_with_a_reward_model(quick_demo, tmp_path):
    """`rayalign eval` as the 7B recipes compare PPO and SALSA: a prompt set, reward-model scores."""
    import json

    from tests.conftest import run_cli_here

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    models = f"models=[{quick_demo / 'sft' / 'sft-0'},{quick_demo / 'sft' / 'sft-1'}]"
    proc = run_cli_here("eval", models, f"prompts.source={prompts}", "reward.kind=model",
                        f"reward.model={quick_demo / 'rm' / 'model'}", "samples_per_prompt=2", "max_new_tokens=8",
                        check=True)
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["prompts"] for r in rows] == [4, 4] and rows[0]["win_rate_vs_first"] == 0.5
    assert {"reward", "reward_se", "combined"} <= set(rows[1]) and "informative" not in rows[1]
    assert rows[1]["combined"] == pytest.approx(rows[1]["reward"])
    proc = run_cli_here("eval", models, f"prompts.source={prompts}")
    assert proc.returncode == 2 and "gold rewards exist only for the world's prompts" in proc.stderr
