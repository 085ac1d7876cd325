"""LoRA against full-weight training on the embedded default, several seeds, equal budgets.

    python -m rayalign.experiments.lora_vs_full --demo runs/demo-... --out runs/lora-vs-full

For every seed, from the demo's SFT-0 (the `small` preset in a full demo), with the same steps,
prompts, samples and sampling settings for both variants:

    ppo    `rayalign train ppo` (configs/ppo.yaml, pi_ref = SFT-0, gold reward): full actor and critic
           against a LoRA actor and critic (rank --rank on every linear projection; pi_ref from
           the adapter-disabled policy); gold and KL to SFT-0 on the test prompts
    spo    `rayalign train spo` (configs/spo.yaml, the demo's settings): full against LoRA; gold and KL
    soups  `rayalign soups` with Rewarded and Bone Soups (the demo's soups settings): full-weight experts
           and backbones against LoRA ones; hypervolume of the gold fronts on the test prompts

LoRA learning rates are --lr-scale times the full ones (LoRA's usual practice: the adapter starts at
zero and its updates are scaled by alpha / r); everything else is equal. Writes OUT/report.md and
OUT/results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rayalign.config.core import load_config
from rayalign.config.schema import PrefConfig, RLConfig, SoupsConfig
from rayalign.distributed.cluster import connect
from rayalign.eval.gold import evaluate
from rayalign.eval.kl import sequence_kl
from rayalign.experiments.common import check_demo, demo_parser, write_report
from rayalign.models.checkpoint import load_causal_lm
from rayalign.recipes.demo import PREF_FULL, SOUPS_FULL, with_rl
from rayalign.recipes.ppo import run_rl
from rayalign.recipes.preference import run_preference
from rayalign.recipes.soups import run_soups
from rayalign.utils.logging import log, setup_logging
from rayalign.world.build import split_prompts

VARIANTS = ("full", "lora")


def lora_overrides(prefix: str, rank: int, lr: float) -> list[str]:
    return [f"{prefix}.lora.r={rank}", f"{prefix}.lora.alpha={2 * rank}", f"{prefix}.lr={lr}"]


def gold_and_kl(sft: Path, policy: Path, seed: int, samples: int) -> dict[str, float]:
    prompts = split_prompts(0)["test"]
    model, tok = load_causal_lm(policy)
    ref, _ = load_causal_lm(sft)
    g = evaluate(policy.parent.name, model, tok, prompts, n=samples, seed=seed).summary()
    kl = sequence_kl(model, ref, tok, prompts, n=2, max_new_tokens=40, seed=seed)
    return {"gold": g["combined"], "gold_se": g["combined_se"], "kl": kl.mean, "kl_se": kl.se}


def run(demo: Path, out: Path, seeds: list[int], rank: int, lr_scale: float, samples: int,
        parts: list[str]) -> dict[str, Any]:
    sft = demo / "sft" / "sft-0"
    rl_base = load_config(RLConfig, "ppo", [f"policy={sft}", "output=unused"])
    pref_base = load_config(PrefConfig, "spo", [f"policy={sft}", "output=unused"])
    per_seed: dict[str, dict[str, dict[int, Any]]] = {p: {v: {} for v in VARIANTS} for p in parts}
    started = connect()
    try:
        for s in seeds:
            for v in VARIANTS:
                if "ppo" in parts:
                    extra = [] if v == "full" else [
                        *lora_overrides("learner.actor", rank, rl_base.learner.actor.lr * lr_scale),
                        *lora_overrides("learner.critic", rank, rl_base.learner.critic.lr * lr_scale)]
                    cfg = load_config(RLConfig, "ppo", [f"policy={sft}", f"output={out / 'ppo' / f'{v}-{s}'}",
                                                        f"seed={s}", *extra])
                    log.info("lora-vs-full: ppo %s seed %d", v, s)
                    policy = run_rl(cfg, "ppo", resume=True)
                    per_seed["ppo"][v][s] = gold_and_kl(sft, policy, s, samples)
                if "spo" in parts:
                    extra = [] if v == "full" else lora_overrides("learner.actor", rank,
                                                                  pref_base.learner.actor.lr * lr_scale)
                    cfg = load_config(PrefConfig, "spo", [f"policy={sft}", f"output={out / 'spo' / f'{v}-{s}'}",
                                                          f"seed={s}", "world.pairs_per_prompt=48", *PREF_FULL, *extra])
                    log.info("lora-vs-full: spo %s seed %d", v, s)
                    policy = run_preference(cfg, "spo", resume=True)
                    per_seed["spo"][v][s] = gold_and_kl(sft, policy, s, samples)
                if "soups" in parts:
                    extra = [] if v == "full" else [f"lora.r={rank}", f"lora.alpha={2 * rank}"]
                    rl_extra = [] if v == "full" else [f"learner.actor.lr={rl_base.learner.actor.lr * lr_scale}"]
                    cfg = load_config(SoupsConfig, None, [
                        f"policy={sft}", f"output={out / 'soups' / f'{v}-{s}'}", f"seed={s}", "methods=[rewarded,bone]",
                        *with_rl(SOUPS_FULL, rl_extra), *extra])
                    log.info("lora-vs-full: soups %s seed %d", v, s)
                    res = run_soups(cfg, resume=True)
                    per_seed["soups"][v][s] = {m: res["methods"][m]["hypervolume"] for m in ("rewarded", "bone")}
                    per_seed["soups"][v][s]["bone_k"] = res["chosen"]["bone_k"]
    finally:
        if started:
            import ray

            ray.shutdown()
    return {"seeds": seeds, "rank": rank, "lr_scale": lr_scale, "samples": samples, "per_seed": per_seed,
            "summary": summarise(per_seed)}


def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}


def summarise(per_seed: dict[str, dict[str, dict[int, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part, by_variant in per_seed.items():
        keys = ("gold", "kl") if part in ("ppo", "spo") else ("rewarded", "bone")
        out[part] = {v: {k: _ms([r[k] for r in rows.values()]) for k in keys} for v, rows in by_variant.items() if rows}
        if all(by_variant[v] for v in VARIANTS):
            seeds = sorted(by_variant["full"])
            out[part]["lora_minus_full"] = {k: _ms([by_variant["lora"][s][k] - by_variant["full"][s][k] for s in seeds])
                                            for k in keys}
    return out


def render(r: dict[str, Any]) -> str:
    f = lambda m: f"{m['mean']:.4f} ± {m['std']:.4f}"
    lines = ["# LoRA against full-weight training on the embedded default", "",
             f"Seeds {r['seeds']}; LoRA rank {r['rank']} on every linear projection (alpha = 2r), learning rates "
             f"x{r['lr_scale']:g} the full ones; equal steps, prompts, samples and sampling. Gold on the world's test "
             f"prompts ({r['samples']} samples each), KL(policy || SFT-0) per sequence; mean ± sd over seeds.", ""]
    s = r["summary"]
    for part in ("ppo", "spo"):
        if part not in s:
            continue
        lines += [f"## {part.upper()}", "", "| variant | gold (combined) | KL to SFT-0 | per seed gold |", "|---|---|---|---|"]
        for v in VARIANTS:
            if v in s[part]:
                per = ", ".join(f"{x['gold']:.3f}" for x in r["per_seed"][part][v].values())
                lines.append(f"| {v} | {f(s[part][v]['gold'])} | {f(s[part][v]['kl'])} | {per} |")
        if "lora_minus_full" in s[part]:
            d = s[part]["lora_minus_full"]
            lines += ["", f"LoRA minus full, paired by seed: gold {f(d['gold'])}, KL {f(d['kl'])}."]
        lines.append("")
    if "soups" in s:
        lines += ["## Rewarded and Bone Soups", "", "| experts | Rewarded Soups hypervolume | Bone Soups hypervolume | "
                  "Bone k per seed |", "|---|---|---|---|"]
        for v in VARIANTS:
            if v in s["soups"]:
                ks = ", ".join(str(x["bone_k"]) for x in r["per_seed"]["soups"][v].values())
                lines.append(f"| {v} | {f(s['soups'][v]['rewarded'])} | {f(s['soups'][v]['bone'])} | {ks} |")
        if "lora_minus_full" in s["soups"]:
            d = s["soups"]["lora_minus_full"]
            lines += ["", f"LoRA minus full, paired by seed: Rewarded {f(d['rewarded'])}, Bone {f(d['bone'])}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = demo_parser(__doc__ or "", "sft/sft-0")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr-scale", type=float, default=10.0)
    p.add_argument("--samples", type=int, default=4, help="gold samples per test prompt")
    p.add_argument("--parts", nargs="+", choices=["ppo", "spo", "soups"], default=["ppo", "spo", "soups"])
    a = p.parse_args()
    check_demo(p, a.demo, "sft/sft-0")
    setup_logging()
    r = run(a.demo, a.out, a.seeds, a.rank, a.lr_scale, a.samples, a.parts)
    a.out.mkdir(parents=True, exist_ok=True)
    write_report(a.out, r, render(r))


if __name__ == "__main__":
    main()
