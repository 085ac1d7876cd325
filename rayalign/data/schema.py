"""Row schemas shared by the synthetic world and the real loaders.

- SFT rows (UltraChat-200k layout):      {"messages": [{"role", "content"}, ...], "prompt"?: str}
- preference rows (UltraFeedback-binarized layout):
                                          {"prompt": str, "chosen": [messages], "rejected": [messages]}
  (TRL's "prompt/chosen/rejected as strings" form is accepted and converted to messages)
- prompt rows:                           {"prompt": str} or {"messages": [...]} (last user turn is the prompt)
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
KINDS = ("sft", "preference", "prompt")


class DatasetRowError(ValueError):
    """A malformed row: the message names the source, the row index and the field."""

    def __init__(self, source: str, index: int, field: str, problem: str):
        super().__init__(f"{source}: row {index}: field '{field}': {problem}")
        self.source, self.index, self.field = source, index, field


def _check_messages(msgs: Any, source: str, i: int, field: str, need_assistant_last: bool) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise DatasetRowError(source, i, field, f"must be a non-empty list of messages, got {type(msgs).__name__}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DatasetRowError(source, i, f"{field}[{j}]", "each message must be a mapping with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise DatasetRowError(source, i, f"{field}[{j}].role", f"must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DatasetRowError(source, i, f"{field}[{j}].content", f"must be a string, got {type(m.get('content')).__name__}")
    if need_assistant_last and msgs[-1]["role"] != "assistant":
        raise DatasetRowError(source, i, field, "the last message must be the assistant's answer")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def prompt_of(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def normalise_row(row: dict[str, Any], kind: str, source: str, index: int) -> dict[str, Any]:
    """Validate one row and return it in rayalign's schema. Raises DatasetRowError."""
    if not isinstance(row, dict):
        raise DatasetRowError(source, index, "<row>", f"must be a mapping, got {type(row).__name__}")
    if kind == "sft":
        if row.get("messages") is None:  # absent, or null where another row of the file has it
            raise DatasetRowError(source, index, "messages", "missing (SFT rows need a 'messages' list)")
        msgs = _check_messages(row["messages"], source, index, "messages", need_assistant_last=True)
        return {"prompt": row.get("prompt") or prompt_of(msgs), "messages": msgs}
    if kind == "preference":
        out: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            if row.get(side) is None:
                raise DatasetRowError(source, index, side, "missing (preference rows need 'chosen' and 'rejected')")
            val = row[side]
            if isinstance(val, str):  # TRL standard form: prompt + completion strings
                if not isinstance(row.get("prompt"), str):
                    raise DatasetRowError(source, index, "prompt", f"needed as a string when '{side}' is a string")
                val = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": val}]
            out[side] = _check_messages(val, source, index, side, need_assistant_last=True)
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise DatasetRowError(source, index, "prompt", f"must be a string, got {type(prompt).__name__}")
        out["prompt"] = prompt or prompt_of(out["chosen"])
        for extra in ("objective", "gold_chosen", "gold_rejected"):
            if extra in row:
                out[extra] = row[extra]
        return out
    if kind == "prompt":
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            return {"prompt": row["prompt"]}
        if row.get("messages") is not None:
            msgs = _check_messages(row["messages"], source, index, "messages", need_assistant_last=False)
            p = prompt_of(msgs)
            if p:
                return {"prompt": p}
        raise DatasetRowError(source, index, "prompt", "missing or empty (prompt rows need 'prompt' or 'messages')")
    raise ValueError(f"unknown row kind {kind!r}; expected one of {KINDS}")
