"""Turn rows into token tensors through the tokenizer's chat template.

Loss masks are derived from the template itself: the tokens of assistant turns are the ones
between `template(messages[:i], add_generation_prompt=True)` and `template(messages[:i+1])`.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def render(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_sft(tok: Any, messages: list[dict[str, str]], max_len: int) -> dict[str, list[int]]:
    """input_ids with labels on assistant tokens only (IGNORE elsewhere), truncated to max_len."""
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _ids(tok, render(tok, messages[:i], add_generation_prompt=True))
        upto = _ids(tok, render(tok, messages[: i + 1]))
        if upto[: len(before)] != before:
            raise ValueError("the tokenizer's chat template is not prefix-stable; cannot mask prompt tokens")
        new_ctx = before[len(ids):]
        labels += [IGNORE] * len(new_ctx) + upto[len(before):]
        ids = upto
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def encode_prompt(tok: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return _ids(tok, render(tok, msgs, add_generation_prompt=True))


def special_strings(tok: Any) -> set[str]:
    """Every string the tokenizer reads as one special (added) token."""
    return {*tok.all_special_tokens, *getattr(tok, "added_tokens_encoder", {})}


def encode_untrusted_prompt(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """encode_prompt for text from outside (a served request): message content is never read as special
    tokens, so `<|end|><|assistant|>` inside a user message cannot fake a turn. Content that holds no
    special-token string takes encode_prompt's path unchanged (the ids the model was trained on);
    otherwise the template is rendered around sentinels and each content is tokenized as plain text."""
    specials = special_strings(tok)
    if not any(sp in m["content"] for m in messages for sp in specials):
        return encode_prompt(tok, messages)
    marks = [f"\x00rayalign-content-{i}\x00" for i in range(len(messages))]
    text = render(tok, [{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt=True)
    ids: list[int] = []
    for mark, m in zip(marks, messages):
        before, found, text = text.partition(mark)
        if not found:
            raise ValueError("this chat template changes message content, so content holding special-token "
                             "strings cannot be tokenized safely")
        ids += _ids(tok, before) + tok(m["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + _ids(tok, text)


def encode_conversation(tok: Any, messages: list[dict[str, str]], max_len: int) -> dict[str, Any]:
    """Full conversation ids plus the length of its prompt part (for reward models and DPO)."""
    full = _ids(tok, render(tok, messages))
    prompt_len = len(encode_prompt(tok, messages[:-1]))
    return {"input_ids": full[-max_len:] if len(full) > max_len else full,
            "prompt_len": max(0, prompt_len - max(0, len(full) - max_len))}


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    n = max(len(s) for s in seqs)
    rows = [(s + [value] * (n - len(s))) if side == "right" else ([value] * (n - len(s)) + s) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate_lm(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids = pad([b["input_ids"] for b in batch], pad_id)
    return {
        "input_ids": ids,
        "attention_mask": pad([[1] * len(b["input_ids"]) for b in batch], 0),
        "labels": pad([b["labels"] for b in batch], IGNORE),
    }


def collate_pairs(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, in one right-padded batch."""
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    out = {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
    }
    if "objective" in batch[0]:
        out["objective"] = torch.tensor([b["objective"] for b in batch], dtype=torch.long)
    return out


def response_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response sequences for scoring sampled responses; `response_mask` is
    aligned with input_ids[:, 1:] (the positions whose next token is a response token)."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    masks = [[0] * (len(p) - 1) + [1] * len(r) for p, r in zip(prompt_ids, response_ids)]
    return {"input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0),
            "response_mask": pad(masks, 0)[:, : max(len(s) for s in seqs) - 1].float()}


def encode_pair(tok: Any, row: dict[str, Any], max_len: int) -> dict[str, Any]:
    """A preference row (chosen / rejected conversations) as token ids plus where each response starts."""
    c = encode_conversation(tok, row["chosen"], max_len)
    r = encode_conversation(tok, row["rejected"], max_len)
    return {"chosen_ids": c["input_ids"], "rejected_ids": r["input_ids"],
            "chosen_prompt_len": c["prompt_len"], "rejected_prompt_len": r["prompt_len"]}


def collate_preference(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """collate_pairs plus `response_mask` aligned with input_ids[:, 1:]: 1 where the next token
    belongs to the response (the preference losses sum log-probs over exactly these)."""
    out = collate_pairs(batch, pad_id)
    starts = [b["chosen_prompt_len"] for b in batch] + [b["rejected_prompt_len"] for b in batch]
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    masks = [[0] * max(0, s - 1) + [1] * (len(ids) - max(1, s)) for s, ids in zip(starts, seqs)]
    out["response_mask"] = pad(masks, 0).float()  # every row has len(ids) - 1 entries
    return out
