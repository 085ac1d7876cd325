"""SPO against DPO on the embedded default, several seeds (the comparison of arXiv 2405.00747).

    python -m rayalign.experiments.spo_vs_dpo --demo runs/demo-... --out runs/spo-vs-dpo

For every seed, from SFT-0 with pi_ref = SFT-0 and the same preference pairs (the world's train
prompts, combined gold labels): SPO (alpha, global KL on online samples), SPO without the
global KL (kl_coef = 0: the preference loss alone) and DPO. Seed 0 also runs SPO at other
alphas. Every final policy is evaluated on the held-out test prompts, none of which is in the
preference set:

- gold reward and win rates (SPO and DPO over SFT-0, SPO over DPO);
- drift outside the preference data: KL(pi || pi_ref) on the test prompts, full vocabulary per
  position, on the policy's own samples -- SPO with and without its global KL term, and DPO;
- output entropy (nats per token) and the share of distinct responses among 8 samples, against alpha.

Writes OUT/report.md, OUT/results.json, OUT/gold_vs_drift.png, OUT/entropy_vs_alpha.png.
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
from rayalign.eval.plots import reward_kl_curves, xy_lines
from rayalign.experiments.common import mean_se
from rayalign.models.checkpoint import load_causal_lm
from rayalign.recipes.preference import run_preference
from rayalign.utils.io import atomic_write_json, atomic_write_text
from rayalign.utils.logging import log, setup_logging
from rayalign.world.build import split_prompts


def jobs(seeds: list[int], alpha: float, alphas: list[float], kl_coef: float) -> list[tuple[str, str, int, list[str]]]:
    """(name, method, seed, overrides) of every run."""
    out = []
    for s in seeds:
        out += [(f"spo-s{s}", "spo", s, [f"algo.alpha={alpha}", f"algo.kl_coef={kl_coef}"]),
                (f"spo_nokl-s{s}", "spo", s, [f"algo.alpha={alpha}", "algo.kl_coef=0"]),
                (f"dpo-s{s}", "dpo", s, [])]
    out += [(f"spo_a{a:g}-s{seeds[0]}", "spo", seeds[0], [f"algo.alpha={a}", f"algo.kl_coef={kl_coef}"])
            for a in alphas if a != alpha]
    return out


def train_runs(demo: Path, out: Path, plan: list[tuple[str, str, int, list[str]]], overrides: list[str]) -> dict[str, Path]:
    sft0 = demo / "sft" / "sft-0"
    runs = {}
    for name, method, seed, extra in plan:
        cfg = load_config(PrefConfig, "spo", [f"policy={sft0}", f"output={out / name}", f"seed={seed}",
                                              *overrides, *extra])
        log.info("experiment: %s (%s, seed %d) %s", name, method, seed, " ".join(extra))
        run_preference(cfg, method, resume=True)
        runs[name] = out / name
    return runs


def evaluate_runs(demo: Path, runs: dict[str, Path], n_prompts: int, samples: int,
                  max_new_tokens: int = 32) -> tuple[dict[str, dict[str, float]], dict[str, GoldResult]]:
    prompts = split_prompts(0)["test"][:n_prompts]
    sft0, tok = load_causal_lm(demo / "sft" / "sft-0")
    evals, gold = {}, {}
    for name, path in {"sft-0": demo / "sft" / "sft-0", **{k: v / "policy" for k, v in runs.itemean_se()}}.itemean_se():
        model, _ = load_causal_lm(path)
        g = evaluate(name, model, tok, prompts, n=samples, max_new_tokens=max_new_tokens, seed=1234)
        kl = sequence_kl(model, sft0, tok, prompts, n=samples, max_new_tokens=max_new_tokens, seed=99)
        div = diversity(model, tok, prompts, n=8, max_new_tokens=max_new_tokens, seed=7)
        s = g.summary()
        gold[name] = g
        evals[name] = {"combined": s["combined"], "combined_se": s["combined_se"], "mean_words": s["mean_words"],
                       "drift_kl": kl.mean, "drift_kl_se": kl.se, **div.as_dict()}
        log.info("evaluated %s: gold %.3f, drift KL %.2f, entropy %.2f, distinct %.2f", name, s["combined"], kl.mean,
                 div.token_entropy, div.distinct)
    return evals, gold


def run(demo: Path, out: Path, seeds: list[int], alpha: float, alphas: list[float], kl_coef: float, n_prompts: int,
        samples: int, overrides: list[str]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = connect()
    try:
        runs = train_runs(demo, out, jobs(seeds, alpha, alphas, kl_coef), overrides)
    finally:
        if started:
            ray.shutdown()
    evals, gold = evaluate_runs(demo, runs, n_prompts, samples)
    kinds = ("spo", "spo_nokl", "dpo")
    per = {k: [evals[f"{k}-s{s}"] for s in seeds] for k in kinds}
    alpha_runs = {alpha: f"spo-s{seeds[0]}", **{a: f"spo_a{a:g}-s{seeds[0]}" for a in alphas if a != alpha}}
    results: dict[str, Any] = {
        "seeds": seeds, "alpha": alpha, "kl_coef": kl_coef, "overrides": overrides, "prompts": n_prompts,
        "samples": samples, "sft0": evals["sft-0"],
        "final": {k: {m: mean_se([e[m] for e in per[k]]) for m in ("combined", "drift_kl", "token_entropy", "distinct",
                                                             "mean_words")} for k in kinds},
        "win_over_sft0": {k: mean_se([win_rate(gold[f"{k}-s{s}"], gold["sft-0"]) for s in seeds]) for k in kinds},
        "spo_over_dpo": mean_se([win_rate(gold[f"spo-s{s}"], gold[f"dpo-s{s}"]) for s in seeds]),
        "spo_over_spo_nokl": mean_se([win_rate(gold[f"spo-s{s}"], gold[f"spo_nokl-s{s}"]) for s in seeds]),
        "alpha_sweep": [{"alpha": a, "run": r, **{m: evals[r][m] for m in ("token_entropy", "distinct", "combined",
                                                                          "drift_kl")}}
                        for a, r in sorted(alpha_runs.itemean_se())],
        "evals": evals,
    }
    names = {"spo": f"SPO (alpha={alpha:g}, KL {kl_coef:g})", "spo_nokl": "SPO without global KL", "dpo": "DPO"}
    reward_kl_curves({names[k]: [] for k in kinds}, out / "gold_vs_drift.png",
                     {names[k]: [(e["drift_kl"], e["combined"]) for e in per[k]] for k in kinds},
                     title="Held-out gold reward against drift (KL to SFT-0 on unseen prompts)",
                     xlabel="KL(pi || pi_ref) on held-out prompts")
    sweep = results["alpha_sweep"]
    xy_lines({"token entropy (nats)": ([r["alpha"] for r in sweep], [r["token_entropy"] for r in sweep]),
              "distinct share of 8 samples": ([r["alpha"] for r in sweep], [r["distinct"] for r in sweep])},
             out / "entropy_vs_alpha.png", "alpha", "value", "SPO output diversity against alpha", logx=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", render(results))
    return results


def render(r: dict[str, Any]) -> str:
    f, w = r["final"], r["win_over_sft0"]
    names = {"spo": f"SPO (alpha {r['alpha']:g}, global KL {r['kl_coef']:g})", "spo_nokl": "SPO, no global KL",
             "dpo": "DPO"}
    lines = ["# SPO vs DPO on the embedded default", "",
             f"Seeds {r['seeds']}, all from SFT-0 with pi_ref = SFT-0 and the same preference pairs; held-out: "
             f"{r['prompts']} test prompts (not in the preference set) x {r['samples']} samples; mean ± standard "
             f"error over seeds. Overrides: {' '.join(r['overrides']) or 'none'}.", "",
             "![gold vs drift](gold_vs_drift.png)", "",
             "| model | gold (combined) | win rate over SFT-0 | drift KL (held-out) | token entropy | distinct | words |",
             "|---|---|---|---|---|---|---|",
             f"| SFT-0 | {r['sft0']['combined']:.3f} | – | 0 | {r['sft0']['token_entropy']:.2f} | "
             f"{r['sft0']['distinct']:.2f} | {r['sft0']['mean_words']:.1f} |"]
    for k in ("spo", "spo_nokl", "dpo"):
        lines.append(f"| {names[k]} | {f[k]['combined'][0]:.3f} ± {f[k]['combined'][1]:.3f} | {w[k][0]:.1%} ± "
                     f"{w[k][1]:.1%} | {f[k]['drift_kl'][0]:.2f} ± {f[k]['drift_kl'][1]:.2f} | "
                     f"{f[k]['token_entropy'][0]:.2f} | {f[k]['distinct'][0]:.2f} | {f[k]['mean_words'][0]:.1f} |")
    lines += ["", f"- SPO over DPO: {r['spo_over_dpo'][0]:.1%} ± {r['spo_over_dpo'][1]:.1%}",
              f"- SPO over SPO without its global KL: {r['spo_over_spo_nokl'][0]:.1%} ± {r['spo_over_spo_nokl'][1]:.1%}",
              "", "## Output diversity against alpha (seed 0)", "", "![entropy vs alpha](entropy_vs_alpha.png)", "",
              "| alpha | token entropy | distinct share | gold | drift KL |", "|---|---|---|---|---|"]
    for s in r["alpha_sweep"]:
        lines.append(f"| {s['alpha']:g} | {s['token_entropy']:.2f} | {s['distinct']:.2f} | {s['combined']:.3f} | "
                     f"{s['drift_kl']:.2f} |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help="a demo run directory (with sft/sft-0)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--alphas", type=_floats, default=[0.25, 1.0, 4.0],
                   help="comma-separated alpha sweep on the first seed (default 0.25,1,4)")
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--prompts", type=int, default=33, help="held-out test prompts")
    p.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. epochs=2")
    a = p.parse_args()
    if not (a.demo / "sft" / "sft-0").is_dir():
        p.error(f"--demo {a.demo}: no sft/sft-0 inside (run `rayalign demo` first)")
    setup_logging()
    print(render(run(a.demo, a.out, a.seeds, a.alpha, a.alphas, a.kl_coef, a.prompts, a.samples, a.overrides)))


if __name__ == "__main__":
    main()
