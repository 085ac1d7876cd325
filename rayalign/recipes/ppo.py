"""PPO, SALSA and the critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) on Ray: the
controller, one readable loop over the roles.

    rayalign train ppo   --config ppo.yaml   policy=runs/sft/sft-0 output=runs/ppo
    rayalign train salsa --config salsa.yaml reference.models=[runs/sft/sft-0,runs/sft/sft-1]
    rayalign train grpo  --config ppo.yaml   rollout.n=4 reference.models=[runs/sft/sft-0,runs/sft/sft-1]

SALSA is this very loop with a soup as pi_ref (arXiv 2411.01798); plain PPO's pi_ref is the SFT
model the policy starts from. The reference is a choice, not an estimator: any estimator
(algo.estimator, rayalign.losses.advantages) runs with any pi_ref. Each iteration:

    generate   rollout workers sample responses to a batch of prompts (vLLM or transformers)
    score      reward scorers give R(x, y) (a reward model or the gold functions)
    reference  reference workers give log pi_ref of every response token (checkpoint or soup)
    forward    the learner group gives log pi_old (and V_old when the estimator has a critic)
    advantages the estimator's, from R, the per-token KL and V_old (GAE) or the prompt's other
               samples (GRPO, RLOO, ...) -- here, on the controller
    train      several PPO epochs of mini-batches on the learner group (actor, and critic for GAE)
    sync       new policy weights to the rollout workers (object store or collective broadcast)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from rayalign.config.core import dump_config
from rayalign.config.schema import DataConfig, RLConfig, reference_dtype
from rayalign.data.loaders import load_rows
from rayalign.data.tokenize import encode_prompt, response_batch
from rayalign.distributed.cluster import connect
from rayalign.distributed.placement import PlacementPlan
from rayalign.distributed.pool import ActorPool
from rayalign.learner.group import LearnerGroup
from rayalign.losses.advantages import AdvantageInputs, advantage_estimator, critic_free_estimators
from rayalign.losses.ppo import AdaptiveKL, RunningMoments, kl_penalty, masked_mean, masked_whiten, normalise_scores
from rayalign.models.checkpoint import check_dir, is_local, load_tokenizer
from rayalign.recipes.loop import batch_indices
from rayalign.recipes.monitor import KLHackMonitor
from rayalign.reference.worker import ReferenceActor
from rayalign.reward.conditioning import PreferenceConditioning
from rayalign.reward.scorer import RewardActor, reward_model_paths
from rayalign.rollout.fleet import RolloutFleet
from rayalign.utils.io import atomic_write_json, atomic_write_text, claim_output
from rayalign.utils.logging import RunLogger, log
from rayalign.world import build
from rayalign.world.gold import OBJECTIVES, gold_vector

# `rayalign train M` for these runs algo.estimator=M; ppo and salsa take algo.estimator as configured (gae)
ESTIMATOR_METHODS = tuple(critic_free_estimators())  # grpo, dr_grpo, rloo, reinforce_pp
METHODS = ("ppo", "salsa", *ESTIMATOR_METHODS)


# ---- inputs ------------------------------------------------------------------------------------

def resolve_roles(cfg: RLConfig, method: str) -> RLConfig:
    """Fill method defaults: PPO's reference is the policy's own start; SALSA needs a soup; grpo,
    rloo, ... set their estimator, and only an estimator with values gets a critic."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    updates: dict[str, Any] = {}
    if method in ESTIMATOR_METHODS:
        if cfg.algo.estimator not in ("gae", method):
            raise ValueError(f"rayalign train {method} uses algo.estimator={method!r}; the config asks for "
                             f"{cfg.algo.estimator!r} (drop it, or run `rayalign train ppo algo.estimator=...`)")
        if advantage_estimator(method).needs_groups and cfg.rollout.n < 2:
            raise ValueError(f"rayalign train {method} compares the samples of each prompt: rollout.n must be "
                             f">= 2 (got {cfg.rollout.n})")
        cfg = cfg.model_copy(update={"algo": cfg.algo.model_copy(update={"estimator": method})})
    if cfg.algo.token_sum_norm is None:
        cfg = cfg.model_copy(update={"algo": cfg.algo.model_copy(update={"token_sum_norm":
                                                                          cfg.rollout.max_new_tokens})})
    if method == "salsa" and len(cfg.reference.models) < 2:
        raise ValueError("SALSA needs a soup reference: reference.models must list at least two SFT models "
                         f"(got {cfg.reference.models})")
    if not cfg.reference.models:
        updates["reference"] = cfg.reference.model_copy(update={"models": [cfg.policy]})
    rms = reward_model_paths(cfg.reward.model)
    if not cfg.algo.needs_critic:
        updates["critic"] = None  # a critic-free estimator: no value model is built
    elif cfg.critic is None:  # the value model starts from the (first) reward model, else the policy
        updates["critic"] = rms[0] if "model" in cfg.reward.kinds else cfg.policy
    cfg = cfg.model_copy(update=updates)
    check_model_paths([("policy", cfg.policy), ("critic", cfg.critic), *[("reward.model", m) for m in rms],
                       *[("reference.models", m) for m in cfg.reference.models]])
    return cfg


