"""SPO and DPO training throughput against TRL's DPOTrainer, in the same run, on the same model and
the same preference pairs (the world's, chat template applied by each side), with the cost of
SPO's online sampling.

1. rayalign DPO: `rayalign train dpo` on a local Ray (one learner rank with pi_ref beside the policy).
2. rayalign SPO with its global KL (online samples by a vLLM rollout worker every --kl-every
   steps, weights synced first) and SPO with kl_coef = 0 (no sampling, no reference pass): the
   difference is what the global KL costs.
3. TRL DPOTrainer (reference model, same batch of pairs per step, same learning rate), in its own
   virtual environment under --work (installed on first use with the CPU constraints).

Steady state: the first step of every run is excluded (engine and optimiser warm-up); SPO's
refresh steps are included, so its online sampling is amortised exactly as in training.

    python benchmarks/preference_throughput.py [--model DIR] [--pairs-per-step 32] [--steps 9]

Ratios > 1 mean rayalign is faster.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from peers import ROOT, peer_python, run_peer_script, small_model

from rayalign.utils.env import cpu_defaults

cpu_defaults(ROOT)

TRL_SCRIPT = r'''
import json, sys, time
import numpy as np
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

a = json.loads(sys.argv[1])

class Clock(TrainerCallback):
    def __init__(self):
        self.t = [time.perf_counter()]
    def on_step_end(self, args, state, control, **kw):
        self.t.append(time.perf_counter())

rows = [json.loads(line) for line in open(a["pairs"])]
ds = Dataset.from_list(rows)
tok = AutoTokenizer.from_pretrained(a["model"])
cfg = DPOConfig(output_dir=a["out"], per_device_train_batch_size=a["batch"], learning_rate=a["lr"], beta=a["beta"],
                max_length=a["max_length"], max_steps=a["steps"], logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_dropout=True)
clock = Clock()
trainer = DPOTrainer(model=a["model"], args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
trainer.train()
print("RESULT " + json.dumps({"step_times": list(np.diff(clock.t))}))
'''


def world_pairs(n: int) -> list[dict]:
    from rayalign.config.schema import DataConfig, WorldConfig
    from rayalign.recipes.supervised import preference_rows

    rows = preference_rows(DataConfig(limit=n), WorldConfig(), "combined", "train")
    return [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in rows]


def pair_tokens(model: Path, n: int) -> float:
    """Mean tokens per pair (chosen + rejected, prompt included) under the chat template."""
    from rayalign.config.schema import DataConfig, WorldConfig
    from rayalign.models.checkpoint import load_tokenizer
    from rayalign.recipes.supervised import encode_pairs, preference_rows

    tok = load_tokenizer(model)
    enc = encode_pairs(tok, preference_rows(DataConfig(limit=n), WorldConfig(), "combined", "train"), 96)
    return sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in enc) / len(enc)


def ours(work: Path, model: Path, method: str, name: str, pairs: int, steps: int, extra: dict) -> dict:
    from rayalign.config.schema import PrefConfig
    from rayalign.recipes.preference import run_preference

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrefConfig.model_validate({
        "policy": str(model), "output": str(out), "data": {"limit": pairs * steps}, "pairs_per_step": pairs,
        "save_every": 0, "learner": {"resources": {"num_cpus": 0.75},
                                     "actor": {"zero_stage": 2, "micro_batch_size": pairs, "lr": 1e-4}},
        "rollout": {"engine": "vllm", "resources": {"num_cpus": 0.25}, "max_new_tokens": 32, "n": 2},
        "sync": {"kind": "object_store"}, **extra})
    run_preference(cfg, method)
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = sum(r["time/step"] for r in rows)
    return {"steps": len(rows), "seconds_per_step": seconds / len(rows), "pairs_per_s": len(rows) * pairs / seconds,
            "refreshes": sum(1 for r in rows if r.get("kl/refreshed")),
            "sampling_seconds": sum(r.get("time/generate", 0.0) + r.get("time/sync", 0.0) for r in rows) / len(rows)}


def trl_dpo(work: Path, model: Path, pairs: int, steps: int, beta: float) -> dict:
    py = peer_python(work, "trl")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in world_pairs(pairs * steps)))
    args = {"model": str(model), "pairs": str(data), "batch": pairs, "lr": 1e-4, "beta": beta, "max_length": 96,
            "steps": steps, "out": str(work / "trl-dpo-run")}
    times = run_peer_script(py, TRL_SCRIPT, args, "TRL DPO run")["step_times"][1:]
    return {"steps": len(times), "seconds_per_step": sum(times) / len(times), "pairs_per_s": len(times) * pairs / sum(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: a freshly built `small` preset)")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-pref")
    p.add_argument("--pairs-per-step", type=int, default=32)
    p.add_argument("--steps", type=int, default=9, help="optimiser steps per run (the first is warm-up)")
    p.add_argument("--kl-every", type=int, default=4)
    p.add_argument("--kl-prompts", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (both sides)")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.model or small_model(a.work)
    if not (model / "config.json").is_file():
        p.error(f"--model {model}: not a model directory (no config.json)")
    B, S = a.pairs_per_step, a.steps
    tokens = pair_tokens(model, B * S)
    res = {
        "rayalign_dpo": ours(a.work, model, "dpo", "dpo-run", B, S, {"algo": {"dpo_beta": a.beta}}),
        "rayalign_spo": ours(a.work, model, "spo", "spo-run", B, S, {"algo": {
            "kl_coef": 0.1, "kl_every": a.kl_every, "kl_prompts": a.kl_prompts}}),
        "rayalign_spo_no_kl": ours(a.work, model, "spo", "spo-nokl-run", B, S, {"algo": {"kl_coef": 0.0}}),
        "trl_dpo": trl_dpo(a.work, model, B, S, a.beta),
    }
    for r in res.values():
        r["tokens_per_s"] = r["pairs_per_s"] * tokens
    trl = res["trl_dpo"]["pairs_per_s"]
    res["ratio_dpo_vs_trl"] = res["rayalign_dpo"]["pairs_per_s"] / trl
    res["ratio_spo_vs_trl_dpo"] = res["rayalign_spo"]["pairs_per_s"] / trl
    spo, nokl = res["rayalign_spo"]["seconds_per_step"], res["rayalign_spo_no_kl"]["seconds_per_step"]
    res["global_kl_share_of_spo_step"] = 1 - nokl / spo
    print(f"preference training ({B} pairs/step, {tokens:.0f} tokens/pair, {S - 1} steady steps):")
    for k in ("rayalign_dpo", "rayalign_spo", "rayalign_spo_no_kl", "trl_dpo"):
        print(f"  {k:20s} {res[k]['pairs_per_s']:7.1f} pairs/s {res[k]['tokens_per_s']:8.0f} tok/s "
              f"{res[k]['seconds_per_step']:.3f} s/step")
    print(f"  ratio rayalign DPO / TRL DPO {res['ratio_dpo_vs_trl']:.2f}x; rayalign SPO / TRL DPO "
          f"{res['ratio_spo_vs_trl_dpo']:.2f}x")
    print(f"  SPO's global KL (online sampling every {a.kl_every} steps + reference and KL passes): "
          f"{100 * res['global_kl_share_of_spo_step']:.1f}% of the step; sampling + sync alone "
          f"{res['rayalign_spo']['sampling_seconds']:.3f} s/step amortised")
    (a.work / "results.json").write_text(json.dumps(res, indent=2))
    print(f"results: {a.work / 'results.json'}")


if __name__ == "__main__":
    main()
