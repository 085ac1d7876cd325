"""Soups over preferences: Rewarded Soups, Bone Soups, Personalized Soups and the Prompted-MORL
baseline, trained on Ray and compared by their Pareto fronts (arXiv 2306.04488, 2502.10762, 2310.11564).

    rayalign soups policy=runs/demo/sft/sft-0 output=runs/soups objectives=[informative,concise]

Training (every run is PPO from the same SFT model, through `run_rl`):
    rewarded      one expert per objective i, rewarded by r_i; merged with theta = sum_i mu_i theta_i
    bone          backbone j rewarded by h_j = (B r)_j; merged with lambda = B^-1 mu (negative entries
                  kept), optionally extrapolated against SFT: k sum_j lambda_j theta_j + (1 - k) theta_SFT,
                  k chosen on the dev split by hypervolume
    personalized  one expert per objective trained on a learned reward model's head i (the paper's
                  pipeline), merged like rewarded; without a reward model the experts are Rewarded Soups'
    morl          one policy on mu . r, mu told in a system message: by default the paper's
                  per-objective instructions (arXiv 2310.11564), with as many PPO steps as one soup's
                  experts together

Rewarded Soups get the same extrapolation against SFT as Bone Soups (k chosen on dev from
`rewarded_k`, by default Bone's candidates), and both are also reported at k = 1, so the two soups
are compared with and without it.

Evaluation: for every mu of the preference grid, the method's model generates on the test prompts
and the gold functions score every objective. A method's front is its mean gold vector per mu;
reported are hypervolume (pymoo) against a stated reference point, controllability (Spearman of mu_i
against achieved r_i) and the gold win rate on mu . r against the SFT model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rayalign.config.core import dump_config, load_config
from rayalign.config.schema import RLConfig, SoupsConfig
from rayalign.distributed.cluster import connect
from rayalign.eval.merged import MergedModel, rollout_scores
from rayalign.eval.pareto import controllability, hypervolume, preference_grid
from rayalign.eval.plots import pareto_fronts, xy_lines
from rayalign.merge.methods import BoneSoup, merge_method
from rayalign.models.checkpoint import load_causal_lm
from rayalign.recipes.ppo import load_prompts, run_rl
from rayalign.reward.conditioning import PreferenceConditioning
from rayalign.reward.scorer import RewardScorer
from rayalign.utils.io import atomic_write_json, atomic_write_text, claim_output
from rayalign.utils.logging import log
from rayalign.world.gold import OBJECTIVES

LABELS = {"rewarded": "Rewarded Soups", "bone": "Bone Soups", "personalized": "Personalized Soups",
          "morl": "Prompted-MORL"}


def _on(objectives: list[str], values: np.ndarray | list[float], all_objectives: list[str]) -> list[float]:
    """A vector over `objectives` spread onto `all_objectives` (zeros elsewhere)."""
    full = np.zeros(len(all_objectives))
    for o, v in zip(objectives, values):
        full[all_objectives.index(o)] = v
    return [round(float(x), 10) for x in full]


def _heads(reward_model: str) -> list[str]:
    cfg = json.loads((Path(reward_model) / "config.json").read_text())
    k = len(cfg["id2label"]) if "id2label" in cfg else int(cfg.get("num_labels", 1))  # HF stores id2label
    if k < 2:
        raise ValueError(f"personalized_reward_model {reward_model} has one head; Personalized Soups need one head per "
                         "objective (train it with `rayalign rm objectives=each`)")
    return list(OBJECTIVES[:k])


def training_runs(cfg: SoupsConfig) -> dict[str, list[str]]:
    """Every PPO run the requested methods need: run name -> RL config overrides."""
    objs, k = cfg.objectives, len(cfg.objectives)
    eye = np.eye(k)
    runs: dict[str, list[str]] = {}
    if "rewarded" in cfg.methods or ("personalized" in cfg.methods and not cfg.personalized_reward_model):
        for i, o in enumerate(objs):
            runs[f"expert-{o}"] = [f"reward.weights={_on(objs, eye[i], list(OBJECTIVES))}"]
    if "personalized" in cfg.methods and cfg.personalized_reward_model:
        heads = _heads(cfg.personalized_reward_model)
        missing = [o for o in objs if o not in heads]
        if missing:
            raise ValueError(f"personalized_reward_model has heads {heads}, not the objectives {missing}")
        for i, o in enumerate(objs):
            runs[f"personal-{o}"] = ["reward.kind=model", f"reward.model={cfg.personalized_reward_model}",
                                     f"reward.weights={_on(objs, eye[i], heads)}", f"critic={cfg.policy}"]
    if "bone" in cfg.methods:
        B = BoneSoup.backbone_matrix(k, cfg.bone_beta)
        for j in range(k):
            runs[f"backbone-{j}"] = [f"reward.weights={_on(objs, B[j], list(OBJECTIVES))}"]
    if "morl" in cfg.methods:
        runs["morl"] = ["reward.conditioning=prompt", f"reward.conditioned_objectives=[{','.join(objs)}]",
                        f"reward.condition_grid={cfg.grid_points}", f"reward.condition_style={cfg.morl_prompts}"]
        if cfg.morl_budget == "matched":  # one policy gets the PPO steps of all of a soup's experts together
            steps = load_config(RLConfig, cfg.rl_config, ["policy=unused", "output=unused", *cfg.rl]).steps
            runs["morl"].append(f"steps={k * steps}")
    return runs


def lora_overrides(cfg: SoupsConfig) -> list[str]:
    """The soups' `lora` block as overrides of every PPO run's actor (experts become adapters)."""
    if not cfg.lora.enabled:
        return []
    lo = cfg.lora
    return [f"learner.actor.lora.r={lo.r}", f"learner.actor.lora.alpha={lo.alpha}",
            f"learner.actor.lora.dropout={lo.dropout}", f"learner.actor.lora.target_modules=[{','.join(lo.target_modules)}]"]


def train(cfg: SoupsConfig, out: Path, resume: bool) -> dict[str, Path]:
    """All PPO runs, one after another on one Ray; a finished run is kept when resuming."""
    policies: dict[str, Path] = {}
    started = connect(cfg.ray_address)
    try:
        for name, overrides in training_runs(cfg).items():
            rl = load_config(RLConfig, cfg.rl_config, [f"policy={cfg.policy}", f"output={out / 'runs' / name}",
                                                       f"seed={cfg.seed}", f"world.seed={cfg.world.seed}",
                                                       *lora_overrides(cfg), *cfg.rl, *overrides])
            log.info("soups: PPO run %s (%s)", name, " ".join(overrides))
            policies[name] = run_rl(rl, "ppo", resume=resume)
    finally:
        if started:
            import ray

            ray.shutdown()
    return policies


class FrontEvaluator:
    """Rollouts of one model per preference vector, scored by the gold functions on every objective."""

    def __init__(self, cfg: SoupsConfig, split: str):
        self.cfg = cfg
        self.ev = cfg.test if split == "test" else cfg.dev
        self.prompts = load_prompts(self.ev.prompts, cfg.world.seed)
        self.scorer = RewardScorer("gold")
        self.index = [list(OBJECTIVES).index(o) for o in cfg.objectives]

    def scores(self, model: Any, tok: Any, inputs: list[Any] | None = None) -> np.ndarray:
        """[P, n, K] gold scores over all the world's objectives (common random numbers: one seed)."""
        return rollout_scores(model, tok, self.prompts, self.scorer, n=self.ev.samples_per_prompt,
                              max_new_tokens=self.ev.max_new_tokens, temperature=self.ev.temperature,
                              seed=self.cfg.seed, inputs=inputs)

    def front(self, grid: np.ndarray, model_for: Callable[[np.ndarray], tuple[Any, Any, list[Any] | None]],
              desc: str) -> np.ndarray:
        """[G, P, n, K] scores of the model each preference vector gets."""
        out = []
        for mu in tqdm(grid, desc=desc, leave=False):
            model, tok, inputs = model_for(mu)
            out.append(self.scores(model, tok, inputs))
        return np.stack(out)

    def mean_front(self, scores: np.ndarray) -> np.ndarray:
        return scores.mean(axis=(1, 2))[:, self.index]


