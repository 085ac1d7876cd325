"""ExPO's gain in gold reward over its theta_1, for PPO, SALSA, SPO and DPO, several seeds
(as in ExPO, arXiv 2404.16792).

    python -m rayalign.experiments.expo_gain --demo runs/demo-... --out runs/expo-gain

For every seed, the four aligned models are trained from the demo's SFT-0 with the demo's settings
(seed 0 reuses the demo's own models); ExPO searches alpha on the dev prompts with the demo's
reward model, exactly as `rayalign demo` does. Each theta_1 and theta_2 is evaluated on the test
prompts with the gold rewards; so is every alpha of the grid (the oracle curve the reward model
did not see).

Writes OUT/report.md, OUT/results.json and OUT/gold_vs_alpha.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rayalign.config.core import load_config
from rayalign.config.schema import ExpoConfig, PrefConfig, RLConfig
from rayalign.distributed.cluster import connect
from rayalign.eval.gold import evaluate, win_rate
from rayalign.eval.merged import MergedModel
from rayalign.eval.plots import metric_lines
from rayalign.experiments.common import check_demo, demo_parser, write_report
from rayalign.models.checkpoint import load_causal_lm
from rayalign.recipes.demo import EXPO_FULL, PREF_FULL
from rayalign.recipes.expo import run_expo
from rayalign.recipes.ppo import run_rl
from rayalign.recipes.preference import run_preference
from rayalign.utils.logging import log, setup_logging
from rayalign.world.build import split_prompts

METHODS = ("ppo", "salsa", "spo", "dpo")


def aligned_model(demo: Path, out: Path, method: str, seed: int) -> Path:
    """theta_1: the demo's own model for seed 0, else trained with the demo's settings."""
    if seed == 0 and (demo / method / "policy").is_dir():
        return demo / method / "policy"
    sft = [demo / "sft" / "sft-0", demo / "sft" / "sft-1"]
    target = out / f"{method}-s{seed}"
    if method in ("ppo", "salsa"):
        refs = ",".join(map(str, sft)) if method == "salsa" else ""
        cfg = load_config(RLConfig, method, [f"policy={sft[0]}", f"output={target}", f"reference.models=[{refs}]",
                                             f"seed={seed}"])
        return run_rl(cfg, method, resume=True)
    cfg = load_config(PrefConfig, "spo", [f"policy={sft[0]}", f"output={target}", f"seed={seed}",
                                          "world.pairs_per_prompt=48", *PREF_FULL])
    return run_preference(cfg, method, resume=True)


def run(demo: Path, out: Path, seeds: list[int], samples: int) -> dict[str, Any]:
    prompts = split_prompts(0)["test"]
    sft0 = demo / "sft" / "sft-0"
    rows: dict[str, dict[int, Any]] = {m: {} for m in METHODS}
    started = connect()
    try:
        for seed in seeds:
            for m in METHODS:
                theta1 = aligned_model(demo, out, m, seed)
                cfg = load_config(ExpoConfig, None, [f"sft={sft0}", f"aligned={theta1}", f"output={out / f'expo-{m}-s{seed}'}",
                                                     f"reward.model={demo / 'rm' / 'model'}", f"seed={seed}", *EXPO_FULL])
                res = run_expo(cfg, resume=True)
                merged = MergedModel([sft0, theta1])
                by_alpha = {}
                for p in res["curve"]:  # gold on the test prompts at every alpha (alpha 0 = theta_1)
                    a = p["alpha"]
                    by_alpha[a] = evaluate(f"{m} alpha {a}", merged.set([-a, 1.0 + a]), merged.tok, prompts, n=samples,
                                           seed=seed)
                chosen, by_gold = res["alpha"], res["gold_alpha"]
                g1, g2 = by_alpha[0.0].summary()["combined"], by_alpha[chosen].summary()["combined"]
                rows[m][seed] = {"alpha": chosen, "gold_theta1": g1, "gold_theta2": g2, "gain": g2 - g1,
                                 "win_rate": win_rate(by_alpha[chosen], by_alpha[0.0]),
                                 "alpha_by_dev_gold": by_gold,
                                 "gain_by_dev_gold": by_alpha[by_gold].summary()["combined"] - g1,
                                 "dev_reward": [p["reward"] for p in res["curve"]],
                                 "test_gold": [by_alpha[p["alpha"]].summary()["combined"] for p in res["curve"]],
                                 "alphas": [p["alpha"] for p in res["curve"]]}
                log.info("experiment: %s seed %d: alpha %.2f, gold %.3f -> %.3f", m, seed, chosen, g1, g2)
    finally:
        if started:
            import ray

            ray.shutdown()
    sft_gold = evaluate("sft-0", *load_causal_lm(sft0), prompts, n=samples, seed=0).summary()["combined"]

    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}

    table = {m: {k: ms([r[k] for r in rows[m].values()])
                 for k in ("gold_theta1", "gold_theta2", "gain", "win_rate", "gain_by_dev_gold")}
             | {"alphas_chosen": [r["alpha"] for r in rows[m].values()],
                "alphas_by_dev_gold": [r["alpha_by_dev_gold"] for r in rows[m].values()],
                "oracle_alpha": [r["alphas"][int(np.argmax(r["test_gold"]))] for r in rows[m].values()]}
             for m in METHODS}
    return {"seeds": seeds, "test_prompts": len(prompts), "samples_per_prompt": samples, "sft_gold": sft_gold,
            "methods": table, "per_seed": rows}


def render(r: dict[str, Any]) -> str:
    lines = ["# ExPO: gain in gold reward over theta_1", "",
             f"Seeds {r['seeds']}; {r['test_prompts']} test prompts x {r['samples_per_prompt']} samples; combined gold "
             f"reward (SFT-0: {r['sft_gold']:.3f}); alpha chosen on the dev prompts by the demo's reward model.", "",
             "![gold against alpha](gold_vs_alpha.png)", "",
             "| theta_1 | gold theta_1 | gold theta_2 | gain (mean ± sd) | theta_2 wins vs theta_1 | alpha chosen per seed "
             "| gain if dev rollouts were judged by gold (alphas) | best alpha on test gold per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for m, v in r["methods"].items():
        lines.append(f"| {m} | {v['gold_theta1']['mean']:.3f} ± {v['gold_theta1']['std']:.3f} | "
                     f"{v['gold_theta2']['mean']:.3f} ± {v['gold_theta2']['std']:.3f} | "
                     f"{v['gain']['mean']:+.3f} ± {v['gain']['std']:.3f} | {v['win_rate']['mean']:.1%} | "
                     f"{v['alphas_chosen']} | {v['gain_by_dev_gold']['mean']:+.3f} ± {v['gain_by_dev_gold']['std']:.3f} "
                     f"({v['alphas_by_dev_gold']}) | {v['oracle_alpha']} |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path) -> None:
    alphas = next(iter(r["per_seed"]["ppo"].values()))["alphas"]
    metric_lines({m: [np.asarray(row["test_gold"]) for row in r["per_seed"][m].values()] for m in METHODS}, out,
                 "test gold (combined)", "ExPO: gold against alpha, one line per seed", x=alphas, xlabel="alpha")


def main() -> None:
    p = demo_parser(__doc__, "rm/model")
    p.add_argument("--samples", type=int, default=4, help="samples per test prompt")
    a = p.parse_args()
    check_demo(p, a.demo, "rm/model")
    setup_logging()
    r = run(a.demo, a.out, a.seeds, a.samples)
    plot(r, a.out / "gold_vs_alpha.png")
    write_report(a.out, r, render(r))


if __name__ == "__main__":
    main()
