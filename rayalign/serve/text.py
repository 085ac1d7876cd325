"""From generated token ids to the text a client sees, whole or streamed: incremental
detokenisation, the same whitespace trim and stop strings for both, and OpenAI's log-prob shapes.

A byte-level BPE splits a multi-byte character over several tokens, so decoding a growing prefix
and slicing it turns a character that spans two tokens into U+FFFD for good. The incremental
decoder of the `tokenizers` library (DecodeStream) holds such bytes back until the character is
complete; the streamed pieces of a choice therefore concatenate to exactly its whole text.

    choice = render_choice(tok, ids, finished=True, stops=["."], logprobs=token_logprobs, top=2)
    choice.text      # what the non-streamed answer says
    choice.pieces    # stream deltas: "".join(p.text for p in choice.pieces) == choice.text
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream


@dataclass
class Piece:
    """One stream delta and the log-prob entries of the tokens it completes."""

    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Choice:
    text: str
    finish: str  # "stop" (EOS or a stop string) or "length"
    pieces: list[Piece]
    logprobs: list[dict[str, Any]] | None  # per token of `text`, OpenAI chat shape


def token_deltas(tok: Any, ids: list[int]) -> list[str]:
    """One text delta per token, whose concatenation is `tok.decode(ids, skip_special_tokens=True)`;
    bytes of an unfinished character are held back and come with the token that completes it."""
    stream = DecodeStream(skip_special_tokens=True)
    backend = tok.backend_tokenizer
    deltas = [stream.step(backend, t) or "" for t in ids]
    full = tok.decode(ids, skip_special_tokens=True)
    sent = "".join(deltas)
    if full.startswith(sent):
        if deltas:
            deltas[-1] += full[len(sent):]  # bytes that never completed a character: as decode shows them
    else:  # a decoder DecodeStream does not mirror exactly: one delta with everything
        deltas = [""] * (len(ids) - 1) + [full] if ids else []
    return deltas


def _entry(tok: Any, token_id: int, lp: float) -> dict[str, Any]:
    text = tok.decode([token_id], skip_special_tokens=False)
    return {"token": text, "logprob": lp,
            "bytes": None if "\ufffd" in text else list(text.encode("utf-8"))}  # a partial character has no text


def logprob_entries(tok: Any, ids: list[int], logprobs: list[dict[int, float]], top: int) -> list[dict[str, Any]]:
    """OpenAI's chat `logprobs.content`: per token its text, log-prob and the `top` most likely."""
    out = []
    for t, dist in zip(ids, logprobs):
        best = sorted(dist.items(), key=lambda kv: -kv[1])[:top]
        out.append({**_entry(tok, t, float(dist[t])), "top_logprobs": [_entry(tok, i, float(v)) for i, v in best]})
    return out


def render_choice(tok: Any, ids: list[int], finished: bool, stops: list[str] = (),  # type: ignore[assignment]
                  logprobs: list[dict[int, float]] | None = None, top: int = 0) -> Choice:
    """The text of one generated choice (EOS removed, surrounding whitespace trimmed, cut before the
    first stop string) and the stream pieces that spell exactly that text."""
    eos = tok.eos_token_id
    if ids and ids[-1] == eos:
        ids = ids[:-1]
        logprobs = logprobs[:len(ids)] if logprobs is not None else None
    deltas = token_deltas(tok, ids)
    full = "".join(deltas)
    begin, end = len(full) - len(full.lstrip()), len(full.rstrip())
    finish = "stop" if finished else "length"
    hits = [i for i in (full.find(s, begin) for s in stops) if 0 <= i < end]
    if hits:
        end, finish = min(hits), "stop"
    entries = logprob_entries(tok, ids, logprobs, top) if logprobs is not None else None
    pieces: list[Piece] = []
    pending: list[dict[str, Any]] = []
    offset = used = 0  # used: tokens up to the stop string
    for j, d in enumerate(deltas):
        start = offset
        offset += len(d)
        if start >= end and (d or start > end):
            break  # past the stop string: neither text nor log-probs
        used = j + 1
        if entries is not None:
            pending.append(entries[j])
        text = full[max(start, begin):min(offset, end)]
        if text:
            pieces.append(Piece(text, pending))
            pending = []
    if pending:
        if pieces:
            pieces[-1].logprobs.extend(pending)
        else:
            pieces.append(Piece("", pending))
    return Choice(full[begin:end] if end > begin else "", finish, pieces, entries[:used] if entries is not None else None)


def completion_logprobs(choice: Choice) -> dict[str, Any] | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    if choice.logprobs is None:
        return None
    offsets, pos = [], 0
    for e in choice.logprobs:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in choice.logprobs],
            "token_logprobs": [e["logprob"] for e in choice.logprobs],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in choice.logprobs],
            "text_offset": offsets}
