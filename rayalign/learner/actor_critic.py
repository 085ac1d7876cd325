"""One rank of the PPO learner group: the policy (actor) and, for an advantage estimator that
needs values (GAE), the critic, each a DeepSpeed `Learner`, in the torch.distributed group of all
ranks. The critic-free estimators (GRPO, RLOO, REINFORCE++) build no critic at all. No Ray in here: `LearnerGroup` wraps
it in actors; a test can run it in-process as a one-rank group.

Batches are right-padded sequences (prompt + response). Every per-token tensor is aligned with
input_ids[:, 1:] (position t scores the token at t + 1) and `response_mask` marks the positions
whose token is part of the response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayalign.config.schema import LearnerConfig, PPOAlgoConfig
from rayalign.learner.dist import init_process_group
from rayalign.learner.engine import Learner, wrap_lora
from rayalign.learner.policy import PolicyRank
from rayalign.losses.advantages import ADVANTAGES
from rayalign.losses.logprobs import token_logprobs
from rayalign.losses.policy import PolicyLossInputs, policy_loss_fn
from rayalign.losses.ppo import entropy, kl_penalty, masked_mean, value_loss
from rayalign.models.checkpoint import CheckpointError, check_dir, is_local, load_causal_lm, load_tokenizer


def load_value_model(path: str | Path) -> Any:
    """A per-token value model (token classification, one label) from a reward model or an LM."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    if is_local(path):
        check_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(path), num_labels=1)
        config.classifier_dropout = 0.0  # values must not depend on train/eval mode
        model = AutoModelForTokenClassification.from_pretrained(str(path), config=config, dtype=torch.float32)
    except Exception as exc:
        raise CheckpointError(f"cannot load a critic from {path}: {type(exc).__name__}: {exc}") from exc
    return model


class ActorCriticRank(PolicyRank):
    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, policy: str, critic: str | None,
              actor_cfg: dict[str, Any], critic_cfg: dict[str, Any], temperature: float = 1.0, seed: int = 0,
              own_reference: bool = False, total_steps: int | None = None) -> None:
        """`own_reference`: pi_ref is the LoRA policy's own base, computed here with the adapter
        disabled (no reference workers, no second copy of the model). `total_steps`: the run's
        optimiser steps, for the learning-rate schedule. `critic` None: no value model."""
        acfg, ccfg = LearnerConfig(**actor_cfg), LearnerConfig(**critic_cfg)
        init_process_group(acfg.backend, rank, world_size, master_addr, master_port)
        self.rank, self.world_size, self.temperature, self.seed = rank, world_size, temperature, seed
        torch.manual_seed(seed)
        policy_model, _ = load_causal_lm(policy, with_tokenizer=False)
        self.tokenizer = load_tokenizer(policy)
        self.actor = Learner(wrap_lora(policy_model, acfg, policy), acfg, total_steps)
        self.critic: Learner | None = None
        if critic is not None:
            critic_model = load_value_model(critic)
            critic_model.config.pad_token_id = self.tokenizer.pad_token_id
            self.critic = Learner(wrap_lora(critic_model, ccfg, critic, heads=["score"]), ccfg, total_steps)
        if own_reference and not self.actor.is_lora:
            raise ValueError("own_reference needs a LoRA policy (learner.actor.lora.r > 0)")
        self.own_reference = own_reference
        self.learners = {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    # ---- experience ------------------------------------------------------------------------
    def _values(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out.squeeze(-1)[:, :-1].float()

    def _logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Old policy log-probs and old values of a shard (before this iteration's updates), and
        with `own_reference` pi_ref's log-probs (`ref_logp`, the adapter disabled)."""
        assert self.actor is not None, "setup() first"
        self.actor.engine.eval()
        logp = token_logprobs(self._logits(self.actor.engine, batch), batch["input_ids"], self.temperature)
        out = {"logp": logp}
        if self.critic is not None:
            self.critic.engine.eval()
            out["values"] = self._values(self.critic.engine, batch)
        if self.own_reference:
            with self.actor.adapter_disabled():
                out["ref_logp"] = token_logprobs(self._logits(self.actor.engine, batch), batch["input_ids"],
                                                 self.temperature)
        return out

    def train(self, batch: dict[str, torch.Tensor], algo: dict[str, Any], iteration: int) -> dict[str, float]:
        """`algo.epochs` passes over this rank's shard in mini-batches; one optimiser step of the
        actor (and of the critic, when there is one) per mini-batch. With the KL as a loss term the
        batch carries `ref_logp` and the policy loss adds beta * k3. Returns metrics averaged over
        the steps."""
        assert self.actor is not None, "setup() first"
        a = PPOAlgoConfig(**algo)
        kl_in_loss = a.kl_in_loss
        if kl_in_loss and "ref_logp" not in batch:
            raise ValueError(f"algo.estimator {a.estimator!r} with the KL as a loss term needs ref_logp in the batch")
        token_sum = ADVANTAGES[a.estimator].token_sum_loss
        if token_sum and a.token_sum_norm is None:
            raise ValueError(f"algo.estimator {a.estimator!r} sums its loss over tokens: set algo.token_sum_norm "
                             "(run_rl sets it to rollout.max_new_tokens)")
        sum_norm = a.token_sum_norm if token_sum else None
        surrogate = policy_loss_fn(a.policy_loss).fn
        cfg = self.actor.cfg
        mini = cfg.micro_batch_size * cfg.grad_accum
        n = batch["input_ids"].shape[0]
        if n % mini:
            raise ValueError(f"shard of {n} samples is not a multiple of the mini-batch ({mini})")
        rng = np.random.default_rng([self.seed, iteration, self.rank])
        T = self.temperature

        def actor_loss(model: Any, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            logits = self._logits(model, mb)
            logp = token_logprobs(logits, mb["input_ids"], T)
            loss, m = surrogate(PolicyLossInputs(logp, mb["old_logp"], mb["advantages"], mb["response_mask"], a.clip,
                                                 a.dual_clip, sum_norm))
            if kl_in_loss:
                kl = masked_mean(kl_penalty(logp, mb["ref_logp"], "k3"), mb["response_mask"])
                loss = loss + a.beta * kl
                m["kl_loss"] = float(kl.detach())
            ent = entropy(logits[:, :-1] / T, mb["response_mask"])
            if a.entropy_coef:
                loss = loss - a.entropy_coef * ent
            return loss, {**m, "entropy": float(ent.detach())}

        def critic_loss(model: Any, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            values = self._values(model, mb)
            loss, m = value_loss(values, mb["old_values"], mb["returns"], mb["response_mask"], a.value_clip)
            return loss, m

        totals: dict[str, float] = {}
        steps = 0
        for _ in range(a.epochs):
            order = rng.permutation(n)
            for s in range(0, n, mini):
                idx = torch.as_tensor(order[s:s + mini])
                micro = [{k: v[idx[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size]] for k, v in batch.items()}
                         for j in range(cfg.grad_accum)]
                am = self.actor.step(micro, actor_loss)
                cm = self.critic.step(micro, critic_loss) if self.critic is not None else {}
                merged = {**{f"policy/{k}": v for k, v in am.items()}, **{f"value/{k}": v for k, v in cm.items()}}
                for k, v in merged.items():
                    totals[k] = totals.get(k, 0.0) + v
                steps += 1
        return {k: v / steps for k, v in totals.items()}
