"""PPO, SALSA and the critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) on Ray: the
controller, one readable loop of named phases over the roles.

    rayalign train ppo   --config ppo.yaml   policy=runs/sft/sft-0 output=runs/ppo
    rayalign train salsa --config salsa.yaml reference.models=[runs/sft/sft-0,runs/sft/sft-1]
    rayalign train grpo  --config ppo.yaml   rollout.n=4 reference.models=[runs/sft/sft-0,runs/sft/sft-1]

SALSA is this very loop with a soup as pi_ref (arXiv 2411.01798); plain PPO's pi_ref is the SFT
model the policy starts from. The reference is a choice, not an estimator: any estimator
(algo.estimator, rayalign.losses.advantages) runs with any pi_ref and any policy loss
(algo.policy_loss, rayalign.losses.policy). Each iteration:

    collect     generate  rollout workers sample responses to a batch of prompts (vLLM or transformers)
                score     reward scorers give R(x, y) (gold functions, reward models, code, a service)
                reference reference workers give log pi_ref of every response token (checkpoint or soup)
                forward   the learner group gives log pi_old (and V_old when the estimator has a critic)
                -> an `Experience`
    advantages  the estimator's, from R, the per-token KL and V_old (GAE) or the prompt's other
                samples (GRPO, RLOO, ...) -- here, on the controller
    train       several PPO epochs of mini-batches on the learner group (actor, and critic for GAE)
    sync        new policy weights to the rollout workers (object store or collective broadcast)
    metrics     what the iteration did, logged, watched by the KL-hack monitor
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError
from tqdm.auto import tqdm

from rayalign.config.schema import DataConfig, RLConfig, reference_dtype
from rayalign.data.loaders import load_rows
from rayalign.data.tokenize import encode_prompt, response_batch
from rayalign.distributed.placement import PlacementPlan
from rayalign.distributed.pool import ActorPool
from rayalign.learner.group import LearnerGroup
from rayalign.losses.advantages import AdvantageInputs, advantage_estimator, critic_free_estimators
from rayalign.losses.ppo import AdaptiveKL, RunningMoments, kl_penalty, masked_mean, masked_whiten, normalise_scores
from rayalign.models.checkpoint import check_dir, is_local, load_tokenizer
from rayalign.recipes.loop import batch_indices
from rayalign.recipes.monitor import KLHackMonitor
from rayalign.recipes.run import RaySession, claim, finish_run, save_run_state, timed
from rayalign.reference.worker import ReferenceActor
from rayalign.reward.conditioning import PreferenceConditioning
from rayalign.reward.scorer import RewardActor, reward_model_paths
from rayalign.rollout.fleet import RolloutFleet
from rayalign.sync import SyncStats
from rayalign.utils.logging import log
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


# ---- the roles -----------------------------------------------------------------------------------

class Roles:
    """Every actor of a run, placed by the plan (`PlacementPlan.spawn`); `close()` releases them."""

    def __init__(self, cfg: RLConfig, plan: PlacementPlan):
        r = cfg.rollout
        self.own_reference = cfg.reference_in_learner
        # every role loads at once: scorers and references first (nothing waits on them), then the
        # learner ranks in the background while the rollout engines start
        scorers = plan.spawn(RewardActor, "reward", **cfg.reward.scorer_args(), max_restarts=cfg.reward.max_restarts)
        refs = [] if self.own_reference else plan.spawn(
            ReferenceActor, "reference", cfg.reference.models, cfg.reference.weights, r.temperature,
            reference_dtype(cfg.reference.dtype, cfg.learner.actor.precision), max_restarts=cfg.reference.max_restarts)
        self.learners: LearnerGroup | None = None
        self.fleet: RolloutFleet | None = None
        try:
            self.learners = LearnerGroup(plan, cfg.learner, cfg.policy, cfg.critic,  # None: no critic chosen
                                         r.temperature, cfg.seed, own_reference=self.own_reference,
                                         total_steps=cfg.optimizer_steps, wait=False)
            self.fleet = RolloutFleet(plan, r, cfg.sync, cfg.policy, self.learners,
                                      learner_gpus=cfg.learner.resources.num_gpus, seed=cfg.seed,
                                      lora=cfg.learner.actor.lora)
            self.learners.ready()
            self.reward = ActorPool("reward", started(scorers, "reward"))
            self.reference = ActorPool("reference", started(refs, "reference"))
        except BaseException:  # a role that could not start: release the others before the error goes up
            self._kill(scorers + refs)
            raise
        self.rollout = self.fleet.pool
        self.engine = self.fleet.engine
        self.objectives = ray.get(scorers[0].objective_names.remote())

    def push_weights(self) -> SyncStats:
        return self.fleet.push_weights()

    @property
    def restarts(self) -> int:
        return self.rollout.restarts + self.reward.restarts + self.reference.restarts

    def close(self) -> None:
        self._kill(self.reward.actors + self.reference.actors)

    def _kill(self, actors: list[Any]) -> None:
        if self.learners is not None:
            self.learners.shutdown()
        if self.fleet is not None:
            self.fleet.close()
        for a in actors:
            ray.kill(a, no_restart=True)


def started(actors: list[Any], role: str) -> list[Any]:
    """The actors once their constructors ran; one that failed is named with its error (a reward
    function that does not import, a reference checkpoint that does not load)."""
    for i, a in enumerate(actors):
        try:
            ray.get(a.__ray_ready__.remote())
        except RayActorError as exc:
            raise ValueError(f"{role} actor {i} could not start: {actor_init_error(exc)}") from None
    return actors


def actor_init_error(exc: BaseException) -> str:
    """The line of a failed actor constructor's error that names it (the last of its traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "Error " in line]
    return errors[-1] if errors else (lines[-1] if lines else type(exc).__name__)