def check_model_paths(named: list[tuple[str, str | None]]) -> None:
    """Every local model directory a run names exists and holds a model; the error names the key."""
    for what, path in named:
        if path and is_local(path):
            try:
                check_dir(path)
            except Exception as exc:
                raise ValueError(f"{what}: {exc}") from None


def finished_policy(out: Path, method: str, resume: bool) -> Path | None:
    """Claim OUTPUT for a run; the final policy if that run already finished (resume keeps it)."""
    claim_output(out, resume)
    if (out / "policy").is_dir():
        log.info("%s: %s already finished; kept", method, out / "policy")
        return out / "policy"
    return None


def load_prompts(data: DataConfig, world_seed: int, need: int = 1) -> list[str]:
    """A prompt set: a split of the embedded world's prompts, or a dataset / file of prompt rows."""
    if data.source == "world":
        splits = build.split_prompts(world_seed)
        if data.split not in splits:
            raise ValueError(f"prompts.split {data.split!r} is not a world split; use one of {sorted(splits)}")
        prompts = splits[data.split]
    else:
        prompts = list(load_rows(data.source, "prompt", data.split, data.limit)["prompt"])
    prompts = prompts[:data.limit] if data.limit else prompts
    if len(prompts) < need:
        raise ValueError(f"{len(prompts)} prompts in {data.source!r} ({data.split}) is fewer than the {need} "
                         "a step samples")
    return prompts


def gold_of(prompts: list[str], responses: list[str]) -> np.ndarray | None:
    """Gold objective vectors when the prompts belong to the embedded world, else None."""
    try:
        return np.stack([gold_vector(p, r) for p, r in zip(prompts, responses)])
    except ValueError:
        return None


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    times[f"time/{name}"] = time.perf_counter() - t0


# ---- the roles -----------------------------------------------------------------------------------

class Roles:
    """Every actor of a run, placed by the plan; `close()` releases them."""

    def __init__(self, cfg: RLConfig, plan: PlacementPlan):
        r = cfg.rollout
        self.own_reference = cfg.reference_in_learner
        # every role loads at once: scorers and references first (nothing waits on them), then the
        # learner ranks in the background while the rollout engines start
        scorers = [RewardActor.options(**plan.options("reward", i), max_restarts=cfg.reward.max_restarts)
                   .remote(**cfg.reward.scorer_args())
                   for i in range(cfg.reward.workers)]
        refs = [] if self.own_reference else [
            ReferenceActor.options(**plan.options("reference", i), max_restarts=cfg.reference.max_restarts)
            .remote(cfg.reference.models, cfg.reference.weights, r.temperature,
                    reference_dtype(cfg.reference.dtype, cfg.learner.actor.precision))
            for i in range(cfg.reference.workers)]
        self.learners = LearnerGroup(plan, cfg.learner, cfg.policy, cfg.critic,  # None: resolve_roles chose no critic
                                     r.temperature, cfg.seed, own_reference=self.own_reference,
                                     total_steps=cfg.optimizer_steps, wait=False)
        self.fleet = RolloutFleet(plan, r, cfg.sync, cfg.policy, self.learners,
                                  learner_gpus=cfg.learner.resources.num_gpus, seed=cfg.seed, lora=cfg.learner.actor.lora)
        self.learners.ready()
        self.rollout = self.fleet.pool
        self.reward = ActorPool("reward", scorers)
        self.reference = ActorPool("reference", refs)
        self.engine = self.fleet.engine
        self.objectives = ray.get(scorers[0].objective_names.remote())

    def push_weights(self) -> Any:
        return self.fleet.push_weights()

    def close(self) -> None:
        self.learners.shutdown()
        self.fleet.close()
        for pool in (self.reward, self.reference):
            for a in pool.actors:
                ray.kill(a, no_restart=True)


