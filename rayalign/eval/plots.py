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
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
