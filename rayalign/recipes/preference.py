"""SPO, DPO and IPO on Ray: the controller, one readable loop.

    rayalign train spo --config spo.yaml policy=runs/sft/sft-0 output=runs/spo
    rayalign train dpo --config spo.yaml policy=runs/sft/sft-0 output=runs/dpo algo.dpo_beta=0.1

All three read the same preference pairs and train the same learner ranks, where pi_ref (one
checkpoint or a soup) sits beside the policy (see rayalign.learner.preference for why). What
makes SPO SPO is its global regulariser, computed on the policy's own samples:

    every T = algo.kl_every steps (SPO with algo.kl_coef > 0):
        sync      the policy's weights to the rollout workers
        generate  the workers sample responses to algo.kl_prompts prompts from the *current* policy
    every step:
        train     one optimiser step on the learner group:
                  SPO  -(1/alpha) mu log sigmoid(alpha (log pi(y_w) - log pi(y_l)))
                       + kl_coef * sum_t KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t)) over the online samples
                  DPO / IPO on the log-ratios to pi_ref (no online samples)

The online samples of a refresh are kept in the run state, so a resumed run continues the
interrupted refresh cycle with the very same samples and pairs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rayalign.config.schema import PrefConfig
from rayalign.data.tokenize import collate_preference, encode_prompt, response_batch
from rayalign.distributed.placement import PlacementPlan, RoleDemand
from rayalign.learner.group import shard
from rayalign.learner.preference import PreferenceGroup
from rayalign.losses.preference import preference_loss
from rayalign.models.checkpoint import load_tokenizer
from rayalign.recipes.loop import batch_indices
from rayalign.recipes.ppo import check_model_paths, gold_of, load_prompts
from rayalign.recipes.run import RaySession, claim, finish_run, save_run_state, timed
from rayalign.recipes.supervised import encode_pairs, preference_rows
from rayalign.rollout.fleet import RolloutFleet
from rayalign.utils.io import atomic_write_json
from rayalign.utils.logging import log

def resolve(cfg: PrefConfig, method: str) -> PrefConfig:
    preference_loss(method)  # names the registered losses when `method` is not one
    if not cfg.reference.models:
        cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"models": [cfg.policy]})})
    check_model_paths([("policy", cfg.policy), *[("reference.models", m) for m in cfg.reference.models]])
    return cfg


def online_kl(cfg: PrefConfig, method: str) -> bool:
    return preference_loss(method).online_kl and cfg.algo.kl_coef > 0


def placement(cfg: PrefConfig, online: bool) -> PlacementPlan:
    """Learner ranks (each with its pi_ref inside), plus the rollout workers when SPO samples online."""
    demands = [RoleDemand.of("learner", cfg.learner.ranks, cfg.learner.resources)]
    if online:
        demands.append(RoleDemand.of("rollout", cfg.rollout.workers, cfg.rollout.resources))
    roles = {d.role for d in demands}
    colocate = [[r for r in g if r in roles] for g in cfg.placement.colocate]
    return PlacementPlan.build(demands, [g for g in colocate if len(g) > 1], cfg.placement.strategy)


def step_batches(examples: list[dict[str, Any]], idx: np.ndarray, pad_id: int, ranks: int, grad_accum: int,
                 kl_batch: dict[str, torch.Tensor] | None) -> list[list[dict[str, torch.Tensor]]]:
    """The step's pairs (and online samples) as ranks x grad_accum micro-batches."""
    parts = ranks * grad_accum
    size = len(idx) // parts
    micro = [collate_preference([examples[i] for i in idx[j * size:(j + 1) * size]], pad_id) for j in range(parts)]
    if kl_batch is not None:
        for mb, kl in zip(micro, shard(kl_batch, parts)):
            mb.update({f"kl_{k}": v for k, v in kl.items()})
    return [micro[r * grad_accum:(r + 1) * grad_accum] for r in range(ranks)]


