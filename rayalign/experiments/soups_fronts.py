"""Bone Soups against Rewarded Soups, Personalized Soups and Prompted-MORL on the embedded default,
several seeds (the comparisons of arXiv 2502.10762).

    python -m rayalign.experiments.soups_fronts --demo runs/demo-... --out runs/soups-fronts

For every seed, `rayalign soups` from the demo's SFT-0 (objectives informative and concise, 11
preference vectors): Rewarded Soups' experts learn from the gold objectives; Personalized Soups'
experts from a learned reward model with one head per objective (trained here once, from SFT-0,
on noise-free per-objective pairs), as in the paper's pipeline; Bone Soups' backbones from
h = B r; Prompted-MORL from mu . r with the paper's per-objective instructions in a system message
and the PPO steps of all of a soup's experts together. Rewarded and Bone Soups are each reported at
k = 1 and with their extrapolation k chosen on dev from the same candidates. Reported over seeds:
hypervolume, controllability and gold win rates (mean and standard deviation).

Writes OUT/report.md, OUT/results.json and OUT/fronts.png (every seed's fronts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rayalign.config.core import load_config
from rayalign.config.schema import DataConfig, LearnerConfig, RMConfig, SoupsConfig, WorldConfig
from rayalign.eval.plots import pareto_fronts
from rayalign.experiments.common import check_demo, demo_parser, write_report
from rayalign.recipes.demo import SOUPS_FULL
from rayalign.recipes.soups import LABELS, run_soups
from rayalign.recipes.supervised import run_rm
from rayalign.utils.logging import log, setup_logging


def per_objective_reward_model(demo: Path, out: Path) -> Path:
    """One head per objective, with the demo reward model's settings (so Personalized Soups learn
    from a proxy of the same quality as the demo's)."""
    world = WorldConfig(pairs_per_prompt=48)
    return run_rm(RMConfig(base=str(demo / "sft" / "sft-0"), output=str(out / "rm-each"), objectives="each",
                           world=world, epochs=1.0, data=DataConfig(max_seq_len=96),
                           learner=LearnerConfig(lr=5e-4, micro_batch_size=32)), resume=True)


def run(demo: Path, out: Path, seeds: list[int], overrides: list[str]) -> dict[str, Any]:
    probe = load_config(SoupsConfig, None, ["policy=unused", "output=unused", *SOUPS_FULL, *overrides])
    rm_info: dict[str, Any] = {}
    with_rm: list[str] = []
    if "personalized" in probe.methods:  # its experts learn from a reward model, trained once
        rm = per_objective_reward_model(demo, out)
        rm_info = json.loads((rm / "rayalign.json").read_text())
        with_rm = [f"personalized_reward_model={rm}"]
    per_seed = {}
    for s in seeds:
        cfg = load_config(SoupsConfig, None, [f"policy={demo / 'sft' / 'sft-0'}", f"output={out / f'seed-{s}'}",
                                              f"seed={s}", *with_rm, *SOUPS_FULL, *overrides])
        log.info("experiment: soups seed %d", s)
        per_seed[s] = run_soups(cfg, resume=True)
    return aggregate(per_seed, rm_info)


def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}


def aggregate(per_seed: dict[int, dict[str, Any]], rm_info: dict[str, Any]) -> dict[str, Any]:
    first = next(iter(per_seed.values()))
    methods = list(first["methods"])
    table = {m: {"hypervolume": _ms([r["methods"][m]["hypervolume"] for r in per_seed.values()]),
                 "controllability": _ms([r["methods"][m]["controllability"]["mean"] for r in per_seed.values()]),
                 "win_rate_vs_sft": _ms([r["methods"][m]["win_rate_vs_sft"] for r in per_seed.values()]),
                 "hypervolume_per_seed": [r["methods"][m]["hypervolume"] for r in per_seed.values()]}
             for m in methods}
    k1 = list(first.get("at_k1", {}))
    table.update({f"{m}_k1": {"hypervolume": _ms([r["at_k1"][m]["hypervolume"] for r in per_seed.values()]),
                              "controllability": _ms([r["at_k1"][m]["controllability"]["mean"] for r in per_seed.values()]),
                              "win_rate_vs_sft": _ms([r["at_k1"][m]["win_rate_vs_sft"] for r in per_seed.values()]),
                              "hypervolume_per_seed": [r["at_k1"][m]["hypervolume"] for r in per_seed.values()]}
                  for m in k1})
    bone_wins = [r["pairwise"]["bone vs rewarded"] for r in per_seed.values() if "bone vs rewarded" in r["pairwise"]]
    k1_wins = [r["pairwise"]["bone vs rewarded, both at k = 1"] for r in per_seed.values()
               if "bone vs rewarded, both at k = 1" in r["pairwise"]]
    hv_diff = {name: _ms([r[a]["bone"]["hypervolume"] - r[a]["rewarded"]["hypervolume"] for r in per_seed.values()])
               for name, a in (("chosen k", "methods"), ("k = 1", "at_k1")) if {"bone", "rewarded"} <= set(first[a])}
    return {"seeds": list(per_seed), "objectives": first["objectives"], "reference_point": first["reference_point"],
            "grid_points": len(first["grid"]), "methods": table,
            "bone_over_rewarded_hv_seeds": sum(r["methods"]["bone"]["hypervolume"] > r["methods"]["rewarded"]["hypervolume"]
                                               for r in per_seed.values()) if {"bone", "rewarded"} <= set(methods) else None,
            "bone_vs_rewarded_win_rate": _ms(bone_wins) if bone_wins else None,
            "bone_k": [r["chosen"].get("bone_k") for r in per_seed.values()],
            "rewarded_k": [r["chosen"].get("rewarded_k") for r in per_seed.values()],
            "bone_vs_rewarded_k1_win_rate": _ms(k1_wins) if k1_wins else None,
            "bone_minus_rewarded_hypervolume": hv_diff,
            "objective_std_sft": first.get("objective_std_sft"),
            "morl_run": first.get("training_runs", {}).get("morl"),
            "per_objective_rm_accuracy": rm_info.get("heldout_accuracy"),
            "per_seed": per_seed}


