"""Functions run on spawned learner ranks by the tests (must be importable)."""

from __future__ import annotations

import torch


def tiny_lm_steps(rank: int, world_size: int, zero_stage: int, steps: int, global_batch: int, out: str,
                  checkpointing: bool = False) -> list[float]:
    """Train a freshly initialised tiny Llama for `steps` on fixed data; rank 0 saves the full
    weights to `out`. Every rank sees its slice of the same global batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayalign.config.schema import LearnerConfig
    from rayalign.learner.engine import Learner
    from rayalign.losses.sft import causal_lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32,
                                         tie_word_embeddings=False))
    per_rank = global_batch // world_size
    learner = Learner(model, LearnerConfig(zero_stage=zero_stage, lr=1e-2, micro_batch_size=per_rank, grad_clip=1e9,
                                           gradient_checkpointing=checkpointing))
    data = torch.randint(0, 64, (steps, global_batch, 16), generator=torch.Generator().manual_seed(1))

    def loss_fn(m, b):
        return causal_lm_loss(m(input_ids=b["input_ids"]).logits, b["input_ids"]), {}

    losses = []
    for s in range(steps):
        mine = data[s, rank * per_rank:(rank + 1) * per_rank]
        losses.append(learner.step([{"input_ids": mine}], loss_fn)["loss"])
    sd = learner.full_state_dict()
    if rank == 0:
        torch.save(sd, out)
    return losses


def tiny_lora_steps(rank: int, world_size: int, zero_stage: int, steps: int, global_batch: int, out: str,
                    resume_at: int = 0) -> list[float]:
    """Like tiny_lm_steps with a rank-4 LoRA adapter (PEFT) on every linear projection; rank 0
    saves the adapter tensors to `out` and the adapter directory to `out`.dir. With `resume_at`,
    the run saves its state after that many steps, and a new learner (a fresh model and adapter)
    loads it and finishes the run, as `--resume` does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayalign.config.schema import LearnerConfig, LoraConfig
    from rayalign.learner.engine import Learner, wrap_lora
    from rayalign.losses.sft import causal_lm_loss

    cfg = LearnerConfig(zero_stage=zero_stage, lr=3e-3, micro_batch_size=global_batch // world_size, grad_clip=1e9,
                        lora=LoraConfig(r=4, alpha=8))

    def make() -> Learner:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32,
                                             tie_word_embeddings=False))
        torch.manual_seed(1)
        model = wrap_lora(model, cfg, None)
        for n, p in model.named_parameters():  # B = 0 at init; a non-zero start makes A's gradients count too
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
        return Learner(model, cfg)

    learner = make()
    per_rank = global_batch // world_size
    data = torch.randint(0, 64, (steps, global_batch, 16), generator=torch.Generator().manual_seed(1))

    def loss_fn(m, b):
        return causal_lm_loss(m(input_ids=b["input_ids"]).logits, b["input_ids"]), {}

    losses = []
    for s in range(steps):
        if resume_at and s == resume_at:
            learner.save_state(out + ".state", {"step": s}, tag="mid")
            learner = make()
            assert learner.load_state(out + ".state", tag="mid")["step"] == s
        mine = data[s, rank * per_rank:(rank + 1) * per_rank]
        losses.append(learner.step([{"input_ids": mine}], loss_fn)["loss"])
    sd = {n: t.to("cpu", copy=True) for n, t in learner.iter_adapter_params()}
    frozen = sum(1 for p in learner.module.parameters() if not p.requires_grad)
    learner.save_pretrained(out + ".dir")
    if rank == 0:
        torch.save({"adapter": sd, "frozen": frozen}, out)
    return losses