# ---- one iteration's data ----------------------------------------------------------------------------

@dataclass
class Experience:
    """What `collect` gathers in one iteration: the samples, their scores and log-probs."""

    prompt_index: np.ndarray        # [B] prompts of this iteration (each sampled n times, in order)
    prompts: list[str]              # [B * n] the prompt of every sample
    responses: list[str]            # [B * n] decoded responses
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, response_mask ([B * n, ...])
    finished: torch.Tensor          # [B * n] 1 where the response ended by itself (EOS)
    scored: torch.Tensor            # [B * n, 1 + K] the scorer's combination, then its K objectives
    score: torch.Tensor             # [B * n] R(x, y) the policy optimises (conditioned, EOS penalty)
    old_logp: torch.Tensor          # [B * n, T] log pi_old of every response token
    ref_logp: torch.Tensor          # [B * n, T] log pi_ref
    values: torch.Tensor | None     # [B * n, T] V_old (estimators with a critic)

    @property
    def mask(self) -> torch.Tensor:
        return self.batch["response_mask"]


@dataclass
class Advantages:
    """What the `advantages` phase computes from an Experience."""

    train_batch: dict[str, torch.Tensor]
    normalised_score: torch.Tensor
    token_kl: torch.Tensor
    advantages: torch.Tensor
    beta: float
    kl_in_loss: bool


# ---- the phases --------------------------------------------------------------------------------------

