"""ExPO's gain in gold reward over its theta_1, for PPO, SALSA, SPO and DPO, several seeds
(as in ExPO, arXiv 2404.16792).

    python -m rayalign.experiments.expo_gain --demo runs/demo-... --out runs/expo-gain
    python -m rayalign.experiments.expo_gain --demo runs/demo-... --out runs/expo-fractions \
        --methods spo,dpo --fractions 0.1,0.25,0.5,1

For every seed, the aligned models are trained from the demo's SFT-0 with the demo's settings
(seed 0 at fraction 1 reuses the demo's own models); SPO and DPO take `--fractions` of the demo's
1,024 preference pairs (the paper's regime: under-trained theta_1, which ExPO is for). ExPO
searches alpha on the dev prompts with the demo's reward model and the paper's sampling
(temperature 0.7, top-p 0.9, top-k 40), and alpha is chosen two ways from the same dev rewards:
the paper's argmax over 0.1-0.5 (theta_1 itself is never kept) and rayalign's rule (the best alpha
in 0-0.5 whose gain over theta_1 exceeds one paired standard error, else theta_1). Each theta_1
and every alpha of the grid is evaluated on the test prompts with the gold rewards (the oracle
curve the reward model did not see).

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
PAIRS = 1024  # the demo's SPO / DPO data (PREF_FULL: data.limit=1024)


def aligned_model(demo: Path, out: Path, method: str, seed: int, fraction: float = 1.0) -> Path:
    """theta_1: the demo's own model for seed 0 at the full data, else trained with the demo's settings
    (SPO and DPO on `fraction` of the pairs)."""
    if seed == 0 and fraction == 1.0 and (demo / method / "policy").is_dir():
        return demo / method / "policy"
    sft = [demo / "sft" / "sft-0", demo / "sft" / "sft-1"]
    target = out / (f"{method}-s{seed}" if fraction == 1.0 else f"{method}-f{fraction:g}-s{seed}")
    if method in ("ppo", "salsa"):
        if fraction != 1.0:
            raise ValueError(f"--fractions apply to SPO and DPO (their preference pairs), not {method}")
        refs = ",".join(map(str, sft)) if method == "salsa" else ""
        cfg = load_config(RLConfig, method, [f"policy={sft[0]}", f"output={target}", f"reference.models=[{refs}]",
                                             f"seed={seed}"])
        return run_rl(cfg, method, resume=True)
    cfg = load_config(PrefConfig, "spo", [f"policy={sft[0]}", f"output={target}", f"seed={seed}",
                                          "world.pairs_per_prompt=48", *PREF_FULL,
                                          f"data.limit={max(16, round(fraction * PAIRS))}"])
    return run_preference(cfg, method, resume=True)


def paper_alpha(curve: list[dict[str, float]]) -> float:
    """The ExPO paper's choice: the dev-reward argmax over alpha in [0.1, 0.5]."""
    inside = [p for p in curve if 0.1 - 1e-9 <= p["alpha"] <= 0.5 + 1e-9]
    return max(inside, key=lambda p: p["reward"])["alpha"]


def run(demo: Path, out: Path, seeds: list[int], samples: int, methods: tuple[str, ...] = METHODS,
        fractions: tuple[float, ...] = (1.0,)) -> dict[str, Any]:
    prompts = split_prompts(0)["test"]
    sft0 = demo / "sft" / "sft-0"
    cells = [(m, f) for m in methods for f in (fractions if m in ("spo", "dpo") else (1.0,))]
    rows: dict[str, dict[int, Any]] = {cell_name(m, f): {} for m, f in cells}
    started = connect()
    try:
        for seed in seeds:
            for m, f in cells:
                theta1 = aligned_model(demo, out, m, seed, f)
                name = cell_name(m, f)
                cfg = load_config(ExpoConfig, None, [f"sft={sft0}", f"aligned={theta1}",
                                                     f"output={out / f'expo-{name}-s{seed}'}",
                                                     f"reward.model={demo / 'rm' / 'model'}", f"seed={seed}",
                                                     *EXPO_FULL])
                res = run_expo(cfg, resume=True)
                merged = MergedModel([sft0, theta1])
                by_alpha = {}
                for p in res["curve"]:  # gold on the test prompts at every alpha (alpha 0 = theta_1)
                    a = p["alpha"]
                    by_alpha[a] = evaluate(f"{name} alpha {a}", merged.set([-a, 1.0 + a]), merged.tok, prompts,
                                           n=samples, seed=seed)
                chosen, by_gold, paper = res["alpha"], res["gold_alpha"], paper_alpha(res["curve"])
                g1 = by_alpha[0.0].summary()["combined"]
                gain = {a: g.summary()["combined"] - g1 for a, g in by_alpha.items()}
                rows[name][seed] = {"alpha": chosen, "gold_theta1": g1, "gold_theta2": g1 + gain[chosen],
                                    "gain": gain[chosen], "win_rate": win_rate(by_alpha[chosen], by_alpha[0.0]),
                                    "alpha_paper": paper, "gain_paper": gain[paper],
                                    "win_rate_paper": win_rate(by_alpha[paper], by_alpha[0.0]),
                                    "alpha_by_dev_gold": by_gold, "gain_by_dev_gold": gain[by_gold],
                                    "dev_reward": [p["reward"] for p in res["curve"]],
                                    "test_gold": [by_alpha[p["alpha"]].summary()["combined"] for p in res["curve"]],
                                    "alphas": [p["alpha"] for p in res["curve"]]}
                log.info("experiment: %s seed %d: alpha %.2f (paper's rule %.2f), gold %.3f -> %.3f", name, seed,
                         chosen, paper, g1, g1 + gain[chosen])
    finally:
        if started:
            import ray

            ray.shutdown()
    sft_gold = evaluate("sft-0", *load_causal_lm(sft0), prompts, n=samples, seed=0).summary()["combined"]

    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0,
                "se": float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0}

    table = {name: {k: ms([r[k] for r in per.values()])
                    for k in ("gold_theta1", "gold_theta2", "gain", "win_rate", "gain_paper", "win_rate_paper",
                              "gain_by_dev_gold")}
             | {"alphas_chosen": [r["alpha"] for r in per.values()],
                "alphas_paper": [r["alpha_paper"] for r in per.values()],
                "alphas_by_dev_gold": [r["alpha_by_dev_gold"] for r in per.values()],
                "oracle_alpha": [r["alphas"][int(np.argmax(r["test_gold"]))] for r in per.values()]}
             for name, per in rows.items()}
    return {"seeds": seeds, "test_prompts": len(prompts), "samples_per_prompt": samples, "sft_gold": sft_gold,
            "fractions": list(fractions), "pairs": PAIRS, "methods": table, "per_seed": rows}


