"""Serving personalised merges: latency of a cached soup and of a cold merge, cache hit rate under a
skewed stream of preference vectors, and throughput against a naive server that merges (and loads)
on every request -- the same application with its cache turned off -- in one run.

    python benchmarks/serve_latency.py [--preset medium|small] [--requests 200] [--concurrency 8]

Two ingredient models of the preset (random weights; latency does not depend on training) form a
linear family on loopback. Writes benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peers import ROOT  # noqa: E402


def ingredients(work: Path, preset: str) -> Path:
    from rayalign.models.presets import build_preset, train_tokenizer

    tok = None
    for i in range(2):
        path = work / f"{preset}-{i}"
        if not path.is_dir():
            tok = tok or train_tokenizer(0)
            build_preset(preset, path, tok, seed=i)
    return work


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stream(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], list[dict], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    extras: list[dict] = []
    async with httpx.AsyncClient(timeout=600) as http:
        async def one(b: dict) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await http.post(url, json=b)
                lat.append(time.perf_counter() - t0)
                r.raise_for_status()
                extras.append(r.json()["rayalign"])
        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return lat, extras, time.perf_counter() - t0


def pct(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(xs, 50) * 1e3), "p99_ms": float(np.percentile(xs, 99) * 1e3)}


def measure(store: Path, preset: str, cache_bytes: int, bodies: dict[str, list[dict]], concurrency: int) -> dict:
    from ray import serve

    from rayalign.config.schema import ServeConfig
    from rayalign.serve.app import build_app

    port = _port()
    cfg = ServeConfig.model_validate({"model_store": str(store), "port": port, "cache_bytes": cache_bytes,
                                      "max_tokens_limit": 64, "families": [
                                          {"name": "bench", "models": [f"{preset}-0", f"{preset}-1"],
                                           "objectives": ["a", "b"]}]})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        out = {}
        asyncio.run(_stream(url, bodies["warmup"], 1))
        lat, ex, _ = asyncio.run(_stream(url, bodies["cold"], 1))
        out["cold"] = pct(lat) | {"merge_ms": float(np.mean([e["merge_s"] for e in ex]) * 1e3),
                                  "load_ms": float(np.mean([e["load_s"] for e in ex]) * 1e3)}
        lat, ex, _ = asyncio.run(_stream(url, bodies["cached"], 1))
        out["cached"] = pct(lat) | {"hit_rate": float(np.mean([e["cache_hit"] for e in ex]))}
        lat, ex, wall = asyncio.run(_stream(url, bodies["skewed"], concurrency))
        out["skewed"] = pct(lat) | {"hit_rate": float(np.mean([e["cache_hit"] for e in ex])),
                                    "requests_per_s": len(lat) / wall, "reloads": int(sum(e["load_s"] > 0 for e in ex))}
        return out
    finally:
        serve.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="medium", choices=["small", "medium"])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-serve")
    a = p.parse_args()
    import ray

    store = ingredients(a.work, a.preset)
    msg = [{"role": "user", "content": "what colour is the apple ?"}]

    def body(mu: list[float]) -> dict:
        return {"model": "bench", "messages": msg, "max_tokens": 16, "preference": mu, "seed": 0}

    rng = np.random.default_rng(0)
    popular = [[i / 20, 1 - i / 20] for i in range(21)]           # 21 quantised vectors, Zipf-distributed
    weights = 1.0 / np.arange(1, len(popular) + 1) ** 1.1
    picks = rng.choice(len(popular), size=a.requests, p=weights / weights.sum())
    bodies = {"warmup": [body([0.5, 0.5])],
              "cold": [body([0.05 * i + 0.01, 1 - 0.05 * i - 0.01]) for i in range(1, 17)][:16],
              "cached": [body([0.5, 0.5])] * 30,
              "skewed": [body(popular[i]) for i in picks]}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cached = measure(store, a.preset, 4 * 1024**3, bodies, a.concurrency)
        naive = measure(store, a.preset, 0, bodies, a.concurrency)
    finally:
        ray.shutdown()
    res = {"preset": a.preset, "requests": a.requests, "concurrency": a.concurrency, "rayalign": cached,
           "naive_merge_every_request": naive,
           "throughput_ratio": cached["skewed"]["requests_per_s"] / naive["skewed"]["requests_per_s"],
           "cached_p50_ratio": naive["cached"]["p50_ms"] / cached["cached"]["p50_ms"]}
    out = ROOT / "benchmarks" / "results" / "serve_latency.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    print(f"skewed stream: {cached['skewed']['requests_per_s']:.1f} req/s cached vs {naive['skewed']['requests_per_s']:.1f} "
          f"naive ({res['throughput_ratio']:.2f}x), hit rate {cached['skewed']['hit_rate']:.1%}; cached p50 "
          f"{cached['cached']['p50_ms']:.0f} ms, cold p50 {cached['cold']['p50_ms']:.0f} ms")


if __name__ == "__main__":
    main()
