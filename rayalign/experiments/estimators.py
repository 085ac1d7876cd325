"""Advantage estimators against each other, each with SFT-0 and with the soup as pi_ref, several seeds.

    python -m rayalign.experiments.estimators --demo runs/demo-... --out runs/estimators

For every seed, estimator (PPO's GAE with a critic, GRPO arXiv 2402.03300, RLOO arXiv 2402.14740,
REINFORCE++ arXiv 2501.03262; Dr. GRPO on request) and reference (SFT-0, or SALSA's uniform soup of
SFT-0 and SFT-1, arXiv 2411.01798): one `rayalign train` run from SFT-0 with the same prompts, the same
number of samples per iteration (prompts_per_step x rollout.n, equal for every method), the same beta,
learning rate and reward (the gold functions). Each final policy is evaluated on the held-out test
prompts: gold reward, the sequence KL to SFT-0 and to its own reference (summed over the vocabulary
at every position), its gold win rate over SFT-0, and -- per estimator and seed -- the soup-reference
policy's win rate over the SFT-0-reference one.

Writes OUT/report.md, OUT/results.json and OUT/gold_vs_kl.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray

from rayalign.config.core import load_config
from rayalign.config.schema import RLConfig
from rayalign.distributed.cluster import connect
from rayalign.eval.gold import GoldResult, evaluate, win_rate
from rayalign.eval.kl import sequence_kl
from rayalign.eval.plots import xy_lines
from rayalign.experiments.common import check_demo, demo_parser, mean_se, write_report
from rayalign.models.checkpoint import load_causal_lm
from rayalign.recipes.ppo import run_rl
from rayalign.reference.worker import ReferenceWorker
from rayalign.utils.logging import log, setup_logging
from rayalign.world.build import split_prompts

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
REFERENCES = ("sft0", "soup")
LABELS = {"gae": "PPO (GAE)", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++"}


def method_of(estimator: str, reference: str) -> str:
    """The `rayalign train` method: ppo / salsa for GAE (salsa checks the soup), else the estimator."""
    if estimator == "gae":
        return "salsa" if reference == "soup" else "ppo"
    return estimator


def train_runs(demo: Path, out: Path, seeds: list[int], estimators: list[str], overrides: list[str]
               ) -> dict[tuple[int, str, str], Path]:
    sft0, sft1 = demo / "sft" / "sft-0", demo / "sft" / "sft-1"
    runs = {}
    for seed in seeds:
        for est in estimators:
            for ref in REFERENCES:
                name = f"{est}-{ref}-s{seed}"
                refs = f"[{sft0},{sft1}]" if ref == "soup" else "[]"
                cfg = load_config(RLConfig, "ppo", [f"policy={sft0}", f"reference.models={refs}",
                                                    f"output={out / name}", f"seed={seed}", "snapshot_every=0",
                                                    *overrides])
                log.info("estimators: %s (%s, reference %s, seed %d)", name, est, ref, seed)
                run_rl(cfg, method_of(est, ref), resume=True)
                runs[(seed, est, ref)] = out / name
    return runs


def evaluate_runs(demo: Path, runs: dict[tuple[int, str, str], Path], samples: int, max_new_tokens: int
                  ) -> tuple[dict[str, dict[str, float]], dict[str, GoldResult]]:
    prompts = split_prompts(0)["test"]
    sft0_path = demo / "sft" / "sft-0"
    sft0, tok = load_causal_lm(sft0_path)
    soup = ReferenceWorker([str(sft0_path), str(demo / "sft" / "sft-1")]).model
    evals: dict[str, dict[str, float]] = {}
    gold: dict[str, GoldResult] = {}

    def one(key: str, path: Path, ref: str) -> None:
        model, _ = load_causal_lm(path)
        gold[key] = evaluate(key, model, tok, prompts, n=samples, max_new_tokens=max_new_tokens, seed=1234)
        kl_sft0 = sequence_kl(model, sft0, tok, prompts, n=samples, max_new_tokens=max_new_tokens, seed=99)
        kl_own = sequence_kl(model, soup, tok, prompts, n=samples, max_new_tokens=max_new_tokens,
                             seed=99) if ref == "soup" else kl_sft0
        s = gold[key].summary()
        evals[key] = {"gold": s["combined"], "gold_se": s["combined_se"], "words": s["mean_words"],
                      "kl_sft0": kl_sft0.mean, "kl_ref": kl_own.mean}

    one("sft-0", sft0_path, "sft0")
    for (seed, est, ref), run in runs.items():
        one(run.name, run / "policy", ref)
        summary = json.loads((run / "summary.json").read_text())
        evals[run.name]["seconds_per_iteration"] = float(summary["mean_times"].get("time/iteration", float("nan")))
    return evals, gold


def run(demo: Path, out: Path, seeds: list[int], estimators: list[str], samples: int, max_new_tokens: int,
        overrides: list[str]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = connect()
    try:
        runs = train_runs(demo, out, seeds, estimators, overrides)
    finally:
        if started:
            ray.shutdown()
    evals, gold = evaluate_runs(demo, runs, samples, max_new_tokens)
    probe = load_config(RLConfig, "ppo", ["policy=unused", "output=unused", *overrides])
    cells: dict[str, dict[str, Any]] = {}
    for est in estimators:
        for ref in REFERENCES:
            keys = [f"{est}-{ref}-s{s}" for s in seeds]
            cells[f"{est}/{ref}"] = {
                "gold": mean_se([evals[k]["gold"] for k in keys]),
                "kl_sft0": mean_se([evals[k]["kl_sft0"] for k in keys]),
                "kl_ref": mean_se([evals[k]["kl_ref"] for k in keys]),
                "win_rate_over_sft0": mean_se([win_rate(gold[k], gold["sft-0"]) for k in keys]),
                "words": mean_se([evals[k]["words"] for k in keys]),
                "seconds_per_iteration": mean_se([evals[k]["seconds_per_iteration"] for k in keys]),
            }
    soup_over_sft0 = {est: mean_se([win_rate(gold[f"{est}-soup-s{s}"], gold[f"{est}-sft0-s{s}"]) for s in seeds])
                      for est in estimators}
    results = {
        "seeds": seeds, "estimators": estimators, "overrides": overrides, "steps": probe.steps,
        "prompts_per_step": probe.prompts_per_step, "samples_per_prompt": probe.rollout.n,
        "samples_per_iteration": probe.prompts_per_step * probe.rollout.n, "beta": probe.algo.beta,
        "test_prompts": len(split_prompts(0)["test"]), "eval_samples": samples, "sft0": evals["sft-0"],
        "cells": cells, "soup_over_sft0_reference": soup_over_sft0, "evals": evals,
    }
    xy_lines({f"{LABELS[est]}, ref {ref}": ([evals[f"{est}-{ref}-s{s}"]["kl_sft0"] for s in seeds],
                                            [evals[f"{est}-{ref}-s{s}"]["gold"] for s in seeds])
              for est in estimators for ref in REFERENCES},
             out / "gold_vs_kl.png", "sequence KL to SFT-0 (test prompts)", "gold reward (combined)",
             f"Estimators x reference, {len(seeds)} seeds (one point per seed)", markers_only=True)
    write_report(out, results, render(results))
    return results


def render(r: dict[str, Any]) -> str:
    def f(x: list[float], p: int = 3) -> str:
        return f"{x[0]:.{p}f} ± {x[1]:.{p}f}"

    lines = [
        "# Advantage estimators x KL reference on the embedded default", "",
        f"Seeds {r['seeds']}; every run from SFT-0, {r['steps']} iterations of {r['prompts_per_step']} prompts x "
        f"{r['samples_per_prompt']} samples ({r['samples_per_iteration']} per iteration for every method), "
        f"beta {r['beta']}, gold reward; overrides {r['overrides']}. Held-out: {r['test_prompts']} test prompts x "
        f"{r['eval_samples']} samples; mean ± standard error over seeds. SFT-0 gold {r['sft0']['gold']:.3f}.", "",
        "![gold vs KL](gold_vs_kl.png)", "",
        "| estimator | reference | gold | KL to SFT-0 | KL to own reference | win rate over SFT-0 | words | s / iteration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for est in r["estimators"]:
        for ref in REFERENCES:
            c = r["cells"][f"{est}/{ref}"]
            lines.append(f"| {LABELS[est]} | {'soup of SFT-0, SFT-1' if ref == 'soup' else 'SFT-0'} | {f(c['gold'])} | "
                         f"{f(c['kl_sft0'], 2)} | {f(c['kl_ref'], 2)} | {c['win_rate_over_sft0'][0]:.1%} ± "
                         f"{c['win_rate_over_sft0'][1]:.1%} | {c['words'][0]:.1f} | {c['seconds_per_iteration'][0]:.2f} |")
    lines += ["", "Soup reference over SFT-0 reference (gold win rate, paired by seed):", ""]
    for est, w in r["soup_over_sft0_reference"].items():
        lines.append(f"- {LABELS[est]}: {w[0]:.1%} ± {w[1]:.1%}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = demo_parser(__doc__, "sft/sft-0 and sft/sft-1")
    p.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help=f"comma-separated among {', '.join(LABELS)} (default {','.join(ESTIMATORS)})")
    p.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("overrides", nargs="*", default=["prompts_per_step=16", "rollout.n=4"],
                   help="dotted overrides for every run (default: prompts_per_step=16 rollout.n=4)")
    a = p.parse_args()
    estimators = [e for e in a.estimators.split(",") if e]
    bad = [e for e in estimators if e not in LABELS]
    if bad:
        p.error(f"--estimators: unknown {bad}; choose among {', '.join(LABELS)}")
    check_demo(p, a.demo, "sft/sft-0")
    check_demo(p, a.demo, "sft/sft-1")
    setup_logging()
    run(a.demo, a.out, a.seeds, estimators, a.samples, a.max_new_tokens, a.overrides)


if __name__ == "__main__":
    main()
