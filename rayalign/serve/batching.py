"""A Serve replica that batches continuously across requests and preferences (the plain class
behind the ModelServer deployment; the one-request-at-a-time server is rayalign.serve.server).

Two kinds of family, both exact:
- adapter: LoRA ingredients on one base. A preference's merge coefficients c (linear mu, or Bone
  Soups' lambda = B^-1 mu extrapolated by k against the SFT anchor, arXiv:2502.10762) sum to one,
  so the merge is the base plus ONE combined adapter of rank sum r_i (rayalign.merge.lora.combine).
  It is registered with vLLM's multi-LoRA under its own adapter id, so requests of different
  preferences run in the same batch on the same base weights, with no weight swap.
- full: the merged full weights are written once per key (tmpfs) and swapped into the engine only
  between batches (rayalign.serve.scheduler.WeightScheduler); requests for the loaded key batch.

Both caches (combined adapters and merged weights) are one LRU bounded in bytes; an entry in use
is removed only when its last request ends.

    server = BatchingServer(cfg)
    entry = await server.prepare("demo-soup@20:14,6")
    async for deltas in server.stream("demo-soup@20:14,6", prompt_ids, SamplingConfig(max_new_tokens=32)):
        ...
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayalign.config.schema import VLLM_LORA_MODULES, VLLM_LORA_RANKS, ServeConfig
from rayalign.merge import kernels
from rayalign.merge.engine import merge_state_dicts, validate_paths
from rayalign.merge.io import read_state_dict
from rayalign.merge.lora import Adapter, combine, load_adapter, save_combined
from rayalign.models.lora import adapter_base, is_adapter_dir, same_path
from rayalign.rollout.engine import SamplingConfig
from rayalign.serve.cache import ByteLRU
from rayalign.serve.engine import AsyncEngine, Delta
from rayalign.serve.families import Family, key_coefficients
from rayalign.serve.scheduler import WeightScheduler
from rayalign.utils.io import scratch_dir

BASE_KEY = "@base"  # the weights key of every adapter family's requests: the base model itself


@dataclass
class ServePlan:
    """How a config's families are served by one engine: each family's kind, the engine's base
    model and the largest combined adapter rank (vLLM max_lora_rank)."""

    kinds: dict[str, str]
    base: Path
    lora_rank: int | None
    ranks: dict[str, int] = field(default_factory=dict)


def _adapter_family_problem(fam: Family) -> str | None:
    """Why `fam` cannot be served as combined adapters (None: it can)."""
    if not all(is_adapter_dir(p) for p in fam.paths):
        full = [str(p) for p in fam.paths if not is_adapter_dir(p)]
        return f"its models {full} are full checkpoints, not LoRA adapters"
    bases = sorted({adapter_base(p) for p in fam.paths})
    if any(not same_path(b, bases[0]) for b in bases):
        return f"its adapters sit on different bases {bases}"
    if fam.anchor is not None:
        anchor_base = adapter_base(fam.anchor) if is_adapter_dir(fam.anchor) else str(fam.anchor)
        if not same_path(anchor_base, bases[0]):
            return f"base_model {fam.anchor} is neither the adapters' base {bases[0]} nor an adapter on it"
    if fam.cfg.kind == "linear" and fam.cfg.allow_negative:
        return "allow_negative lets the weights sum to other than one, which no adapter on the base expresses"
    return None


def plan(cfg: ServeConfig, families: dict[str, Family]) -> ServePlan:
    """The family kinds and the engine's base; ValueError names the family and the problem."""
    kinds: dict[str, str] = {}
    for name, fam in families.items():
        problem = _adapter_family_problem(fam)
        if fam.cfg.weights == "adapter" and problem:
            raise ValueError(f"family {name}: weights: adapter, but {problem}")
        kinds[name] = "adapter" if fam.cfg.weights != "full" and problem is None else "full"
    adapter_bases = sorted({adapter_base(families[n].paths[0]) for n, k in kinds.items() if k == "adapter"})
    if any(not same_path(b, adapter_bases[0]) for b in adapter_bases):
        raise ValueError(f"adapter families on different bases {adapter_bases} cannot share one engine; serve "
                         "them from separate configs")
    ranks: dict[str, int] = {}
    for name, kind in kinds.items():
        if kind != "adapter":
            continue
        fam = families[name]
        adapters = [load_adapter(p) for p in fam.sources() if is_adapter_dir(p)]
        ranks[name] = sum(a.rank for a in adapters)
        bad = sorted({m for a in adapters for m in a.target_modules} - set(VLLM_LORA_MODULES))
        if bad:
            raise ValueError(f"family {name}: its adapters adapt {bad}; vLLM applies LoRA to "
                             f"{list(VLLM_LORA_MODULES)} only (use weights: full)")
        if ranks[name] > max(VLLM_LORA_RANKS):
            raise ValueError(f"family {name}: its combined adapter has rank {ranks[name]} (the sum of its "
                             f"adapters' ranks), above vLLM's largest {max(VLLM_LORA_RANKS)} (use weights: full)")
    if adapter_bases:
        base = Path(adapter_bases[0])
    else:
        first = families[cfg.families[0].name].paths[0]
        base = Path(adapter_base(first)) if is_adapter_dir(first) else first
    need = max(ranks.values(), default=0)
    rank = min(r for r in VLLM_LORA_RANKS if r >= need) if ranks else None
    return ServePlan(kinds, base, rank, ranks)


