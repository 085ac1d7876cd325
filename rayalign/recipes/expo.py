"""ExPO (Zheng et al. 2024, papers/expo-weak-to-strong-extrapolation.txt): extrapolate an aligned
model away from the SFT model it was trained from,

    theta_2 = theta_1 + alpha (theta_1 - theta_0),

with alpha chosen on a dev prompt set: each candidate's rollouts are scored by a reward model (or,
on the embedded world, the gold functions) and the best mean reward wins -- among the candidates
whose gain over alpha = 0 (theta_1 kept) is larger than `min_gain_se` paired standard errors, so a
noisy reward model does not move the model on a gain it cannot tell from noise.

    rayalign expo sft=runs/sft/sft-0 aligned=runs/dpo/policy output=runs/dpo-expo reward.model=runs/rm/model
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rayalign.config.core import dump_config
from rayalign.config.schema import ExpoConfig, ScorerConfig, WorldConfig
from rayalign.eval.merged import MergedModel, sample_flat
from rayalign.eval.plots import xy_lines
from rayalign.merge.engine import merge_to_disk
from rayalign.merge.spec import MergeSpec
from rayalign.recipes.ppo import gold_of, load_prompts
from rayalign.reward.scorer import RewardScorer
from rayalign.utils.io import atomic_write_json, atomic_write_text, claim_output
from rayalign.utils.logging import log

# relative distance ||theta_1 - theta_0|| / ||theta_0|| above which the two do not look like an
# SFT -> aligned pair (alignment moves weights by a few percent; unrelated models by ~100%)
PAIR_DISTANCE_WARN = 0.5


def pair_distance(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor]) -> float:
    """||theta_1 - theta_0|| / ||theta_0|| over every floating-point tensor."""
    diff = norm = 0.0
    for name, t0 in theta0.items():
        if t0.is_floating_point():
            diff += float((theta1[name].double() - t0.double()).pow(2).sum())
            norm += float(t0.double().pow(2).sum())
    return math.sqrt(diff / norm) if norm > 0 else float("inf")


def check_pair(distance: float, sft: str, aligned: str) -> str | None:
    """A warning when theta_0 / theta_1 do not look like an SFT model and a model aligned from it."""
    if distance == 0.0:
        msg = f"ExPO: {aligned} has the same weights as {sft}; extrapolation does nothing"
    elif distance > PAIR_DISTANCE_WARN:
        msg = (f"ExPO: {aligned} is far from {sft} (relative distance {distance:.2f} > {PAIR_DISTANCE_WARN}); "
               "they do not look like an SFT model and a model aligned from it")
    else:
        return None
    log.warning(msg)
    return msg


def choose_alpha(curve: list[dict[str, float]], per_prompt: dict[float, np.ndarray], min_gain_se: float) -> float:
    """The alpha of the best mean dev reward, among those whose gain over the smallest alpha (theta_1
    when 0 is on the grid) exceeds `min_gain_se` paired standard errors (same prompts, same sampling
    seed); the smallest alpha when none does. Records gain and its standard error on the curve."""
    base = min(per_prompt)
    ok = []
    for p in curve:
        diff = per_prompt[p["alpha"]] - per_prompt[base]
        p["gain"] = float(diff.mean())
        p["gain_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        if p["alpha"] == base or p["gain"] > min_gain_se * p["gain_se"]:
            ok.append(p)
    return max(ok, key=lambda p: (p["reward"], -p["alpha"]))["alpha"]


def make_scorer(reward: ScorerConfig, world: WorldConfig) -> RewardScorer:
    weights = reward.weights if reward.weights is not None else (world.weights if reward.kind == "gold" else None)
    return RewardScorer(reward.kind, reward.model, weights)


def run_expo(cfg: ExpoConfig, resume: bool = False) -> dict[str, Any]:
    """Search alpha, write OUTPUT/model (theta_2 at the chosen alpha) and OUTPUT/expo.json."""
    out = Path(cfg.output)
    claim_output(out, resume)
    if (out / "expo.json").is_file() and (out / "model").is_dir():
        log.info("expo: %s already finished; kept", out)
        return json.loads((out / "expo.json").read_text())
    prompts = load_prompts(cfg.dev.prompts, cfg.world.seed)
    merged = MergedModel([cfg.sft, cfg.aligned])  # refuses models of different architectures / vocabularies
    distance = pair_distance(merged.sources[0], merged.sources[1])
    warning = check_pair(distance, cfg.sft, cfg.aligned)
    scorer = make_scorer(cfg.reward, cfg.world)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", "# rayalign expo\n" + dump_config(cfg))

    d = cfg.dev
    curve: list[dict[str, float]] = []
    per_prompt: dict[float, np.ndarray] = {}
    gold_pp: dict[float, np.ndarray] = {}
    for alpha in tqdm(cfg.alphas, desc="expo alpha"):
        model = merged.set([-alpha, 1.0 + alpha])
        flat_p, flat_r = sample_flat(model, merged.tok, prompts, d.samples_per_prompt, d.max_new_tokens,
                                     d.temperature, cfg.seed, top_p=d.top_p, top_k=d.top_k)
        reward = scorer.score(flat_p, flat_r)["combined"].reshape(len(prompts), -1).mean(1)
        point = {"alpha": alpha, "reward": float(reward.mean()),
                 "reward_se": float(reward.std(ddof=1) / math.sqrt(len(reward))) if len(reward) > 1 else 0.0,
                 "mean_words": float(np.mean([len(r.split()) for r in flat_r]))}
        gold = gold_of(flat_p, flat_r) if scorer.kinds != ["gold"] else None
        if gold is not None:  # the world's truth on the same rollouts, for the report (not for the choice)
            gold_pp[alpha] = (gold @ np.asarray(cfg.world.weights)).reshape(len(prompts), -1).mean(1)
            point["gold"] = float(gold_pp[alpha].mean())
        curve.append(point)
        per_prompt[alpha] = reward
        log.info("expo: alpha %.2f -> dev reward %.4f", alpha, point["reward"])
    best = choose_alpha(curve, per_prompt, cfg.min_gain_se)
    # what the same rule would choose if the dev rollouts were judged by the truth (reported, not used)
    gold_alpha = choose_alpha([{"alpha": p["alpha"], "reward": p["gold"]} for p in curve], gold_pp,
                              cfg.min_gain_se) if gold_pp else None

    spec = MergeSpec(method="expo", models=[{"model": cfg.aligned}], base_model=cfg.sft, alpha=best)
    merge_to_disk(spec, out / "model", progress=False, overwrite=resume)
    result = {"sft": cfg.sft, "aligned": cfg.aligned, "alpha": best, "curve": curve, "distance": distance,
              "warning": warning, "scorer": cfg.reward.kind, "gold_alpha": gold_alpha, "dev_prompts": len(prompts),
              "samples_per_prompt": d.samples_per_prompt}
    series = {f"dev reward ({cfg.reward.kind})": ([p["alpha"] for p in curve], [p["reward"] for p in curve])}
    if "gold" in curve[0]:
        series["dev gold (same rollouts)"] = ([p["alpha"] for p in curve], [p["gold"] for p in curve])
    xy_lines(series, out / "reward_vs_alpha.png", "alpha", "mean reward", f"ExPO: chosen alpha = {best}")
    atomic_write_json(out / "expo.json", result)
    log.info("expo: chosen alpha %.2f; wrote %s", best, out / "model")
    return result
