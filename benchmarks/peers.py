"""Peers run in their own virtual environments under the benchmark's work directory (never in
rayalign's), with CPU torch through the same constraints file; installed on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peer_python(work: Path, package: str) -> Path:
    """The interpreter of WORK/<package>-venv, which has `package` (e.g. trl, mergekit) installed."""
    venv = work / f"{package}-venv"
    py = venv / "bin" / "python"
    if not (venv / ".ok").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints" / "cpu.txt"),
                        "torch==2.13.0", package], check=True)
        (venv / ".ok").touch()
    return py
