"""PPO and SALSA on Ray: the controller, one readable loop over the roles.

    rayalign train ppo   --config ppo.yaml   policy=runs/sft/sft-0 output=runs/ppo
    rayalign train salsa --config salsa.yaml reference.models=[runs/sft/sft-0,runs/sft/sft-1]

SALSA is this very loop with a soup as pi_ref (SPEC section 1); plain PPO's pi_ref is the SFT
model the policy starts from. Each iteration:

    generate   rollout workers sample responses to a batch of prompts (vLLM or transformers)
    score      reward scorers give R(x, y) (a reward model or the gold functions)
    reference  reference workers give log pi_ref of every response token (checkpoint or soup)
    forward    the learner group gives log pi_old and V_old
    advantages r_t = -beta kl_t (+ R on the last token), GAE, whitening -- here, on the controller
    train      several PPO epochs of mini-batches on the learner group (actor and critic)
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
from ray.exceptions import ActorUnavailableError, RayActorError
from tqdm.auto import tqdm

from rayalign.config.core import dump_config
from rayalign.config.schema import RLConfig
from rayalign.data.loaders import load_rows
from rayalign.data.tokenize import encode_prompt, response_batch
from rayalign.distributed.cluster import connect
from rayalign.distributed.placement import PlacementPlan
from rayalign.distributed.pool import ActorPool
from rayalign.learner.group import LearnerGroup
from rayalign.losses.ppo import (
    AdaptiveKL,
    RunningMoments,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    normalise_scores,
    token_rewards,
)
from rayalign.models.checkpoint import check_dir, is_local, load_tokenizer
from rayalign.recipes.loop import batch_indices
from rayalign.recipes.monitor import KLHackMonitor
from rayalign.reference.worker import ReferenceActor
from rayalign.reward.scorer import RewardActor
from rayalign.rollout.worker import RolloutActor
from rayalign.sync.collective import CollectiveSync
from rayalign.sync.object_store import ObjectStoreSync
from rayalign.utils.io import OutputExistsError, atomic_write_json, atomic_write_text
from rayalign.utils.logging import RunLogger, log
from rayalign.world import build
from rayalign.world.gold import OBJECTIVES, gold_vector

METHODS = ("ppo", "salsa")


# ---- inputs ------------------------------------------------------------------------------------

def resolve_roles(cfg: RLConfig, method: str) -> RLConfig:
    """Fill method defaults: PPO's reference is the policy's own start; SALSA needs a soup."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    updates: dict[str, Any] = {}
    if method == "salsa" and len(cfg.reference.models) < 2:
        raise ValueError("SALSA needs a soup reference: reference.models must list at least two SFT models "
                         f"(got {cfg.reference.models})")
    if not cfg.reference.models:
        updates["reference"] = cfg.reference.model_copy(update={"models": [cfg.policy]})
    if cfg.critic is None:
        updates["critic"] = cfg.reward.model if cfg.reward.kind == "model" else cfg.policy
    cfg = cfg.model_copy(update=updates)
    for what, path in [("policy", cfg.policy), ("critic", cfg.critic), ("reward.model", cfg.reward.model),
                       *[("reference.models", m) for m in cfg.reference.models]]:
        if path and is_local(path):
            try:
                check_dir(path)
            except Exception as exc:
                raise ValueError(f"{what}: {exc}") from None
    return cfg


