"""PPO against SALSA on the embedded default, several seeds (the comparison of arXiv 2411.01798).

    python -m rayalign.experiments.salsa_vs_ppo --demo runs/demo-... --out runs/salsa-vs-ppo

For every seed: PPO (pi_ref = SFT-0) and SALSA (pi_ref = uniform soup of SFT-0 and SFT-1), both
started from SFT-0, same beta, same prompts, same reward. Policy snapshots are kept every few
iterations and evaluated on held-out prompts: gold reward and KL to the run's own reference
(and to SFT-0, the common yardstick). SALSA is compared with PPO at matched KL: per seed the
target is the smaller of the two final KLs, each method contributes its snapshot closest to it,
and the gold win rate of SALSA over PPO is measured on the same held-out prompts. One more SALSA
run at a high beta reproduces the KL hack (length collapse) for the monitor to catch.

Writes OUT/report.md, OUT/results.json, OUT/reward_vs_kl.png, OUT/kl_hack_length.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import ray

from rayalign.config.core import load_config
from rayalign.config.schema import RLConfig
from rayalign.distributed.cluster import connect
from rayalign.eval.gold import GoldResult, evaluate, win_rate
from rayalign.eval.kl import sequence_kl
from rayalign.eval.plots import metric_lines, reward_kl_curves
from rayalign.experiments.common import mean_se
from rayalign.models.checkpoint import load_causal_lm
from rayalign.recipes.ppo import run_rl
from rayalign.reference.worker import ReferenceWorker
from rayalign.utils.io import atomic_write_json, atomic_write_text
from rayalign.utils.logging import log, setup_logging
from rayalign.world.build import split_prompts


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def _ema(x: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    out = np.empty_like(x)
    acc = x[0]
    for i, v in enumerate(x):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def train_runs(demo: Path, out: Path, seeds: list[int], steps: int, beta: float, hack_beta: float,
               overrides: list[str], hack_estimator: str = "k1") -> dict[str, Path]:
    sft0, sft1 = demo / "sft" / "sft-0", demo / "sft" / "sft-1"
    runs: dict[str, Path] = {}
    jobs = [(f"{m}-s{s}", m, s, beta) for s in seeds for m in ("ppo", "salsa")]
    jobs.append(("salsa-hack", "salsa", seeds[0], hack_beta))
    for name, method, seed, b in jobs:
        refs = f"reference.models=[{sft0},{sft1}]" if method == "salsa" else "reference.models=[]"
        hack = (["monitor.stop_on_collapse=false", "snapshot_every=0", f"algo.kl_estimator={hack_estimator}"]
                if name == "salsa-hack" else [])
        cfg = load_config(RLConfig, "salsa", [f"policy={sft0}", refs, f"output={out / name}", f"steps={steps}",
                                              f"seed={seed}", f"algo.beta={b}", "snapshot_every=5", *overrides,
                                              *hack])
        log.info("experiment: %s (%s, seed %d, beta %g)", name, method, seed, b)
        run_rl(cfg, method, resume=True)
        runs[name] = out / name
    return runs


def evaluate_runs(demo: Path, runs: dict[str, Path], n_prompts: int, samples: int,
                  max_new_tokens: int = 32) -> dict[str, Any]:
    prompts = split_prompts(0)["test"][:n_prompts]
    sft0_path = demo / "sft" / "sft-0"
    sft0, tok = load_causal_lm(sft0_path)
    soup = ReferenceWorker([str(sft0_path), str(demo / "sft" / "sft-1")]).model
    evals: dict[str, dict[str, Any]] = {}
    gold: dict[str, GoldResult] = {}

    def one(key: str, path: Path, method: str) -> None:
        model, _ = load_causal_lm(path)
        g = evaluate(key, model, tok, prompts, n=samples, max_new_tokens=max_new_tokens, seed=1234)
        own = soup if method == "salsa" else sft0
        kl_own = sequence_kl(model, own, tok, prompts, n=samples, max_new_tokens=max_new_tokens, seed=99)
        kl_sft = sequence_kl(model, sft0, tok, prompts, n=samples, max_new_tokens=max_new_tokens,
                             seed=99) if own is not sft0 else kl_own
        gold[key] = g
        s = g.summary()
        evals[key] = {"combined": s["combined"], "combined_se": s["combined_se"], "mean_words": s["mean_words"],
                      "kl_ref": kl_own.mean, "kl_ref_se": kl_own.se, "kl_sft0": kl_sft.mean}

    one("sft-0", sft0_path, "ppo")
    for name, run in runs.items():
        method = name.split("-")[0]
        for snap in sorted((run / "snapshots").glob("iter*"), key=lambda p: int(p.name[4:])):
            one(f"{name}@{snap.name[4:]}", snap, method)
        one(name, run / "policy", method)
    return {"prompts": len(prompts), "samples": samples, "evals": evals, "gold": gold}


def matched_kl(runs: dict[str, Path], ev: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """Per seed: each method's snapshot (or final policy) closest to the smaller final KL."""
    evals, gold = ev["evals"], ev["gold"]
    rows = []
    for s in seeds:
        cands = {m: [k for k in evals if k.split("@")[0] == f"{m}-s{s}"] for m in ("ppo", "salsa")}
        target = min(evals[f"ppo-s{s}"]["kl_ref"], evals[f"salsa-s{s}"]["kl_ref"])
        pick = {m: min(ks, key=lambda k: abs(evals[k]["kl_ref"] - target)) for m, ks in cands.items()}
        rows.append({"seed": s, "target_kl": target, "ppo": pick["ppo"], "salsa": pick["salsa"],
                     "kl_ppo": evals[pick["ppo"]]["kl_ref"], "kl_salsa": evals[pick["salsa"]]["kl_ref"],
                     "gold_ppo": evals[pick["ppo"]]["combined"], "gold_salsa": evals[pick["salsa"]]["combined"],
                     "salsa_win_rate": win_rate(gold[pick["salsa"]], gold[pick["ppo"]])})
    return rows


