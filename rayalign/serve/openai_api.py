"""The OpenAI-compatible surface: request bodies, the error shape, response and stream chunks.

A request names a model family (`"model": "demo-soup"`) or one of its named soups
(`"model": "demo-soup/terse"`), and may carry a preference vector as an extra body field
(`"preference": [0.7, 0.3]`; with the OpenAI client: `extra_body={"preference": [...]}`).
Without either, the family's uniform preference is used.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rayalign.serve.text import Choice, Piece, completion_logprobs


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# The engines' seed range: vLLM and torch take a 64-bit seed, signed or unsigned; anything wider
# raises inside the engine (and left vLLM's loop stuck), so it is refused here with a 400.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
COUNT_MAX = 2**31 - 1  # token counts

# OpenAI parameters rayalign does not implement: a request that sets them to anything but their
# neutral value gets a 400 naming them, never a silent answer that ignores them.
UNSUPPORTED: dict[str, Any] = {
    "tools": lambda v: not v, "tool_choice": lambda v: v in (None, "none"), "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": lambda v: not v, "presence_penalty": lambda v: not v, "frequency_penalty": lambda v: not v,
    "suffix": lambda v: not v, "echo": lambda v: not v, "best_of": lambda v: v in (None, 1),
    "audio": lambda v: v is None, "modalities": lambda v: v in (None, ["text"]), "prediction": lambda v: v is None,
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(..., description="a string, or a list of text parts as OpenAI clients "
                                          "send it (other part types are refused)")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, metadata, ...)
    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=COUNT_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=COUNT_MAX)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first")
    preference: list[Annotated[float, Field(strict=True)]] | None = Field(
        None, description="rayalign: weights over the family's objectives (numbers; strings and booleans are refused)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        """None: no log-probs; k >= 0: the sampled token's plus the k most likely."""
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)

    def logprob_count(self) -> int | None:
        return self.logprobs


def _bad_text(obj: Any, where: str = "") -> str | None:
    """The path of the first string that is not valid Unicode (a lone surrogate such as "\\ud800"
    decodes from JSON but cannot be encoded or tokenized)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "<body>"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _bad_text(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def parse(kind: type[BaseModel], raw: bytes) -> Any:
    """Body bytes -> request model, or a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    bad = _bad_text(data)
    if bad:
        raise APIError(400, f"{bad}: the text is not valid Unicode (a lone surrogate?)", param=bad)
    if isinstance(data.get("preference"), list):  # JSON has no NaN/inf, but Python's parser accepts them
        for x in data["preference"]:
            if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
                raise APIError(400, "preference weights must be finite numbers", param="preference")
    refused = sorted(k for k, neutral in UNSUPPORTED.items() if k in data and not neutral(data[k]))
    if refused:
        raise APIError(400, f"unsupported parameter(s) {refused}: rayalign does not implement them",
                       param=refused[0], code="unsupported_parameter")
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None


def split_model(name: str) -> tuple[str, str | None]:
    """"family" or "family/soup"."""
    family, _, soup = name.partition("/")
    return family, soup or None


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, choices: list[Choice], prompt_tokens: int, completion_tokens: int,
                  extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": completion_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
                         "logprobs": None if c.logprobs is None else {"content": c.logprobs}}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens), "rayalign": extra}


def completion_response(model: str, choices: list[Choice], prompt_tokens: int, completion_tokens: int,
                        extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": completion_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": c.text, "finish_reason": c.finish, "logprobs": completion_logprobs(c)}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens), "rayalign": extra}


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class ChunkWriter:
    """Server-sent events of one chat or text completion, written as its choices' pieces arrive:
    per chat choice a role delta first, one delta per stream piece (with its tokens' log-probs when
    asked; a completion's `text_offset` counts from the start of its text), a finish chunk; with
    stream_options.include_usage a last chunk with no choices and the usage; then [DONE]."""

    def __init__(self, model: str, chat: bool):
        self.chat = chat
        self.head = {"id": completion_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()), "model": model,
                     "object": "chat.completion.chunk" if chat else "text_completion"}
        self._pos: dict[int, int] = {}  # completions: characters of token text sent per choice

    def _chunk(self, i: int, body: dict[str, Any], reason: str | None, lps: Any) -> str:
        return sse({**self.head, "choices": [{"index": i, **body, "finish_reason": reason, "logprobs": lps}]})

    def start(self, i: int) -> list[str]:
        return [self._chunk(i, {"delta": {"role": "assistant", "content": ""}}, None, None)] if self.chat else []

    def piece(self, i: int, p: Piece, logprobs: bool) -> str:
        if self.chat:
            return self._chunk(i, {"delta": {"content": p.text}}, None, {"content": p.logprobs} if logprobs else None)
        lps = None
        if logprobs:
            lps = completion_logprobs(Choice(p.text, "", [], p.logprobs), start=self._pos.get(i, 0))
            self._pos[i] = self._pos.get(i, 0) + sum(len(e["token"]) for e in p.logprobs)
        return self._chunk(i, {"text": p.text}, None, lps)

    def finish(self, i: int, reason: str) -> str:
        return self._chunk(i, {"delta": {}} if self.chat else {"text": ""}, reason, None)

    def usage(self, usage_: dict[str, int]) -> str:
        return sse({**self.head, "choices": [], "usage": usage_})

    @staticmethod
    def done() -> str:
        return sse("[DONE]")


def _chunks(model: str, choices: list[Choice], usage_: dict[str, int] | None, chat: bool) -> list[str]:
    w = ChunkWriter(model, chat)
    out = []
    for i, c in enumerate(choices):
        out += w.start(i)
        out += [w.piece(i, p, c.logprobs is not None) for p in c.pieces]
        out.append(w.finish(i, c.finish))
    if usage_ is not None:
        out.append(w.usage(usage_))
    return out + [w.done()]


def chat_chunks(model: str, choices: list[Choice], usage_: dict[str, int] | None = None) -> list[str]:
    """The stream of whole chat choices (see ChunkWriter)."""
    return _chunks(model, choices, usage_, chat=True)


def completion_chunks(model: str, choices: list[Choice], usage_: dict[str, int] | None = None) -> list[str]:
    return _chunks(model, choices, usage_, chat=False)