def run_preference(cfg: PrefConfig, method: str, resume: bool = False,
                   on_step: Callable[[int, dict[str, float], Any], None] | None = None) -> Path:
    """Train with SPO, DPO or IPO; returns the directory of the final policy (OUTPUT/policy)."""
    cfg = resolve(cfg, method)
    out = Path(cfg.output)
    done = claim(out, method, resume)
    if done is not None:
        return done
    tok = load_tokenizer(cfg.policy)
    rows = preference_rows(cfg.data, cfg.world, "combined", cfg.data.split)
    examples = encode_pairs(tok, rows, cfg.data.max_seq_len)
    B = cfg.pairs_per_step
    if len(examples) < B:
        raise ValueError(f"{len(examples)} preference pairs in {cfg.data.source!r} is fewer than pairs_per_step={B}")
    per_epoch = len(examples) // B
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    online = online_kl(cfg, method)
    P = cfg.algo.kl_prompts
    prompts = load_prompts(cfg.prompts, cfg.world.seed, P) if online else []
    encoded = [encode_prompt(tok, p) for p in prompts]
    lc = cfg.learner.actor
    with RaySession(cfg, method, resume, plan=lambda: placement(cfg, online)) as run:
        group = run.own(PreferenceGroup(run.plan, cfg.learner.ranks, lc, cfg.policy, cfg.reference.models,
                                        cfg.reference.weights, cfg.seed, total_steps=total, wait=False),
                        PreferenceGroup.shutdown)
        fleet: RolloutFleet | None = None
        if online:  # the rollout engines start while the learner ranks load
            fleet = run.own(RolloutFleet(run.plan, cfg.rollout, cfg.sync, cfg.policy, group,
                                         learner_gpus=cfg.learner.resources.num_gpus, seed=cfg.seed, lora=lc.lora),
                            RolloutFleet.close)
        group.ready()
        start, samples = run.resume_learners(group, total, "step"), None
        if run.saved is not None and (out / "state" / "kl_samples.json").is_file():
            samples = json.loads((out / "state" / "kl_samples.json").read_text())
        logger = run.logger

        def padded(s: dict[str, Any] | None) -> dict[str, torch.Tensor] | None:
            """The online samples as one padded batch, built once per refresh."""
            return None if s is None else response_batch(s["prompt_ids"], s["response_ids"], tok.pad_token_id)

        kl_batch = padded(samples)
        log.info("%s: %d pairs, %d steps of %d pairs; reference %s; online KL: %s", method, len(examples), total, B,
                 group.describe_reference(), f"{P} prompts x {cfg.rollout.n} every {cfg.algo.kl_every} steps, "
                 f"{fleet.engine} rollouts" if fleet else "off")
        history: list[dict[str, float]] = []
        algo = cfg.algo.model_dump()
        bar = tqdm(range(start, total), desc=method, initial=start, total=total)
        for step in bar:
            t_step = time.perf_counter()
            times: dict[str, float] = {}
            metrics: dict[str, float] = {}
            refresh = step // cfg.algo.kl_every
            if fleet is not None and (samples is None or samples["refresh"] != refresh):
                with timed(times, "sync"):
                    stats = fleet.push_weights()
                idx = batch_indices(len(prompts), cfg.seed + 1, refresh, max(1, len(prompts) // P), P)
                sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": cfg.rollout.max_new_tokens,
                            "n": cfg.rollout.n, "seed": cfg.seed * 100_003 + refresh}
                with timed(times, "generate"):
                    outs = fleet.generate([encoded[i] for i in idx], sampling)
                samples = {"refresh": refresh, "prompts": [prompts[i] for i in np.repeat(idx, cfg.rollout.n)],
                           "prompt_ids": [o["prompt_ids"] for o in outs],
                           "response_ids": [o["response_ids"] or [tok.eos_token_id] for o in outs]}
                atomic_write_json(out / "state" / "kl_samples.json", samples)
                kl_batch = padded(samples)
                metrics.update({**stats.as_metrics(), "kl/refreshed": 1.0})
                gold = gold_of(samples["prompts"], tok.batch_decode(samples["response_ids"], skip_special_tokens=True))
                if gold is not None:
                    metrics["gold/online_combined"] = float((gold @ np.asarray(cfg.world.weights)).mean())
            idx = batch_indices(len(examples), cfg.seed, step, per_epoch, B)
            shards = step_batches(examples, idx, tok.pad_token_id, cfg.learner.ranks, lc.grad_accum, kl_batch)
            with timed(times, "train"):
                metrics.update(group.train_step(shards, method, algo))
            times["time/step"] = time.perf_counter() - t_step
            metrics.update(times)
            metrics["data/first_pair"] = float(idx[0])
            if fleet is not None:
                metrics["restarts"] = float(fleet.restarts)
            logger.log(step + 1, metrics)
            history.append({"step": step + 1, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            **({"kl": f"{metrics['global_kl']:.2f}"} if "global_kl" in metrics else {}))
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == total:
                save_run_state(out, group, step + 1, {"method": method})
            if on_step is not None:
                on_step(step + 1, metrics, fleet)
        summary = _summary(method, cfg, history, fleet, len(examples))
        return finish_run(out, group, summary, _format_summary(summary), {"stage": method, "steps": total})


def kl_time_share(history: list[dict[str, float]]) -> float | None:
    """Share of the step time spent on the global KL: the online sampling and weight sync of the
    refreshes, and on every step the reference and policy forward passes over the samples (their
    backward share is measured by benchmarks/preference_throughput.py, SPO with and without KL)."""
    if not history or "global_kl" not in history[-1]:
        return None
    cost = sum(h.get("time/sync", 0.0) + h.get("time/generate", 0.0) + h["time/rank_reference_forward"]
               + h["time/rank_kl_forward"] for h in history)
    return cost / sum(h["time/step"] for h in history)


def _summary(method: str, cfg: PrefConfig, history: list[dict[str, float]], fleet: RolloutFleet | None,
             pairs: int) -> dict[str, Any]:
    last, first = history[-1] if history else {}, history[0] if history else {}
    keys = [k for k in ("loss", "preference_loss", "accuracy", "margin", "implicit_accuracy", "global_kl",
                        "sample_entropy", "sample_length", "gold/online_combined") if k in last or k in first]
    means = {k: float(np.mean([h[k] for h in history if k in h])) for k in ("time/step", "time/train", "time/sync",
                                                                         "time/generate") if any(k in h for h in history)}
    return {
        "method": method, "steps": last.get("step", 0), "pairs": pairs, "pairs_per_step": cfg.pairs_per_step,
        "data": f"{cfg.data.source} preference pairs ({cfg.data.split})", "algo": cfg.algo.model_dump(), "reference": {"models": cfg.reference.models, "weights": cfg.reference.weights},
        "first": {k: first[k] for k in keys if k in first}, "last": {k: last[k] for k in keys if k in last},
        "mean_times": means, "kl_time_share": kl_time_share(history),
        "engine": fleet.engine if fleet else None, "restarts": fleet.restarts if fleet else 0,
    }


def _format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['method']} finished: {s['steps']} steps over {s['pairs']} pairs"]
    for k in s["last"]:
        lines.append(f"  {k:22s} {s['first'].get(k, float('nan')):8.3f} -> {s['last'][k]:8.3f}")
    lines.append("  mean seconds: " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in s["mean_times"].items()))
    if s["kl_time_share"] is not None:
        lines.append(f"  global KL share of step time (sampling, sync, forwards): {100 * s['kl_time_share']:.1f}%")
    return "\n".join(lines)
