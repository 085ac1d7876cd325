"""The end-to-end demo on the embedded default (README Quickstart line 1).

world -> tokenizer and preset -> pre-trained base -> N SFT seeds -> uniform soup (merge engine) -> reward model
-> PPO and SALSA from SFT-0 on Ray -> SPO and DPO -> ExPO of those four (alpha chosen by the reward model)
-> Rewarded / Bone / Personalized Soups over a preference grid (fronts, hypervolume; --quick adds Prompted-MORL)
-> gold evaluation of every model -> report.md / results.json in the run directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rayalign.config.core import load_config
from rayalign.config.schema import (
    DataConfig,
    ExpoConfig,
    LearnerConfig,
    PrefConfig,
    PretrainConfig,
    RLConfig,
    RMConfig,
    SFTConfig,
    SoupsConfig,
    WorldConfig,
)
from rayalign.distributed.cluster import connect
from rayalign.eval.gold import GoldResult, evaluate, win_rate
from rayalign.eval.plots import gold_bars, xy_lines
from rayalign.merge.engine import merge_to_disk
from rayalign.merge.spec import MergeSpec
from rayalign.models.checkpoint import load_causal_lm
from rayalign.models.presets import build_preset, n_params, train_tokenizer
from rayalign.recipes.expo import run_expo
from rayalign.recipes.ppo import run_rl
from rayalign.recipes.preference import run_preference
from rayalign.recipes.soups import render as render_soups
from rayalign.recipes.soups import run_soups
from rayalign.recipes.supervised import run_pretrain, run_rm, run_sft
from rayalign.utils.io import OutputExistsError, atomic_write_json, atomic_write_text
from rayalign.utils.logging import log
from rayalign.world.build import split_prompts
from rayalign.world.gold import OBJECTIVES


def uniform_soup(paths: list[Path], out: Path) -> Path:
    """theta_soup = (1/N) sum_i theta_i, through the streaming merge engine."""
    spec = MergeSpec(method="linear", models=[{"model": str(p), "weight": 1.0 / len(paths)} for p in paths])
    merge_to_disk(spec, out, progress=False)
    return out


# SPO and DPO in the demo: the settings of the README's SPO-vs-DPO table (experiments/spo_vs_dpo.py)
PREF_FULL = ["data.limit=1024", "epochs=1"]
# ExPO: the paper's grid (0.1-0.5, and 0 = keep theta_1); 8 samples on each of the 17 dev prompts
# (alpha >= 1 lowered gold for every model in a first sweep, while the reward model still liked it)
EXPO_FULL = ["alphas=[0,0.1,0.2,0.3,0.4,0.5]", "dev.samples_per_prompt=8"]
# soups: informative against concise, 11 preference vectors (experiments/soups_fronts.py uses the same)
SOUPS_FULL = ["objectives=[informative,concise]", "rl=[steps=20]"]
# The demo trains the soups (ours) but not their Prompted-MORL baseline: at a soup's PPO budget, with
# the paper's longer instruction prompts, it took ~205 s of a 1300 s demo on a 2-core machine. The
# baseline comparison, over 3 seeds, is experiments/soups_fronts.py; --quick still trains it (for 4
# PPO steps), so the tests run its path end to end.
DEMO_SOUPS = "methods=[rewarded,bone,personalized]"


def cpu_threads() -> list[str]:
    """RL overrides for a machine without a GPU: the learner and the reference compute on every core
    the demo may use (the RL loop runs its phases one after another), not on Ray's one thread for a
    fractional CPU. Nothing on a GPU machine."""
    import torch

    if torch.cuda.is_available():
        return []
    n = len(os.sched_getaffinity(0))
    return [f"learner.resources.cpu_threads={n}", f"reference.resources.cpu_threads={n}"]


def with_rl(soups: list[str], extra: list[str]) -> list[str]:
    """Soups overrides with `extra` added to their `rl=[...]` list (the overrides of every PPO run)."""
    inner = [o[len("rl=["):-1] for o in soups if o.startswith("rl=[")]
    return [o for o in soups if not o.startswith("rl=[")] + [f"rl=[{','.join([i for i in inner if i] + extra)}]"]


STAGES = ("preset", "pretrain", "sft", "soup", "reward_model", "ppo_salsa", "spo_dpo", "expo", "soups")


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(preset="tiny", pretrain_docs=1500, pretrain_epochs=1.0, sft_per_prompt=2, sft_epochs=1.0,
                    pairs_per_prompt=2, rm_epochs=1.0, eval_prompts=16, eval_samples=1,
                    rl=["steps=3", "prompts_per_step=16", "rollout.n=1", "rollout.max_new_tokens=16"],
                    pref=["data.limit=32", "pairs_per_step=16", "algo.kl_prompts=8", "rollout.max_new_tokens=16",
                          "learner.actor.micro_batch_size=8"],
                    expo=["alphas=[0,0.5]", "dev.prompts.limit=4", "dev.samples_per_prompt=1", "dev.max_new_tokens=16"],
                    soups=["rl=[steps=2,prompts_per_step=16,rollout.n=1,rollout.max_new_tokens=16]", "grid_points=3",
                           "bone_k=[1.0,1.2]", "test.prompts.limit=4", "test.samples_per_prompt=1",
                           "test.max_new_tokens=16", "dev.prompts.limit=4", "dev.samples_per_prompt=1",
                           "dev.max_new_tokens=16"])
    return dict(preset="small", pretrain_docs=6000, pretrain_epochs=1.5, sft_per_prompt=8, sft_epochs=3.0,
                pairs_per_prompt=48, rm_epochs=6.0, eval_prompts=None, eval_samples=4, rl=[], pref=PREF_FULL,
                expo=EXPO_FULL, soups=[*SOUPS_FULL, DEMO_SOUPS])


def run_demo(out: str | Path, quick: bool = False, resume: bool = False, seeds: tuple[int, ...] = (0, 1),
             world_seed: int = 0) -> dict[str, Any]:
    out = Path(out)
    if out.exists() and not resume:
        raise OutputExistsError(f"demo run directory already exists: {out} (pass --resume to continue it)")
    out.mkdir(parents=True, exist_ok=True)
    s = _settings(quick)
    t0 = time.time()
    timings: dict[str, float] = {}
    world = WorldConfig(seed=world_seed, pretrain_docs=s["pretrain_docs"], sft_per_prompt=s["sft_per_prompt"],
                        pairs_per_prompt=s["pairs_per_prompt"])
    prompts = split_prompts(world_seed)["test"][: s["eval_prompts"]]
    results: dict[str, GoldResult] = {}

    def stage(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)
        log.info("demo [%d/%d] %s done in %.0fs (%.0fs so far)", STAGES.index(name) + 1, len(STAGES), name,
                 timings[name], time.time() - t0)

    def gold(name: str, path: Path) -> None:
        model, tok = load_causal_lm(path)
        results[name] = evaluate(name, model, tok, prompts, n=s["eval_samples"], seed=world_seed,
                                 weights=world.weights)
        log.info("demo: gold %s: %s", name, {k: round(v, 3) for k, v in results[name].summary().items()
                                              if k in OBJECTIVES + ("combined",)})

    # 1. tokenizer and randomly initialised preset
    preset = out / "presets" / s["preset"]
    if not preset.is_dir():
        build_preset(s["preset"], preset, train_tokenizer(world_seed), seed=world_seed)
    params = n_params(load_causal_lm(preset)[0])
    gold("random-init", preset)
    stage("preset")

    # 2. pre-trained base, 3. SFT seeds
    base = run_pretrain(PretrainConfig(model=str(preset), output=str(out / "base"), world=world,
                                       epochs=s["pretrain_epochs"],
                                       learner=LearnerConfig(lr=3e-3, micro_batch_size=32, warmup_steps=20)),
                        resume=resume)
    gold("base", base)
    stage("pretrain")
    sft_paths = run_sft(SFTConfig(base=str(base), output=str(out / "sft"), seeds=list(seeds), world=world,
                                  epochs=s["sft_epochs"], learner=LearnerConfig(lr=1e-3, micro_batch_size=16,
                                                                                warmup_steps=10)),
                        resume=resume)
    for p in sft_paths:
        gold(p.name, p)
    stage("sft")

    # 4. uniform soup of the SFT seeds
    soup = out / "soup"
    if not soup.is_dir():
        uniform_soup(sft_paths, soup)
    gold("soup", soup)
    stage("soup")

    # 5. reward model on noise-free Bradley-Terry pairs
    rm = run_rm(RMConfig(base=str(sft_paths[0]), output=str(out / "rm"), world=world, epochs=s["rm_epochs"],
                         data=DataConfig(max_seq_len=96), learner=LearnerConfig(lr=5e-4, micro_batch_size=32)),
                resume=resume)
    rm_info = json.loads((rm / "rayalign.json").read_text())
    stage("reward_model")

    # 6. PPO (pi_ref = SFT-0) and SALSA (pi_ref = soup of the SFT seeds), both from SFT-0, on Ray,
    #    rewarded by the gold functions (the reward model above is a weaker proxy: see its accuracy);
    # 7. SPO (online global KL) and DPO from SFT-0 with pi_ref = SFT-0, on the same preference pairs.
    #    One Ray serves both stages.
    rl_summaries, pref_summaries = {}, {}
    expo_results: dict[str, Any] = {}
    soups: dict[str, Any] = {}
    threads = cpu_threads()
    started = connect()
    try:
        if len(sft_paths) >= 2:
            for method in ("ppo", "salsa"):
                refs = ",".join(str(p) for p in sft_paths) if method == "salsa" else ""
                cfg = load_config(RLConfig, method, [f"policy={sft_paths[0]}", f"output={out / method}",
                                                     f"reference.models=[{refs}]", f"seed={world_seed}", *s["rl"],
                                                     *threads])
                policy = run_rl(cfg, method, resume=resume)
                rl_summaries[method] = json.loads((out / method / "summary.json").read_text())
                gold(method, policy)
            stage("ppo_salsa")
        for method in ("spo", "dpo"):
            cfg = load_config(PrefConfig, "spo", [f"policy={sft_paths[0]}", f"output={out / method}",
                                                  f"seed={world_seed}", f"world.seed={world_seed}",
                                                  f"world.pairs_per_prompt={world.pairs_per_prompt}", *s["pref"],
                                                  *[t for t in threads if t.startswith("learner.")]])
            policy = run_preference(cfg, method, resume=resume)
            pref_summaries[method] = json.loads((out / method / "summary.json").read_text())
            gold(method, policy)
        stage("spo_dpo")

        # 8. ExPO of every aligned model against SFT-0, alpha chosen on dev prompts by the reward model
        for method in [*rl_summaries, *pref_summaries]:
            cfg = load_config(ExpoConfig, None, [f"sft={sft_paths[0]}", f"aligned={out / method / 'policy'}",
                                                 f"output={out / 'expo' / method}", f"reward.model={rm}",
                                                 f"seed={world_seed}", f"world.seed={world_seed}", *s["expo"]])
            expo_results[method] = run_expo(cfg, resume=resume)
            gold(f"{method}+expo", out / "expo" / method / "model")
        stage("expo")

        # 9. Rewarded / Bone / Personalized Soups (and Prompted-MORL with --quick): PPO runs, gold fronts
        cfg = load_config(SoupsConfig, None, [f"policy={sft_paths[0]}", f"output={out / 'soups'}",
                                              f"seed={world_seed}", f"world.seed={world_seed}",
                                              *with_rl(s["soups"], threads)])
        soups = run_soups(cfg, resume=resume)
        stage("soups")
    finally:
        if started:
            import ray

            ray.shutdown()

    summary = {
        "preset": s["preset"], "parameters": params, "quick": quick, "seeds": list(seeds),
        "eval_prompts": len(prompts), "samples_per_prompt": s["eval_samples"], "weights": world.weights,
        "gold": {k: v.summary() for k, v in results.items()},
        "win_rate": {f"{p.name} vs base": win_rate(results[p.name], results["base"]) for p in sft_paths}
        | {f"soup vs {sft_paths[0].name}": win_rate(results["soup"], results[sft_paths[0].name])}
        | {f"{m} vs {sft_paths[0].name}": win_rate(results[m], results[sft_paths[0].name]) for m in rl_summaries}
        | ({"salsa vs ppo": win_rate(results["salsa"], results["ppo"])} if len(rl_summaries) == 2 else {})
        | {f"{m} vs {sft_paths[0].name}": win_rate(results[m], results[sft_paths[0].name]) for m in pref_summaries}
        | {"spo vs dpo": win_rate(results["spo"], results["dpo"])}
        | {f"{m}+expo vs {m}": win_rate(results[f"{m}+expo"], results[m]) for m in expo_results},
        "expo": {m: {"alpha": r["alpha"], "curve": r["curve"],
                     "gain": results[f"{m}+expo"].summary()["combined"] - results[m].summary()["combined"]}
                 for m, r in expo_results.items()},
        "soups": soups,
        "preference": {m: {"steps": v["steps"], "pairs_per_step": v["pairs_per_step"], "data": v["data"],
                           "first": v["first"], "last": v["last"],
                           "kl_time_share": v["kl_time_share"], "mean_times": v["mean_times"]}
                       for m, v in pref_summaries.items()},
        "rl": {m: {"iterations": v["iterations"], "engine": v["engine"], "reward": v["reward"],
                   "reference": v["reference"]["models"], "first": v["first"], "last": v["last"],
                   "mean_times": v["mean_times"], "kl_hack_alarms": v["kl_hack_alarms"]}
               for m, v in rl_summaries.items()},
        "reward_model": {"heldout_accuracy": rm_info["heldout_accuracy"], "heldout_pairs": rm_info["heldout_pairs"]},
        "timings_s": timings, "wall_time_s": round(time.time() - t0, 1),
    }
    gold_bars(summary["gold"], out / "gold_rewards.png", "Gold rewards on held-out prompts")
    if expo_results:
        xy_lines({m: ([p["alpha"] for p in r["curve"]], [p["reward"] for p in r["curve"]])
                  for m, r in expo_results.items()}, out / "expo_alpha.png", "alpha",
                 "reward-model score (dev prompts)", "ExPO: reward against alpha")
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "report.md", render_report(summary))
    if soups:
        atomic_write_text(out / "serve.yaml", serve_yaml(out, soups))
    log.info("demo finished in %.0fs; report: %s", summary["wall_time_s"], out / "report.md")
    return summary


def serve_yaml(out: Path, soups: dict[str, Any]) -> str:
    """A `rayalign serve` config over the demo's soups: the Rewarded Soup experts and the Bone Soup
    backbones (each with the k chosen on dev), both over informative and concise."""
    import yaml

    objs = soups["objectives"]
    cfg = {
        "model_store": str(out.resolve()),
        "families": [
            {"name": "demo-soup", "kind": "linear", "objectives": list(objs),
             "models": [f"soups/runs/expert-{o}/policy" for o in objs],
             **({"k": rk, "base_model": "sft/sft-0"} if (rk := soups["chosen"].get("rewarded_k", 1.0)) != 1.0 else {}),
             "soups": {"informative": [1.0, 0.0], "balanced": [0.5, 0.5], "terse": [0.2, 0.8]}},
            {"name": "demo-bone", "kind": "bone_soup", "objectives": list(objs), "beta": soups["bone_beta"],
             "k": soups["chosen"]["bone_k"], "base_model": "sft/sft-0",
             "models": [f"soups/runs/backbone-{j}/policy" for j in range(len(objs))]},
        ],
    }
    return "# rayalign serve --config THIS_FILE   (written by rayalign demo)\n" + yaml.safe_dump(cfg, sort_keys=False)


def render_report(summary: dict[str, Any]) -> str:
    lines = [
        "# rayalign demo report", "",
        f"Preset `{summary['preset']}` ({summary['parameters']:,} parameters), SFT seeds {summary['seeds']}, "
        f"{summary['eval_prompts']} held-out prompts x {summary['samples_per_prompt']} samples, "
        f"combined = weights {summary['weights']} over {list(OBJECTIVES)}.", "",
        "## Gold rewards (mean ± standard error over prompts)", "",
        "![gold rewards](gold_rewards.png)", "",
        "| model | " + " | ".join(OBJECTIVES) + " | combined | mean words |",
        "|---" * (len(OBJECTIVES) + 3) + "|",
    ]
    for name, g in summary["gold"].items():
        cells = [f"{g[o]:.3f} ± {g[o + '_se']:.3f}" for o in OBJECTIVES + ("combined",)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {g['mean_words']:.1f} |")
    lines += ["", "## Gold win rates", ""] + [f"- {k}: {v:.1%}" for k, v in summary["win_rate"].items()]
    acc = summary["reward_model"]["heldout_accuracy"]
    lines += ["", "## Reward model", "",
              f"Held-out pair accuracy: {acc['all']:.1%} on {summary['reward_model']['heldout_pairs']} pairs "
              "from held-out prompts.", "",
              ""]
    if summary.get("rl"):
        lines += ["## PPO and SALSA (from SFT-0, on Ray)", "",
                  "| run | reward optimised | reference | iterations | training reward first -> last | "
                  "KL to reference (last batch, k1 sample estimate) | mean s/iteration |",
                  "|---|---|---|---|---|---|---|"]
        for m, v in summary["rl"].items():
            ref = " + ".join(Path(p).name for p in v["reference"])
            lines.append(f"| {m} ({v['engine']}) | {v['reward']} | {ref} | {v['iterations']} | "
                         f"{v['first']['reward/score']:.3f} -> "
                         f"{v['last']['reward/score']:.3f} | {v['last']['kl/sequence']:.2f} | "
                         f"{v['mean_times'].get('time/iteration', float('nan')):.1f} |")
        lines.append("")
    if summary.get("preference"):
        lines += ["## SPO and DPO (from SFT-0, pi_ref = SFT-0, the same preference pairs, on Ray)", "",
                  "They optimise no reward: their loss is on preference pairs (" +
                  next(iter(summary["preference"].values())).get("data", "the world's pairs") +
                  ", labelled by Bradley-Terry sampling on the gold combination).", "",
                  "| run | steps x pairs | pair accuracy first -> last | SPO global KL (online samples) | "
                  "global KL share of step time | mean s/step |", "|---|---|---|---|---|---|"]
        for m, v in summary["preference"].items():
            kl = f"{v['first']['global_kl']:.2f} -> {v['last']['global_kl']:.2f}" if "global_kl" in v["last"] else "–"
            share = f"{v['kl_time_share']:.0%}" if v["kl_time_share"] is not None else "–"
            lines.append(f"| {m} | {v['steps']} x {v['pairs_per_step']} | {v['first']['accuracy']:.2f} -> "
                         f"{v['last']['accuracy']:.2f} | {kl} | {share} | {v['mean_times']['time/step']:.2f} |")
        lines.append("")
    if summary.get("expo"):
        lines += ["## ExPO (theta_2 = theta_1 + alpha (theta_1 - SFT-0), alpha chosen on dev prompts by the reward "
                  "model)", "", "![ExPO: reward against alpha](expo_alpha.png)", "",
                  "| model | chosen alpha | dev reward-model score at alpha = " +
                  ", ".join(str(p["alpha"]) for p in next(iter(summary["expo"].values()))["curve"]) +
                  " | gold (test) theta_1 -> theta_2 | gain | theta_2 wins vs theta_1 |", "|---|---|---|---|---|---|"]
        for m, v in summary["expo"].items():
            g1, g2 = summary["gold"][m]["combined"], summary["gold"][f"{m}+expo"]["combined"]
            lines.append(f"| {m} | {v['alpha']} | " + ", ".join(f"{p['reward']:.3f}" for p in v["curve"]) +
                         f" | {g1:.3f} -> {g2:.3f} | {v['gain']:+.3f} | {summary['win_rate'][f'{m}+expo vs {m}']:.1%} |")
        lines.append("")
    if summary.get("soups"):
        lines += [render_soups(summary["soups"], heading="##", images="soups/"), ""]
    lines += ["## Wall time", ""] + [f"- {k}: {v:.0f} s" for k, v in summary["timings_s"].items()]
    lines.append(f"- total: {summary['wall_time_s']:.0f} s")
    return "\n".join(lines) + "\n"

