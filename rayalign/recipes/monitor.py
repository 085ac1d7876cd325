"""The KL-hack monitor (SALSA paper, section on length collapse): with a soup reference and a
high KL coefficient the policy can lower its KL by answering ever shorter, down to nothing.
Response length and KL are watched every step; a collapse is warned about and, when configured,
stops the run."""

from __future__ import annotations

from dataclasses import dataclass

from rayalign.config.schema import MonitorConfig
from rayalign.utils.logging import log


@dataclass
class Alarm:
    step: int
    message: str
    stop: bool


class KLHackMonitor:
    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.initial_length: float | None = None
        self.streak = 0
        self.alarms = 0

    def update(self, step: int, mean_length: float, kl: float) -> Alarm | None:
        if self.initial_length is None:
            self.initial_length = max(mean_length, 1e-9)
        floor = self.cfg.collapse_ratio * self.initial_length
        self.streak = self.streak + 1 if mean_length < floor else 0
        if self.streak < self.cfg.patience:
            return None
        self.alarms += 1
        msg = (f"KL-hack: mean response length {mean_length:.1f} tokens has been below "
               f"{self.cfg.collapse_ratio:g} x the first step's {self.initial_length:.1f} for {self.streak} "
               f"steps (KL {kl:.3f}); lower algo.beta" + (" -- stopping (monitor.stop_on_collapse)"
                                                         if self.cfg.stop_on_collapse else ""))
        log.warning(msg)
        return Alarm(step, msg, self.cfg.stop_on_collapse)

    def state_dict(self) -> dict[str, float | int | None]:
        return {"initial_length": self.initial_length, "streak": self.streak, "alarms": self.alarms}

    def load_state_dict(self, s: dict[str, float | int | None]) -> None:
        self.initial_length = s["initial_length"]  # type: ignore[assignment]
        self.streak, self.alarms = int(s["streak"] or 0), int(s["alarms"] or 0)