# ---- run state -------------------------------------------------------------------------------------

def save_run_state(out: Path, learners: Any, iteration: int, controller: dict[str, Any]) -> None:
    """Learner states (models, optimisers) under tag iter<N>, then the controller's state, written
    atomically last: a kill in between leaves the previous state the valid one."""
    state = out / "state"
    tag = f"iter{iteration}"
    learners.save_state(str(state), {"iteration": iteration}, tag)
    previous = read_controller(out)
    atomic_write_json(state / "controller.json", {**controller, "iteration": iteration, "tag": tag})
    if previous is not None and previous["tag"] != tag:
        for part in state.iterdir():
            if part.is_dir():
                shutil.rmtree(part / previous["tag"], ignore_errors=True)


def finish_run(out: Path, learners: Any, summary: dict[str, Any], text: str, extra: dict[str, Any]) -> Path:
    """The final policy (OUTPUT/policy) and OUTPUT/summary.json; the resumable state goes."""
    learners.save_policy(str(out / "policy"), extra=extra)
    atomic_write_json(out / "summary.json", summary)
    print(text, flush=True)
    shutil.rmtree(out / "state", ignore_errors=True)
    return out / "policy"


def read_controller(out: Path) -> dict[str, Any] | None:
    p = out / "state" / "controller.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ---- the loop ----------------------------------------------------------------------------------------

