"""LoRA adapters (arXiv:2106.09685) with the `peft` library: wrap a model for training, name its
adapter tensors, save standard PEFT adapter directories, and load adapter directories anywhere a
model directory is accepted.

    model = apply_lora(model, cfg.lora)                    # PeftModel; only A, B (and heads) train
    named = adapter_state(model, params)                   # PEFT file names -> tensors
    save_adapter(model, tok, "out/", named, base="runs/sft/sft-0")
    model = load_adapter_merged(AutoModelForCausalLM, "out/")   # base + B A, an ordinary model

A directory is an adapter when it holds `adapter_config.json`; its base is the directory recorded
in `base_model_name_or_path` (rayalign records absolute paths).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from rayalign.config.schema import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"


class AdapterError(ValueError):
    """An adapter directory that is missing, corrupt, or does not fit the model it is put on."""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    f = p / ADAPTER_CONFIG
    try:
        cfg = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{f} is corrupt: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{f}: not a LoRA adapter (peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r})")
    if not (p / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{p} has no {ADAPTER_WEIGHTS}")
    return cfg


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (relative paths are taken from the adapter)."""
    base = read_adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{Path(path) / ADAPTER_CONFIG} records no base_model_name_or_path")
    b = Path(str(base)).expanduser()
    if not b.is_absolute() and (Path(path) / b).exists():
        return str((Path(path) / b).resolve())
    return str(base)


def same_path(a: str | Path, b: str | Path) -> bool:
    """Two references to one model: the same directory (resolved), or the same hub id."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct name suffixes of the model's linear layers (what target_modules can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_targets(model: torch.nn.Module, targets: Iterable[str], where: str = "lora.target_modules") -> None:
    have = linear_module_names(model)
    missing = sorted(set(targets) - set(have))
    if missing:
        raise AdapterError(f"{where}: {type(model).__name__} has no linear module named {missing}; it has {have}")


def peft_config(cfg: LoraConfig, modules_to_save: list[str] | None = None, base: str | None = None) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), modules_to_save=modules_to_save,
                          base_model_name_or_path=base, bias="none")


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, modules_to_save: list[str] | None = None,
               base: str | None = None) -> Any:
    """A PeftModel around `model`: base weights frozen, A and B (and `modules_to_save`, e.g. a
    reward head) trainable. `base` is recorded in the saved adapter's config."""
    from peft import get_peft_model

    check_targets(model, cfg.target_modules)
    if base is not None and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    return get_peft_model(model, peft_config(cfg, modules_to_save, base))


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


_ADAPTER_KEY = re.compile(rf"\.{ADAPTER_NAME}(?=\.|$)")


def file_name(param_name: str) -> str:
    """PeftModel parameter name -> its name in adapter_model.safetensors (PEFT drops the adapter
    name: '...q_proj.lora_A.default.weight' -> '...q_proj.lora_A.weight'; a modules_to_save copy
    '...score.modules_to_save.default.weight' -> '...score.weight')."""
    name = param_name.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
    return _ADAPTER_KEY.sub("", name)


def adapter_state(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The trainable tensors of a PeftModel under their adapter-file names."""
    return {file_name(n): t for n, t in named}


def save_adapter(model: Any, tok: Any, out: str | Path, state: Mapping[str, torch.Tensor],
                 overwrite: bool = False, extra: dict[str, Any] | None = None, merged: bool = False) -> Path:
    """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors, the tokenizer),
    atomically; with `merged`, OUTPUT/merged holds base + B A as a full HF model too."""
    from safetensors.torch import save_file

    from rayalign.utils.io import atomic_dir

    cfg = model.peft_config[ADAPTER_NAME]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        cfg.save_pretrained(str(tmp))
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        if tok is not None:
            tok.save_pretrained(tmp)
        if extra:
            (tmp / "rayalign.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        if merged:
            inner = model.get_base_model()
            kw = {} if type(inner).__name__.endswith("ForCausalLM") else {"num_labels": inner.config.num_labels}
            full = load_adapter_merged(type(inner), tmp, dtype=torch.float32, **kw)
            full.save_pretrained(tmp / "merged", safe_serialization=True)
            if tok is not None:
                tok.save_pretrained(tmp / "merged")
    return Path(out)


def load_adapter_merged(cls: Any, path: str | Path, dtype: torch.dtype = torch.float32, **kw: Any) -> Any:
    """An adapter directory as an ordinary model of class `cls`: its base, loaded and checked,
    plus B A folded into the weights (modules_to_save replaced)."""
    from peft import PeftModel

    from rayalign.models.checkpoint import CheckpointError, check_dir, is_local

    base = adapter_base(path)
    if is_local(base):
        try:
            check_dir(base)
        except CheckpointError as exc:
            raise AdapterError(f"adapter {path}: its base {base} cannot be loaded: {exc}") from None
    check_adapter_file(path)
    # an adapter on an adapter (e.g. PPO LoRA on a LoRA SFT model): the base is merged first
    model = load_adapter_merged(cls, base, dtype, **kw) if is_local(base) and is_adapter_dir(base) else None
    try:
        if model is None:
            model = cls.from_pretrained(base, dtype=dtype, **kw)
        peft = PeftModel.from_pretrained(model, str(path))
    except Exception as exc:
        raise AdapterError(f"cannot load adapter {path} on its base {base}: {type(exc).__name__}: {exc}") from exc
    return peft.merge_and_unload()


def check_adapter_file(path: str | Path) -> dict[str, Any]:
    """The header of adapter_model.safetensors, validated (a truncated or corrupt file is named)."""
    from rayalign.merge.io import MergeInputError, read_header

    f = Path(path) / ADAPTER_WEIGHTS
    try:
        return read_header(f)
    except MergeInputError as exc:
        raise AdapterError(str(exc)) from None


def init_adapter(base: str | Path, out: str | Path, cfg: LoraConfig, seed: int = 0, std: float = 0.05,
                 overwrite: bool = False) -> Path:
    """A fresh adapter on `base` whose B is drawn N(0, std^2) instead of PEFT's zeros, so that it
    changes the model: serving benchmarks and exactness tests, whose cost and correctness do not
    depend on what the adapter learned."""
    from rayalign.models.checkpoint import load_causal_lm

    model, tok = load_causal_lm(str(base))
    peft_model = apply_lora(model, cfg, base=str(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    state = adapter_state((n, p) for n, p in peft_model.named_parameters() if ".lora_" in n)
    return save_adapter(peft_model, tok, out, state, overwrite=overwrite)
