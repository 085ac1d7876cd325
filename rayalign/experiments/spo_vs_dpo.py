"""SPO against DPO at an equal tuning budget, several seeds (the comparison of arXiv 2405.00747).

    python -m rayalign.experiments.spo_vs_dpo --demo runs/demo-... --out runs/spo-vs-dpo

Every run starts from SFT-0 with pi_ref = SFT-0 and the same preference pairs (the world's train
prompts, combined gold labels). Phases:

1. tuning, on the first seed: SPO at every alpha of `--alphas` and DPO at every beta of `--dpo-betas`
   (the same number of values: a method is not given more tries than the other); each is judged on
   the dev prompts by gold reward, and the best value is kept;
2. test: SPO (SPO-basic, mu = 1) and DPO at their chosen values, and SPO weighted
   (mu = (4 p (1 - p))^gamma, `--gamma`) at SPO's alpha, on every seed;
3. judging on the held-out test prompts, none of which is in the preference set or the dev set:
   gold reward, win rates (paired by seed), drift outside the preference data -- KL(pi || SFT-0) on
   the policy's own samples, full vocabulary per position -- and output entropy / distinct share.

Writes OUT/report.md, OUT/results.json and OUT/gold_vs_drift.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import ray

from rayalign.config.core import load_config
from rayalign.config.schema import PrefConfig
from rayalign.distributed.cluster import connect
from rayalign.eval.diversity import diversity
from rayalign.eval.gold import GoldResult, evaluate, win_rate
from rayalign.eval.kl import sequence_kl
from rayalign.eval.plots import reward_kl_curves
from rayalign.experiments.common import floats, ints, mean_se, write_report
from rayalign.models.checkpoint import load_causal_lm
from rayalign.recipes.preference import run_preference
from rayalign.utils.logging import log, setup_logging
from rayalign.world.build import split_prompts

KINDS = ("spo", "spo_weighted", "dpo")
LABELS = {"spo": "SPO-basic", "spo_weighted": "SPO weighted", "dpo": "DPO"}


def train(demo: Path, out: Path, name: str, method: str, seed: int, extra: list[str], overrides: list[str]) -> Path:
    cfg = load_config(PrefConfig, "spo", [f"policy={demo / 'sft' / 'sft-0'}", f"output={out / name}",
                                          f"seed={seed}", *overrides, *extra])
    log.info("spo-vs-dpo: %s (%s, seed %d) %s", name, method, seed, " ".join(extra))
    run_preference(cfg, method, resume=True)
    return out / name / "policy"


def run(demo: Path, out: Path, seeds: list[int], alphas: list[float], betas: list[float], gamma: float,
        kl_coef: float, dev_samples: int, samples: int, max_new_tokens: int, overrides: list[str]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    prompts = split_prompts(0)
    sft0, tok = load_causal_lm(demo / "sft" / "sft-0")

    def dev_gold(path: Path) -> float:
        model, _ = load_causal_lm(path)
        return evaluate(path.parent.name, model, tok, prompts["dev"], n=dev_samples, max_new_tokens=max_new_tokens,
                        seed=4321).summary()["combined"]

    spo_args = {a: [f"algo.alpha={a}", f"algo.kl_coef={kl_coef}", "algo.gamma=0"] for a in alphas}
    dpo_args = {b: [f"algo.dpo_beta={b}"] for b in betas}
    started = connect()
    try:
        s0 = seeds[0]  # 1. tuning on the first seed, judged on dev
        tune_spo = {a: train(demo, out, f"spo-a{a:g}-s{s0}", "spo", s0, spo_args[a], overrides) for a in alphas}
        tune_dpo = {b: train(demo, out, f"dpo-b{b:g}-s{s0}", "dpo", s0, dpo_args[b], overrides) for b in betas}
        dev = {"spo": {a: dev_gold(p) for a, p in tune_spo.items()}, "dpo": {b: dev_gold(p) for b, p in tune_dpo.items()}}
        alpha = max(alphas, key=lambda a: dev["spo"][a])
        beta = max(betas, key=lambda b: dev["dpo"][b])
        log.info("spo-vs-dpo: dev gold %s; chosen alpha %g, DPO beta %g", dev, alpha, beta)
        runs: dict[str, dict[int, Path]] = {k: {} for k in KINDS}
        for s in seeds:  # 2. test seeds at the chosen values
            runs["spo"][s] = train(demo, out, f"spo-a{alpha:g}-s{s}", "spo", s, spo_args[alpha], overrides)
            runs["dpo"][s] = train(demo, out, f"dpo-b{beta:g}-s{s}", "dpo", s, dpo_args[beta], overrides)
            runs["spo_weighted"][s] = train(demo, out, f"spo-a{alpha:g}-g{gamma:g}-s{s}", "spo", s,
                                            [*spo_args[alpha][:2], f"algo.gamma={gamma}"], overrides)
    finally:
        if started:
            ray.shutdown()

    test = prompts["test"]  # 3. judging
    evals: dict[str, dict[str, float]] = {}
    gold: dict[str, GoldResult] = {}
    for key, path in {"sft-0": demo / "sft" / "sft-0",
                      **{f"{k}-s{s}": p for k in KINDS for s, p in runs[k].items()}}.items():
        model, _ = load_causal_lm(path)
        gold[key] = evaluate(key, model, tok, test, n=samples, max_new_tokens=max_new_tokens, seed=1234)
        kl = sequence_kl(model, sft0, tok, test, n=samples, max_new_tokens=max_new_tokens, seed=99)
        div = diversity(model, tok, test, n=8, max_new_tokens=max_new_tokens, seed=7)
        s = gold[key].summary()
        evals[key] = {"gold": s["combined"], "gold_se": s["combined_se"], "words": s["mean_words"],
                      "drift_kl": kl.mean, "drift_kl_se": kl.se, **div.as_dict()}
        log.info("spo-vs-dpo: %s gold %.3f, drift KL %.2f", key, s["combined"], kl.mean)

    def paired(a: str, b: str) -> list[float]:
        return mean_se([win_rate(gold[f"{a}-s{s}"], gold[f"{b}-s{s}"]) for s in seeds])

    results: dict[str, Any] = {
        "seeds": seeds, "alphas": alphas, "dpo_betas": betas, "gamma": gamma, "kl_coef": kl_coef,
        "overrides": overrides, "dev_prompts": len(prompts["dev"]), "dev_samples": dev_samples,
        "test_prompts": len(test), "samples": samples, "max_new_tokens": max_new_tokens,
        "dev_gold": {m: {f"{v:g}": g for v, g in d.items()} for m, d in dev.items()},
        "chosen": {"alpha": alpha, "dpo_beta": beta}, "sft0": evals["sft-0"],
        "final": {k: {m: mean_se([evals[f"{k}-s{s}"][m] for s in seeds])
                      for m in ("gold", "drift_kl", "token_entropy", "distinct", "words")} for k in KINDS},
        "win_over_sft0": {k: mean_se([win_rate(gold[f"{k}-s{s}"], gold["sft-0"]) for s in seeds]) for k in KINDS},
        "spo_over_dpo": paired("spo", "dpo"), "weighted_over_spo": paired("spo_weighted", "spo"),
        "weighted_over_dpo": paired("spo_weighted", "dpo"), "evals": evals,
    }
    reward_kl_curves({LABELS[k]: [] for k in KINDS}, out / "gold_vs_drift.png",
                     {LABELS[k]: [(evals[f"{k}-s{s}"]["drift_kl"], evals[f"{k}-s{s}"]["gold"]) for s in seeds]
                      for k in KINDS},
                     title="Held-out gold against drift (KL to SFT-0 on unseen prompts), one point per seed",
                     xlabel="KL(pi || SFT-0) on held-out prompts")
    write_report(out, results, render(results))
    return results


def render(r: dict[str, Any]) -> str:
    def f(x: list[float], p: int = 3) -> str:
        return f"{x[0]:.{p}f} ± {x[1]:.{p}f}"

    c = r["chosen"]
    names = {"spo": f"SPO-basic (alpha {c['alpha']:g})", "spo_weighted": f"SPO weighted (alpha {c['alpha']:g}, "
             f"gamma {r['gamma']:g})", "dpo": f"DPO (beta {c['dpo_beta']:g})"}
    lines = ["# SPO vs DPO at an equal tuning budget", "",
             f"Tuning on seed {r['seeds'][0]}: SPO alpha in {r['alphas']} and DPO beta in {r['dpo_betas']} "
             f"({len(r['alphas'])} and {len(r['dpo_betas'])} values), each judged by gold on {r['dev_prompts']} dev "
             f"prompts x {r['dev_samples']} samples. Global KL coefficient {r['kl_coef']:g}. Test: seeds {r['seeds']}, "
             f"{r['test_prompts']} test prompts x {r['samples']} samples, <= {r['max_new_tokens']} new tokens; mean ± "
             f"standard error over seeds. Overrides: {' '.join(r['overrides']) or 'none'}.", "",
             "| dev gold | " + " | ".join(r["dev_gold"]["spo"]) + " |", "|---" * (1 + len(r["alphas"])) + "|",
             "| SPO alpha | " + " | ".join(f"{v:.3f}" for v in r["dev_gold"]["spo"].values()) + " |", "",
             "| dev gold | " + " | ".join(r["dev_gold"]["dpo"]) + " |", "|---" * (1 + len(r["dpo_betas"])) + "|",
             "| DPO beta | " + " | ".join(f"{v:.3f}" for v in r["dev_gold"]["dpo"].values()) + " |", "",
             "![gold vs drift](gold_vs_drift.png)", "",
             "| model | test gold | win rate over SFT-0 | drift KL | token entropy | distinct | words |",
             "|---|---|---|---|---|---|---|",
             f"| SFT-0 | {r['sft0']['gold']:.3f} | – | 0 | {r['sft0']['token_entropy']:.2f} | "
             f"{r['sft0']['distinct']:.2f} | {r['sft0']['words']:.1f} |"]
    for k in KINDS:
        x, w = r["final"][k], r["win_over_sft0"][k]
        lines.append(f"| {names[k]} | {f(x['gold'])} | {w[0]:.1%} ± {w[1]:.1%} | {f(x['drift_kl'], 2)} | "
                     f"{x['token_entropy'][0]:.2f} | {x['distinct'][0]:.2f} | {x['words'][0]:.1f} |")
    lines.append("")
    for key, label in (("spo_over_dpo", "SPO-basic over DPO"), ("weighted_over_spo", "SPO weighted over SPO-basic"),
                       ("weighted_over_dpo", "SPO weighted over DPO")):
        lines.append(f"- {label} (gold win rate, paired by seed): {r[key][0]:.1%} ± {r[key][1]:.1%}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help="a demo run directory (with sft/sft-0)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="comma-separated; the first also tunes")
    p.add_argument("--alphas", type=floats, default=[0.25, 1.0, 4.0], help="SPO alphas tried on dev")
    p.add_argument("--dpo-betas", type=floats, default=[0.03, 0.1, 0.3], help="DPO betas tried on dev")
    p.add_argument("--gamma", type=float, default=1.0, help="weighted SPO's exponent")
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--dev-samples", type=int, default=8, help="samples per dev prompt")
    p.add_argument("--samples", type=int, default=4, help="samples per test prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. epochs=2")
    a = p.parse_args()
    if len(a.alphas) != len(a.dpo_betas):
        p.error(f"an equal tuning budget: {len(a.alphas)} alphas but {len(a.dpo_betas)} DPO betas")
    if a.gamma <= 0:
        p.error("--gamma must be > 0 (gamma 0 is SPO-basic, already in the study)")
    if not (a.demo / "sft" / "sft-0").is_dir():
        p.error(f"--demo {a.demo}: no sft/sft-0 inside (run `rayalign demo` first)")
    setup_logging()
    run(a.demo, a.out, a.seeds, a.alphas, a.dpo_betas, a.gamma, a.kl_coef, a.dev_samples, a.samples,
        a.max_new_tokens, a.overrides)


if __name__ == "__main__":
    main()
