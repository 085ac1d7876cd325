"""What the multi-seed experiments share: their command line around a finished demo run, and
writing their report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from rayalign.utils.io import atomic_write_json, atomic_write_text


def mean_se(xs: list[float]) -> list[float]:
    """[mean, standard error] over seeds (0 for a single seed)."""
    return [float(np.mean(xs)), float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0]


def demo_parser(doc: str, needs: str) -> argparse.ArgumentParser:
    """--demo (a finished `rayalign demo` run holding `needs`), --out, --seeds."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help=f"a demo run directory (with {needs})")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[0, 1, 2],
                   help="comma-separated (default 0,1,2)")
    return p


def check_demo(p: argparse.ArgumentParser, demo: Path, needs: str) -> None:
    if not (demo / needs).is_dir():
        p.error(f"--demo {demo}: no {needs} inside (run `rayalign demo` first)")


def write_report(out: Path, results: dict[str, Any], text: str) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", text)
    print(text)