def load_prompts(cfg: RLConfig) -> list[str]:
    if cfg.prompts.source == "world":
        splits = build.split_prompts(cfg.world.seed)
        if cfg.prompts.split not in splits:
            raise ValueError(f"prompts.split {cfg.prompts.split!r} is not a world split; use one of {sorted(splits)}")
        prompts = splits[cfg.prompts.split]
    else:
        prompts = list(load_rows(cfg.prompts.source, "prompt", cfg.prompts.split, cfg.prompts.limit)["prompt"])
    prompts = prompts[:cfg.prompts.limit] if cfg.prompts.limit else prompts
    if len(prompts) < cfg.prompts_per_step:
        raise ValueError(f"{len(prompts)} prompts is fewer than prompts_per_step={cfg.prompts_per_step}")
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
        self.learners = LearnerGroup(plan, cfg.learner, cfg.policy, cfg.critic or cfg.policy, r.temperature, cfg.seed)
        sampling = {"temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens, "n": r.n,
                    "seed": cfg.seed}
        workers = [RolloutActor.options(**plan.options("rollout", i), max_restarts=r.max_restarts)
                   .remote(r.engine, cfg.policy, sampling) for i in range(r.workers)]
        scorers = [RewardActor.options(**plan.options("reward", i), max_restarts=cfg.reward.max_restarts)
                   .remote(cfg.reward.kind, cfg.reward.model, cfg.reward.weights) for i in range(cfg.reward.workers)]
        refs = [ReferenceActor.options(**plan.options("reference", i), max_restarts=cfg.reference.max_restarts)
                .remote(cfg.reference.models, cfg.reference.weights, r.temperature)
                for i in range(cfg.reference.workers)]
        bucket = int(cfg.sync.bucket_mb * 1024**2)
        if cfg.sync.kind == "collective":
            gpus = cfg.learner.resources.num_gpus > 0 and r.resources.num_gpus > 0
            self.sync: Any = CollectiveSync(self.learners, workers, bucket, "nccl" if gpus else "gloo")
        else:
            self.sync = ObjectStoreSync(workers, bucket, source=self.learners)
        self.rollout = ActorPool("rollout", workers, on_restart=self._resync)
        self.reward = ActorPool("reward", scorers)
        self.reference = ActorPool("reference", refs)
        self.engine = ray.get(workers[0].engine_name.remote())
        self.objectives = ray.get(scorers[0].objective_names.remote())
        self.resyncs = 0

    def _resync(self, i: int) -> None:
        stats = self.sync.resync(i)
        self.resyncs += 1
        log.info("re-synced rollout worker %d: %.1f MB in %.2fs", i, stats.bytes / 1e6, stats.seconds)

    def push_weights(self) -> Any:
        """The learner's weights to every rollout worker. A worker that dies during the object-store
        sync is restarted by Ray and re-synced on its own; the others already hold the new weights."""
        try:
            return self.sync.push()
        except (RayActorError, ActorUnavailableError) as exc:
            if isinstance(self.sync, CollectiveSync):
                raise
            log.warning("a rollout worker failed during the weight sync (%s); recovering", type(exc).__name__)
            back = self.rollout.recover_restarted()
            if not back:
                raise
            return self.sync.push(workers=[w for i, w in enumerate(self.rollout.actors) if i not in back])

    def close(self) -> None:
        self.learners.shutdown()
        for pool in (self.rollout, self.reward, self.reference):
            for a in pool.actors:
                ray.kill(a, no_restart=True)


# ---- run state -------------------------------------------------------------------------------------

def _save_state(out: Path, roles: Roles, iteration: int, controller: dict[str, Any]) -> None:
    """Learner states (actor, critic, optimisers) under tag iter<N>, then the controller's state,
    written atomically last: a kill in between leaves the previous state the valid one."""
    state = out / "state"
    tag = f"iter{iteration}"
    roles.learners.save_state(str(state), {"iteration": iteration}, tag)
    previous = _read_controller(out)
    atomic_write_json(state / "controller.json", {**controller, "iteration": iteration, "tag": tag})
    if previous is not None and previous["tag"] != tag:
        for part in ("actor", "critic"):
            shutil.rmtree(state / part / previous["tag"], ignore_errors=True)


def _read_controller(out: Path) -> dict[str, Any] | None:
    p = out / "state" / "controller.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ---- the loop ----------------------------------------------------------------------------------------

