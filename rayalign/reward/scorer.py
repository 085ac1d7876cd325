"""Reward scorers: the embedded world's gold reward functions, trained reward models, Python
callables and reward services over HTTP (rayalign.reward.sources), alone or stacked.

A scorer returns, per (prompt, response), a vector of objective scores and their combination by
the configured weights. The Ray actor is a thin shell; the class is used in-process by evaluation.

    scorer = RewardScorer("gold", weights=[0.6, 0.2, 0.2])
    out = scorer.score(["what colour is the apple ?"], ["the apple is red ."])
    out["combined"], out["vector"]          # [n], [n, k]
    RewardScorer("model", ["rm-helpful", "rm-harmless"], weights=[0.7, 0.3])   # heads stacked
    RewardScorer(["model", "function"], "rm", weights=[0.8, 0.2], function="my_rewards:length_penalty")
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from rayalign.reward.sources import FunctionSource, GoldSource, HttpSource, ModelSource, RewardError, RewardSource

REWARD_KINDS = ("gold", "model", "function", "http")


class RewardScorer:
    """A stack of reward sources (rayalign.reward.sources) in the order of `kind`: 'gold' (the
    world's objective vector), 'model' (reward model directories, heads stacked in the order
    given), 'function' (Python callables) and 'http' (a reward service). Their vectors are
    concatenated into one objective vector and combined by `weights`."""

    def __init__(self, kind: str | list[str], model: str | list[str] | None = None,
                 weights: list[float] | None = None, max_len: int = 2048, batch_size: int = 64,
                 dtype: str = "auto", function: str | list[str] | None = None, http: str | None = None,
                 http_objectives: list[str] | None = None, http_timeout_s: float = 30.0, http_retries: int = 3):
        self.kinds = kinds = [kind] if isinstance(kind, str) else list(kind)
        if not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"reward.kind {kinds}: give each of {list(REWARD_KINDS)} at most once")
        self.sources: list[RewardSource] = []
        for k in kinds:
            if k == "gold":
                self.sources.append(GoldSource())
            elif k == "model":
                self.sources.append(ModelSource(reward_model_paths(model), max_len, batch_size, dtype))
            elif k == "function":
                specs = [function] if isinstance(function, str) else list(function or [])
                if not specs:
                    raise RewardError("reward.kind 'function' needs reward.function (module:callable or file.py)")
                self.sources += [FunctionSource(spec) for spec in specs]
            elif k == "http":
                if not http:
                    raise RewardError("reward.kind 'http' needs reward.http (the service URL)")
                self.sources.append(HttpSource(http, http_objectives, http_timeout_s, http_retries))
            else:
                raise ValueError(f"unknown reward kind {k!r}; use {' / '.join(REWARD_KINDS)}")
        names = [n for src in self.sources for n in src.objectives]
        self.objectives = names if len(set(names)) == len(names) else \
            [f"{i}:{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]
        n_obj = len(self.objectives)
        self.weights = np.asarray(weights if weights is not None and n_obj > 1 else [1.0] * n_obj, dtype=np.float64)
        if self.weights.shape != (n_obj,):
            raise ValueError(f"reward.weights has {len(self.weights)} entries, the scorer gives {n_obj} "
                             f"objectives {self.objectives}")

    def score(self, prompts: list[str], responses: list[str]) -> dict[str, Any]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        vec = np.concatenate([src(prompts, responses) for src in self.sources], axis=1)
        combined = vec @ self.weights
        return {"vector": vec, "combined": combined, "objectives": self.objectives}

    def score_items(self, items: list[tuple[str, str]]) -> list[list[float]]:
        """[(prompt, response)] -> [[combined, *vector]]: the form the actor pool splits and joins."""
        out = self.score([p for p, _ in items], [r for _, r in items])
        return [[float(c), *map(float, v)] for c, v in zip(out["combined"], out["vector"])]

    def objective_names(self) -> list[str]:
        return list(self.objectives)


def reward_model_paths(model: str | list[str] | None) -> list[str]:
    """`reward.model` as a list: one directory, several, or none."""
    return [model] if isinstance(model, str) else list(model or [])


RewardActor = ray.remote(RewardScorer)
