"""Preference-conditioned prompts: the Prompted-MORL baseline of Personalized Soups
(Jang et al. 2023, papers/personalized-soups-2310.11564.md).

One policy is trained on the combined reward mu . r, where mu is drawn per prompt from the
preference grid and told to the policy in a system message; at evaluation the same message asks
for the user's mu. The world's gold functions and reward models always score the bare prompt.

    cond = PreferenceConditioning(["informative", "concise", "friendly"], ["informative", "concise"], 11)
    mu = cond.sample(rng, 4)                  # [4, 2] rows of the grid
    cond.messages("what colour is the apple ?", mu[0])
    cond.weights(mu)                          # [4, 3]: zeros on the objectives mu does not span
"""

from __future__ import annotations

import numpy as np

from rayalign.eval.pareto import preference_grid


def preference_message(names: list[str], mu: np.ndarray | list[float]) -> str:
    return "preference: " + ", ".join(f"{n} {float(w):.2f}" for n, w in zip(names, mu))


def conditioned_messages(prompt: str, names: list[str], mu: np.ndarray | list[float]) -> list[dict[str, str]]:
    return [{"role": "system", "content": preference_message(names, mu)}, {"role": "user", "content": prompt}]


class PreferenceConditioning:
    def __init__(self, objectives: list[str], conditioned: list[str] | None, grid_points: int):
        conditioned = list(conditioned or objectives)
        unknown = [o for o in conditioned if o not in objectives]
        if unknown:
            raise ValueError(f"reward.conditioned_objectives {unknown} are not objectives of the reward scorer "
                             f"{objectives}")
        if len(conditioned) < 2:
            raise ValueError(f"preference conditioning needs at least 2 objectives; the scorer gives {objectives}, "
                             f"conditioned on {conditioned}")
        self.objectives, self.names = list(objectives), conditioned
        self.index = [objectives.index(o) for o in conditioned]
        self.grid = preference_grid(len(conditioned), grid_points)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.grid[rng.integers(len(self.grid), size=n)]

    def weights(self, mu: np.ndarray) -> np.ndarray:
        """Preference rows over the conditioned objectives -> rows over all the scorer's objectives."""
        mu = np.atleast_2d(mu)
        full = np.zeros((len(mu), len(self.objectives)))
        full[:, self.index] = mu
        return full

    def messages(self, prompt: str, mu: np.ndarray | list[float]) -> list[dict[str, str]]:
        return conditioned_messages(prompt, self.names, mu)