def run_rl(cfg: RLConfig, method: str, resume: bool = False,
           on_step: Callable[[int, dict[str, float], Roles], None] | None = None) -> Path:
    """Train with PPO or SALSA; returns the directory of the final policy (OUTPUT/policy)."""
    cfg = resolve_roles(cfg, method)
    out = Path(cfg.output)
    if out.exists() and not resume:
        raise OutputExistsError(f"output already exists: {out} (pass --resume to continue that run, "
                                "or choose another output)")
    if (out / "policy").is_dir():
        log.info("%s: %s already finished; kept", method, out / "policy")
        return out / "policy"
    prompts = load_prompts(cfg)
    tok = load_tokenizer(cfg.policy)
    encoded = [encode_prompt(tok, p) for p in prompts]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", f"# rayalign train {method}\n" + dump_config(cfg))

    B, n = cfg.prompts_per_step, cfg.rollout.n
    per_epoch = len(prompts) // B
    started_ray = connect(cfg.ray_address)
    plan = PlacementPlan.from_config(cfg)
    print(plan.describe(), flush=True)
    plan.reserve(cfg.placement.timeout_s)
    roles: Roles | None = None
    logger = RunLogger(out / "logs", "")
    try:
        roles = Roles(cfg, plan)
        kl_ctl = AdaptiveKL(cfg.algo.beta, cfg.algo.kl_target, cfg.algo.kl_horizon)
        moments = RunningMoments()
        monitor = KLHackMonitor(cfg.monitor)
        start = 0
        saved = _read_controller(out) if resume else None
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
            with timed(times, "generate"):
                rollouts = roles.rollout.map("generate", [encoded[i] for i in idx], sampling)
            prompt_ids = [r["prompt_ids"] for r in rollouts]
            response_ids = [r["response_ids"] or [tok.eos_token_id] for r in rollouts]
            responses = tok.batch_decode(response_ids, skip_special_tokens=True)
            batch = response_batch(prompt_ids, response_ids, tok.pad_token_id)
            mask = batch["response_mask"]

            with timed(times, "score"):
                scored = torch.tensor(roles.reward.map("score_items", list(zip(sample_prompts, responses))),
                                      dtype=torch.float32)
            with timed(times, "reference"):
                ref_logp = roles.reference.map_tensors("logprobs", {k: batch[k] for k in ("input_ids", "attention_mask")})
            with timed(times, "forward"):
                old = roles.learners.forward(batch)

            # rewards and advantages (SPEC section 1)
            finished = torch.tensor([float(r["finished"]) for r in rollouts])
            score = scored[:, 0].clone()
            if cfg.reward.missing_eos_penalty is not None:
                score -= cfg.reward.missing_eos_penalty * (1.0 - finished)
            norm_score = normalise_scores(score, cfg.algo.reward_norm, moments, cfg.algo.reward_clip)
            kl_t = kl_penalty(old["logp"], ref_logp, cfg.algo.kl_estimator) * mask
            beta = kl_ctl.beta
            rewards = token_rewards(norm_score, kl_t, beta, mask)
            values = old["values"] * mask
            advantages, returns = gae(rewards, values, mask, cfg.algo.gamma, cfg.algo.lam)
            if cfg.algo.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            train_batch = {**batch, "old_logp": old["logp"], "old_values": values, "advantages": advantages,
                           "returns": returns}

            with timed(times, "train"):
                train_metrics = roles.learners.train(train_batch, cfg.algo.model_dump(), it)
            seq_kl = float(((old["logp"] - ref_logp) * mask).sum(1).mean())  # k1 summed over the response
            kl_ctl.update(seq_kl, B * n)
            with timed(times, "sync"):
                stats = roles.push_weights()

            lengths = mask.sum(1)
            metrics: dict[str, float] = {
                "reward/score": float(score.mean()), "reward/score_std": float(score.std()),
                "reward/normalised": float(norm_score.mean()),
                "reward/total": float((rewards * mask).sum(1).mean()),
                "kl/sequence": seq_kl, "kl/token_estimate": float(masked_mean(kl_t, mask)), "kl/beta": beta,
                "response/length": float(lengths.mean()), "response/finished": float(finished.mean()),
                "value/mean": float(masked_mean(values, mask)),
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
                _save_state(out, roles, it + 1, {"kl": kl_ctl.state_dict(), "moments": moments.state_dict(),
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
        roles.learners.save_policy(str(out / "policy"), extra={"stage": method, **summary})
        atomic_write_json(out / "summary.json", summary)
        print(_format_summary(summary), flush=True)
        shutil.rmtree(out / "state", ignore_errors=True)
        return out / "policy"
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
