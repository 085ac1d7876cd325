"""Where rewards come from: each source scores a batch of (prompt, response) and returns a vector
per item, [n, k] with k = len(source.objectives). A scorer stacks its sources' vectors into one
objective vector and combines it by `reward.weights`.

- gold      the embedded world's gold reward functions (informative, concise, friendly)
- model     trained reward models (rayalign.models.checkpoint.load_reward_model); their heads
- function  rewards as code: `module:callable`, `path/to/file.py:callable` or `path/to/file.py` (its
            callable `reward`). It is called as fn(prompts, responses) and returns one score per
            item, or a vector per item with the names in `fn.objectives` (a list of strings)
- http      a reward service: POST {"prompts": [...], "responses": [...]} to a URL, answered with
            {"scores": [...]} (one number or one list per item), with a timeout and bounded retries

Every error names the callable or the URL: an import that fails, a callable that returns the
wrong number of items or non-numbers, a service that answers an error status or bad JSON.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rayalign.world.gold import OBJECTIVES, gold_vector


class RewardError(ValueError):
    """A reward source that cannot be loaded or answered badly; the message names it."""


class RewardSource(Protocol):
    objectives: list[str]

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """[n, len(objectives)] scores."""


def as_matrix(raw: Any, n: int, k: int | None, what: str) -> np.ndarray:
    """A source's answer -> float64 [n, k]: one number per item (k = 1) or a vector of k per item."""
    try:
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().cpu().numpy()
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"{what} returned {type(raw).__name__}, not numbers ({exc})") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n:
        raise RewardError(f"{what} returned scores of shape {tuple(np.shape(raw))} for {n} items; expected {n} "
                          "numbers or n lists")
    if k is not None and arr.shape[1] != k:
        raise RewardError(f"{what} returned {arr.shape[1]} scores per item, its objectives are {k}"
                          + ("" if arr.shape[1] == 1 else "; name them in the callable's `objectives` attribute"))
    if not np.all(np.isfinite(arr)):
        raise RewardError(f"{what} returned non-finite scores")
    return arr


class GoldSource:
    def __init__(self) -> None:
        self.objectives = list(OBJECTIVES)

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, len(OBJECTIVES)))
        return np.stack([gold_vector(p, r) for p, r in zip(prompts, responses)])


class ModelSource:
    """Trained reward models (one directory, or several whose heads are stacked in the order given);
    each reads the conversation through its own tokenizer and chat template."""

    def __init__(self, paths: list[str], max_len: int = 2048, batch_size: int = 64, dtype: str = "auto"):
        if not paths:
            raise RewardError("a reward scorer of kind 'model' needs a reward model directory (reward.model)")
        from rayalign.models.checkpoint import load_reward_model
        from rayalign.utils.device import place

        self.max_len, self.batch_size = max_len, batch_size
        self.models = []
        for p in paths:
            m, tok = load_reward_model(p)
            self.models.append((place(m, dtype).eval(), tok))
        self.objectives = head_names(paths, [int(m.config.num_labels) for m, _ in self.models])

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return np.concatenate([self._one(m, tok, prompts, responses) for m, tok in self.models], axis=1)

    def _one(self, model: Any, tok: Any, prompts: list[str], responses: list[str]) -> np.ndarray:
        from rayalign.data.tokenize import encode_conversation, pad

        out = []
        for b in range(0, len(prompts), self.batch_size):
            seqs = [encode_conversation(tok, [{"role": "user", "content": p},
                                              {"role": "assistant", "content": r}], self.max_len)["input_ids"]
                    for p, r in zip(prompts[b:b + self.batch_size], responses[b:b + self.batch_size])]
            ids = pad(seqs, tok.pad_token_id).to(model.device)
            mask = pad([[1] * len(s) for s in seqs], 0).to(model.device)
            out.append(model(input_ids=ids, attention_mask=mask).logits.float().cpu())
        k = int(model.config.num_labels)
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, k))