@dataclass
class Prepared:
    """What a key needs on the engine: a combined adapter (LoRARequest) or a merged-weights
    directory, on tmpfs."""

    key: str
    kind: str
    path: str
    nbytes: int
    build_s: float
    lora: Any = None
    removed: bool = False  # evicted and deleted: a request that still holds it builds it again


class BatchingServer:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.families = {f.name: Family(f, cfg.model_store, cfg.preference_grid) for f in cfg.families}
        paths = sorted({p for fam in self.families.values() for p in fam.sources()})
        self.plan = plan(cfg, self.families)
        validate_paths(sorted({*paths, self.plan.base}))  # one engine: same architecture, tensors, tokenizer
        self.engine = AsyncEngine(str(self.plan.base), lora_rank=self.plan.lora_rank, max_loras=cfg.max_loras,
                                  max_cpu_loras=cfg.max_cpu_loras, options=cfg.vllm,
                                  gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.cache = ByteLRU(cfg.cache_bytes, on_evict=self._evicted)
        self.sched = WeightScheduler(self._swap, loaded=BASE_KEY, max_wait_s=cfg.max_swap_wait_s)
        self._adapters: dict[Path, Adapter] = {}
        self._weights: dict[Path, dict[str, torch.Tensor]] = {}
        self._building: dict[str, asyncio.Future] = {}
        self._live: dict[str, tuple[Prepared, int]] = {}  # key -> (entry, requests using it)
        self._doomed: set[str] = set()  # evicted while in use: removed when the last request ends
        self._unkept: dict[str, Prepared] = {}  # built but larger than the cache, not yet taken by its request
        self._ids = itertools.count(1)
        self.last_progress = time.monotonic()

    # ---- merge coefficients and what they become on the engine ---------------------------------------

    def coefficients(self, key: str) -> tuple[Family, list[float]]:
        return key_coefficients(self.families, key)

    async def prepare(self, key: str) -> tuple[Prepared, bool]:
        """The key's combined adapter or merged weights, from the cache or built once (concurrent
        requests for a new key wait for the same build). Returns it and whether it was cached."""
        live = self._live.get(key)
        if live is not None and key in self._doomed:  # evicted but still in use: back into the cache
            self._doomed.discard(key)
            self.cache.put(key, live[0], live[0].nbytes)
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True
        if key in self._unkept:  # built for a request, too large to cache: that request's, removed after it
            return self._unkept.pop(key), False
        if key not in self._building:
            self._building[key] = asyncio.ensure_future(self._build(key))
            self._building[key].add_done_callback(lambda _: self._building.pop(key, None))
        return await asyncio.shield(self._building[key]), False

    async def warm(self, key: str) -> tuple[float, bool]:
        """Build `key`'s adapter or merged weights now; returns the build time and whether it was cached."""
        entry, hit = await self.prepare(key)
        return (0.0 if hit else entry.build_s), hit

    async def _build(self, key: str) -> Prepared:
        fam, coefs = self.coefficients(key)
        t0 = time.perf_counter()
        path = scratch_dir("rayalign-serve-")
        try:
            if self.plan.kinds[fam.cfg.name] == "adapter":
                nbytes = await asyncio.to_thread(self._write_adapter, fam, coefs, Path(path))
                from vllm.lora.request import LoRARequest

                lora_id = next(self._ids)
                entry = Prepared(key, "adapter", path, nbytes, 0.0, LoRARequest(f"{key}#{lora_id}", lora_id, path))
                await self.engine.add_lora(entry.lora)  # loaded now: a bad adapter fails here, not in a batch
            else:
                nbytes = await asyncio.to_thread(self._write_merged, fam, coefs, Path(path))
                entry = Prepared(key, "full", path, nbytes, 0.0)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        entry.build_s = time.perf_counter() - t0
        if not self.cache.put(key, entry, nbytes):  # larger than the whole cache: used once, then removed
            self._doomed.add(key)
            self._unkept[key] = entry
        return entry

    def _write_adapter(self, fam: Family, coefs: list[float], out: Path) -> int:
        adapters, cs = [], []
        for p, c in zip(fam.sources(), coefs):
            if is_adapter_dir(p):
                if p not in self._adapters:
                    self._adapters[p] = load_adapter(p)
                adapters.append(self._adapters[p])
                cs.append(c)
            # else: the anchor is the base; its weight is what makes the coefficients sum to one
        return save_combined(combine(adapters, cs), out)

    def _write_merged(self, fam: Family, coefs: list[float], out: Path) -> int:
        from safetensors.torch import save_file

        for p in fam.sources():
            if p not in self._weights:
                self._weights[p] = read_state_dict(p, torch.float32)
        merged = merge_state_dicts([self._weights[p] for p in fam.sources()],
                                   lambda ts: kernels.weighted_sum(ts, coefs))
        save_file({k: v.contiguous() for k, v in merged.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        return (out / "model.safetensors").stat().st_size

    # ---- lifetime of cache entries -----------------------------------------------------------------

    def _evicted(self, key: str, entry: Prepared) -> None:
        if key in self._live:
            self._doomed.add(key)
        else:
            self._remove(entry)

    def _remove(self, entry: Prepared) -> None:
        entry.removed = True
        shutil.rmtree(entry.path, ignore_errors=True)
        if entry.lora is not None:
            asyncio.ensure_future(self.engine.remove_lora(entry.lora.lora_int_id))

    def _pin(self, entry: Prepared) -> None:
        _, n = self._live.get(entry.key, (entry, 0))
        self._live[entry.key] = (entry, n + 1)

    def _unpin(self, entry: Prepared) -> None:
        e, n = self._live[entry.key]
        if n > 1:
            self._live[entry.key] = (e, n - 1)
            return
        del self._live[entry.key]
        if entry.key in self._doomed:
            self._doomed.discard(entry.key)
            self._remove(entry)

    async def _swap(self, weights_key: str) -> None:
        if weights_key == BASE_KEY:
            path = str(self.plan.base)
        else:
            path = self._live[weights_key][0].path  # pinned by the waiting requests
        await self.engine.load_weights_from(path)

    # ---- requests ------------------------------------------------------------------------------------

    async def stream(self, key: str, prompt_ids: list[int], sampling: SamplingConfig,
                     info: dict[str, Any] | None = None) -> AsyncIterator[list[Delta]]:
        """The choices' new tokens step by step, on the weights `key` names. `info` (when given) is
        filled with the cache hit, build and queue times."""
        t0 = time.perf_counter()
        entry, hit = await self.prepare(key)
        while entry.removed:  # evicted by another build before this request could hold it
            entry, hit = await self.prepare(key)
        self._pin(entry)
        try:
            weights_key = BASE_KEY if entry.kind == "adapter" else key
            t1 = time.perf_counter()
            async with self.sched.hold(weights_key):
                if info is not None:
                    info.update(engine=self.engine.name, batching="continuous", kind=entry.kind, cache_hit=hit,
                                merge_s=0.0 if hit else entry.build_s, prepare_s=t1 - t0,
                                queue_s=time.perf_counter() - t1)
                if self.engine.unfinished() == 0:  # the no-progress clock starts with the first request in
                    self.last_progress = time.monotonic()
                async for deltas in self.engine.stream(uuid.uuid4().hex, prompt_ids, sampling, entry.lora):
                    self.last_progress = time.monotonic()
                    yield deltas
        finally:
            self._unpin(entry)

    def stuck_s(self) -> float:
        """How long requests have been in the engine with no new token (0 when none are)."""
        if self.engine.unfinished() == 0:
            return 0.0
        return time.monotonic() - self.last_progress

    def check_health(self) -> None:
        dead = self.engine.dead()
        if dead:
            raise RuntimeError(dead)
        stuck = self.stuck_s()
        if stuck > self.cfg.generation_timeout_s:
            raise RuntimeError(f"requests have been in the engine for {stuck:.0f} s with no new token "
                               f"(generation_timeout_s {self.cfg.generation_timeout_s:g}): wedged")

    def stats(self) -> dict[str, Any]:
        return {"engine": self.engine.config(), "unfinished": self.engine.unfinished(), "aborted": self.engine.aborted,
                "swaps": self.sched.swaps,
                "loaded": self.sched.loaded, "waiting": self.sched.waiting(), "cache": self.cache.stats(),
                "kinds": self.plan.kinds}

