"""LoRA adapters as merge ingredients: exact combinations of adapters on one base.

An adapter i on base W adds delta_i = s_i B_i A_i (s_i = alpha_i / r_i) to each target module.
A linear merge sum_i c_i theta_i of adapters (and of the base itself, coefficient c_0) is

    (c_0 + sum_i c_i) W + sum_i c_i s_i B_i A_i,

and when the coefficients sum to one that is W plus one adapter of rank sum_i r_i, exactly:

    B = [c_1 s_1 B_1 | ... | c_n s_n B_n],   A = [A_1; ...; A_n],   scaling 1.

This is PEFT's `cat` combination (`add_weighted_adapter(combination_type="cat")`). PEFT's
`linear` combination scales A and B by sqrt-weights and sums them, so (sum_i w_i B_i)(sum_j w_j A_j)
keeps the cross terms B_i A_j and cannot express a negative weight: rayalign never uses it.
Negative coefficients (Bone Soups' lambda = B^-1 mu, arXiv:2502.10762), the k-extrapolation against
the SFT anchor and ExPO's theta_1 + alpha (theta_1 - theta_0) (arXiv:2404.16792) are all linear, so
they fold into the c_i above. Modules some adapters do not target get zero blocks: the combination
is exact over the union of target modules.

    adapters = [load_adapter(p) for p in paths]
    adapters = [adapter_from_peft(peft_model), ...]   # or from PeftModels in memory
    combined = combine(adapters, [0.7, 0.3])          # Adapter, rank 2r
    save_combined(combined, "out/", tokenizer_from=paths[0])
    AdapterCheckpoint(path)                           # an adapter read as base + B A, tensor by tensor
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayalign.merge.io import Checkpoint, MergeInputError, TensorInfo
from rayalign.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    adapter_base,
    read_adapter_config,
    same_path,
)

PREFIX = "base_model.model."


@dataclass
class Adapter:
    """A LoRA adapter in memory: per target module (named as in the base model) A [r, in],
    B [out, r] and its scale s, so delta = s B A."""

    base: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    path: str = "<memory>"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    def delta(self, module: str) -> torch.Tensor:
        a, b, s = self.modules[module]
        return s * (b.double() @ a.double())

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.modules.values())


def load_adapter(path: str | Path, base: str | None = None) -> Adapter:
    """Read and check a PEFT LoRA directory. `base` overrides a recorded base that no longer exists
    (a moved directory); a recorded base that exists and differs from `base` is refused."""
    from rayalign.merge.io import read_header

    p = Path(path).expanduser()
    try:
        cfg = read_adapter_config(p)
        recorded = adapter_base(p)
    except AdapterError as exc:
        raise MergeInputError(str(exc)) from None
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
                   if cfg.get(k)]
    if unsupported:
        raise MergeInputError(f"adapter {p}: {unsupported} are not supported in merges (plain LoRA only: "
                              "rank, alpha, target modules)")
    chosen = recorded
    if base is not None and not same_path(base, recorded):
        if Path(recorded).expanduser().exists():
            raise MergeInputError(f"adapter {p} was trained on base {recorded}, but the merge's base is {base}")
        chosen = base
    r, alpha = int(cfg.get("r", 0)), float(cfg.get("lora_alpha", 0))
    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r) if r else 0.0
    header = read_header(p / ADAPTER_WEIGHTS)
    from safetensors import safe_open

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(p / ADAPTER_WEIGHTS), "pt") as f:
        for name in header:
            if not name.startswith(PREFIX) or not name.endswith((".lora_A.weight", ".lora_B.weight")):
                raise MergeInputError(f"adapter {p}: unexpected tensor {name} (a LoRA adapter holds "
                                      "'base_model.model.<module>.lora_A.weight' and '.lora_B.weight')")
            module, kind = name[len(PREFIX):].rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            pairs.setdefault(module, {})[kind] = f.get_tensor(name)
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise MergeInputError(f"adapter {p}: module {module} has {sorted(ab)} but not both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise MergeInputError(f"adapter {p}: module {module} has lora_A {list(a.shape)} and lora_B "
                                  f"{list(b.shape)}, inconsistent with rank r = {r}")
        modules[module] = (a.float(), b.float(), scale)
    if not modules:
        raise MergeInputError(f"adapter {p} holds no LoRA tensors")
    return Adapter(chosen, modules, str(p), cfg)


def adapter_from_peft(model: Any, base: str | None = None, adapter_name: str = "default") -> Adapter:
    """The adapter of an in-memory PeftModel (e.g. a learner's or a Serve replica's), as an Adapter."""
    from peft.tuners.lora import LoraLayer

    modules = {}
    inner = model.get_base_model()
    for name, mod in inner.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A:
            a = mod.lora_A[adapter_name].weight.detach().float().cpu()
            b = mod.lora_B[adapter_name].weight.detach().float().cpu()
            modules[name] = (a, b, float(mod.scaling[adapter_name]))
    if not modules:
        raise MergeInputError(f"the model has no LoRA adapter named {adapter_name!r}")
    cfg = model.peft_config[adapter_name]
    return Adapter(base or cfg.base_model_name_or_path or "<memory>", modules, "<memory>", cfg.to_dict())


def check_on_base(adapter: Adapter, base: Checkpoint) -> None:
    """Every adapted module exists in the base with the shape the adapter was made for."""
    for module, (a, b, _) in adapter.modules.items():
        name = f"{module}.weight"
        info = base.tensors.get(name)
        if info is None:
            raise MergeInputError(f"adapter {adapter.path} adapts {module}, which the base {base.path} lacks "
                                  "(an adapter made for another model?)")
        if tuple(info.shape) != (b.shape[0], a.shape[1]):
            raise MergeInputError(f"adapter {adapter.path}: {module} is [{b.shape[0]}, {a.shape[1]}] in the adapter "
                                  f"but {list(info.shape)} in the base {base.path} (an adapter made for another base)")


def combine(adapters: Sequence[Adapter], coefficients: Sequence[float]) -> Adapter:
    """sum_i c_i delta_i as one adapter, exactly (see the module docstring); scale 1, rank sum r_i
    per module, padded with zero rows/columns to one rank over the union of modules."""
    if len(adapters) != len(coefficients) or not adapters:
        raise ValueError(f"{len(adapters)} adapters for {len(coefficients)} coefficients")
    first = adapters[0].base
    others = sorted({a.base for a in adapters if not same_path(a.base, first)})
    if others:
        raise MergeInputError(f"adapters on different bases cannot be combined into one adapter: {[first, *others]}")
    modules = sorted({m for a in adapters for m in a.modules})
    blocks: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for m in modules:
        As, Bs = [], []
        for ad, c in zip(adapters, coefficients):
            if m in ad.modules:
                a, b, s = ad.modules[m]
                As.append(a)
                Bs.append(b * (float(c) * s))
        blocks[m] = (As, Bs)
    rank = max(sum(x.shape[0] for x in As) for As, _ in blocks.values())
    out = {}
    for m, (As, Bs) in blocks.items():
        a, b = torch.cat(As, 0), torch.cat(Bs, 1)
        pad = rank - a.shape[0]
        if pad:  # zero rows of A meet zero columns of B: nothing is added
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
        out[m] = (a, b, 1.0)
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets, "lora_dropout": 0.0,
              "bias": "none", "base_model_name_or_path": adapters[0].base, "task_type": None,
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True}
    return Adapter(adapters[0].base, out, "<combined>", config)


def save_combined(adapter: Adapter, out: Path, tokenizer_from: str | Path | None = None,
                  extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> int:
    """Write `adapter` as a PEFT directory into `out` (an existing temporary directory the caller
    renames into place); returns the bytes of adapter_model.safetensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from rayalign.merge.engine import TOKENIZER_FILES

    cfg = dict(adapter.config)
    peft_cfg = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                          lora_dropout=0.0, bias="none", base_model_name_or_path=adapter.base)
    peft_cfg.save_pretrained(str(out))
    tensors = {}
    for m, (a, b, s) in adapter.modules.items():
        assert s == 1.0
        tensors[f"{PREFIX}{m}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    src = Path(tokenizer_from) if tokenizer_from else None
    for name in TOKENIZER_FILES:
        if src is not None and (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if extra:
        (out / "rayalign_merge.json").write_text(json.dumps(extra, indent=2) + "\n")
    return (out / ADAPTER_WEIGHTS).stat().st_size


class AdapterCheckpoint(Checkpoint):
    """An adapter directory read as the full model it stands for (base + s B A), tensor by tensor,
    so every full-weight merge (and `merge_into`) takes adapters as ingredients unchanged."""

    def __init__(self, path: str | Path, base: str | None = None, adapter: Adapter | None = None):
        self.adapter = adapter if adapter is not None else load_adapter(path, base)
        base_dir = Path(self.adapter.base).expanduser()
        if not base_dir.is_dir():
            raise MergeInputError(f"adapter {path}: its base {self.adapter.base} is not a local model directory")
        if (base_dir / ADAPTER_CONFIG).is_file():
            raise MergeInputError(f"adapter {path}: its base {base_dir} is itself an adapter; merge it into a full "
                                  "model first (rayalign merge ... --output-kind full, or lora.save_merged)")
        self._base = Checkpoint(base_dir)
        check_on_base(self.adapter, self._base)
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = self._base.tensors
        self.config = self._base.config
        self._handles = {}
        self._cache: tuple[str, torch.Tensor] | None = None

    def _full(self, name: str) -> torch.Tensor | None:
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if module not in self.adapter.modules:
            return None
        if self._cache is None or self._cache[0] != name:
            w = self._base.read(name)
            self._cache = (name, (w.double() + self.adapter.delta(module)).to(w.dtype).reshape(-1))
        return self._cache[1]

    def read_flat(self, name: str, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        full = self._full(name)
        if full is None:
            return self._base.read_flat(name, start, count, out)
        if out is None:
            return full[start:start + count].clone()
        buf = out[:count]
        buf.copy_(full[start:start + count])
        return buf

    def close(self) -> None:
        self._base.close()
        self._cache = None


def open_checkpoint(path: str | Path, base: str | None = None) -> Checkpoint:
    """A model directory, or an adapter directory read as base + B A."""
    from rayalign.models.lora import is_adapter_dir

    return AdapterCheckpoint(path, base) if is_adapter_dir(path) else Checkpoint(path)
