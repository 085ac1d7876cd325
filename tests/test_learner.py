"""The DeepSpeed learner with 2 gloo ranks on CPU: ZeRO-2 and ZeRO-3 must compute the same
training trajectory as one rank without sharding (same global batch, same data)."""

import pytest
import torch

from rayalign.learner.launch import spawn_ranks
from tests.workers import tiny_lm_steps, tiny_lora_steps

STEPS, GLOBAL_BATCH = 4, 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "zero0.pt"
    losses = spawn_ranks(tiny_lm_steps, 1, args=(0, STEPS, GLOBAL_BATCH, str(out)))[0]
    return losses, torch.load(out)


@pytest.mark.parametrize("stage,checkpointing", [(2, False), (3, False), (3, True)],
                         ids=["zero2", "zero3", "zero3-gradient-checkpointing"])
def test_two_ranks_match_single_rank(stage, checkpointing, reference, tmp_path):
    """ZeRO-3 with gradient checkpointing is the 7B recipes' learner setting."""
    ref_losses, ref_sd = reference
    out = tmp_path / f"zero{stage}.pt"
    per_rank = spawn_ranks(tiny_lm_steps, 2, args=(stage, STEPS, GLOBAL_BATCH, str(out), checkpointing))
    # each rank logs the loss of its half of the batch; their mean is the global loss
    mean_losses = [(a + b) / 2 for a, b in zip(*per_rank)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-4)
    assert ref_losses[-1] < ref_losses[0]  # it trains
    sd = torch.load(out)
    assert sd.keys() == ref_sd.keys()
    # All-reduce sums in another order than one rank does; Adam turns that float noise on
    # near-zero gradients into updates of up to ~lr. Measured: relative error ~1e-5, max ~3e-5.
    # A sharding bug (a lost reduction, a misplaced shard) shows up as 1e-1 or more.
    for k in ref_sd:
        rel = float((sd[k] - ref_sd[k]).norm() / ref_sd[k].norm())
        assert rel < 1e-4, f"ZeRO-{stage} differs at {k}: relative error {rel:.2e}"
        assert float((sd[k] - ref_sd[k]).abs().max()) < 1e-3, k


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "zero0.pt"
    losses = spawn_ranks(tiny_lora_steps, 1, args=(0, STEPS, GLOBAL_BATCH, str(out)))[0]
    return losses, torch.load(out)


@pytest.mark.parametrize("stage,resume_at", [(0, 0), (1, 0), (2, 0), (3, 0), (3, 2)],
                         ids=["zero0", "zero1", "zero2", "zero3", "zero3-resumed"])
def test_lora_on_two_ranks_matches_one_rank(stage, resume_at, lora_reference, tmp_path):
    """A PEFT LoRA learner trains only A and B, on 2 gloo ranks under every ZeRO stage, along the
    one-rank trajectory; its adapter directory loads in plain PEFT; a state saved mid-run and
    loaded into a fresh learner continues the same run."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    ref_losses, ref = lora_reference
    out = tmp_path / f"zero{stage}.pt"
    per_rank = spawn_ranks(tiny_lora_steps, 2, args=(stage, STEPS, GLOBAL_BATCH, str(out), resume_at))
    assert [(a + b) / 2 for a, b in zip(*per_rank)] == pytest.approx(ref_losses, rel=1e-4)
    assert ref_losses[-1] < ref_losses[0]
    got = torch.load(out)
    # 2 layers x 7 projections, A and B each; everything else is frozen
    assert len(got["adapter"]) == 28 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in got["adapter"])
    assert got["frozen"] == ref["frozen"] > 0
    for k, v in ref["adapter"].items():
        rel = float((got["adapter"][k] - v).norm() / v.norm())
        assert rel < 1e-4, f"ZeRO-{stage} LoRA differs at {k}: relative error {rel:.2e}"
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32,
                                        tie_word_embeddings=False))
    peft = PeftModel.from_pretrained(base, str(out) + ".dir")
    loaded = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if "lora_" in k}
    for k, v in got["adapter"].items():
        assert torch.equal(loaded[k], v), k


def test_lr_factor_warms_up_then_decays_or_stays_constant():
    """The multiplier DeepSpeed's scheduler applies after optimiser step k (hand-computed)."""
    from rayalign.config.schema import LearnerConfig
    from rayalign.learner.engine import has_schedule, lr_factor

    warm = LearnerConfig(warmup_steps=4, lr_schedule="constant")
    assert [lr_factor(warm, 100)(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_factor(warm, None)(k) for k in (0, 3, 50)] == [0.25, 1.0, 1.0]
    cos = LearnerConfig(warmup_steps=2, lr_schedule="cosine")
    # after warm-up t = (k - 2) / (6 - 2): 0.1 + 0.9 * (1 + cos(pi t)) / 2
    assert [lr_factor(cos, 6)(k) for k in range(7)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 2 ** -0.5), 0.55, 0.1 + 0.45 * (1 - 2 ** -0.5), 0.1])
    assert lr_factor(cos, None)(5) == 1.0  # no known length: no decay
    assert has_schedule(warm, None) and has_schedule(LearnerConfig(), 10)
    assert not has_schedule(LearnerConfig(lr_schedule="constant"), 10) and not has_schedule(LearnerConfig(), None)
