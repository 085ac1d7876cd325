"""Reference workers: hold pi_ref -- one checkpoint (PPO) or a soup of several built on load by
the merge engine (SALSA) -- and return per-token log-probs of given sequences.

    ref = ReferenceWorker(["runs/sft/sft-0", "runs/sft/sft-1"], [0.5, 0.5])   # a soup
    logp = ref.logprobs({"input_ids": ids, "attention_mask": mask})         # [B, L-1]
"""

from __future__ import annotations

import ray
import torch

from rayalign.losses.logprobs import token_logprobs
from rayalign.merge.engine import merge_into
from rayalign.merge.lora import open_checkpoint
from rayalign.models.checkpoint import load_causal_lm
from rayalign.utils.device import place, to_device


class ReferenceWorker:
    def __init__(self, models: list[str], weights: list[float] | None = None, temperature: float = 1.0,
                 dtype: str = "auto"):
        if not models:
            raise ValueError("a reference worker needs at least one model")
        w = weights if weights is not None else [1.0 / len(models)] * len(models)
        if len(w) != len(models):
            raise ValueError(f"{len(w)} soup weights for {len(models)} reference models")
        self.model, _ = load_causal_lm(models[0], with_tokenizer=False)
        if len(models) > 1 or w[0] != 1.0:
            merge_into(self.model, [open_checkpoint(m) for m in models], w)  # in float32, on the CPU
        self.model = place(self.model, dtype).eval()  # then onto this actor's GPU, if it has one
        self.temperature = temperature
        self.description = {"models": list(models), "weights": list(w)}

    def describe(self) -> dict:
        return self.description

    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = to_device(batch, self.model.device)
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        return token_logprobs(logits, b["input_ids"], self.temperature).cpu()


ReferenceActor = ray.remote(ReferenceWorker)