def run_rl(cfg: RLConfig, method: str, resume: bool = False,
           on_step: Callable[[int, dict[str, float], Roles], None] | None = None) -> Path:
    """Train with PPO or SALSA; returns the directory of the final policy (OUTPUT/policy)."""
    cfg = resolve_roles(cfg, method)
    out = Path(cfg.output)
    done = finished_policy(out, method, resume)
    if done is not None:
        return done
    prompts = load_prompts(cfg.prompts, cfg.world.seed, cfg.prompts_per_step)
    tok = load_tokenizer(cfg.policy)
    encoded = [encode_prompt(tok, p) for p in prompts]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", f"# rayalign train {method}\n" + dump_config(cfg))

    B, n = cfg.prompts_per_step, cfg.rollout.n
    estimator = advantage_estimator(cfg.algo.estimator)
    groups = torch.arange(B).repeat_interleave(n)  # the rollouts come prompt by prompt, n samples each
    per_epoch = len(prompts) // B
    started_ray = connect(cfg.ray_address)
    plan = PlacementPlan.from_config(cfg)
    print(plan.describe(), flush=True)
    plan.reserve(cfg.placement.timeout_s)
    roles: Roles | None = None
    logger = RunLogger(out / "logs", "", wandb=cfg.wandb, run_config=cfg.model_dump(), name=out.name)
    try:
        roles = Roles(cfg, plan)
        cond = PreferenceConditioning(roles.objectives, cfg.reward.conditioned_objectives, cfg.reward.condition_grid) \
            if cfg.reward.conditioning == "prompt" else None
        kl_ctl = AdaptiveKL(cfg.algo.beta, cfg.algo.kl_target, cfg.algo.kl_horizon)
        moments = RunningMoments()
        monitor = KLHackMonitor(cfg.monitor)
        start = 0
        saved = read_controller(out) if resume else None
        if saved is not None:
            roles.learners.load_state(str(out / "state"), saved["tag"])
            kl_ctl.load_state_dict(saved["kl"])
            moments.load_state_dict(saved["moments"])
            monitor.load_state_dict(saved["monitor"])
            start = int(saved["iteration"])
            log.info("%s: resuming at iteration %d/%d", method, start, cfg.steps)
        if resume:
            logger.truncate(start)
        first = roles.push_weights()
        log.info("%s: %s rollout engine; first weight sync %.1f MB in %.2fs (%s)", method, roles.engine,
                 first.bytes / 1e6, first.seconds, cfg.sync.kind)
        history: list[dict[str, float]] = []
        bar = tqdm(range(start, cfg.steps), desc=method, initial=start, total=cfg.steps)
        for it in bar:
            t_iter = time.perf_counter()
            times: dict[str, float] = {}
            idx = batch_indices(len(prompts), cfg.seed, it, per_epoch, B)
            sample_prompts = [prompts[i] for i in np.repeat(idx, n)]
            sampling = {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                        "max_new_tokens": cfg.rollout.max_new_tokens, "n": n, "seed": cfg.seed * 100_003 + it}
            if cond is not None:  # Prompted-MORL: a preference vector per prompt, told in a system message
                mu = cond.sample(np.random.default_rng([cfg.seed, it]), len(idx))
                batch_prompts = [encode_prompt(tok, cond.messages(prompts[i], m)) for i, m in zip(idx, mu)]
            else:
                batch_prompts = [encoded[i] for i in idx]
            with timed(times, "generate"):
                rollouts = roles.rollout.map("generate", batch_prompts, sampling)
            prompt_ids = [r["prompt_ids"] for r in rollouts]
            response_ids = [r["response_ids"] or [tok.eos_token_id] for r in rollouts]
            responses = tok.batch_decode(response_ids, skip_special_tokens=True)
            batch = response_batch(prompt_ids, response_ids, tok.pad_token_id)
            mask = batch["response_mask"]

            with timed(times, "score"):
                scored = torch.tensor(roles.reward.map("score_items", list(zip(sample_prompts, responses))),
                                      dtype=torch.float32)
            if not roles.own_reference:
                with timed(times, "reference"):
                    ref_logp = roles.reference.map_tensors("logprobs",
                                                           {k: batch[k] for k in ("input_ids", "attention_mask")})
            with timed(times, "forward"):
                old = roles.learners.forward(batch)
            if roles.own_reference:  # the LoRA policy's base, from the learner's forward with the adapter off
                ref_logp = old["ref_logp"]

            # rewards and advantages (rayalign.losses.advantages)
            finished = torch.tensor([float(r["finished"]) for r in rollouts])
            score = scored[:, 0].clone() if cond is None else \
                (scored[:, 1:] * torch.tensor(cond.weights(np.repeat(mu, n, axis=0)), dtype=torch.float32)).sum(1)
            if cfg.reward.missing_eos_penalty is not None:
                score -= cfg.reward.missing_eos_penalty * (1.0 - finished)
            norm_score = normalise_scores(score, cfg.algo.reward_norm, moments, cfg.algo.reward_clip)
            kl_t = kl_penalty(old["logp"], ref_logp, cfg.algo.kl_estimator) * mask
            beta = kl_ctl.beta
            kl_in_loss = cfg.algo.kl_in_loss
            values = old["values"] * mask if "values" in old else None
            advantages, returns = estimator.fn(AdvantageInputs(
                scores=norm_score, token_kl=kl_t, mask=mask, beta=0.0 if kl_in_loss else beta, values=values,
                groups=groups, gamma=cfg.algo.gamma, lam=cfg.algo.lam, kl_in_reward=not kl_in_loss))
            if estimator.needs_values and cfg.algo.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            train_batch = {**batch, "old_logp": old["logp"], "advantages": advantages}
            if values is not None:
                train_batch.update(old_values=values, returns=returns)
            if kl_in_loss:
                train_batch["ref_logp"] = ref_logp
            total_reward = norm_score - (0.0 if kl_in_loss else beta) * kl_t.sum(1)

            with timed(times, "train"):
                train_metrics = roles.learners.train(train_batch, {**cfg.algo.model_dump(), "beta": beta}, it)
            seq_kl = float(((old["logp"] - ref_logp) * mask).sum(1).mean())  # k1 summed over the response
            kl_ctl.update(seq_kl, B * n)
            with timed(times, "sync"):
                stats = roles.push_weights()

            lengths = mask.sum(1)
            metrics: dict[str, float] = {
                "reward/score": float(score.mean()), "reward/score_std": float(score.std()),
                "reward/normalised": float(norm_score.mean()),
                "reward/total": float(total_reward.mean()),
                "kl/sequence": seq_kl, "kl/token_estimate": float(masked_mean(kl_t, mask)), "kl/beta": beta,
                "response/length": float(lengths.mean()), "response/finished": float(finished.mean()),
                **({"value/mean": float(masked_mean(values, mask))} if values is not None else {}),
                "advantage/mean_raw": float(masked_mean(advantages, mask)),
                **{f"reward/{name}": float(scored[:, 1 + j].mean()) for j, name in enumerate(roles.objectives)
                   if len(roles.objectives) > 1},
                **train_metrics, **times, **stats.as_metrics(),
                "restarts": float(roles.rollout.restarts + roles.reward.restarts + roles.reference.restarts),
            }
            gold = gold_of(sample_prompts, responses)
            if gold is not None:
                weights = np.asarray(cfg.world.weights)
                metrics["gold/combined"] = float((gold @ weights).mean())
                metrics.update({f"gold/{o}": float(gold[:, j].mean()) for j, o in enumerate(OBJECTIVES)})
            metrics["time/iteration"] = time.perf_counter() - t_iter
            alarm = monitor.update(it + 1, metrics["response/length"], seq_kl)
            metrics["monitor/collapse"] = float(alarm is not None)
            metrics["data/first_prompt"] = float(idx[0])
            logger.log(it + 1, metrics)
            history.append({"iteration": it + 1, **metrics})
            bar.set_postfix(score=f"{metrics['reward/score']:.3f}", kl=f"{seq_kl:.2f}",
                            len=f"{metrics['response/length']:.1f}")
            stop = alarm is not None and alarm.stop
            if (cfg.save_every and (it + 1) % cfg.save_every == 0) or it + 1 == cfg.steps or stop:
                save_run_state(out, roles.learners, it + 1, {"kl": kl_ctl.state_dict(), "moments": moments.state_dict(),
                                                 "monitor": monitor.state_dict()})
            snapshot = out / "snapshots" / f"iter{it + 1}"
            if cfg.snapshot_every and (it + 1) % cfg.snapshot_every == 0 and not snapshot.exists():
                roles.learners.save_policy(str(snapshot), extra={"stage": method, "iteration": it + 1})
            if on_step is not None:
                on_step(it + 1, metrics, roles)
            if stop:
                log.warning("%s: stopped at iteration %d by the KL-hack monitor", method, it + 1)
                break
        summary = _summary(method, cfg, history, monitor, roles)
        return finish_run(out, roles.learners, summary, _format_summary(summary), {"stage": method, **summary})
    finally:
        logger.close()
        if roles is not None:
            roles.close()
        plan.release()
        if started_ray:
            ray.shutdown()


