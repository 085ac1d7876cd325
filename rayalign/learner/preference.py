"""One rank of the SPO / DPO / IPO learner group: the policy (a DeepSpeed `Learner`) and pi_ref
(one checkpoint or a soup built on load by the merge engine) in the same process.

pi_ref lives beside the policy on purpose. SPO's global KL needs pi_ref's whole distribution at
every position of every online sample -- [samples, positions, vocabulary] floats, 1 GB for 64
samples x 128 positions x a 32k vocabulary in fp32 -- and shipping that from a reference actor
every step would cost more than the forward pass that makes it. Here the reference forward runs
next to the policy's and only scalars leave the rank. DPO and IPO take their reference
log-probs from the same model.

Batches arrive as lists of micro-batches (one per gradient-accumulation step). A micro-batch
holds the pairs (`input_ids`, `attention_mask`, `response_mask`: chosen rows first, then
rejected) and, for SPO with beta > 0, online samples under `kl_` keys.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import torch

from rayalign.config.schema import LearnerConfig, PrefAlgoConfig, reference_dtype, reference_is_policy
from rayalign.learner.dist import init_process_group
from rayalign.learner.engine import Learner, wrap_lora
from rayalign.learner.group import RankGroup, mean_metrics
from rayalign.learner.policy import PolicyRank
from rayalign.losses.logprobs import full_kl, token_logprobs
from rayalign.losses.ppo import entropy
from rayalign.losses.preference import PairLogprobs, global_kl, preference_loss, sequence_logprob
from rayalign.models.checkpoint import load_causal_lm, load_tokenizer
from rayalign.reference.worker import ReferenceWorker


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


class PreferenceRank(PolicyRank):
    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, policy: str,
              reference: list[str], reference_weights: list[float] | None, actor_cfg: dict[str, Any],
              seed: int = 0, total_steps: int | None = None) -> None:
        cfg = LearnerConfig(**actor_cfg)
        init_process_group(cfg.backend, rank, world_size, master_addr, master_port)
        self.rank, self.seed = rank, seed
        torch.manual_seed(seed)
        model, _ = load_causal_lm(policy, with_tokenizer=False)
        self.tokenizer = load_tokenizer(policy)
        self.actor = Learner(wrap_lora(model, cfg, policy), cfg, total_steps)
        self.learners = {"actor": self.actor}
        if self.actor.is_lora and reference_is_policy(policy, reference, reference_weights):
            self.reference = None  # pi_ref = the policy with its adapter disabled: no second copy
            self.reference_description = {"models": [policy], "weights": [1.0], "adapter_disabled": True}
        else:
            self.reference = ReferenceWorker(reference, reference_weights,
                                             dtype=reference_dtype("auto", cfg.precision))  # the policy's dtype
            self.reference.model.to(self.actor.device)
            self.reference_description = self.reference.describe()

    def describe_reference(self) -> dict[str, Any]:
        return self.reference_description

    @contextmanager
    def _reference(self, model: Any) -> Iterator[Any]:
        """pi_ref for a forward pass: the reference model, or `model` with its adapter disabled."""
        if self.reference is not None:
            yield self.reference.model
        else:
            assert self.actor is not None
            with self.actor.adapter_disabled():
                yield model

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], method: str,
                   algo: dict[str, Any]) -> dict[str, float]:
        """One optimiser step of the preference loss `method` (rayalign.losses.preference's registry:
        spo, dpo, ipo, ...) over this rank's micro-batches."""
        assert self.actor is not None, "setup() first"
        a = PrefAlgoConfig(**algo)
        loss_def = preference_loss(method)
        clock = {"reference": 0.0, "kl": 0.0}

        def loss_fn(model: Any, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            ids, attn, resp = mb["input_ids"], mb["attention_mask"], mb["response_mask"]
            n = ids.shape[0] // 2
            logp = sequence_logprob(token_logprobs(_forward(model, ids, attn), ids), resp)
            w, l_ = logp[:n], logp[n:]
            m: dict[str, float] = {"margin": float((w - l_).detach().mean()),
                                   "accuracy": float((w > l_).float().mean())}
            if loss_def.needs_reference:
                t0 = time.perf_counter()
                with torch.no_grad(), self._reference(model) as ref_model:
                    ref = sequence_logprob(token_logprobs(_forward(ref_model, ids, attn), ids), resp)
                clock["reference"] += time.perf_counter() - t0
                rw, rl = ref[:n], ref[n:]
                loss = loss_def.fn(PairLogprobs(w, l_, rw, rl), a)
                h = (w - rw) - (l_ - rl)
                m.update({"implicit_margin": float(h.detach().mean()),
                          "implicit_accuracy": float((h > 0).float().mean())})
            else:
                loss = loss_def.fn(PairLogprobs(w, l_), a)
            m["preference_loss"] = float(loss.detach())
            if "kl_input_ids" in mb:
                t0 = time.perf_counter()
                kid, kattn, kmask = mb["kl_input_ids"], mb["kl_attention_mask"], mb["kl_response_mask"]
                with torch.no_grad(), self._reference(model) as ref_model:
                    ref_logits = _forward(ref_model, kid, kattn)
                t1 = time.perf_counter()
                logits = _forward(model, kid, kattn)
                kl = global_kl(full_kl(logits, ref_logits), kmask)
                clock["reference"] += t1 - t0
                clock["kl"] += time.perf_counter() - t1
                loss = loss + a.kl_coef * kl
                m.update({"global_kl": float(kl.detach()),
                          "sample_entropy": float(entropy(logits[:, :-1].detach(), kmask)),
                          "sample_length": float(kmask.sum(-1).mean())})
            return loss, m

        t0 = time.perf_counter()
        metrics = self.actor.step(micro_batches, loss_fn)
        metrics["time/rank_step"] = time.perf_counter() - t0
        metrics["time/rank_reference_forward"] = clock["reference"]
        metrics["time/rank_kl_forward"] = clock["kl"]
        return metrics


class PreferenceGroup(RankGroup):
    """N PreferenceRank actors (policy + colocated pi_ref) in one torch.distributed group."""

    def __init__(self, plan: Any, ranks: int, actor_cfg: LearnerConfig, policy: str, reference: list[str],
                 reference_weights: list[float] | None, seed: int = 0, total_steps: int | None = None,
                 wait: bool = True):
        super().__init__(plan, ranks, PreferenceRank, wait=wait, policy=policy, reference=reference,
                         reference_weights=reference_weights, actor_cfg=actor_cfg.model_dump(), seed=seed,
                         total_steps=total_steps)

    def train_step(self, shards: list[list[dict[str, torch.Tensor]]], method: str,
                   algo: dict[str, Any]) -> dict[str, float]:
        return mean_metrics(self.call_sharded("train_step", shards, method, algo))

    def describe_reference(self) -> dict[str, Any]:
        return ray.get(self.ranks[0].describe_reference.remote())
