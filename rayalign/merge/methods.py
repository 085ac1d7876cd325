"""Merge methods as a registry of classes, each holding its coefficient math once.

A method turns a validated `MergeSpec` into a `Plan`: the input paths in the order its kernel
takes them, the per-tensor kernel, and the effective linear coefficients on those inputs (every
method here is linear in the weights, which is what lets the in-memory merge, LoRA adapters and
Serve use one weighted sum). Methods that map a user preference mu to coefficients (the soups)
also answer `preference_coefficients`, which `rayalign soups` and Serve's model families call:

    MERGE_METHODS["bone_soup"].preference_coefficients([1, 0], beta=0.7)        # [1.75, -0.75]
    MERGE_METHODS["bone_soup"].preference_coefficients([1, 0], beta=0.7, k=1.2)  # [2.1, -0.9, -0.2]

- linear          model soups, theta = sum_i w_i theta_i (Wortsman et al., arXiv 2203.05482); Rewarded
                  and Personalized Soups with w = mu (arXiv 2306.04488, arXiv 2310.11564)
- task_arithmetic base + sum_i w_i (theta_i - base) (Ilharco et al., arXiv 2212.04089)
- expo            theta_1 + alpha (theta_1 - theta_0) (Zheng et al., arXiv 2404.16792)
- bone_soup       lambda = B^-1 mu, optionally k sum_j lambda_j theta_j + (1 - k) theta_SFT (arXiv 2502.10762)

Register another with `@register_merge_method`: one class plus its test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from rayalign.merge import kernels
from rayalign.merge.coefficients import bone_matrix, bone_soup_coefficients, extrapolated
from rayalign.utils.registry import Registry

if TYPE_CHECKING:
    from rayalign.merge.spec import MergeSpec

Kernel = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Plan:
    """A spec turned into: input paths (in the order the kernel takes them), the kernel, and the
    effective linear coefficients on those inputs (for reports and for the in-memory API)."""

    paths: list[str]
    kernel: Kernel
    coefficients: list[float]
    template: str  # the model whose config and tokenizer the output takes


class MergeMethod:
    name: ClassVar[str]
    paper: ClassVar[str]
    takes_preference: ClassVar[bool] = False  # maps a preference mu to coefficients (soups, Serve families)

    def check(self, spec: MergeSpec) -> None:
        """Raise ValueError naming what the spec lacks for this method."""

    def plan(self, spec: MergeSpec) -> Plan:
        raise NotImplementedError

    def weights(self, mu: Sequence[float], beta: float | None = None) -> np.ndarray:
        """The ingredients' coefficients for a preference mu (before any extrapolation)."""
        raise ValueError(f"merge method {self.name!r} does not map a preference to coefficients")

    def preference_coefficients(self, mu: Sequence[float], beta: float | None = None, k: float = 1.0,
                                anchor: bool | None = None) -> list[float]:
        """Coefficients on [ingredients..., anchor]: k * weights(mu) + (1 - k) * anchor. The anchor's
        entry is there when `anchor` is true (default: when k != 1)."""
        lam = self.weights(mu, beta)
        if anchor if anchor is not None else k != 1.0:
            return extrapolated(lam, k)
        if k != 1.0:
            raise ValueError(f"k = {k} extrapolates against an anchor model, and none was given")
        return [float(x) for x in lam]


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register_merge_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    MERGE_METHODS.add(cls.name, cls())
    return cls


def merge_method(name: str) -> MergeMethod:
    return MERGE_METHODS.lookup(name)


def preference_methods() -> list[str]:
    """The methods a Serve family or a soups run can map a preference through."""
    return [n for n, m in MERGE_METHODS.items() if m.takes_preference]


def _weights(spec: MergeSpec) -> list[float]:
    return [float(e.weight) if e.weight is not None else 0.0 for e in spec.models]


def _require_weights(spec: MergeSpec) -> None:
    missing = [e.model for e in spec.models if e.weight is None]
    if missing:
        raise ValueError(f"{spec.method} needs a weight for every model; missing for {missing}")


