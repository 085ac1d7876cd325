"""Reward functions the tests import by `module:callable` (rewards as code)."""

import numpy as np


def brevity(prompts, responses):
    """One score per item: minus the number of words."""
    return [-float(len(r.split())) for r in responses]


def two_scores(prompts, responses):
    return np.array([[len(r), r.count("!")] for r in responses], dtype=float)


two_scores.objectives = ["chars", "bangs"]


def two_unnamed(prompts, responses):
    return [[1.0, 2.0] for _ in responses]


def wrong_count(prompts, responses):
    return [1.0]


def not_numbers(prompts, responses):
    return ["good"] * len(responses)


def raises(prompts, responses):
    raise KeyError("no such user")
