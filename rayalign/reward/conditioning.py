"""Preference-conditioned prompts: the Prompted-MORL baseline of Personalized Soups
(Jang et al. 2023, papers/personalized-soups-2310.11564.md).

One policy is trained on the combined reward mu . r, where mu is drawn per prompt and told to the
policy in a system message; at evaluation the same message asks for the user's mu. The world's
gold functions and reward models always score the bare prompt. Two ways of telling mu:

- "instructions" (the paper's): one natural-language instruction per objective, present or absent
  -- the prompts are binary signals of which objectives to optimise, and mu is uniform over the
  objectives asked for (every non-empty subset is a training preference). A preference off that
  set is asked for with the nearest one.
- "weights": mu written out as decimals ("preference: informative 0.30, concise 0.70"), mu drawn
  from the full preference grid.

    cond = PreferenceConditioning(["informative", "concise", "friendly"], ["informative", "concise"], 11)
    mu = cond.sample(rng, 4)                  # [4, 2] rows of the grid
    cond.messages("what colour is the apple ?", mu[0])
    cond.weights(mu)                          # [4, 3]: zeros on the objectives mu does not span
"""

from __future__ import annotations

import itertools

import numpy as np

from rayalign.eval.pareto import preference_grid


def preference_message(names: list[str], mu: np.ndarray | list[float]) -> str:
    return "preference: " + ", ".join(f"{n} {float(w):.2f}" for n, w in zip(names, mu))


INSTRUCTIONS = {
    "informative": "Give the direct answer and further true facts.",
    "concise": "Answer in as few words as possible.",
    "friendly": "Be friendly and polite.",
}
STYLES = ("weights", "instructions")


def instruction_message(names: list[str], mu: np.ndarray | list[float]) -> str:
    """The instructions of the objectives mu asks for (entries > 0), in the objectives' order."""
    asked = [INSTRUCTIONS.get(n, f"Optimise for {n}.") for n, w in zip(names, mu) if float(w) > 0]
    if not asked:
        raise ValueError(f"preference {list(mu)} asks for no objective")
    return " ".join(asked)


def binary_grid(k: int) -> np.ndarray:
    """Every non-empty subset of k objectives, uniform weights over the subset (rows sum to 1)."""
    rows = [np.array(bits, dtype=np.float64) / sum(bits) for bits in itertools.product((0, 1), repeat=k) if any(bits)]
    return np.array(sorted(rows, key=lambda r: (-int((r > 0).sum()), tuple(-r))))


def conditioned_messages(prompt: str, names: list[str], mu: np.ndarray | list[float]) -> list[dict[str, str]]:
    return [{"role": "system", "content": preference_message(names, mu)}, {"role": "user", "content": prompt}]


class PreferenceConditioning:
    def __init__(self, objectives: list[str], conditioned: list[str] | None, grid_points: int,
                 style: str = "weights"):
        conditioned = list(conditioned or objectives)
        unknown = [o for o in conditioned if o not in objectives]
        if unknown:
            raise ValueError(f"reward.conditioned_objectives {unknown} are not objectives of the reward scorer "
                             f"{objectives}")
        if len(conditioned) < 2:
            raise ValueError(f"preference conditioning needs at least 2 objectives; the scorer gives {objectives}, "
                             f"conditioned on {conditioned}")
        if style not in STYLES:
            raise ValueError(f"preference conditioning style {style!r}: use one of {STYLES}")
        self.objectives, self.names, self.style = list(objectives), conditioned, style
        self.index = [objectives.index(o) for o in conditioned]
        self.grid = preference_grid(len(conditioned), grid_points) if style == "weights" else \
            binary_grid(len(conditioned))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.grid[rng.integers(len(self.grid), size=n)]

    def weights(self, mu: np.ndarray) -> np.ndarray:
        """Preference rows over the conditioned objectives -> rows over all the scorer's objectives."""
        mu = np.atleast_2d(mu)
        full = np.zeros((len(mu), len(self.objectives)))
        full[:, self.index] = mu
        return full

    def nearest(self, mu: np.ndarray | list[float]) -> np.ndarray:
        """The training preference closest to mu (L1; the first of ties): mu itself on the weights grid."""
        return self.grid[int(np.argmin(np.abs(self.grid - np.asarray(mu, dtype=np.float64)).sum(1)))]

    def messages(self, prompt: str, mu: np.ndarray | list[float]) -> list[dict[str, str]]:
        """What the policy is shown for preference mu (asked with the nearest training preference)."""
        if self.style == "weights":
            return conditioned_messages(prompt, self.names, mu)
        return [{"role": "system", "content": instruction_message(self.names, self.nearest(mu))},
                {"role": "user", "content": prompt}]
