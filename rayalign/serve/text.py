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


class ChoiceStream:
    """One choice rendered as its tokens arrive: `feed` returns the stream pieces that are final
    (their text can no longer be trimmed as trailing whitespace or cut by a stop string), `finish`
    the rest and the whole Choice. Feeding every token at once and finishing gives what the
    non-streamed answer says; the pieces streamed along the way are exactly that answer's pieces.

    The text is the EOS-free decode, surrounding whitespace trimmed, cut before the first stop
    string. Text that could still be the start of a stop string, trailing whitespace and the last
    token (the decoder may still owe it bytes) are held back until the next token decides them.
    """

    def __init__(self, tok: Any, stops: list[str] = (), top: int | None = None):  # type: ignore[assignment]
        self.tok, self.stops, self.top = tok, [s for s in stops if s], top
        self._decoder = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.deltas: list[str] = []
        self.entries: list[dict[str, Any]] | None = [] if top is not None else None
        self.full = ""
        self.hit: int | None = None  # where a stop string begins, once one has
        self.ended = False  # EOS seen, or a stop string: later tokens are not part of the answer
        self.pieces: list[Piece] = []
        self._pending: list[dict[str, Any]] = []
        self._next = 0  # the first token not yet turned into a piece
        self._offset = 0  # where that token's text begins in `full`

    def feed(self, ids: list[int], logprobs: list[dict[int, float]] | None = None) -> list[Piece]:
        for j, t in enumerate(ids):
            if self.ended:
                break
            if t == self.tok.eos_token_id:
                self.ended = True
                break
            self.ids.append(t)
            d = self._decoder.step(self.tok.backend_tokenizer, t) or ""
            self.deltas.append(d)
            self.full += d
            if self.entries is not None and logprobs is not None:
                self.entries.extend(logprob_entries(self.tok, [t], [logprobs[j]], self.top or 0))
            if self.stops and self.hit is None:
                self.hit = self._stop_hit()
                self.ended = self.hit is not None
        return self._emit(self._safe_end(), final=False)

    def finish(self, finished: bool) -> tuple[list[Piece], Choice]:
        """The remaining pieces and the whole choice. `finished`: the engine ended it (EOS or a
        stop string) rather than max_tokens."""
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if full != self.full:
            if full.startswith(self.full) and self.deltas:  # bytes that never completed a character
                self.deltas[-1] += full[len(self.full):]
            elif self._next == 0:  # a decoder DecodeStream does not mirror: one delta with everything
                self.deltas = [""] * (len(self.ids) - 1) + [full] if self.ids else []
            else:  # already streamed: the stream's text stands
                full = self.full
            self.full = full
            if self.stops:
                self.hit = self._stop_hit()
        begin, end = self._bounds()
        if self.hit is not None:
            end = self.hit
        tail = self._emit(end, final=True)
        text = self.full[begin:end] if end > begin else ""
        finish = "stop" if finished or self.hit is not None else "length"
        used = self._next
        return tail, Choice(text, finish, list(self.pieces),
                            self.entries[:used] if self.entries is not None else None)

    # ---- internals ------------------------------------------------------------------------------

    def _bounds(self) -> tuple[int, int]:
        full = self.full
        return len(full) - len(full.lstrip()), len(full.rstrip())

    def _stop_hit(self) -> int | None:
        begin, end = self._bounds()
        hits = [i for i in (self.full.find(s, begin) for s in self.stops) if 0 <= i < end]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """How far the text is final while more tokens may come."""
        begin, end = self._bounds()
        if end <= begin:
            return -1  # only whitespace so far: where the text begins is not known
        if self.hit is not None:
            return self.hit
        for s in self.stops:  # a tail that a stop string could start with
            for k in range(min(len(s) - 1, len(self.full)), 0, -1):
                if self.full.endswith(s[:k]):
                    end = min(end, len(self.full) - k)
                    break
        return end

    def _emit(self, end: int, final: bool) -> list[Piece]:
        """Pieces of the tokens whose text lies before `end`; with `final`, of every token up to the
        stop (the last token, whose bytes may still grow, waits for the end)."""
        begin = self._bounds()[0]
        out: list[Piece] = []
        last = len(self.deltas) if final else len(self.deltas) - 1
        while self._next < last:
            j, d = self._next, self.deltas[self._next]
            start, stop = self._offset, self._offset + len(d)
            if final:
                if start >= end and (d or start > end):
                    break  # past the stop string: neither text nor log-probs
            elif stop > end or end < 0:
                break
            if self.entries is not None and j < len(self.entries):
                self._pending.append(self.entries[j])
            text = self.full[max(start, begin):min(stop, end)]
            if text:
                out.append(Piece(text, self._pending))
                self._pending = []
            self._next, self._offset = j + 1, stop
        if final and self._pending:  # log-probs of tokens with no text of their own: with the last piece
            if out:
                out[-1].logprobs.extend(self._pending)
            else:  # (already sent when streaming: then in a piece of their own)
                out.append(Piece("", self._pending))
            self._pending = []
        self.pieces += out
        return out


def render_choice(tok: Any, ids: list[int], finished: bool, stops: list[str] = (),  # type: ignore[assignment]
                  logprobs: list[dict[int, float]] | None = None, top: int = 0) -> Choice:
    """The text of one generated choice (EOS removed, surrounding whitespace trimmed, cut before the
    first stop string) and the stream pieces that spell exactly that text."""
    stream = ChoiceStream(tok, stops, top if logprobs is not None else None)
    stream.feed(ids, logprobs)
    return stream.finish(finished)[1]


def completion_logprobs(choice: Choice, start: int = 0) -> dict[str, Any] | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset (counted
    from `start`, where a streamed piece's tokens begin)."""
    if choice.logprobs is None:
        return None
    offsets, pos = [], start
    for e in choice.logprobs:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in choice.logprobs],
            "token_logprobs": [e["logprob"] for e in choice.logprobs],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in choice.logprobs],
            "text_offset": offsets}
