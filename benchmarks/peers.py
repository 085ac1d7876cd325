"""What the benchmarks share. Peers run in their own virtual environments under the benchmark's
work directory (never in rayalign's), with CPU torch through the same constraints file;
installed on first use. A peer script prints one line `RESULT <json>`."""

from __future__ import annotations

import json
import os
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


def run_peer_script(py: Path, script: str, args: dict, what: str) -> dict:
    """Run `script` under the peer's interpreter with `args` as JSON (rayalign importable, no GPU);
    its `RESULT` line, parsed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(py), "-c", script, json.dumps(args)], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def small_model(work: Path) -> Path:
    """WORK/small: the `small` preset with random weights (throughput does not depend on training)."""
    from rayalign.models.presets import build_preset, train_tokenizer

    path = work / "small"
    if not path.is_dir():
        build_preset("small", path, train_tokenizer(0))
    return path
