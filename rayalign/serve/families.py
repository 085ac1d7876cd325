"""From a request's preference vector (or named soup) to merge coefficients, for a model family.

A preference mu over the family's objectives is checked (length, finite, sign), put on the simplex
and quantised to a grid of `1/grid` steps (largest-remainder rounding keeps the sum at 1), so that
nearby vectors share one merged model in the cache. The key names family and quantised mu.

    fam = Family(FamilyConfig(name="soup", models=["a", "b"], objectives=["helpful", "concise"]), grid=20)
    key, coefficients = fam.resolve(preference=[0.72, 0.28])   # "soup@20:14,6", [0.7, 0.3]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayalign.config.schema import FamilyConfig
from rayalign.merge.methods import merge_method


class PreferenceError(ValueError):
    """A preference vector or soup name the family cannot serve; the message names the problem."""


def in_store(root: str | Path, relative: str) -> Path:
    """`root / relative`, refusing anything that resolves outside the model store (.., absolute paths, links)."""
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise PreferenceError(f"{relative!r} is outside the model store {base}")
    return path


def quantise(mu: np.ndarray, grid: int) -> np.ndarray:
    """Non-negative mu summing to 1 -> multiples of 1/grid summing to 1 (largest remainder)."""
    scaled = mu * grid
    q = np.floor(scaled)
    short = round(grid - q.sum())
    order = np.argsort(-(scaled - q), kind="stable")
    q[order[:short]] += 1
    return q / grid


class Family:
    def __init__(self, cfg: FamilyConfig, store: str | Path = ".", grid: int = 20):
        if grid < 1:
            raise ValueError(f"preference grid must be >= 1, got {grid}")
        self.cfg, self.grid = cfg, grid
        self.paths = [in_store(store, m) for m in cfg.models]
        self.anchor = in_store(store, cfg.base_model) if cfg.base_model and cfg.k != 1.0 else None

    @property
    def n(self) -> int:
        return len(self.cfg.models)

    def preference(self, preference: list[float] | None = None, soup: str | None = None) -> np.ndarray:
        if (preference is None) == (soup is None):
            raise PreferenceError("give either a preference vector or a soup name")
        if soup is not None:
            if soup not in self.cfg.soups:
                raise PreferenceError(f"model {self.cfg.name} has no soup {soup!r}; it has {sorted(self.cfg.soups)}")
            preference = self.cfg.soups[soup]
        mu = np.asarray(preference, dtype=np.float64)
        if mu.shape != (self.n,):
            raise PreferenceError(f"model {self.cfg.name} takes a preference vector of {self.n} weights over "
                                  f"{self.cfg.objectives}, got {len(preference)}")  # type: ignore[arg-type]
        if not np.all(np.isfinite(mu)):
            raise PreferenceError(f"preference weights must be finite numbers, got {list(preference)}")  # type: ignore[arg-type]
        negative = self.cfg.kind == "bone_soup" or not self.cfg.allow_negative
        if negative and np.any(mu < 0):
            raise PreferenceError(f"model {self.cfg.name} takes no negative preference weights, got "
                                  f"{mu.tolist()}")
        if self.cfg.allow_negative and self.cfg.kind == "linear":
            return np.round(mu * self.grid) / self.grid
        peak = np.abs(mu).max()
        if not peak > 0:
            raise PreferenceError(f"preference weights must not all be zero, got {mu.tolist()}")
        mu = mu / peak  # scaled into [0, 1] first, so the sum cannot overflow ([1e308, 1e308] is (1/2, 1/2))
        return quantise(mu / mu.sum(), self.grid)

    def coefficients(self, mu: np.ndarray) -> list[float]:
        """Coefficients on `self.sources()` (the ingredients, then the anchor when k != 1)."""
        return merge_method(self.cfg.kind).preference_coefficients(mu, self.cfg.beta, self.cfg.k,
                                                                  anchor=self.anchor is not None)

    def sources(self) -> list[Path]:
        return [*self.paths, self.anchor] if self.anchor is not None else list(self.paths)

    def key(self, mu: np.ndarray) -> str:
        """Exact: the family, the grid and mu's numerators on it ("soup@20:14,6" is mu = (0.7, 0.3))."""
        return f"{self.cfg.name}@{self.grid}:" + ",".join(str(round(x * self.grid)) for x in mu)

    def resolve(self, preference: list[float] | None = None, soup: str | None = None) -> tuple[str, list[float]]:
        mu = self.preference(preference, soup)
        return self.key(mu), self.coefficients(mu)


def parse_key(key: str) -> tuple[str, int, list[int]]:
    """"family@grid:n1,n2" -> (family, grid, numerators): a key names its merge completely."""
    try:
        family, rest = key.rsplit("@", 1)
        grid, nums = rest.split(":", 1)
        return family, int(grid), [int(x) for x in nums.split(",")]
    except ValueError:
        raise PreferenceError(f"malformed model key {key!r}") from None


def key_coefficients(families: dict[str, Family], key: str) -> tuple[Family, list[float]]:
    """The family a merge key names and the merge coefficients on its sources."""
    name, grid, nums = parse_key(key)
    fam = families.get(name)
    if fam is None:
        raise PreferenceError(f"unknown model {name!r}; served: {sorted(families)}")
    if grid != fam.grid or len(nums) != fam.n:
        raise PreferenceError(f"model key {key!r} does not match family {name} (grid {fam.grid}, {fam.n} weights)")
    return fam, fam.coefficients(np.asarray(nums, dtype=np.float64) / grid)
