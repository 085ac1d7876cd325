"""Run logging: metrics.jsonl (one JSON line per step) and TensorBoard, from rank 0 only."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rayalign.utils.io import append_jsonl, atomic_write_text

log = logging.getLogger("rayalign")


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s rayalign %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(level)
        log.propagate = False


class RunLogger:
    """Writes `metrics.jsonl` and TensorBoard events under `directory` (tags prefixed by `prefix`)."""

    def __init__(self, directory: str | Path, prefix: str = "", enabled: bool = True):
        self.dir = Path(directory)
        self.prefix = prefix
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{f"{self.prefix}{k}": v for k, v in metrics.items()}}
        append_jsonl(self.dir / "metrics.jsonl", record)
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{self.prefix}{k}", v, step)  # type: ignore[union-attr]

    def truncate(self, after_step: int) -> None:
        """Drop metrics.jsonl records beyond `after_step` (a resumed run repeats those steps)."""
        path = self.dir / "metrics.jsonl"
        if not self.enabled or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