def render(r: dict[str, Any]) -> str:
    lines = ["# Soups over preferences: Bone vs Rewarded vs Personalized Soups vs Prompted-MORL", "",
             f"Seeds {r['seeds']}; objectives {r['objectives']}; {r['grid_points']} preference vectors; gold rewards "
             f"on the test prompts; hypervolume against {r['reference_point']}. k chosen on dev, per seed: Bone "
             f"{r['bone_k']}, Rewarded {r.get('rewarded_k')}."
             + (f" Personalized Soups learn from a reward model with one head per objective (held-out accuracy "
                f"{r['per_objective_rm_accuracy']})." if r.get("per_objective_rm_accuracy") else "")
             + f" Prompted-MORL's run: {r.get('morl_run')}.", "", "![fronts](fronts.png)", "",
             "| method | hypervolume (mean ± sd) | per seed | controllability (mean Spearman) | gold win rate vs SFT |",
             "|---|---|---|---|---|"]
    for m, v in r["methods"].items():
        h, c, w = v["hypervolume"], v["controllability"], v["win_rate_vs_sft"]
        label = f"{LABELS[m[:-3]]}, k = 1" if m.endswith("_k1") else LABELS[m] + (
            ", k chosen on dev" if m in ("rewarded", "bone") else "")
        lines.append(f"| {label} | {h['mean']:.4f} ± {h['std']:.4f} | "
                     + ", ".join(f"{x:.4f}" for x in v["hypervolume_per_seed"])
                     + f" | {c['mean']:.3f} ± {c['std']:.3f} | {w['mean']:.1%} ± {w['std']:.1%} |")
    if r.get("bone_vs_rewarded_win_rate"):
        b = r["bone_vs_rewarded_win_rate"]
        lines += ["", f"Bone over Rewarded Soups: higher hypervolume in {r['bone_over_rewarded_hv_seeds']} of "
                  f"{len(r['seeds'])} seeds; mu . r win rate over the grid {b['mean']:.1%} ± {b['std']:.1%}."]
    if r.get("bone_vs_rewarded_k1_win_rate"):
        b = r["bone_vs_rewarded_k1_win_rate"]
        lines.append(f"Both at k = 1: mu . r win rate of Bone over Rewarded {b['mean']:.1%} ± {b['std']:.1%}.")
    for name, d in (r.get("bone_minus_rewarded_hypervolume") or {}).items():
        lines.append(f"Bone minus Rewarded hypervolume, {name}: {d['mean']:+.4f} ± {d['std']:.4f} (sd over seeds).")
    if r.get("objective_std_sft"):
        lines.append("Objective spread under SFT (sd over test samples): " + ", ".join(
            f"{o} {s:.3f}" for o, s in zip(r["objectives"], r["objective_std_sft"])) + ".")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path) -> None:
    """Every seed's fronts: one colour per method, one line style per seed."""
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    dashes = ["-", "--", ":", "-."]
    fronts, styles = {}, {}
    for k, (s, res) in enumerate(r["per_seed"].items()):
        for c, m in enumerate(res["methods"]):
            name = f"{LABELS[m]} (seed {s})"
            fronts[name] = np.asarray(res["methods"][m]["front"])
            styles[name] = {"color": colours[c % 4], "linestyle": dashes[k % 4],
                            "label": LABELS[m] if k == 0 else None}
    pareto_fronts(fronts, r["objectives"], out, "Gold fronts; line style = seed",
                  points={"SFT": np.asarray(next(iter(r["per_seed"].values()))["sft"])},
                  reference=np.asarray(r["reference_point"]), styles=styles)


def main() -> None:
    p = demo_parser(__doc__, "sft/sft-0")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the soups config, e.g. grid_points=6")
    a = p.parse_args()
    check_demo(p, a.demo, "sft/sft-0")
    setup_logging()
    r = run(a.demo, a.out, a.seeds, a.overrides)
    plot(r, a.out / "fronts.png")
    write_report(a.out, r, render(r))


if __name__ == "__main__":
    main()