def _summary(method: str, cfg: RLConfig, history: list[dict[str, float]], monitor: KLHackMonitor,
             roles: Roles) -> dict[str, Any]:
    last = history[-1] if history else {}
    first = history[0] if history else {}
    keys = ["reward/score", "kl/sequence", "response/length", "gold/combined"]
    return {
        "method": method, "iterations": last.get("iteration", 0), "engine": roles.engine,
        "reference": {"models": cfg.reference.models, "weights": cfg.reference.weights},
        "first": {k: first[k] for k in keys if k in first}, "last": {k: last[k] for k in keys if k in last},
        "kl_hack_alarms": monitor.alarms, "restarts": last.get("restarts", 0),
        "mean_times": {k: float(np.mean([h[k] for h in history])) for k in last if k.startswith("time/")},
    }


def _format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['method']} finished: {s['iterations']} iterations ({s['engine']} rollouts)"]
    for k in s["last"]:
        lines.append(f"  {k:18s} {s['first'].get(k, float('nan')):8.3f} -> {s['last'][k]:8.3f}")
    lines.append("  time per iteration: " + ", ".join(f"{k[5:]} {v:.2f}s" for k, v in s["mean_times"].items()))
    if s["kl_hack_alarms"]:
        lines.append(f"  KL-hack monitor raised {s['kl_hack_alarms']} alarm(s)")
    return "\n".join(lines)
