"""The DeepSpeed learner: one plain class used for pre-training, SFT, reward models and, wrapped
in Ray actors, for the distributed RL learner groups. No Ray in here.

    learner = Learner(model, LearnerConfig(zero_stage=2), total_steps=1000)
    metrics = learner.step(micro_batches, loss_fn)   # one optimiser step
    learner.save_pretrained("out/", tokenizer)       # HF directory, atomically, from rank 0
    learner.save_state("state/", {"step": 10})       # full training state for resume
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rayalign.config.schema import LearnerConfig
from rayalign.learner.dist import barrier, deepspeed, init_process_group, is_rank0
from rayalign.models import lora
from rayalign.models.checkpoint import save_model
from rayalign.utils.device import to_device

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # torch's AdamW: no fused-kernel compilation; allowed with CPU offload too.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                   "betas": [0.9, 0.95], "torch_adam": True}},
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def has_schedule(cfg: LearnerConfig, total_steps: int | None) -> bool:
    """A scheduler is needed for a warm-up, or for a cosine decay over a known number of steps."""
    return cfg.warmup_steps > 0 or (cfg.lr_schedule == "cosine" and bool(total_steps))


def lr_factor(cfg: LearnerConfig, total_steps: int | None) -> Callable[[int], float]:
    """lr multiplier per optimiser step: linear warm-up, then cosine to 10% over `total_steps`
    (when the run knows them and asks for it) or constant."""
    decay_over = (total_steps or 0) if cfg.lr_schedule == "cosine" else 0
    return warmup_cosine(cfg.warmup_steps, decay_over)


def wrap_lora(model: torch.nn.Module, cfg: LearnerConfig, base: str | None,
              heads: list[str] | None = None) -> torch.nn.Module:
    """With cfg.lora.r > 0: a PeftModel whose adapter (and `heads`, trained in full) is all that
    trains; otherwise the model unchanged."""
    return lora.apply_lora(model, cfg.lora, heads, base) if cfg.lora.enabled else model


class Learner:
    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, total_steps: int | None = None):
        init_process_group(cfg.backend)
        self.cfg = cfg
        if cfg.lora.enabled and not lora.is_peft(model):
            raise ValueError("learner.lora.r > 0 but the model has no adapter: wrap it with wrap_lora() first")
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"learner.gradient_checkpointing: {type(model).__name__} does not support it")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sched = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total_steps))) \
            if has_schedule(cfg, total_steps) else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg), lr_scheduler=sched)
        self.global_step = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def is_lora(self) -> bool:
        return lora.is_peft(self.engine.module)

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Forward passes inside run the frozen base (LoRA off): pi_ref without a second copy."""
        if not self.is_lora:
            raise RuntimeError("adapter_disabled() needs a LoRA learner")
        with self.engine.module.disable_adapter():
            yield

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def step(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFn) -> dict[str, float]:
        """One optimiser step over `grad_accum` micro-batches; returns averaged metrics."""
        if len(micro_batches) != self.cfg.grad_accum:
            raise ValueError(f"step() got {len(micro_batches)} micro-batches, learner.grad_accum is {self.cfg.grad_accum}")
        self.engine.train()
        totals: dict[str, float] = {}
        for mb in micro_batches:
            mb = to_device(mb, self.device)
            loss, metrics = loss_fn(self.engine, mb)
            self.engine.backward(loss)
            self.engine.step()
            metrics = {"loss": float(loss.detach()), **metrics}
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / len(micro_batches)
        self.global_step += 1
        totals["lr"] = float(self.optimizer.param_groups[0]["lr"])
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            totals["grad_norm"] = float(gn)
        return totals

    # ---- weights out ----------------------------------------------------------------------
    def iter_full_params(self, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (un-partitioned) parameters one by one, on every rank; under ZeRO-3 each is
        gathered just for its turn, so peak memory is one parameter, not the model.
        `trainable_only`: just what trains (a LoRA learner's A, B and heads)."""
        for name, p in self.module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield name, p.detach().clone()
            else:
                yield name, p.detach()

    def iter_adapter_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """A LoRA learner's adapter tensors under their PEFT file names (what vLLM and PEFT load)."""
        for name, t in self.iter_full_params(trainable_only=True):
            yield lora.file_name(name), t

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (collective: every rank must call it)."""
        return {n: t.to("cpu", copy=True) for n, t in self.iter_full_params()}

    def save_pretrained(self, out: str | Path, tokenizer: Any = None, overwrite: bool = False,
                        extra: dict[str, Any] | None = None) -> Path:
        """HF directory (safetensors) written atomically by rank 0; collective. A LoRA learner
        writes a PEFT adapter directory (and OUTPUT/merged with lora.save_merged)."""
        if self.is_lora:
            state = {n: t.to("cpu", copy=True) for n, t in self.iter_adapter_params()}
            if is_rank0():
                lora.save_adapter(self.module, tokenizer, out, state, overwrite=overwrite, extra=extra,
                                  merged=self.cfg.lora.save_merged)
            barrier()
            return Path(out)
        sd = self.full_state_dict()
        if is_rank0():
            save_model(self.module, tokenizer, out, state_dict=sd, overwrite=overwrite, extra=extra)
        barrier()
        return Path(out)

    # ---- training state for resume ---------------------------------------------------------
    def save_state(self, directory: str | Path, client_state: dict[str, Any], tag: str | None = None) -> None:
        """Model, optimiser, scheduler and `client_state` (step, data position, RNG, ...);
        collective. `tag` names the state (default step<optimiser step>)."""
        state = dict(client_state, global_step=self.global_step)
        self.engine.save_checkpoint(str(directory), tag=tag or f"step{self.global_step}", client_state=state)

    def load_state(self, directory: str | Path, tag: str | None = None) -> dict[str, Any] | None:
        """Load the state saved in `directory` under `tag` (default: the latest); None if there is none."""
        if tag is None and not (Path(directory) / "latest").is_file():
            return None
        if tag is not None and not (Path(directory) / tag).is_dir():
            raise RuntimeError(f"no training state {tag!r} in {directory}")
        _, client = self.engine.load_checkpoint(str(directory), tag=tag)
        if client is None:
            raise RuntimeError(f"cannot load the training state in {directory}")
        self.global_step = int(client.get("global_step", 0))
        return client
