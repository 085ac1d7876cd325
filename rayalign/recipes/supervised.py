"""Pre-training, SFT and reward-model recipes: each a readable function over the learner.

    rayalign pretrain model=presets/small output=runs/base
    rayalign sft base=runs/base output=runs/sft seeds=[0,1]
    rayalign rm base=runs/sft/sft-0 output=runs/rm
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayalign.config.core import ConfigError, dump_config
from rayalign.config.schema import DataConfig, PretrainConfig, RMConfig, SFTConfig, WorldConfig
from rayalign.data.loaders import load_rows
from rayalign.data.tokenize import collate_lm, collate_pairs, encode_pair, encode_sft, render
from rayalign.distributed.train import expect_output, run_stage, stage_session
from rayalign.learner.dist import is_rank0
from rayalign.learner.engine import Learner, wrap_lora
from rayalign.losses.reward import bradley_terry_loss, pair_accuracy, select_objective
from rayalign.losses.sft import causal_lm_loss
from rayalign.models.checkpoint import check_dir, is_local, load_causal_lm, load_reward_model, load_tokenizer
from rayalign.recipes.loop import TrainState, fit, plan_steps, world
from rayalign.utils.io import atomic_write_text, claim_output
from rayalign.utils.logging import RunLogger, log
from rayalign.world import build
from rayalign.world.gold import OBJECTIVES


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return causal_lm_loss(logits, batch["labels"]), {}


# ---- pre-training ---------------------------------------------------------------------------

def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    return _one_model_stage(cfg, resume, "pretrain", "pretrain", _pretrain)


def _one_model_stage(cfg: PretrainConfig | RMConfig, resume: bool, name: str, desc: str,
                     body: Callable[[Any, TrainState], None]) -> Path:
    """A stage whose result is OUTPUT/model: claim OUTPUT, keep a finished model, else run
    `body(cfg, state)` on every rank (here or on Ray Train)."""
    out = Path(cfg.output)
    claim_output(out, resume)
    if (out / "model").is_dir():
        log.info("%s: %s already finished; kept", name, out / "model")
        return out / "model"
    with stage_session(cfg.train, out, resume, [name]):
        _write_config(out, cfg)
        run_stage(cfg.train, partial(body, cfg), out, name, resume, desc, cfg.learner.zero_stage)
    return expect_output(out / "model", cfg.train)


def _pretrain(cfg: PretrainConfig, state: TrainState) -> None:
    """One rank's pre-training (here, or in a Ray Train worker)."""
    out = Path(cfg.output)
    if (out / "model").is_dir():  # a restarted worker group after the model was written
        return
    seed_everything(cfg.learner.seed)
    model, tok = load_causal_lm(cfg.model)
    texts = list(build.pretrain_corpus(cfg.world.pretrain_docs, cfg.world.seed)["text"])
    examples = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        ids = ([tok.bos_token_id] + ids + [tok.eos_token_id])[: cfg.max_seq_len]
        examples.append({"input_ids": ids, "labels": ids})
    _, total = plan_steps(len(examples), cfg.learner, cfg.epochs, _world_size())
    learner = Learner(model, cfg.learner, total)
    logger = RunLogger(out / "logs", "pretrain/", enabled=is_rank0(), wandb=cfg.wandb, run_config=cfg.model_dump(),
                       name=out.name)
    m = fit(learner, examples, partial(collate_lm, pad_id=tok.pad_token_id), _lm_loss, cfg.epochs,
            cfg.learner.seed, logger, "pretrain", state=state, save_every=cfg.save_every)
    learner.save_pretrained(out / "model", tok, extra={"stage": "pretrain", "final_loss": m.get("loss")})
    logger.close()


# ---- SFT --------------------------------------------------------------------------------------

def sft_rows(data: DataConfig, world_cfg: WorldConfig, split: str | None = None) -> Any:
    if data.source == "world":
        prompts = build.split_prompts(world_cfg.seed)[split or data.split]
        ds = build.sft_dataset(prompts, world_cfg.sft_per_prompt, world_cfg.seed)
        return ds.select(range(min(data.limit, len(ds)))) if data.limit else ds
    return load_rows(data.source, "sft", split=split or data.split, limit=data.limit)


def seed_rows(cfg: SFTConfig, s: int) -> Any:
    """Seed s's demonstrations. `shared`: the same rows for every seed (seeds differ in data order,
    dropout and, under LoRA, the adapter's initialisation); `subset`: a random share of them drawn by
    the seed; `resample`: the world's demonstrations sampled again with the seed (other responses to
    the same prompts)."""
    if cfg.seed_data == "resample":
        if cfg.data.source != "world":
            raise ValueError("seed_data=resample draws new demonstrations from the embedded world; with "
                             f"data.source={cfg.data.source!r} use seed_data=subset")
        prompts = build.split_prompts(cfg.world.seed)[cfg.data.split]
        ds = build.sft_dataset(prompts, cfg.world.sft_per_prompt, cfg.world.seed + 7919 * (s + 1))
        return ds.select(range(min(cfg.data.limit, len(ds)))) if cfg.data.limit else ds
    rows = sft_rows(cfg.data, cfg.world)
    if cfg.seed_data == "subset":
        keep = max(1, round(cfg.seed_data_fraction * len(rows)))
        return rows.select(sorted(np.random.default_rng([s, 104729]).choice(len(rows), keep, replace=False)))
    return rows


