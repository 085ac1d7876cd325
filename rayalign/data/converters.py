"""Convert public multi-objective preference sets into rayalign's layouts, one preference file
per objective (the UltraFeedback layout `rayalign rm` reads) plus the prompts for RL.

PKU-SafeRLHF labels every pair twice -- which response is more helpful (`better_response_id`)
and which is safer (`safer_response_id`) -- so it yields a helpful and a harmless reward model
from the same pairs: the two objectives the Bone Soups and Rewarded Soups papers trade off.

    pairs = pku_saferlhf_pairs(load_dataset("PKU-Alignment/PKU-SafeRLHF", split="train"), "harmless", "pku")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset

from rayalign.data.loaders import DatasetSourceError, read_source
from rayalign.data.schema import DatasetRowError
from rayalign.utils.io import atomic_dir

PKU_LABELS = {"helpful": "better_response_id", "harmless": "safer_response_id"}


def _response(row: dict[str, Any], k: int, source: str, i: int) -> str:
    text = row.get(f"response_{k}")
    if not isinstance(text, str) or not text.strip():
        raise DatasetRowError(source, i, f"response_{k}", "missing or empty")
    return text


def pku_saferlhf_pairs(ds: Any, objective: str, source: str) -> Dataset:
    """One objective's pairs: chosen = the response its label prefers. Pairs whose two
    responses are identical carry no preference and are dropped."""
    if objective not in PKU_LABELS:
        raise ValueError(f"unknown PKU-SafeRLHF objective {objective!r}; use one of {sorted(PKU_LABELS)}")
    field = PKU_LABELS[objective]
    rows = []
    for i, row in enumerate(ds):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetRowError(source, i, "prompt", "missing or empty")
        a, b = _response(row, 0, source, i), _response(row, 1, source, i)
        label = row.get(field)
        if label not in (0, 1):
            raise DatasetRowError(source, i, field, f"must be 0 or 1, got {label!r}")
        if a == b:
            continue
        chosen, rejected = (a, b) if label == 0 else (b, a)
        user = {"role": "user", "content": prompt}
        rows.append({"prompt": prompt, "chosen": [user, {"role": "assistant", "content": chosen}],
                     "rejected": [user, {"role": "assistant", "content": rejected}]})
    if not rows:
        raise DatasetSourceError(f"{source}: no usable pairs for objective {objective!r}")
    return Dataset.from_list(rows)


def convert_pku_saferlhf(source: str, split: str, out: str | Path, limit: int | None = None) -> dict[str, int]:
    """Write OUT/helpful.jsonl, OUT/harmless.jsonl and OUT/prompts.jsonl (unique prompts), all at
    once: OUT appears only when every file is complete. Returns the row count of each file."""
    ds = read_source(source, split)
    if len(ds) == 0:
        raise DatasetSourceError(f"{source}: dataset has no rows")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    parts = {name: pku_saferlhf_pairs(ds, name, source) for name in PKU_LABELS}
    prompts = Dataset.from_list([{"prompt": p} for p in dict.fromkeys(ds["prompt"])])
    with atomic_dir(out) as tmp:
        for name, part in parts.items():
            part.to_json(tmp / f"{name}.jsonl")
        prompts.to_json(tmp / "prompts.jsonl")
    return {**{f"{k}.jsonl": len(v) for k, v in parts.items()}, "prompts.jsonl": len(prompts)}
