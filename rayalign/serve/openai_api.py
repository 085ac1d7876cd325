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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logprobs, ...)
    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    seed: int | None = None
    preference: list[float] | None = Field(None, description="rayalign: weights over the family's objectives")


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)


class CompletionRequest(_Common):
    prompt: str


def parse(kind: type[BaseModel], raw: bytes) -> Any:
    """Body bytes -> request model, or a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    if isinstance(data.get("preference"), list):  # JSON has no NaN/inf, but Python's parser accepts them
        for x in data["preference"]:
            if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
                raise APIError(400, "preference weights must be finite numbers", param="preference")
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


def chat_response(model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int,
                  extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": completion_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                        for i, (t, f) in enumerate(texts)],
            "usage": usage(prompt_tokens, completion_tokens), "rayalign": extra}


def completion_response(model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int,
                        extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": completion_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, f) in enumerate(texts)],
            "usage": usage(prompt_tokens, completion_tokens), "rayalign": extra}


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def chat_chunks(model: str, pieces: list[list[str]], finish: list[str]) -> list[str]:
    """Server-sent events of a chat completion: a role delta, one content delta per token, a finish."""
    cid, created = completion_id("chatcmpl"), int(time.time())

    def chunk(i: int, delta: dict[str, Any], reason: str | None = None) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": i, "delta": delta, "finish_reason": reason}]})

    out = []
    for i, toks in enumerate(pieces):
        out.append(chunk(i, {"role": "assistant", "content": ""}))
        out += [chunk(i, {"content": t}) for t in toks if t]
        out.append(chunk(i, {}, finish[i]))
    return out + [sse("[DONE]")]


def completion_chunks(model: str, pieces: list[list[str]], finish: list[str]) -> list[str]:
    cid, created = completion_id("cmpl"), int(time.time())

    def chunk(i: int, text: str, reason: str | None = None) -> str:
        return sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}]})

    out = []
    for i, toks in enumerate(pieces):
        out += [chunk(i, t) for t in toks if t]
        out.append(chunk(i, "", finish[i]))
    return out + [sse("[DONE]")]
