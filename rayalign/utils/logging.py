"""Run logging: metrics.jsonl (one JSON line per step), TensorBoard and, when asked for, Weights &
Biases (offline by default), from rank 0 only."""

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
    """Writes `metrics.jsonl` and TensorBoard events under `directory` (tags prefixed by `prefix`), and
    with `wandb` (a WandbConfig with enabled=True) the same metrics to a wandb run whose files live
    under `directory`/wandb; `run_config` is recorded as that run's config."""

    def __init__(self, directory: str | Path, prefix: str = "", enabled: bool = True, wandb: Any = None,
                 run_config: dict[str, Any] | None = None, name: str | None = None):
        self.dir = Path(directory)
        self.prefix = prefix
        self.enabled = enabled
        self._tb = None
        self.wandb_run: Any = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            if wandb is not None and wandb.enabled:
                self.wandb_run = _wandb_run(self.dir, wandb, run_config, name)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{f"{self.prefix}{k}": v for k, v in metrics.items()}}
        append_jsonl(self.dir / "metrics.jsonl", record)
        scalars = {f"{self.prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)  # type: ignore[union-attr]
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

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
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _wandb_run(directory: Path, cfg: Any, run_config: dict[str, Any] | None, name: str | None) -> Any:
    """A wandb run under directory/wandb (a resumed rayalign run starts a new wandb run: wandb's
    step must grow, and the resumed steps repeat)."""
    import wandb

    return wandb.init(project=cfg.project, mode=cfg.mode, dir=str(directory), config=run_config or {},
                      name=cfg.name or name, group=cfg.group, tags=list(cfg.tags) or None, reinit="create_new")
