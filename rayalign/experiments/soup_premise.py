"""Does a soup of SFT seeds reach a higher-reward region than its ingredients? SALSA's premise
(arXiv 2411.01798), measured on the embedded default.

    python -m rayalign.experiments.soup_premise --demo runs/demo-... --out runs/soup-premise

From the demo's pre-trained base, N SFT seeds are trained for each way of making them differ
(`rayalign sft seed_data=...`): `shared` (the same demonstrations, other data orders -- what the
demo does), `subset` (each seed its own random half of the demonstrations) and `resample` (each
seed freshly sampled demonstrations of the same prompts). For every mode it evaluates, on the
held-out test prompts, the gold reward and a learned reward model's score of

    each seed; the uniform soups of the first N = 2, 3, 4 seeds; the 11-point interpolation path
    (1 - w) theta_0 + w theta_1 between seeds 0 and 1; and the models' weight distance,

and draws the paths and the soups in one figure. The reward model is the demo's (rm/model) or,
when the demo has none, one trained here with the demo's settings. Writes OUT/report.md,
OUT/results.json and OUT/soup_premise.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayalign.config.schema import DataConfig, LearnerConfig, RMConfig, SFTConfig, WorldConfig
from rayalign.eval.merged import MergedModel
from rayalign.experiments.common import Judge, demo_parser, write_report
from rayalign.merge.io import read_state_dict
from rayalign.recipes.demo import _settings
from rayalign.recipes.supervised import run_rm, run_sft
from rayalign.utils.logging import log, setup_logging

MODES = ("shared", "subset", "resample")
PATH_POINTS = np.linspace(0.0, 1.0, 11)


def demo_world() -> tuple[WorldConfig, dict[str, Any]]:
    s = _settings(False)
    return WorldConfig(seed=0, pretrain_docs=s["pretrain_docs"], sft_per_prompt=s["sft_per_prompt"],
                       pairs_per_prompt=s["pairs_per_prompt"]), s


def train_seeds(base: Path, out: Path, mode: str, seeds: list[int]) -> list[Path]:
    world, s = demo_world()
    return run_sft(SFTConfig(base=str(base), output=str(out / f"sft-{mode}"), seeds=seeds, world=world,
                             epochs=s["sft_epochs"], seed_data=mode,
                             learner=LearnerConfig(lr=1e-3, micro_batch_size=16, warmup_steps=10)), resume=True)


def reward_model(demo: Path, out: Path, sft0: Path) -> Path:
    if (demo / "rm" / "model").is_dir():
        return demo / "rm" / "model"
    world, s = demo_world()
    return run_rm(RMConfig(base=str(sft0), output=str(out / "rm"), world=world, epochs=s["rm_epochs"],
                           data=DataConfig(max_seq_len=96), learner=LearnerConfig(lr=5e-4, micro_batch_size=32)),
                  resume=True)


def weight_distance(a: Path, b: Path) -> float:
    """||theta_a - theta_b|| / ||theta_a|| over every tensor."""
    sa, sb = read_state_dict(a), read_state_dict(b)
    num = sum(float((sa[k].float() - sb[k].float()).square().sum()) for k in sa)
    den = sum(float(sa[k].float().square().sum()) for k in sa)
    return (num / den) ** 0.5


@torch.no_grad()
def evaluate_mode(paths: list[Path], judge: Judge) -> dict[str, Any]:
    merged = MergedModel(paths)
    k = len(paths)

    def at(coefs: list[float], name: str) -> dict[str, float]:
        return judge(merged.set(coefs), merged.tok, name)

    seeds = [at([float(i == j) for j in range(k)], f"seed {i}") for i in range(k)]
    soups = {str(n): at([1.0 / n if j < n else 0.0 for j in range(k)], f"soup of {n}") for n in range(2, k + 1)}
    path = [at([1.0 - w, w] + [0.0] * (k - 2), f"path w={w:.1f}") for w in PATH_POINTS]
    mean_seed = {m: float(np.mean([s[m] for s in seeds])) for m in ("gold", "rm")}
    best_seed = {m: float(np.max([s[m] for s in seeds])) for m in ("gold", "rm")}
    return {"seeds": seeds, "soups": soups, "path": path, "mean_seed": mean_seed, "best_seed": best_seed,
            "soup_gain_over_mean_seed": {n: {m: v[m] - mean_seed[m] for m in ("gold", "rm")} for n, v in soups.items()},
            "distance_01": weight_distance(paths[0], paths[1])}


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric, label in ((axes[0], "gold", "gold reward (combined)"), (axes[1], "rm", "reward-model score")):
        for c, (mode, r) in zip(colours, results["modes"].items()):
            ax.plot(PATH_POINTS, [p[metric] for p in r["path"]], marker="o", markersize=3, color=c,
                    label=f"{mode}: path seed 0 -> seed 1")
            for n, v in r["soups"].items():
                ax.scatter([1.0 + 0.08 * int(n)], [v[metric]], color=c, marker="*", s=70)
                ax.annotate(f"N={n}", (1.0 + 0.08 * int(n), v[metric]), fontsize=7, xytext=(3, 2),
                            textcoords="offset points")
            ax.axhline(r["mean_seed"][metric], color=c, linestyle=":", linewidth=1)
        ax.set_xlabel("weight w on seed 1:  (1 - w) seed 0 + w seed 1")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Soups of SFT seeds (test prompts): paths between two seeds; stars right of w = 1 are uniform "
                 "soups of N seeds; dotted lines the seeds' mean", fontsize=10)
    fig.tight_layout()
    path = out / "soup_premise.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(demo: Path, out: Path, seeds: list[int], modes: list[str], samples: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    base = demo / "base" / "model"
    trained = {mode: train_seeds(base, out, mode, seeds) for mode in modes}
    rm = reward_model(demo, out, trained[modes[0]][0])
    judge = Judge(rm, samples)
    results: dict[str, Any] = {"seeds": seeds, "samples": samples, "test_prompts": len(judge.prompts),
                               "reward_model": str(rm), "modes": {}}
    for mode in modes:
        log.info("soup premise: evaluating %s seeds", mode)
        results["modes"][mode] = evaluate_mode(trained[mode], judge)
    plot(results, out)
    write_report(out, results, render(results))
    return results


def render(r: dict[str, Any]) -> str:
    lines = ["# Soups of SFT seeds: does the soup gain? (SALSA's premise, arXiv 2411.01798)", "",
             f"Seeds {r['seeds']} per mode, from the demo's base; {r['test_prompts']} test prompts x {r['samples']} "
             f"samples; gold = combined gold reward, RM = the reward model {r['reward_model']}; ± standard error "
             "over prompts.", "", "![soup premise](soup_premise.png)", "",
             "| mode | relative weight distance seed 0 - seed 1 | seeds' gold (each) | soups' gold N=2, 3, 4 | "
             "soup N=2 gain over mean seed (gold / RM) | best path point (w, gold) |", "|---|---|---|---|---|---|"]
    for mode, m in r["modes"].items():
        best = max(zip(PATH_POINTS, m["path"]), key=lambda t: t[1]["gold"])
        gain = m["soup_gain_over_mean_seed"]["2"]
        lines.append(f"| {mode} | {m['distance_01']:.4f} | " + ", ".join(f"{s['gold']:.3f}" for s in m["seeds"])
                     + " | " + ", ".join(f"{v['gold']:.3f} ± {v['gold_se']:.3f}" for v in m["soups"].values())
                     + f" | {gain['gold']:+.3f} / {gain['rm']:+.3f} | {best[0]:.1f}, {best[1]['gold']:.3f} |")
    lines += ["", "Interpolation path seed 0 -> seed 1 (gold / RM):", "",
              "| w | " + " | ".join(r["modes"]) + " |", "|---" * (1 + len(r["modes"])) + "|"]
    for i, w in enumerate(PATH_POINTS):
        lines.append(f"| {w:.1f} | " + " | ".join(f"{m['path'][i]['gold']:.3f} / {m['path'][i]['rm']:.3f}"
                                                 for m in r["modes"].values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = demo_parser(__doc__, "base/model")
    p.set_defaults(seeds=[0, 1, 2, 3])
    p.add_argument("--modes", default="shared,subset,resample", help=f"comma-separated among {', '.join(MODES)}")
    p.add_argument("--samples", type=int, default=4, help="samples per test prompt")
    a = p.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose among {', '.join(MODES)}")
    if len(a.seeds) < 2:
        p.error("--seeds: at least 2 (the interpolation path runs between the first two)")
    if not (a.demo / "base" / "model").is_dir():
        p.error(f"--demo {a.demo}: no base/model inside (run `rayalign demo` first)")
    setup_logging()
    run(a.demo, a.out, a.seeds, modes, a.samples)


if __name__ == "__main__":
    main()
