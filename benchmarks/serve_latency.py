"""Serving personalised merges at scale, four servers in one run on loopback (Ray Serve, the
OpenAI-compatible ingress, streaming chat requests from an httpx client):

  (a) lora: a LoRA family, one combined adapter per preference through vLLM's multi-LoRA, batched
      continuously across preferences;
  (b) full: the same experts as a full-weight family, merged weights swapped between batches;
  (c) sequential: today's one-request-at-a-time server (batching: sequential, vLLM's offline engine);
  (d) fixed: the upper bound, server (b)'s engine serving one fixed model (every request the same key).

    python benchmarks/serve_latency.py [--preset medium] [--requests 128] [--concurrency 16 64]

Workloads: `distinct` draws every request's preference vector at random over three objectives
(>= 50 distinct quantised vectors), `repeating` draws from six popular vectors. Reported per server,
workload and concurrency: throughput, p50/p99 latency and p50 time to first token. The experts
are random-B adapters (rank 8) on a randomly initialised preset: serving cost does not depend on
training. Writes benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peers import ROOT  # noqa: E402

OBJECTIVES = ["a", "b", "c"]


def store(work: Path, preset: str, rank: int) -> tuple[Path, int]:
    """The preset's base model and three rank-`rank` adapters on it; returns the store and the base's bytes."""
    from rayalign.config.schema import LoraConfig
    from rayalign.models.lora import init_adapter
    from rayalign.models.presets import build_preset, train_tokenizer

    base = work / f"{preset}-base"
    if not base.is_dir():
        build_preset(preset, base, train_tokenizer(0), seed=0)
    for i in range(len(OBJECTIVES)):
        path = work / f"{preset}-lora{rank}-{i}"
        if not path.is_dir():
            init_adapter(base, path, LoraConfig(r=rank, alpha=2 * rank), seed=i, std=0.05)
    return work, sum(f.stat().st_size for f in base.glob("*.safetensors"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(http, url: str, body: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    async with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - t0
            if line.startswith("data: ") and '"error"' in line:
                raise RuntimeError(line)
    total = time.perf_counter() - t0
    return (first if first is not None else total), total


async def _run(url: str, bodies: list[dict], concurrency: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency + 8)) as http:
        async def one(b: dict) -> tuple[float, float]:
            async with sem:
                return await _one(http, url, b)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    ttft, lat = [r[0] for r in res], [r[1] for r in res]
    return {"requests": len(bodies), "concurrency": concurrency, "requests_per_s": len(bodies) / wall,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
            "ttft_over_latency_p50": float(np.percentile(ttft, 50) / np.percentile(lat, 50))}


def workloads(n: int, seed: int = 0) -> dict[str, list[list[float]]]:
    rng = np.random.default_rng(seed)
    distinct = [rng.dirichlet([1.0] * len(OBJECTIVES)).round(3).tolist() for _ in range(n)]
    popular = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    weights = 1.0 / np.arange(1, len(popular) + 1) ** 1.1
    repeating = [popular[i] for i in rng.choice(len(popular), size=n, p=weights / weights.sum())]
    return {"distinct": distinct, "repeating": repeating}


def serve_and_measure(server: str, work: Path, preset: str, rank: int, loads: dict, concurrencies: list[int],
                      max_tokens: int, max_loras: int, interval_s: float) -> dict:
    from ray import serve

    from rayalign.config.schema import ServeConfig
    from rayalign.serve.app import build_app
    from rayalign.serve.families import Family

    port = _port()
    weights = "adapter" if server == "lora" else "full"
    cfg = ServeConfig.model_validate({
        "model_store": str(work), "port": port, "cache_bytes": 4 * 1024**3, "max_tokens_limit": max_tokens,
        "batching": "sequential" if server == "sequential" else "continuous", "max_loras": max_loras,
        "max_cpu_loras": max(128, max_loras), "stream_interval_s": interval_s,
        "replica_cpus": 1, "families": [{"name": "bench", "objectives": OBJECTIVES, "weights": weights,
                                         "models": [f"{preset}-lora{rank}-{i}" for i in range(len(OBJECTIVES))]}]})
    fam = Family(cfg.families[0], cfg.model_store, cfg.preference_grid)
    msg = [{"role": "user", "content": "what colour is the apple ?"}]

    def body(mu: list[float], i: int) -> dict:
        return {"model": "bench", "messages": msg, "max_tokens": max_tokens, "preference": mu, "seed": i,
                "stream": True}

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(build_app(cfg), name="bench", route_prefix="/")
    start_s = time.perf_counter() - t0
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    out: dict = {"start_s": start_s}
    try:
        asyncio.run(_run(url, [body([1, 0, 0], 0)] * 4, 4))  # warm-up
        names = ["fixed"] if server == "fixed" else list(loads)
        for name in names:
            mus = [[1 / 3, 1 / 3, 1 / 3]] * len(loads["distinct"]) if name == "fixed" else loads[name]
            keys = {fam.resolve(preference=m)[0] for m in mus}
            for c in concurrencies:
                res = asyncio.run(_run(url, [body(m, i) for i, m in enumerate(mus)], c))
                res["distinct_keys"] = len(keys)
                out[f"{name}@{c}"] = res
                print(f"  {server:10s} {name:9s} c={c:3d}: {res['requests_per_s']:6.2f} req/s  p50 "
                      f"{res['p50_ms']:7.0f} ms  p99 {res['p99_ms']:7.0f} ms  ttft p50 {res['ttft_p50_ms']:6.0f} ms  "
                      f"({len(keys)} keys)", flush=True)
    finally:
        serve.shutdown()
    return out


def engine_only(work: Path, preset: str, rank: int, n: int, concurrency: list[int], max_tokens: int,
                max_loras: int) -> dict:
    """The same engine (rayalign.serve.engine.AsyncEngine) with no Serve in front: the fixed model,
    and one combined adapter per request over `n` distinct preferences (what LoRA costs the engine)."""
    from rayalign.config.schema import VLLM_LORA_RANKS
    from rayalign.merge.lora import combine, load_adapter, save_combined
    from rayalign.rollout.engine import SamplingConfig
    from rayalign.serve.engine import AsyncEngine
    from rayalign.utils.io import scratch_dir

    experts = [load_adapter(work / f"{preset}-lora{rank}-{i}") for i in range(len(OBJECTIVES))]
    rng = np.random.default_rng(0)
    out: dict = {}

    async def measure(lora: bool) -> None:
        from vllm.lora.request import LoRARequest

        need = rank * len(OBJECTIVES)
        engine = AsyncEngine(str(work / f"{preset}-base"), lora_rank=min(r for r in VLLM_LORA_RANKS if r >= need)
                             if lora else None, max_loras=max_loras, max_cpu_loras=max(128, max_loras))
        reqs = [None]
        if lora:
            reqs = []
            for j in range(n):
                d = Path(scratch_dir("rayalign-bench-"))
                save_combined(combine(experts, rng.dirichlet([1.0] * len(OBJECTIVES)).tolist()), d)
                reqs.append(LoRARequest(f"bench-{j}", j + 1, str(d)))
        prompt = list(range(1, 12))

        async def one(i: int) -> None:
            s = SamplingConfig(max_new_tokens=max_tokens, temperature=1.0, seed=i)
            async for _ in engine.stream(f"{lora}-{i}-{time.time()}", prompt, s, reqs[i % len(reqs)]):
                pass

        await asyncio.gather(*(one(i) for i in range(16)))  # warm-up
        for c in concurrency:
            sem = asyncio.Semaphore(c)

            async def limited(i: int) -> None:
                async with sem:
                    await one(i)
            t0 = time.perf_counter()
            await asyncio.gather(*(limited(i) for i in range(n)))
            rps = n / (time.perf_counter() - t0)
            out[f"{'lora' if lora else 'fixed'}@{c}"] = rps
            print(f"  engine only {'lora' if lora else 'fixed':5s} c={c:3d}: {rps:6.2f} req/s", flush=True)
        engine.shutdown()

    for lora in (False, True):
        asyncio.run(measure(lora))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="medium", choices=["tiny", "small", "medium"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--servers", nargs="*", default=["lora", "full", "sequential", "fixed"])
    p.add_argument("--max-loras", type=int, default=64, help="combined adapters per batch (vLLM max_loras)")
    p.add_argument("--stream-interval-s", type=float, default=0.05)
    p.add_argument("--engine-only", action="store_true", help="also measure the engine with no Serve in front")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-serve")
    a = p.parse_args()
    import ray

    work, base_bytes = store(a.work, a.preset, a.rank)
    loads = workloads(a.requests)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results: dict = {}
    try:
        for server in a.servers:
            results[server] = serve_and_measure(server, work, a.preset, a.rank, loads, a.concurrency, a.max_tokens,
                                                a.max_loras, a.stream_interval_s)
    finally:
        ray.shutdown()
    top = max(a.concurrency)
    ratios: dict = {}
    for c in a.concurrency:
        for load in loads:
            k = f"{load}@{c}"
            seq = results.get("sequential", {}).get(k, {}).get("requests_per_s")
            fixed = results.get("fixed", {}).get(f"fixed@{c}", {}).get("requests_per_s")
            for s in ("lora", "full"):
                rps = results.get(s, {}).get(k, {}).get("requests_per_s")
                if rps and seq:
                    ratios[f"{s}/sequential {k}"] = rps / seq
                if rps and fixed:
                    ratios[f"{s}/fixed {k}"] = rps / fixed
    if a.engine_only:
        results["engine_only"] = engine_only(work, a.preset, a.rank, a.requests, a.concurrency, a.max_tokens,
                                             a.max_loras)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU", "preset": a.preset,
           "base_model_mb": round(base_bytes / 1e6, 1), "adapter_rank": a.rank, "experts": len(OBJECTIVES),
           "max_tokens": a.max_tokens, "requests": a.requests, "max_loras": a.max_loras,
           "stream_interval_s": a.stream_interval_s, "servers": results, "ratios": ratios}
    out = ROOT / "benchmarks" / "results" / "serve_latency.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))
    lora = results.get("lora", {}).get(f"distinct@{top}", {})
    if lora:
        print(f"lora at {top} concurrent, distinct preferences: ttft p50 / latency p50 = "
              f"{lora['ttft_over_latency_p50']:.2f}")


if __name__ == "__main__":
    main()