def win_rate_at(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    """P(a's mu-weighted gold reward > b's) over matched (prompt, sample) pairs; ties count 1/2."""
    ca, cb = a @ w, b @ w
    return float(np.mean((ca > cb) + 0.5 * (ca == cb)))


def run_soups(cfg: SoupsConfig, resume: bool = False) -> dict[str, Any]:
    out = Path(cfg.output)
    claim_output(out, resume)
    if (out / "results.json").is_file():
        log.info("soups: %s already finished; kept", out)
        return json.loads((out / "results.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", "# rayalign soups\n" + dump_config(cfg))
    policies = train(cfg, out, resume)
    results = evaluate_fronts(cfg, policies, out)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", render(results))
    log.info("soups: wrote %s", out / "report.md")
    return results


def evaluate_fronts(cfg: SoupsConfig, policies: dict[str, Path], out: Path) -> dict[str, Any]:
    """Every method's gold front over the preference grid (test prompts), Bone Soup's k chosen on the
    dev prompts; writes OUT/fronts.png, OUT/controllability.png and OUT/scores.npz."""
    objs, k = cfg.objectives, len(cfg.objectives)
    grid = preference_grid(k, cfg.grid_points)
    ref = np.asarray(cfg.reference_point if cfg.reference_point is not None else [-0.1] * k)
    test, dev = FrontEvaluator(cfg, "test"), FrontEvaluator(cfg, "dev")
    sft_model, tok = load_causal_lm(cfg.policy)
    sft_scores = test.scores(sft_model, tok)
    scores: dict[str, np.ndarray] = {}
    chosen: dict[str, Any] = {}

    soup_fronts: dict[tuple[str, ...], np.ndarray] = {}
    at_k1: dict[str, np.ndarray] = {}

    def soup_front(prefix: str, desc: str) -> np.ndarray:
        """theta = sum_i mu_i theta_i over the experts; evaluated once per expert set (without a reward
        model, Personalized Soups' experts are Rewarded Soups')."""
        names = tuple(f"{prefix}-{o}" for o in objs)
        if names not in soup_fronts:
            merged = MergedModel([policies[n] for n in names])
            coefficients = merge_method("linear").preference_coefficients
            soup_fronts[names] = test.front(grid, lambda mu: (merged.set(coefficients(mu)), merged.tok, None), desc)
        return soup_fronts[names]

    def extrapolated(method: str, kind: str, ingredients: list[Path], candidates: list[float], beta: float | None
                     ) -> np.ndarray:
        """A soup with k sum_j lambda_j theta_j + (1 - k) theta_SFT, k chosen on dev by hypervolume (the
        smaller k of ties); its test front at that k, and at k = 1 (kept in `at_k1`)."""
        merged = MergedModel([*ingredients, cfg.policy])
        coefficients = merge_method(kind).preference_coefficients

        def at(kk: float) -> Callable[[np.ndarray], tuple[Any, Any, None]]:
            return lambda mu: (merged.set(coefficients(mu, beta, kk, anchor=True)), merged.tok, None)

        dev_hv = {}
        for kk in candidates:
            dev_hv[kk] = hypervolume(dev.mean_front(dev.front(grid, at(kk), f"{LABELS[method]} k={kk} (dev)")), ref)
            log.info("soups: %s k=%.2f -> dev hypervolume %.4f", LABELS[method], kk, dev_hv[kk])
        best = max(candidates, key=lambda kk: (dev_hv[kk], -kk))
        chosen[f"{method}_k"] = best
        chosen[f"{method}_dev_hypervolume"] = {str(kk): v for kk, v in dev_hv.items()}
        at_k1[method] = test.front(grid, at(1.0), f"{LABELS[method]} k=1")
        return at_k1[method] if best == 1.0 else test.front(grid, at(best), f"{LABELS[method]} k={best}")

    if "rewarded" in cfg.methods:
        scores["rewarded"] = extrapolated("rewarded", "linear", [policies[f"expert-{o}"] for o in objs],
                                          cfg.rewarded_k if cfg.rewarded_k is not None else cfg.bone_k, None)
        soup_fronts[tuple(f"expert-{o}" for o in objs)] = at_k1["rewarded"]
    if "personalized" in cfg.methods:
        scores["personalized"] = soup_front("personal" if cfg.personalized_reward_model else "expert",
                                            "personalized soups")
    if "bone" in cfg.methods:
        scores["bone"] = extrapolated("bone", "bone_soup", [policies[f"backbone-{j}"] for j in range(k)], cfg.bone_k,
                                      cfg.bone_beta)
    if "morl" in cfg.methods:
        model, mtok = load_causal_lm(policies["morl"])
        cond = PreferenceConditioning(objs, objs, cfg.grid_points, cfg.morl_prompts)
        scores["morl"] = test.front(grid, lambda mu: (model, mtok, [cond.messages(p, mu) for p in test.prompts]),
                                    "prompted-MORL")

    results = summarise(cfg, grid, ref, scores, sft_scores, test, at_k1)
    results.update(chosen=chosen, runs={n: str(p) for n, p in policies.items()}, training_runs=training_runs(cfg),
                   lora=cfg.lora.model_dump() if cfg.lora.enabled else None)
    fronts = {LABELS[m]: np.asarray(results["methods"][m]["front"]) for m in scores}
    pareto_fronts(fronts, objs, out / "fronts.png", f"Gold fronts over {len(grid)} preference vectors (test prompts)",
                  points={"SFT": np.asarray(results["sft"])}, reference=ref)
    xy_lines({LABELS[m]: (grid[:, 0].tolist(), np.asarray(results["methods"][m]["front"])[:, 0].tolist())
              for m in scores}, out / "controllability.png", f"preference mu_{objs[0]}",
             f"achieved gold {objs[0]}", "Controllability")
    np.savez_compressed(out / "scores.npz", grid=grid, sft=sft_scores, **scores,
                        **{f"{m}_k1": s for m, s in at_k1.items()})
    return results


def summarise(cfg: SoupsConfig, grid: np.ndarray, ref: np.ndarray, scores: dict[str, np.ndarray],
              sft_scores: np.ndarray, test: FrontEvaluator, at_k1: dict[str, np.ndarray] | None = None
              ) -> dict[str, Any]:
    objs = cfg.objectives
    weights = [np.asarray(_on(objs, mu, list(OBJECTIVES))) for mu in grid]

    def describe(m: str, s: np.ndarray) -> dict[str, Any]:
        front = test.mean_front(s)
        return {"label": LABELS[m], "front": front.tolist(), "hypervolume": hypervolume(front, ref),
                "controllability": controllability(grid, front, objs),
                "win_rate_vs_sft": float(np.mean([win_rate_at(s[g], sft_scores, w) for g, w in enumerate(weights)]))}

    def pair(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean([win_rate_at(a[g], b[g], w) for g, w in enumerate(weights)]))

    methods = {m: describe(m, s) for m, s in scores.items()}
    k1 = {m: describe(m, s) for m, s in (at_k1 or {}).items()}
    pairwise = {}
    if "bone" in scores and "rewarded" in scores:
        pairwise["bone vs rewarded"] = pair(scores["bone"], scores["rewarded"])
        if {"bone", "rewarded"} <= set(k1):
            pairwise["bone vs rewarded, both at k = 1"] = pair(at_k1["bone"], at_k1["rewarded"])
    # the objectives' spread under the SFT model: a backbone reward h = B r mixes them at these scales
    spread = sft_scores.reshape(-1, sft_scores.shape[-1]).std(0)[test.index]
    return {"at_k1": k1, "objective_std_sft": spread.tolist(),"objectives": objs, "grid": grid.tolist(), "reference_point": ref.tolist(),
            "sft": sft_scores.mean(axis=(0, 1))[test.index].tolist(), "methods": methods, "pairwise": pairwise,
            "test_prompts": len(test.prompts), "samples_per_prompt": test.ev.samples_per_prompt,
            "bone_beta": cfg.bone_beta, "shared_experts": "personalized" in scores and not cfg.personalized_reward_model}


def render(r: dict[str, Any], heading: str = "#", images: str = "") -> str:
    objs = r["objectives"]
    lines = [f"{heading} Soups over preferences: {' vs '.join(objs)}", "",
             f"{len(r['grid'])} preference vectors, {r['test_prompts']} test prompts x {r['samples_per_prompt']} "
             f"samples, gold rewards; hypervolume against the reference point {r['reference_point']}; SFT model at "
             f"{[round(x, 3) for x in r['sft']]}. Bone Soups: beta {r['bone_beta']}, k = "
             f"{r.get('chosen', {}).get('bone_k', '-')}; Rewarded Soups: k = {r.get('chosen', {}).get('rewarded_k', '-')}"
             " (each chosen on the dev split; both also at k = 1 below).", "",
             f"![fronts]({images}fronts.png)", "",
             "| method | hypervolume | controllability (mean Spearman) | " + " | ".join(f"Spearman {o}" for o in objs)
             + " | gold win rate vs SFT (mu . r) |", "|---" * (4 + len(objs)) + "|"]
    for m, v in r["methods"].items():
        c = v["controllability"]
        lines.append(f"| {v['label']} | {v['hypervolume']:.4f} | {c['mean']:.3f} | "
                     + " | ".join(f"{c['per_objective'][o]:.3f}" for o in objs) + f" | {v['win_rate_vs_sft']:.1%} |")
    for m, v in r.get("at_k1", {}).items():
        c = v["controllability"]
        lines.append(f"| {v['label']}, k = 1 | {v['hypervolume']:.4f} | {c['mean']:.3f} | "
                     + " | ".join(f"{c['per_objective'][o]:.3f}" for o in objs) + f" | {v['win_rate_vs_sft']:.1%} |")
    if r.get("objective_std_sft"):
        lines.append(f"\nSpread (standard deviation) of each objective under the SFT model: "
                     + ", ".join(f"{o} {s:.3f}" for o, s in zip(objs, r["objective_std_sft"]))
                     + " -- a backbone reward h = B r mixes the raw objectives at these scales.")
    for name, w in r.get("pairwise", {}).items():
        lines.append(f"\n{name} (mu . r win rate over the grid): {w:.1%}")
    if r.get("training_runs"):
        lines += ["", "Reward each PPO run optimised (overrides of its RL config; reward.kind gold unless given):", ""]
        lines += [f"- {name}: {', '.join(o for o in over if o.startswith(('reward.', 'critic'))) or '-'}"
                  for name, over in r["training_runs"].items()]
    if r.get("shared_experts"):
        lines.append("\nPersonalized Soups used the gold-trained experts of Rewarded Soups (no per-objective reward "
                     "model was given), so the two rows are the same models.")
    return "\n".join(lines) + "\n"
