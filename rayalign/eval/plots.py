"""Plots for run reports (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rayalign.world.gold import OBJECTIVES  # noqa: E402


def gold_bars(summaries: dict[str, dict[str, Any]], out: str | Path, title: str = "Gold rewards") -> Path:
    """Grouped bars: one group per objective (and the combination), one bar per model, with
    standard-error whiskers."""
    keys = list(OBJECTIVES) + ["combined"]
    names = list(summaries)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 3.6))
    for i, name in enumerate(names):
        s = summaries[name]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [s[k] for k in keys], width,
               yerr=[s[f"{k}_se"] for k in keys], capsize=2, label=name)
    ax.set_xticks(x, keys)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("gold reward (mean ± s.e.)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(len(names), 3))
    return _save(fig, out)


def reward_kl_curves(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], out: str | Path,
                     points: dict[str, list[tuple[float, float]]] | None = None,
                     title: str = "Gold reward against KL", xlabel: str = "KL(pi || pi_ref)",
                     ylabel: str = "gold reward (combined)") -> Path:
    """One colour per method: each run's training curve (KL, reward) as a thin line, and optional
    held-out points (for example policy snapshots) as markers."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(curves.items()):
        c = colours[i % len(colours)]
        for j, (x, y) in enumerate(runs):
            ax.plot(x, y, color=c, alpha=0.55, linewidth=1.0, label=f"{name} (training batches)" if j == 0 else None)
        if points and name in points and points[name]:
            px, py = zip(*points[name])
            ax.scatter(px, py, color=c, edgecolor="black", s=28, zorder=3, label=f"{name} (held-out snapshots)")
    return _finish(fig, ax, out, xlabel, ylabel, title)


def metric_lines(series: dict[str, list[np.ndarray]], out: str | Path, ylabel: str, title: str,
                 marks: dict[str, list[int]] | None = None, x: list[float] | None = None,
                 xlabel: str = "iteration") -> Path:
    """Lines over steps (or the shared `x`), one colour per name (several runs each); `marks` puts a
    red cross on steps (for example where the KL-hack monitor raised its alarm)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(series.items()):
        for j, y in enumerate(runs):
            ax.plot(np.arange(1, len(y) + 1) if x is None else x, y, color=colours[i % len(colours)], alpha=0.7,
                    marker="o" if x is not None else None, markersize=3, label=name if j == 0 else None)
            for step in (marks or {}).get(name, []):
                if 1 <= step <= len(y):
                    ax.scatter([step], [y[step - 1]], marker="x", color="red", s=50, zorder=3)
    return _finish(fig, ax, out, xlabel, ylabel, title)


def xy_lines(series: dict[str, tuple[list[float], list[float]]], out: str | Path, xlabel: str, ylabel: str,
             title: str, logx: bool = False, markers_only: bool = False) -> Path:
    """One marked line per name through its (x, y) points (for example entropy against alpha);
    with `markers_only`, the points alone (for example one per seed)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", linestyle="none" if markers_only else "-", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    return _finish(fig, ax, out, xlabel, ylabel, title)


def pareto_fronts(fronts: dict[str, np.ndarray], names: list[str], out: str | Path, title: str,
                  points: dict[str, np.ndarray] | None = None, reference: np.ndarray | None = None,
                  styles: dict[str, dict[str, Any]] | None = None) -> Path:
    """Each method's front (its models over the preference grid, joined in grid order) in objective
    space; with three or more objectives, one panel per pair. `points` marks single models (e.g. SFT);
    `styles` gives a front its matplotlib options (colour, linestyle, label: None to leave it out)."""
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.2), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        for name, f in fronts.items():
            f = np.asarray(f)
            kw = {"marker": "o", "markersize": 3.5, "label": name, **(styles or {}).get(name, {})}
            ax.plot(f[:, i], f[:, j], **kw)
        for name, p in (points or {}).items():
            ax.scatter([p[i]], [p[j]], marker="*", s=120, zorder=3, color="black", label=name)
        if reference is not None:
            ax.scatter([reference[i]], [reference[j]], marker="x", color="grey", label="HV reference point")
        ax.set_xlabel(f"gold {names[i]}")
        ax.set_ylabel(f"gold {names[j]}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, out)


def _finish(fig: Any, ax: Any, out: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def _save(fig: Any, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