@register_merge_method
class Linear(MergeMethod):
    name = "linear"
    paper = "arXiv 2203.05482"
    takes_preference = True

    def check(self, spec: MergeSpec) -> None:
        _require_weights(spec)
        if len(spec.models) < 2:
            raise ValueError(f"linear merge needs at least 2 models, got {len(spec.models)}")
        if spec.normalize and abs(sum(e.weight or 0 for e in spec.models)) < 1e-8:
            raise ValueError("normalize: the weights sum to 0, cannot normalise")

    def plan(self, spec: MergeSpec) -> Plan:
        names, w = [e.model for e in spec.models], _weights(spec)
        total = sum(w) if spec.normalize else 1.0
        return Plan(names, lambda ts: kernels.linear(ts, w, spec.normalize), [x / total for x in w], names[0])

    def weights(self, mu: Sequence[float], beta: float | None = None) -> np.ndarray:
        return np.asarray(mu, dtype=np.float64)


@register_merge_method
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    paper = "arXiv 2212.04089"

    def check(self, spec: MergeSpec) -> None:
        _require_weights(spec)
        if not spec.base_model:
            raise ValueError("task_arithmetic needs base_model")

    def plan(self, spec: MergeSpec) -> Plan:
        assert spec.base_model
        names, w = [e.model for e in spec.models], _weights(spec)
        total = sum(w) if spec.normalize and abs(sum(w)) >= 1e-8 else 1.0
        eff = [x / total for x in w]
        return Plan([spec.base_model, *names], lambda ts: kernels.task_arithmetic(ts[0], ts[1:], w, spec.normalize),
                     [1.0 - sum(eff), *eff], spec.base_model)


@register_merge_method
class Expo(MergeMethod):
    name = "expo"
    paper = "arXiv 2404.16792"

    def check(self, spec: MergeSpec) -> None:
        if spec.alpha is None or not math.isfinite(spec.alpha):
            raise ValueError("expo needs a finite alpha")
        if not spec.base_model or len(spec.models) != 1:
            raise ValueError("expo needs base_model (theta_0, the SFT model) and exactly one model (theta_1)")

    def plan(self, spec: MergeSpec) -> Plan:
        assert spec.base_model and spec.alpha is not None
        a, theta1 = spec.alpha, spec.models[0].model
        return Plan([spec.base_model, theta1], lambda ts: kernels.expo(ts[0], ts[1], a), [-a, 1.0 + a], theta1)


@register_merge_method
class BoneSoup(MergeMethod):
    name = "bone_soup"
    paper = "arXiv 2502.10762"
    takes_preference = True

    def check(self, spec: MergeSpec) -> None:
        if spec.mu is None or spec.beta is None:
            raise ValueError("bone_soup needs mu (one entry per model) and beta")
        if len(spec.mu) != len(spec.models):
            raise ValueError(f"bone_soup: mu has {len(spec.mu)} entries for {len(spec.models)} backbone models")
        if spec.k < 1.0 or not math.isfinite(spec.k):
            raise ValueError(f"bone_soup: k must be >= 1, got {spec.k}")
        if spec.k != 1.0 and not spec.base_model:
            raise ValueError("bone_soup: k != 1 extrapolates against base_model, which is missing")
        self.weights(spec.mu, spec.beta)  # validates beta and mu

    @staticmethod
    def backbone_matrix(n: int, beta: float) -> np.ndarray:
        """B: backbone j is trained on the reward h_j = sum_i B_ji r_i."""
        return bone_matrix(n, beta)

    def weights(self, mu: Sequence[float], beta: float | None = None) -> np.ndarray:
        if beta is None:
            raise ValueError("bone_soup needs beta (the diagonal of B)")
        return bone_soup_coefficients(mu, beta)

    def plan(self, spec: MergeSpec) -> Plan:
        assert spec.mu is not None
        names = [e.model for e in spec.models]
        lam = [float(x) for x in self.weights(spec.mu, spec.beta)]
        if spec.k == 1.0:
            return Plan(names, lambda ts: kernels.linear(ts, lam), lam, names[0])
        k = spec.k
        assert spec.base_model
        return Plan([*names, spec.base_model],
                    lambda ts: kernels.extrapolate(kernels.linear(ts[:-1], lam), ts[-1], k), extrapolated(lam, k),
                    names[0])