def run(demo: Path, out: Path, seeds: list[int], steps: int, beta: float, hack_beta: float, n_prompts: int,
        samples: int, overrides: list[str], hack_estimator: str = "k1") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = connect()
    try:
        runs = train_runs(demo, out, seeds, steps, beta, hack_beta, overrides, hack_estimator)
    finally:
        if started:
            ray.shutdown()
    ev = evaluate_runs(demo, {k: v for k, v in runs.items() if k != "salsa-hack"}, n_prompts, samples)
    evals = ev["evals"]
    matched = matched_kl(runs, ev, seeds)
    final = {m: [evals[f"{m}-s{s}"] for s in seeds] for m in ("ppo", "salsa")}

    hack_rows = _metrics(runs["salsa-hack"])
    alarm_steps = [int(r["step"]) for r in hack_rows if r["monitor/collapse"]]
    results: dict[str, Any] = {
        "seeds": seeds, "steps": steps, "beta": beta, "prompts": ev["prompts"], "samples": ev["samples"],
        "sft0": evals["sft-0"],
        "final": {m: {"gold": mean_se([e["combined"] for e in final[m]]), "kl_ref": mean_se([e["kl_ref"] for e in final[m]]),
                      "kl_sft0": mean_se([e["kl_sft0"] for e in final[m]]),
                      "mean_words": mean_se([e["mean_words"] for e in final[m]])} for m in final},
        "win_rate_final_salsa_over_ppo": mean_se([win_rate(ev["gold"][f"salsa-s{s}"], ev["gold"][f"ppo-s{s}"])
                                              for s in seeds]),
        "win_rate_over_sft0": {m: mean_se([win_rate(ev["gold"][f"{m}-s{s}"], ev["gold"]["sft-0"]) for s in seeds])
                               for m in ("ppo", "salsa")},
        "matched_kl": matched, "win_rate_matched_kl": mean_se([r["salsa_win_rate"] for r in matched]),
        "kl_hack": {"beta": hack_beta, "estimator": hack_estimator, "first_length": hack_rows[0]["response/length"],
                    "last_length": hack_rows[-1]["response/length"], "min_length": min(r["response/length"]
                                                                                        for r in hack_rows),
                    "alarm_steps": alarm_steps, "first_alarm": alarm_steps[0] if alarm_steps else None,
                    "last_kl": hack_rows[-1]["kl/sequence"], "last_gold": hack_rows[-1].get("gold/combined")},
        "evals": evals,
    }
    curves = {m: [(_ema(np.array([r["kl/sequence"] for r in _metrics(runs[f"{m}-s{s}"])])),
                   _ema(np.array([r["gold/combined"] for r in _metrics(runs[f"{m}-s{s}"])]))) for s in seeds]
              for m in ("ppo", "salsa")}
    points = {m: [(e["kl_ref"], e["combined"]) for k, e in evals.items() if k.startswith(f"{m}-s")]
              for m in ("ppo", "salsa")}
    reward_kl_curves(curves, out / "reward_vs_kl.png", points,
                     title=f"PPO vs SALSA, {len(seeds)} seeds, beta={beta:g} (EMA of training batches)")
    metric_lines({f"SALSA beta={hack_beta:g}": [np.array([r["response/length"] for r in hack_rows])],
                  f"SALSA beta={beta:g}": [np.array([r["response/length"] for r in _metrics(runs[f"salsa-s{s}"])])
                                              for s in seeds]},
                 out / "kl_hack_length.png", "mean response length (tokens)",
                 "KL hack: response length (x = monitor alarm)", marks={f"SALSA beta={hack_beta:g}": alarm_steps})
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", render(results))
    return results