class Phases:
    """The phases of an iteration, each a method; the state they share (KL controller, reward
    statistics, prompts) lives here. `on_phase(name, iteration, roles)` runs as each phase starts
    (fault-injection tests, profilers)."""

    def __init__(self, cfg: RLConfig, roles: Roles, tok: Any, prompts: list[str],
                 on_phase: Callable[[str, int, Roles], None] | None = None):
        self.cfg, self.roles, self.tok, self.prompts = cfg, roles, tok, prompts
        self.encoded = [encode_prompt(tok, p) for p in prompts]
        self.estimator = advantage_estimator(cfg.algo.estimator)
        B, n = cfg.prompts_per_step, cfg.rollout.n
        self.groups = torch.arange(B).repeat_interleave(n)  # rollouts come prompt by prompt, n samples each
        self.per_epoch = len(prompts) // B
        self.cond = PreferenceConditioning(roles.objectives, cfg.reward.conditioned_objectives,
                                           cfg.reward.condition_grid, cfg.reward.condition_style) \
            if cfg.reward.conditioning == "prompt" else None
        self.kl_ctl = AdaptiveKL(cfg.algo.beta, cfg.algo.kl_target, cfg.algo.kl_horizon)
        self.moments = RunningMoments()
        self.on_phase = on_phase
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str, it: int) -> Iterator[None]:
        if self.on_phase is not None:
            self.on_phase(name, it, self.roles)
        with timed(self.times, name):
            yield

    def state_dict(self) -> dict[str, Any]:
        return {"kl": self.kl_ctl.state_dict(), "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])

    def collect(self, it: int) -> Experience:
        """generate, score, reference, forward."""
        cfg, roles, tok, n = self.cfg, self.roles, self.tok, self.cfg.rollout.n
        idx = batch_indices(len(self.prompts), cfg.seed, it, self.per_epoch, cfg.prompts_per_step)
        sample_prompts = [self.prompts[i] for i in np.repeat(idx, n)]
        sampling = {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                    "max_new_tokens": cfg.rollout.max_new_tokens, "n": n, "seed": cfg.seed * 100_003 + it}
        mu = None
        if self.cond is not None:  # Prompted-MORL: a preference vector per prompt, told in a system message
            mu = self.cond.sample(np.random.default_rng([cfg.seed, it]), len(idx))
            batch_prompts = [encode_prompt(tok, self.cond.messages(self.prompts[i], m)) for i, m in zip(idx, mu)]
        else:
            batch_prompts = [self.encoded[i] for i in idx]
        with self.phase("generate", it):
            rollouts = roles.rollout.map("generate", batch_prompts, sampling)
        response_ids = [r["response_ids"] or [tok.eos_token_id] for r in rollouts]
        responses = tok.batch_decode(response_ids, skip_special_tokens=True)
        batch = response_batch([r["prompt_ids"] for r in rollouts], response_ids, tok.pad_token_id)
        with self.phase("score", it):
            scored = torch.tensor(roles.reward.map("score_items", list(zip(sample_prompts, responses))),
                                  dtype=torch.float32)
        ref_logp = None
        if not roles.own_reference:
            with self.phase("reference", it):
                ref_logp = roles.reference.map_tensors("logprobs",
                                                       {k: batch[k] for k in ("input_ids", "attention_mask")})
        with self.phase("forward", it):
            old = roles.learners.forward(batch)
        if ref_logp is None:  # the LoRA policy's base, from the learner's forward with the adapter off
            ref_logp = old["ref_logp"]
        finished = torch.tensor([float(r["finished"]) for r in rollouts])
        score = scored[:, 0].clone() if mu is None else \
            (scored[:, 1:] * torch.tensor(self.cond.weights(np.repeat(mu, n, axis=0)), dtype=torch.float32)).sum(1)
        if cfg.reward.missing_eos_penalty is not None:
            score -= cfg.reward.missing_eos_penalty * (1.0 - finished)
        mask = batch["response_mask"]
        return Experience(idx, sample_prompts, responses, batch, finished, scored, score, old["logp"], ref_logp,
                          old["values"] * mask if "values" in old else None)

    def advantages(self, exp: Experience) -> Advantages:
        """The estimator's advantages (rayalign.losses.advantages) and the learner's training batch."""
        cfg, mask = self.cfg, exp.mask
        norm_score = normalise_scores(exp.score, cfg.algo.reward_norm, self.moments, cfg.algo.reward_clip)
        kl_t = kl_penalty(exp.old_logp, exp.ref_logp, cfg.algo.kl_estimator) * mask
        beta, kl_in_loss = self.kl_ctl.beta, cfg.algo.kl_in_loss
        advantages, returns = self.estimator.fn(AdvantageInputs(
            scores=norm_score, token_kl=kl_t, mask=mask, beta=0.0 if kl_in_loss else beta, values=exp.values,
            groups=self.groups, gamma=cfg.algo.gamma, lam=cfg.algo.lam, kl_in_reward=not kl_in_loss))
        if self.estimator.needs_values and cfg.algo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        train_batch = {**exp.batch, "old_logp": exp.old_logp, "advantages": advantages}
        if exp.values is not None:
            train_batch.update(old_values=exp.values, returns=returns)
        if kl_in_loss:
            train_batch["ref_logp"] = exp.ref_logp
        return Advantages(train_batch, norm_score, kl_t, advantages, beta, kl_in_loss)

    def train(self, adv: Advantages, it: int) -> dict[str, float]:
        with self.phase("train", it):
            return self.roles.learners.train(adv.train_batch, {**self.cfg.algo.model_dump(), "beta": adv.beta}, it)

    def sync(self, it: int) -> SyncStats:
        with self.phase("sync", it):
            return self.roles.push_weights()

    def metrics(self, exp: Experience, adv: Advantages, trained: dict[str, float], synced: SyncStats
                ) -> dict[str, float]:
        """The iteration's metrics; updates the KL controller with the sequence KL."""
        cfg, mask, B, n = self.cfg, exp.mask, self.cfg.prompts_per_step, self.cfg.rollout.n
        seq_kl = float(((exp.old_logp - exp.ref_logp) * mask).sum(1).mean())  # k1 summed over the response
        self.kl_ctl.update(seq_kl, B * n)
        total_reward = adv.normalised_score - (0.0 if adv.kl_in_loss else adv.beta) * adv.token_kl.sum(1)
        objectives = self.roles.objectives
        m: dict[str, float] = {
            "reward/score": float(exp.score.mean()), "reward/score_std": float(exp.score.std()),
            "reward/normalised": float(adv.normalised_score.mean()), "reward/total": float(total_reward.mean()),
            "kl/sequence": seq_kl, "kl/token_estimate": float(masked_mean(adv.token_kl, mask)), "kl/beta": adv.beta,
            "response/length": float(mask.sum(1).mean()), "response/finished": float(exp.finished.mean()),
            **({"value/mean": float(masked_mean(exp.values, mask))} if exp.values is not None else {}),
            "advantage/mean_raw": float(masked_mean(adv.advantages, mask)),
            **{f"reward/{name}": float(exp.scored[:, 1 + j].mean()) for j, name in enumerate(objectives)
               if len(objectives) > 1},
            **trained, **self.times, **synced.as_metrics(), "restarts": float(self.roles.restarts),
        }
        gold = gold_of(exp.prompts, exp.responses)
        if gold is not None:
            m["gold/combined"] = float((gold @ np.asarray(cfg.world.weights)).mean())
            m.update({f"gold/{o}": float(gold[:, j].mean()) for j, o in enumerate(OBJECTIVES)})
        m["data/first_prompt"] = float(exp.prompt_index[0])
        return m


# ---- the loop ----------------------------------------------------------------------------------------

def run_rl(cfg: RLConfig, method: str, resume: bool = False,
           on_step: Callable[[int, dict[str, float], Roles], None] | None = None,
           on_phase: Callable[[str, int, Roles], None] | None = None) -> Path:
    """Train with PPO, SALSA or a critic-free estimator; returns the final policy's directory
    (OUTPUT/policy). `on_step(iteration, metrics, roles)` runs after each iteration,
    `on_phase(name, iteration, roles)` as each phase starts."""
    cfg = resolve_roles(cfg, method)
    out = Path(cfg.output)
    done = claim(out, method, resume)
    if done is not None:
        return done
    prompts = load_prompts(cfg.prompts, cfg.world.seed, cfg.prompts_per_step)
    tok = load_tokenizer(cfg.policy)
    with RaySession(cfg, method, resume, plan=lambda: PlacementPlan.from_config(cfg)) as run:
        roles = run.own(Roles(cfg, run.plan), Roles.close)
        phases = Phases(cfg, roles, tok, prompts, on_phase)
        monitor = KLHackMonitor(cfg.monitor)
        start = run.resume_learners(roles.learners, cfg.steps)
        if run.saved is not None:
            phases.load_state_dict(run.saved)
            monitor.load_state_dict(run.saved["monitor"])
        first = roles.push_weights()
        log.info("%s: %s rollout engine; first weight sync %.1f MB in %.2fs (%s)", method, roles.engine,
                 first.bytes / 1e6, first.seconds, cfg.sync.kind)
        history: list[dict[str, float]] = []
        bar = tqdm(range(start, cfg.steps), desc=method, initial=start, total=cfg.steps)
        for it in bar:
            t_iter = time.perf_counter()
            phases.times = {}
            experience = phases.collect(it)
            advantages = phases.advantages(experience)
            trained = phases.train(advantages, it)
            synced = phases.sync(it)
            metrics = phases.metrics(experience, advantages, trained, synced)
            metrics["time/iteration"] = time.perf_counter() - t_iter
            alarm = monitor.update(it + 1, metrics["response/length"], metrics["kl/sequence"])
            metrics["monitor/collapse"] = float(alarm is not None)
            run.logger.log(it + 1, metrics)
            history.append({"iteration": it + 1, **metrics})
            bar.set_postfix(score=f"{metrics['reward/score']:.3f}", kl=f"{metrics['kl/sequence']:.2f}",
                            len=f"{metrics['response/length']:.1f}")
            stop = alarm is not None and alarm.stop
            if (cfg.save_every and (it + 1) % cfg.save_every == 0) or it + 1 == cfg.steps or stop:
                save_run_state(out, roles.learners, it + 1, {**phases.state_dict(), "monitor": monitor.state_dict()})
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


def _summary(method: str, cfg: RLConfig, history: list[dict[str, float]], monitor: KLHackMonitor,
             roles: Roles) -> dict[str, Any]:
    last = history[-1] if history else {}
    first = history[0] if history else {}
    keys = ["reward/score", "kl/sequence", "response/length", "gold/combined"]
    return {
        "method": method, "iterations": last.get("iteration", 0), "engine": roles.engine,
        "reward": cfg.reward.describe(), "estimator": cfg.algo.estimator, "beta": cfg.algo.beta,
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
