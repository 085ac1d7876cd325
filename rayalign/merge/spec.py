"""What to merge: rayalign's merge spec, and the mergekit YAML subset it also accepts.

rayalign YAML:

    method: bone_soup            # linear | task_arithmetic | expo | bone_soup
    models: [{model: runs/bone-0}, {model: runs/bone-1}]
    mu: [0.8, 0.2]               # bone_soup: user preference; lambda = B^-1 mu
    beta: 0.7
    base_model: runs/sft/sft-0   # task_arithmetic: the base; expo: theta_0; bone_soup: SFT anchor for k
    k: 1.2                       # bone_soup extrapolation against base_model (k = 1: none)
    dtype: float32               # output dtype (default: the first model's)
    output: auto                 # PEFT adapters among the models: adapter (one exact adapter of rank
                                 # sum r_i, see rayalign.merge.lora) | full | auto (adapter when exact)

Any model may be a PEFT LoRA directory (read as base + B A). mergekit YAML (methods `linear` and
`task_arithmetic`; `BASE+LORA` names a model with a LoRA applied, as in mergekit; output full unless
`output: adapter`):

    merge_method: linear
    models:
      - model: a
        parameters: {weight: 0.5}
    base_model: ...
    parameters: {normalize: true}
    dtype: float32
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from rayalign.config.core import ConfigError, Strict, apply_overrides, read_yaml_mapping
from rayalign.merge.methods import Kernel, Plan, merge_method
from rayalign.utils.device import DTYPES

__all__ = ["Kernel", "MergeSpec", "Plan", "load_spec", "parse_spec", "resolve"]

OUT_DTYPES = DTYPES  # the output dtypes a spec may name


class ModelEntry(Strict):
    model: str
    weight: float | None = Field(None, strict=True, description="a number; a string such as '0.5' is refused")


class MergeSpec(Strict):
    method: str = Field(..., description="a registered merge method (rayalign.merge.methods): linear, "
                        "task_arithmetic, expo, bone_soup")
    models: list[ModelEntry] = Field(default_factory=list)
    base_model: str | None = None
    normalize: bool = Field(False, strict=True)
    alpha: float | None = Field(None, strict=True, description="expo: extrapolation strength")
    mu: list[Annotated[float, Field(strict=True)]] | None = Field(
        None, description="bone_soup: preference over objectives (one per model)")
    beta: float | None = Field(None, strict=True, description="bone_soup: diagonal of B, in (1/2, 1)")
    k: float = Field(1.0, strict=True, description="bone_soup: extrapolation against base_model, k >= 1")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    max_shard_bytes: int = Field(2 * 1024**3, gt=0)
    output: Literal["auto", "full", "adapter"] = Field(
        "auto", description="PEFT adapters among the models: 'adapter' writes one exact combined adapter (rank "
        "sum r_i), 'full' the merged full model; 'auto' an adapter when the merge is one")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        merge_method(v)  # names the registered methods when v is not one
        return v

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        if not self.models:
            raise ValueError("models: the model list is empty")
        for i, e in enumerate(self.models):
            if e.weight is not None and not math.isfinite(e.weight):
                raise ValueError(f"models[{i}].weight is not finite ({e.weight}) for {e.model}")
        merge_method(self.method).check(self)
        return self


def resolve(spec: MergeSpec) -> Plan:
    """The spec's merge plan, from its registered method (rayalign.merge.methods)."""
    return merge_method(spec.method).plan(spec)


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> MergeSpec:
    """A merge YAML (rayalign's or mergekit's) with dotted overrides, as `rayalign merge` reads it."""
    return parse_spec(apply_overrides(read_yaml_mapping(path), list(overrides)))