def run_sft(cfg: SFTConfig, resume: bool = False) -> list[Path]:
    """Train one SFT model per seed from the same base: OUTPUT/sft-SEED. Seeds change the data
    order and, with `seed_data`, the demonstrations themselves (see `seed_rows`)."""
    out = Path(cfg.output)
    template = chat_template(cfg, load_tokenizer(check_dir(cfg.base) if is_local(cfg.base) else cfg.base))
    claim_output(out, resume)
    paths = [out / f"sft-{s}" for s in cfg.seeds]
    with stage_session(cfg.train, out, resume, [p.name for p in paths]):
        _write_config(out, cfg)
        for s, target in zip(cfg.seeds, paths):
            if target.is_dir():
                log.info("sft: seed %d already finished (%s); kept", s, target)
                continue
            run_stage(cfg.train, partial(_sft_seed, cfg, s, template), out, f"sft-{s}", resume, f"sft seed {s}",
                      cfg.learner.zero_stage)
            expect_output(target, cfg.train)
    return paths


def _sft_seed(cfg: SFTConfig, s: int, template: str, state: TrainState) -> None:
    """One rank's SFT of seed `s` (here, or in a Ray Train worker)."""
    out = Path(cfg.output)
    target = out / f"sft-{s}"
    if target.is_dir():  # a restarted worker group after the model was written
        return
    seed_everything(s)
    rows = seed_rows(cfg, s)
    model, tok = load_causal_lm(cfg.base)
    tok.chat_template = template
    examples = [encode_sft(tok, r["messages"], cfg.data.max_seq_len) for r in rows]
    examples = [e for e in examples if any(lbl != -100 for lbl in e["labels"])]
    _, total = plan_steps(len(examples), cfg.learner, cfg.epochs, _world_size())
    model = wrap_lora(model, cfg.learner, cfg.base)
    learner = Learner(model, cfg.learner.model_copy(update={"seed": s}), total)
    logger = RunLogger(out / "logs" / f"sft-{s}", "sft/", enabled=is_rank0(), wandb=cfg.wandb,
                       run_config=cfg.model_dump(), name=f"{out.name}-sft-{s}")
    m = fit(learner, examples, partial(collate_lm, pad_id=tok.pad_token_id), _lm_loss, cfg.epochs, s,
            logger, f"sft seed {s}", state=state, save_every=cfg.save_every)
    learner.save_pretrained(target, tok, extra={"stage": "sft", "seed": s, "base": str(cfg.base),
                                                "final_loss": m.get("loss")})
    logger.close()