def render(r: dict[str, Any]) -> str:
    f = r["final"]
    lines = [
        "# PPO vs SALSA on the embedded default", "",
        f"Seeds {r['seeds']}, {r['steps']} iterations, beta = {r['beta']}, both from SFT-0; PPO's reference is "
        "SFT-0, SALSA's the uniform soup of SFT-0 and SFT-1. Held-out: "
        f"{r['prompts']} test prompts x {r['samples']} samples; mean ± standard error over seeds.", "",
        "![reward vs KL](reward_vs_kl.png)", "",
        "| model | gold (combined) | KL to own reference | KL to SFT-0 | words |", "|---|---|---|---|---|",
        f"| SFT-0 | {r['sft0']['combined']:.3f} | 0 | 0 | {r['sft0']['mean_words']:.1f} |",
    ]
    for m in ("ppo", "salsa"):
        lines.append(f"| {m.upper()} | {f[m]['gold'][0]:.3f} ± {f[m]['gold'][1]:.3f} | {f[m]['kl_ref'][0]:.2f} ± "
                     f"{f[m]['kl_ref'][1]:.2f} | {f[m]['kl_sft0'][0]:.2f} | {f[m]['mean_words'][0]:.1f} |")
    w = r["win_rate_over_sft0"]
    lines += ["", f"- gold win rate over SFT-0: PPO {w['ppo'][0]:.1%} ± {w['ppo'][1]:.1%}, "
                  f"SALSA {w['salsa'][0]:.1%} ± {w['salsa'][1]:.1%}",
              f"- SALSA over PPO, final policies: {r['win_rate_final_salsa_over_ppo'][0]:.1%} ± "
              f"{r['win_rate_final_salsa_over_ppo'][1]:.1%}",
              f"- SALSA over PPO at matched KL: {r['win_rate_matched_kl'][0]:.1%} ± {r['win_rate_matched_kl'][1]:.1%}",
              "", "| seed | target KL | PPO snapshot (KL, gold) | SALSA snapshot (KL, gold) | SALSA win rate |",
              "|---|---|---|---|---|"]
    for m in r["matched_kl"]:
        lines.append(f"| {m['seed']} | {m['target_kl']:.2f} | {m['ppo']} ({m['kl_ppo']:.2f}, {m['gold_ppo']:.3f}) | "
                     f"{m['salsa']} ({m['kl_salsa']:.2f}, {m['gold_salsa']:.3f}) | {m['salsa_win_rate']:.1%} |")
    h = r["kl_hack"]
    lines += ["", "## KL hack", "", "![length](kl_hack_length.png)", "",
              f"SALSA at beta = {h['beta']} ({h['estimator']} estimator): mean response length {h['first_length']:.1f} -> {h['last_length']:.1f} "
              f"tokens (minimum {h['min_length']:.1f}); the monitor first raised its alarm at iteration "
              f"{h['first_alarm']} ({len(h['alarm_steps'])} alarmed iterations)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help="a demo run directory (with sft/sft-0, sft/sft-1)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--hack-beta", type=float, default=10.0)
    p.add_argument("--hack-estimator", choices=["k1", "k2", "k3"], default="k3")
    p.add_argument("--prompts", type=int, default=64, help="held-out test prompts")
    p.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. rollout.n=4")
    a = p.parse_args()
    for sub in ("sft-0", "sft-1"):
        if not (a.demo / "sft" / sub).is_dir():
            p.error(f"--demo {a.demo}: no sft/{sub} inside (run `rayalign demo` first)")
    setup_logging()
    r = run(a.demo, a.out, a.seeds, a.steps, a.beta, a.hack_beta, a.prompts, a.samples, a.overrides, a.hack_estimator)
    print(render(r))


if __name__ == "__main__":
    main()
