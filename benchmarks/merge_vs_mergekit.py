"""rayalign's merge engine against mergekit, in the same run, on the same checkpoints.

Builds three Llama-architecture checkpoints of about 1 GB each (random float32 weights, two
safetensors shards each), installs mergekit into its own virtual environment (never into
rayalign's), then runs linear and task-arithmetic merges with both tools, alternating, with the
inputs warm in the page cache for both. Prints wall time, peak RSS (of the merging process
alone), achieved read throughput against this machine's measured memory-copy bandwidth, and
whether the outputs are bit-identical. Times are whole processes (interpreter start included);
"engine GB/s" is rayalign's merge alone, from its own report.

    python benchmarks/merge_vs_mergekit.py [--size-gb 1.0] [--repeats 2] [--work .cache/bench-merge]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from peers import ROOT, peer_python
from safetensors.torch import save_file


def llama_config(size_gb: float) -> dict:
    """A Llama config whose float32 weights take about size_gb."""
    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((size_gb * 1e9 / 4 - 2 * vocab * hidden) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "rope_theta": 10000.0}


def build_checkpoint(path: Path, cfg: dict, seed: int, shards: int = 2) -> None:
    if (path / "config.json").is_file():
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(LlamaConfig(**cfg)).state_dict().items()}
    names = list(shapes)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, per = {}, -(-len(names) // shards)
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: torch.randn(shapes[n], generator=g) * 0.02 for n in names[s * per:(s + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(4 * torch.Size(s).numel() for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg))


# ru_maxrss is a high-water mark that survives exec, and a child forked from this (large) process
# starts at this process's RSS. So a small helper interpreter forks the tool: the tool's peak RSS
# then starts from the helper's few MB and measures the tool alone.
_HELPER = """
import json, os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), time.perf_counter() - t, usage.ru_maxrss]))
"""


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of the tool's own process."""
    proc = subprocess.run(["/usr/bin/env", "python3", "-c", _HELPER, *cmd], env=env, capture_output=True, text=True)
    code, wall, maxrss_kb = json.loads(proc.stdout.strip().splitlines()[-1])
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-3000:]}")
    return wall, maxrss_kb / 1024**2


def memcpy_bandwidth(gb: float = 1.0) -> float:
    """GB/s of a plain in-memory copy (read + write counted once, as bytes moved)."""
    src = torch.empty(int(gb * 1e9 / 4))
    src.fill_(1.0)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src)
        best = max(best, gb / (time.perf_counter() - t))
    return best


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def identical(a: Path, b: Path) -> tuple[bool, float]:
    from rayalign.merge.io import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    same, worst = True, 0.0
    if set(ca.keys()) != set(cb.keys()):
        return False, float("inf")
    for n in ca.keys():
        x, y = ca.read(n).float(), cb.read(n).float()
        if not torch.equal(x, y):
            same = False
            worst = max(worst, float((x - y).abs().max()))
    return same, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-merge")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    import shutil

    import yaml

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(args.size_gb)
    models = [work / f"model{i}" for i in range(3)]
    print(f"building 3 checkpoints of {args.size_gb} GB ({cfg['num_hidden_layers']} layers) in {work} ...", flush=True)
    for i, m in enumerate(models):
        build_checkpoint(m, cfg, seed=i)
    mk_py = peer_python(work, "mergekit")
    mk_cli = mk_py.parent / "mergekit-yaml"
    bw = memcpy_bandwidth()
    configs = {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (0.5, 0.3, 0.2))]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(models[0]),
                            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models[1:], (0.6, -0.4))]},
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for method, mcfg in configs.items():
        cfg_path = work / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(mcfg))
        read_gb = sum(f.stat().st_size for m in models[: 3 if method == "linear" else 3] for f in m.glob("*.safetensors")) / 1e9
        times: dict[str, list[tuple[float, float]]] = {"rayalign": [], "mergekit": []}
        for r in range(args.repeats):
            for tool in ("rayalign", "mergekit"):
                out = work / f"out-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                warm(models)
                if tool == "rayalign":
                    cmd = [sys.executable, "-m", "rayalign.cli", "merge", str(cfg_path), str(out), "--quiet"]
                else:
                    cmd = [str(mk_cli), str(cfg_path), str(out), "--no-copy-tokenizer"]
                times[tool].append(measure(cmd, env))
                print(f"  {method:16s} {tool:9s} run {r + 1}: {times[tool][-1][0]:6.2f}s  peak RSS {times[tool][-1][1]:.2f} GB",
                      flush=True)
        same, worst = identical(work / f"out-rayalign-{method}", work / f"out-mergekit-{method}")
        engine_s = json.loads((work / f"out-rayalign-{method}" / "rayalign_merge.json").read_text())["report"]["seconds"]
        best = {t: min(v, key=lambda x: x[0]) for t, v in times.items()}
        rows.append({"method": method, "read_gb": round(read_gb, 3),
                     "rayalign_s": round(best["rayalign"][0], 2), "mergekit_s": round(best["mergekit"][0], 2),
                     "speedup": round(best["mergekit"][0] / best["rayalign"][0], 2),
                     "rayalign_rss_gb": round(best["rayalign"][1], 2), "mergekit_rss_gb": round(best["mergekit"][1], 2),
                     "rss_ratio": round(best["rayalign"][1] / best["mergekit"][1], 2),
                     "rayalign_read_gbps": round(read_gb / best["rayalign"][0], 2),
                     "mergekit_read_gbps": round(read_gb / best["mergekit"][0], 2),
                     "rayalign_engine_gbps": round(read_gb / engine_s, 2),
                     "memcpy_gbps": round(bw, 2), "bit_identical": same, "max_abs_diff": worst})
    print()
    hdr = ("method", "rayalign s", "mergekit s", "speed-up", "rayalign RSS GB", "mergekit RSS GB", "RSS ratio",
           "rayalign GB/s", "mergekit GB/s", "rayalign engine GB/s", "memcpy GB/s", "bit-identical")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['method']} | {r['rayalign_s']} | {r['mergekit_s']} | {r['speedup']}x | {r['rayalign_rss_gb']} | "
              f"{r['mergekit_rss_gb']} | {r['rss_ratio']} | {r['rayalign_read_gbps']} | {r['mergekit_read_gbps']} | "
              f"{r['rayalign_engine_gbps']} | {r['memcpy_gbps']} | {r['bit_identical']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
