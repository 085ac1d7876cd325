"""The lifecycle every Ray training run shares (PPO and its estimators, SPO / DPO / IPO):

    done = claim(out, method, resume)            # OUTPUT is ours (or its finished policy is returned)
    ... load data and check it: errors come before anything is written ...
    with RaySession(cfg, method, resume, plan=lambda: placement(cfg)) as run:
        learners = run.own(LearnerGroup(run.plan, ...), LearnerGroup.shutdown)
        start = run.resume_learners(learners, cfg.steps)   # 0, or the saved iteration (state loaded)
        ...                                      # the loop: run.logger.log(...), save_run_state(...)
        return finish_run(out, learners, summary, text, extra)

The session writes the resolved config, connects to Ray (or joins RAY_ADDRESS), prints and
reserves the placement plan, opens the logger, and on the way out releases in reverse order
everything it was handed, the plan, and the Ray it started.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rayalign.config.core import dump_config
from rayalign.distributed.cluster import connect
from rayalign.distributed.placement import PlacementPlan
from rayalign.utils.io import atomic_write_json, atomic_write_text, claim_output
from rayalign.utils.logging import RunLogger, log


def claim(out: Path, method: str, resume: bool) -> Path | None:
    """Claim OUTPUT for a run; the final policy if that run already finished (resume keeps it)."""
    claim_output(out, resume)
    if (out / "policy").is_dir():
        log.info("%s: %s already finished; kept", method, out / "policy")
        return out / "policy"
    return None


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    times[f"time/{name}"] = time.perf_counter() - t0


class RaySession:
    def __init__(self, cfg: Any, method: str, resume: bool, plan: Callable[[], PlacementPlan]):
        self.cfg, self.method, self.resume = cfg, method, resume
        self.out = Path(cfg.output)
        self._make_plan = plan
        self._closers: list[Callable[[], None]] = []
        self._started_ray = False
        self.plan: PlacementPlan | None = None
        self.logger: RunLogger | None = None
        self.saved: dict[str, Any] | None = None

    def __enter__(self) -> RaySession:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", f"# rayalign train {self.method}\n" + dump_config(self.cfg))
        self._started_ray = connect(self.cfg.ray_address)
        try:
            self.plan = self._make_plan()
            print(self.plan.describe(), flush=True)
            self.plan.reserve(self.cfg.placement.timeout_s)
            self.logger = RunLogger(self.out / "logs", "", wandb=self.cfg.wandb, run_config=self.cfg.model_dump(),
                                    name=self.out.name)
            self.saved = read_controller(self.out) if self.resume else None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def own(self, thing: Any, close: Callable[[Any], None]) -> Any:
        """Hand `thing` to the session: `close(thing)` runs when the session ends (last in, first out)."""
        self._closers.append(lambda: close(thing))
        return thing

    def resume_learners(self, learners: Any, total: int, unit: str = "iteration") -> int:
        """With --resume and a saved state: load it into the learners; the `unit` (iteration, step) to
        start at, of `total`. The logger drops records past it (those run again)."""
        start = 0
        if self.saved is not None:
            learners.load_state(str(self.out / "state"), self.saved["tag"])
            start = int(self.saved["iteration"])
            log.info("%s: resuming at %s %d/%d", self.method, unit, start, total)
        if self.resume:
            assert self.logger is not None
            self.logger.truncate(start)
        return start

    def __exit__(self, *exc: Any) -> None:
        if self.logger is not None:
            self.logger.close()
        while self._closers:
            self._closers.pop()()
        if self.plan is not None:
            self.plan.release()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False


# ---- run state -------------------------------------------------------------------------------------

def save_run_state(out: Path, learners: Any, iteration: int, controller: dict[str, Any]) -> None:
    """Learner states (models, optimisers) under tag iter<N>, then the controller's state, written
    atomically last: a kill in between leaves the previous state the valid one."""
    state = out / "state"
    tag = f"iter{iteration}"
    learners.save_state(str(state), {"iteration": iteration}, tag)
    previous = read_controller(out)
    atomic_write_json(state / "controller.json", {**controller, "iteration": iteration, "tag": tag})
    if previous is not None and previous["tag"] != tag:
        for part in state.iterdir():
            if part.is_dir():
                shutil.rmtree(part / previous["tag"], ignore_errors=True)


def finish_run(out: Path, learners: Any, summary: dict[str, Any], text: str, extra: dict[str, Any]) -> Path:
    """The final policy (OUTPUT/policy) and OUTPUT/summary.json; the resumable state goes."""
    learners.save_policy(str(out / "policy"), extra=extra)
    atomic_write_json(out / "summary.json", summary)
    print(text, flush=True)
    shutil.rmtree(out / "state", ignore_errors=True)
    return out / "policy"


def read_controller(out: Path) -> dict[str, Any] | None:
    p = out / "state" / "controller.json"
    return json.loads(p.read_text()) if p.is_file() else None