def lora_ref(ref: Any, where: str) -> Any:
    """mergekit's 'BASE+LORA' (a model with a LoRA applied) -> the adapter directory LORA, after
    checking that LORA records BASE as its base; anything else is returned unchanged."""
    if not isinstance(ref, str) or "+" not in ref or Path(ref).exists():
        return ref
    from rayalign.models.lora import AdapterError, adapter_base, is_adapter_dir, same_path

    base, adapter = ref.rsplit("+", 1)
    if not is_adapter_dir(adapter):
        raise ConfigError(f"{where}: {ref!r} names {adapter!r} as a LoRA adapter, but it has no adapter_config.json")
    try:
        recorded = adapter_base(adapter)
    except AdapterError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not same_path(base, recorded):
        raise ConfigError(f"{where}: adapter {adapter} was trained on base {recorded}, not {base}")
    return adapter


def from_mergekit(data: dict[str, Any]) -> MergeSpec:
    """Translate mergekit's YAML (linear, task_arithmetic) into a MergeSpec, with mergekit's defaults
    (linear normalises by default, task_arithmetic does not)."""
    method = data.get("merge_method")
    if method not in ("linear", "task_arithmetic"):
        raise ConfigError(f"merge_method {method!r} is not supported; rayalign reads mergekit's 'linear' and "
                          "'task_arithmetic' (use rayalign's own spec for expo and bone_soup)")
    known = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "output"}  # output: rayalign's extension (full, as mergekit writes, or adapter)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unsupported mergekit keys: {unknown}; supported: {sorted(known)}")
    params = data.get("parameters") or {}
    bad = sorted(set(params) - {"normalize"})
    if bad:
        raise ConfigError(f"unsupported mergekit parameters: {[f'parameters.{k}' for k in bad]}; rayalign implements "
                          "parameters.normalize only")
    base = data.get("base_model")
    if isinstance(base, str):
        base = lora_ref(base, "base_model")
    names = [e.get("model") for e in data.get("models") or [] if isinstance(e, dict)]
    source = data.get("tokenizer_source")
    # Every input must have the same tokenizer (the engine checks it), so the output's tokenizer is the
    # same whichever model it is taken from: these sources are exact; others (a model outside the merge,
    # a new vocabulary) are not implemented.
    exact = {None, "base", "union", *(f"model:{n}" for n in names)} - ({"base"} if base is None else set())
    if source not in exact:
        raise ConfigError(f"tokenizer_source {source!r} is not supported; rayalign keeps the inputs' one tokenizer "
                          f"and accepts {sorted(x for x in exact if x)}")
    models = []
    for i, entry in enumerate(data.get("models") or []):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"models[{i}] must be a mapping with 'model'")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"models[{i}]: unsupported keys {extra}")
        if method == "task_arithmetic" and lora_ref(entry["model"], f"models[{i}].model") == base:
            continue  # mergekit skips the base among the models
        p = entry.get("parameters") or {}
        bad = sorted(set(p) - {"weight"})
        if bad:
            raise ConfigError(f"models[{i}].parameters: unsupported {bad} (e.g. density is for TIES/DARE); "
                              "rayalign implements weight only")
        weight = p.get("weight")
        if isinstance(weight, list):
            raise ConfigError(f"models[{i}].parameters.weight: per-layer gradients are not supported")
        models.append({"model": lora_ref(entry["model"], f"models[{i}].model"), "weight": weight})
    out_dtype = data.get("out_dtype") or data.get("dtype")
    return MergeSpec.model_validate({
        "method": method, "models": models, "base_model": base,
        "normalize": params.get("normalize", method == "linear"), "dtype": out_dtype,
        "output": data.get("output", "full"),
    })


def parse_spec(data: dict[str, Any]) -> MergeSpec:
    """Either form: mergekit's when `merge_method` is present, rayalign's otherwise."""
    from pydantic import ValidationError

    if "merge_method" in data:
        try:
            return from_mergekit(data)
        except ValidationError as err:
            raise ConfigError(f"invalid mergekit config: {err}") from None
    try:
        return MergeSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid merge config: {err}") from None