def head_names(paths: list[str], heads: list[int]) -> list[str]:
    """One model: 'reward' for a scalar head, the world's objectives for a head per objective.
    Several: each model's directory name (with /i per head of a multi-head model)."""
    if len(paths) == 1:
        k = heads[0]
        return ["reward"] if k == 1 else list(OBJECTIVES[:k]) if k <= len(OBJECTIVES) else [f"head{i}" for i in range(k)]
    names = []
    for i, (p, k) in enumerate(zip(paths, heads)):
        path = Path(p.rstrip("/"))
        stem = path.parent.name if path.name == "model" else path.name  # RUN/rm/model -> rm
        names += [stem] if k == 1 else [f"{stem}/{j}" for j in range(k)]
    return [n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names)]


def load_callable(spec: str) -> Callable[..., Any]:
    """`module:callable`, `file.py:callable` or `file.py` (its `reward`); the error names `spec`."""
    target, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not target:
        raise RewardError(f"reward function {spec!r}: give module:callable, file.py:callable or file.py")
    is_file = target.endswith(".py") or "/" in target
    name = name or ("reward" if is_file else "")
    if not name:
        raise RewardError(f"reward function {spec!r}: name the callable (module:callable)")
    try:
        if is_file:
            path = Path(target).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"rayalign_reward_{abs(hash(str(path.resolve())))}",
                                                              path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as exc:
        raise RewardError(f"reward function {spec!r}: cannot import {target}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardError(f"reward function {spec!r}: {target} has no attribute {name!r}")
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {name} is a {type(fn).__name__}, not a callable")
    return fn


class FunctionSource:
    """A Python callable fn(prompts, responses) -> scores; `fn.objectives` names a vector's entries."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_callable(spec)
        names = getattr(self.fn, "objectives", None)
        if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names)
                                  or not names):
            raise RewardError(f"reward function {spec!r}: `objectives` must be a non-empty list of names, got "
                              f"{names!r}")
        _, named, callable_name = spec.rpartition(":")
        self.objectives = list(names) if names is not None else [callable_name if named else Path(spec).stem]

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        try:
            raw = self.fn(list(prompts), list(responses))
        except Exception as exc:
            raise RewardError(f"reward function {self.spec!r} raised {type(exc).__name__}: {exc}") from exc
        return as_matrix(raw, len(prompts), len(self.objectives), f"reward function {self.spec!r}")


class HttpSource:
    """POST batches to a reward service. A timeout bounds each attempt; connection errors, timeouts
    and 5xx/429 answers are retried `retries` times with exponential back-off, anything else fails
    at once. The error names the URL and the status."""

    def __init__(self, url: str, objectives: Sequence[str] | None = None, timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.5, batch_size: int = 256):
        if not url.startswith(("http://", "https://")):
            raise RewardError(f"reward.http {url!r} is not an http(s) URL")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.batch_size = batch_size
        self.objectives = list(objectives) if objectives else ["http"]

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        out = [self._post(prompts[b:b + self.batch_size], responses[b:b + self.batch_size])
               for b in range(0, len(prompts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.objectives)))

    def _post(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        import requests

        body = {"prompts": prompts, "responses": responses}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = requests.post(self.url, json=body, timeout=self.timeout_s)
            except requests.Timeout:
                last = f"no answer within {self.timeout_s:g}s"
                continue
            except requests.ConnectionError as exc:
                last = f"connection failed ({type(exc).__name__})"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"status {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code != 200:
                raise RewardError(f"reward service {self.url} answered status {r.status_code}: {r.text[:200]}")
            try:
                scores = r.json()["scores"]
            except (json.JSONDecodeError, ValueError, KeyError, TypeError):
                raise RewardError(f"reward service {self.url} answered status 200 without a JSON object holding "
                                  f"'scores': {r.text[:200]!r}") from None
            return as_matrix(scores, len(prompts), len(self.objectives), f"reward service {self.url}")
        raise RewardError(f"reward service {self.url} failed {self.retries + 1} times; last: {last}")
