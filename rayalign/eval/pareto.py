"""Multi-objective evaluation: preference grids, Pareto fronts, hypervolume and controllability.

All objectives are maximised. Hypervolume is computed by pymoo (which minimises, so fronts and the
reference point are negated); points that do not strictly dominate the reference point add nothing.

    grid = preference_grid(2, 11)              # [[0, 1], [0.1, 0.9], ..., [1, 0]]
    hv = hypervolume(front, reference=[-0.1, -0.1])
    c = controllability(grid, front)           # Spearman(mu_i, achieved_i) per objective, and their mean
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def preference_grid(n_objectives: int, points: int = 11) -> np.ndarray:
    """Every preference vector on the simplex whose entries are multiples of 1/(points-1).

    Two objectives give `points` vectors (11: steps of 0.1); three give the triangular lattice
    (points=6: 21 vectors). Rows sum to 1; ordered by the first entry, then the second."""
    if n_objectives < 2:
        raise ValueError(f"a preference grid needs at least 2 objectives, got {n_objectives}")
    if points < 2:
        raise ValueError(f"a preference grid needs at least 2 points per objective, got {points}")
    m = points - 1
    rows = [c + (m - sum(c),) for c in itertools.product(range(m + 1), repeat=n_objectives - 1) if sum(c) <= m]
    grid = np.array(sorted(rows, key=lambda r: tuple(r)), dtype=np.float64) / m
    return grid


def non_dominated(front: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point weakly dominates with one strict improvement."""
    f = np.asarray(front, dtype=np.float64)
    keep = np.ones(len(f), dtype=bool)
    for i in range(len(f)):
        others = np.delete(f, i, axis=0)
        keep[i] = not np.any(np.all(others >= f[i], axis=1) & np.any(others > f[i], axis=1))
    return keep


def hypervolume(front: np.ndarray, reference: np.ndarray | list[float]) -> float:
    """Volume of objective space dominated by `front` and dominating `reference` (maximisation)."""
    from pymoo.indicators.hv import HV

    f = np.asarray(front, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != ref.shape[0]:
        raise ValueError(f"front of shape {list(f.shape)} does not match a reference point of {ref.shape[0]} objectives")
    if not np.all(np.isfinite(f)) or not np.all(np.isfinite(ref)):
        raise ValueError("hypervolume needs finite objective values and a finite reference point")
    f = f[np.all(f > ref, axis=1)]
    if len(f) == 0:
        return 0.0
    return float(HV(ref_point=-ref)(-f))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def controllability(preferences: np.ndarray, achieved: np.ndarray, names: list[str] | None = None) -> dict[str, Any]:
    """Spearman rank correlation between the preference mu_i and the achieved reward on objective i,
    over the preference grid, per objective and averaged: 1 = raising mu_i always raises reward i."""
    mu, r = np.asarray(preferences, dtype=np.float64), np.asarray(achieved, dtype=np.float64)
    if mu.shape != r.shape:
        raise ValueError(f"preferences {list(mu.shape)} and achieved rewards {list(r.shape)} differ in shape")
    names = names or [f"objective{i}" for i in range(mu.shape[1])]
    per = {n: _spearman(mu[:, i], r[:, i]) for i, n in enumerate(names)}
    finite = [v for v in per.values() if np.isfinite(v)]
    return {"per_objective": per, "mean": float(np.mean(finite)) if finite else float("nan")}