def chat_template(cfg: SFTConfig, tok: Any) -> str:
    """The template SFT trains with: cfg.chat_template's file, else the base tokenizer's own."""
    if cfg.chat_template is None:
        if not tok.chat_template:
            raise ConfigError(f"the tokenizer of {cfg.base} has no chat template; set chat_template: FILE "
                              "(a Jinja template, e.g. clusters/recipes/salsa-7b/chat_template.jinja)")
        return tok.chat_template
    path = Path(cfg.chat_template)
    if not path.is_file():
        raise ConfigError(f"chat_template: no such file {path}")
    text = path.read_text()
    try:
        tok.chat_template = text
        render(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    except Exception as exc:  # jinja2 raises several types
        raise ConfigError(f"chat_template {path} does not render a conversation: {exc}") from exc
    return text


# ---- reward model --------------------------------------------------------------------------

def preference_rows(data: DataConfig, world_cfg: WorldConfig, objectives: str, split: str) -> Any:
    """World pairs: 'combined' labels on world.weights; 'each' stacks one-hot sets with an
    `objective` column. Real data: one objective."""
    if data.source != "world":
        if objectives == "each":
            raise ValueError("rm.objectives 'each' needs per-objective labels; real preference data has one "
                             "(use objectives: combined)")
        return load_rows(data.source, "preference", split=split, limit=data.limit)
    from datasets import concatenate_datasets

    prompts = build.split_prompts(world_cfg.seed)[split]
    seed = world_cfg.seed + (0 if split == "train" else 1000)
    if objectives == "combined":
        ds = build.preference_dataset(prompts, world_cfg.weights, world_cfg.pairs_per_prompt, world_cfg.noise, seed)
    else:
        parts = []
        for k in range(len(OBJECTIVES)):
            onehot = [1.0 if j == k else 0.0 for j in range(len(OBJECTIVES))]
            part = build.preference_dataset(prompts, onehot, world_cfg.pairs_per_prompt, world_cfg.noise, seed + k)
            parts.append(part.add_column("objective", [k] * len(part)))
        ds = concatenate_datasets(parts).shuffle(seed=seed)
    return ds.select(range(min(data.limit, len(ds)))) if data.limit else ds


def encode_pairs(tok: Any, rows: Any, max_len: int) -> list[dict[str, Any]]:
    """Preference rows as token ids (reward models, SPO/DPO/IPO); keeps a row's objective index."""
    out = []
    for r in rows:
        e = encode_pair(tok, r, max_len)
        if r.get("objective") is not None:
            e["objective"] = r["objective"]
        out.append(e)
    return out


def _rm_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    r = select_objective(r, torch.cat([batch["objective"]] * 2) if "objective" in batch else None)
    n = r.size(0) // 2
    return r[:n], r[n:]


def _rm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    rc, rr = _rm_scores(model, batch)
    return bradley_terry_loss(rc, rr), {"accuracy": pair_accuracy(rc, rr), "margin": float((rc - rr).detach().mean())}


@torch.no_grad()
def rm_accuracy(model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 64) -> dict[str, float]:
    """Held-out pair accuracy, overall and per objective when pairs carry one."""
    model.eval()
    hits: dict[str, list[float]] = {"all": []}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = collate_pairs(chunk, pad_id)
        rc, rr = _rm_scores(model, batch)
        ok = (rc > rr).float().tolist()
        hits["all"] += ok
        for e, o in zip(chunk, ok):
            if "objective" in e:
                hits.setdefault(OBJECTIVES[e["objective"]], []).append(o)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def run_rm(cfg: RMConfig, resume: bool = False) -> Path:
    return _one_model_stage(cfg, resume, "rm", "reward model", _rm)


def _rm(cfg: RMConfig, state: TrainState) -> None:
    """One rank's reward-model training and held-out evaluation (here, or in a Ray Train worker)."""
    out = Path(cfg.output)
    if (out / "model").is_dir():  # a restarted worker group after the model was written
        return
    seed_everything(cfg.learner.seed)
    n_heads = 1 if cfg.objectives == "combined" else len(OBJECTIVES)
    model, tok = load_reward_model(cfg.base, num_labels=n_heads)
    if cfg.data.source == "world":
        train_rows = preference_rows(cfg.data, cfg.world, cfg.objectives, "train")
        eval_rows = preference_rows(cfg.data, cfg.world, cfg.objectives, "test")
    else:
        split = preference_rows(cfg.data, cfg.world, cfg.objectives, cfg.data.split).train_test_split(
            test_size=cfg.eval_fraction, seed=cfg.learner.seed)
        train_rows, eval_rows = split["train"], split["test"]
    train = encode_pairs(tok, train_rows, cfg.data.max_seq_len)
    held = encode_pairs(tok, eval_rows, cfg.data.max_seq_len)
    _, total = plan_steps(len(train), cfg.learner, cfg.epochs, _world_size())
    model = wrap_lora(model, cfg.learner, cfg.base, heads=["score"])  # LoRA + a fully trained head
    learner = Learner(model, cfg.learner, total)
    logger = RunLogger(out / "logs", "rm/", enabled=is_rank0(), wandb=cfg.wandb, run_config=cfg.model_dump(),
                       name=out.name)
    fit(learner, train, partial(collate_pairs, pad_id=tok.pad_token_id), _rm_loss, cfg.epochs, cfg.learner.seed,
        logger, "reward model", state=state, save_every=cfg.save_every)
    acc = rm_accuracy(learner.module, held, tok.pad_token_id)
    logger.log(learner.global_step, {f"heldout_accuracy/{k}": v for k, v in acc.items()})
    log.info("reward model held-out pair accuracy: %s (%d pairs)", {k: round(v, 3) for k, v in acc.items()}, len(held))
    objectives = ["combined"] if n_heads == 1 else list(OBJECTIVES)
    if is_rank0():  # before the model: a finished model means a finished run
        atomic_write_text(out / "heldout_accuracy.json", json.dumps(acc, indent=2) + "\n")
    learner.save_pretrained(out / "model", tok, extra={
        "stage": "reward_model", "objectives": objectives, "weights": cfg.world.weights,
        "heldout_accuracy": acc, "heldout_pairs": len(held)})
    logger.close()


# ---- helpers ---------------------------------------------------------------------------------

def _world_size() -> int:
    return world()[1]


def _write_config(out: Path, cfg: Any) -> None:
    if is_rank0():
        atomic_write_text(out / "config.yaml", dump_config(cfg))
