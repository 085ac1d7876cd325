"""Load and save Hugging Face model directories with checks that name the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rayalign.models import lora
from rayalign.utils.io import atomic_dir

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A model directory that is missing, incomplete, corrupt or inconsistent."""


def is_local(path: str | Path) -> bool:
    """A filesystem path rather than a hub id like 'org/name'."""
    p = str(path)
    return Path(p).exists() or p.startswith(("/", ".", "~")) or p.count("/") != 1


def check_dir(path: str | Path) -> Path:
    """A local HF model directory must exist and hold a config and weights; a PEFT adapter
    directory must hold a valid adapter whose recorded base is such a directory (or a hub id)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"model directory not found: {p}")
    if lora.is_adapter_dir(p):
        try:
            lora.check_adapter_file(p)
            base = lora.adapter_base(p)
        except lora.AdapterError as exc:
            raise CheckpointError(str(exc)) from None
        if is_local(base):
            try:
                check_dir(base)
            except CheckpointError as exc:
                raise CheckpointError(f"adapter {p}: its base: {exc}") from None
        return p
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json (not a Hugging Face model directory)")
    try:
        json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}/config.json is corrupt: {exc}") from exc
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"{p} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return p


def load_tokenizer(path: str | Path) -> Any:
    if lora.is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").is_file():
        path = lora.adapter_base(path)  # an adapter saved without its tokenizer uses its base's
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer of {path}: {exc}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_vocab(path: str | Path, model: Any, tok: Any) -> None:
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_emb:
        raise CheckpointError(
            f"tokenizer/model vocabulary mismatch in {path}: tokenizer has {len(tok)} tokens, "
            f"model embeddings have {n_emb} rows")


def _load(cls: Any, path: str | Path, dtype: torch.dtype, **kw: Any) -> Any:
    if is_local(path):
        check_dir(path)
        if lora.is_adapter_dir(path):  # a PEFT adapter: its base with B A folded in
            try:
                return lora.load_adapter_merged(cls, path, dtype, **kw)
            except lora.AdapterError as exc:
                raise CheckpointError(str(exc)) from None
    try:
        return cls.from_pretrained(str(path), dtype=dtype, **kw)
    except Exception as exc:
        raise CheckpointError(f"cannot load model weights from {path}: {type(exc).__name__}: {exc}") from exc


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) from a local directory or a hub id; vocabulary sizes are checked."""
    model = _load(AutoModelForCausalLM, path, dtype)
    tok = load_tokenizer(path) if with_tokenizer else None
    if tok is not None:
        _check_vocab(path, model, tok)
    return model, tok


def load_reward_model(path: str | Path, num_labels: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A sequence-classification model: a scalar (or vector) head on the last non-pad token.
    From a causal LM directory pass num_labels to start a new head."""
    if num_labels is None and lora.is_adapter_dir(path):  # the head's size, from the adapter's copy of it
        heads = [i.shape[0] for n, i in lora.check_adapter_file(path).items() if n.endswith("score.weight")]
        num_labels = heads[0] if heads else None
    kw: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
    tok = load_tokenizer(path)
    model = _load(AutoModelForSequenceClassification, path, dtype, **kw)
    model.config.pad_token_id = tok.pad_token_id
    _check_vocab(path, model, tok)
    return model, tok


def save_model(model: Any, tok: Any, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
               overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer into `out`, atomically."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        if extra:
            (tmp / "rayalign.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    return Path(out)