def cell_name(method: str, fraction: float) -> str:
    return method if fraction == 1.0 else f"{method}@{fraction:g}"


def render(r: dict[str, Any]) -> str:
    lines = ["# ExPO: gain in gold reward over theta_1", "",
             f"Seeds {r['seeds']}; {r['test_prompts']} test prompts x {r['samples_per_prompt']} samples; combined gold "
             f"reward (SFT-0: {r['sft_gold']:.3f}); alpha chosen on the dev prompts by the demo's reward model (the "
             "paper's sampling: temperature 0.7, top-p 0.9, top-k 40). `m@f`: SPO / DPO trained on the fraction f of "
             f"the {r['pairs']} pairs. Gains are mean ± standard error over seeds.", "",
             "![gold against alpha](gold_vs_alpha.png)", "",
             "| theta_1 | gold theta_1 | gain, paper's argmax over 0.1-0.5 (alphas) | gain, rayalign's SE rule "
             "(alphas) | theta_2 wins vs theta_1 (SE rule) | gain if dev were judged by gold (alphas) | best alpha on "
             "test gold |",
             "|---|---|---|---|---|---|---|"]
    for m, v in r["methods"].items():
        lines.append(f"| {m} | {v['gold_theta1']['mean']:.3f} ± {v['gold_theta1']['se']:.3f} | "
                     f"{v['gain_paper']['mean']:+.3f} ± {v['gain_paper']['se']:.3f} ({v['alphas_paper']}) | "
                     f"{v['gain']['mean']:+.3f} ± {v['gain']['se']:.3f} ({v['alphas_chosen']}) | "
                     f"{v['win_rate']['mean']:.1%} | {v['gain_by_dev_gold']['mean']:+.3f} ± "
                     f"{v['gain_by_dev_gold']['se']:.3f} ({v['alphas_by_dev_gold']}) | {v['oracle_alpha']} |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path) -> None:
    alphas = next(iter(next(iter(r["per_seed"].values())).values()))["alphas"]
    metric_lines({m: [np.asarray(row["test_gold"]) for row in per.values()] for m, per in r["per_seed"].items()}, out,
                 "test gold (combined)", "ExPO: gold against alpha, one line per seed", x=alphas, xlabel="alpha")


def main() -> None:
    p = demo_parser(__doc__, "rm/model")
    p.add_argument("--samples", type=int, default=4, help="samples per test prompt")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {', '.join(METHODS)}")
    p.add_argument("--fractions", default="1", help="SPO / DPO: fractions of the pairs, e.g. 0.1,0.25,0.5,1")
    a = p.parse_args()
    methods = tuple(m for m in a.methods.split(",") if m)
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods: choose among {', '.join(METHODS)}")
    try:
        fractions = tuple(float(x) for x in a.fractions.split(",") if x)
    except ValueError:
        p.error(f"--fractions {a.fractions!r}: comma-separated numbers in (0, 1]")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        p.error(f"--fractions {a.fractions!r}: comma-separated numbers in (0, 1]")
    check_demo(p, a.demo, "rm/model")
    setup_logging()
    r = run(a.demo, a.out, a.seeds, a.samples, methods, fractions)
    plot(r, a.out / "gold_vs_alpha.png")
    write_report(a.out, r, render(r))


if __name__ == "__main__":
    main()
