"""Typed configs from YAML with dotted command-line overrides.

    cfg = load_config(SFTConfig, "sft.yaml", ["learner.lr=1e-4", "n_seeds=3"])

Unknown keys and bad values are ConfigError naming the key (dotted path) and, where the
field has a fixed set of values, the allowed ones.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


class Strict(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _fields_of(cls: type[BaseModel], path: list[str]) -> list[str]:
    """Allowed keys at a dotted path, for error messages."""
    for part in path:
        field = cls.model_fields.get(part)
        if field is None:
            return []
        sub = _model_in(field.annotation)
        if sub is None:
            return []
        cls = sub
    return sorted(cls.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        key = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _fields_of(cls, loc[:-1])
            lines.append(f"  unknown key '{key}'; allowed keys here: {', '.join(allowed)}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


BUILTIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def builtin_configs() -> list[str]:
    """Names of the example configs shipped in rayalign/configs (`--config salsa`)."""
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a built-in config (`salsa`, `salsa.yaml`) when no such file exists."""
    p = Path(path)
    if p.is_file():
        return p
    builtin = BUILTIN_CONFIGS / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if len(p.parts) == 1 and builtin.is_file():
        return builtin
    raise ConfigError(f"config file not found: {p} (built-in configs: {', '.join(builtin_configs())})")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file (or built-in config name) whose top level is a mapping; ConfigError names the file otherwise."""
    p = resolve_config_path(path)
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Build `cls` from (base dict) <- (YAML file) <- (dotted overrides)."""
    data: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        data = _deep_merge(data, read_yaml_mapping(path))
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    try:
        return cls.model_validate(with_section_defaults(cls, data))
    except ValidationError as err:
        raise ConfigError(_format(cls, err, source)) from None


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_section_defaults(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """`data` with every section it sets laid over that section's default values, not its class's:
    where `RLConfig.learner.actor` defaults to `LearnerConfig(lr=1e-5)`, the override
    `learner.actor.micro_batch_size=8` keeps lr 1e-5 instead of getting `LearnerConfig`'s own 1e-3."""
    out = dict(data)
    for name, field in cls.model_fields.items():
        value = out.get(name)
        if not isinstance(value, dict):
            continue
        default = field.get_default(call_default_factory=True)
        sub = _model_in(field.annotation)
        if isinstance(default, BaseModel):
            out[name] = _deep_merge(default.model_dump(exclude_unset=True),
                                    with_section_defaults(type(default), value))
        elif sub is not None:
            out[name] = with_section_defaults(sub, value)
    return out


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
