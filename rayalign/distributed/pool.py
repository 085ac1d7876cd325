"""A role's actors as one pool: work is split evenly across them, and an actor that dies is
restarted by Ray (`max_restarts`), brought back to the run's state by `on_restart` (for rollout
workers: a weight re-sync) and given its share of the work again, so the step is not lost.

A restart can also be invisible to the caller: an actor killed between two calls is back before
the next one, which then succeeds -- on a fresh actor that never received the run's weights. So
after every call the pool compares each actor's restart count in the GCS with the count it last
saw, and treats a difference like a failure: recover, then redo that actor's share.

    pool = ActorPool("rollout", actors, on_restart=lambda i: sync.resync(i))
    outs = pool.map("generate", prompt_ids, sampling)      # items split across actors, order kept
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from rayalign.utils.logging import log


def split_evenly(items: Sequence[Any], n: int) -> list[list[Any]]:
    """n contiguous chunks whose sizes differ by at most one (order kept)."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


class ActorPool:
    def __init__(self, role: str, actors: Sequence[Any], on_restart: Callable[[int], None] | None = None,
                 max_retries: int = 3, restart_timeout_s: float = 300.0):
        self.role, self.actors = role, list(actors)
        self.on_restart = on_restart
        self.max_retries, self.restart_timeout_s = max_retries, restart_timeout_s
        self.restarts = 0
        self._seen = [_num_restarts(a) for a in self.actors]

    def __len__(self) -> int:
        return len(self.actors)

    def wait_ready(self, i: int) -> None:
        """Block until actor i answers (Ray restarts a dead actor that has restarts left)."""
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                ray.get(self.actors[i].__ray_ready__.remote(), timeout=30)
                return
            except (ActorUnavailableError, RayActorError, ray.exceptions.GetTimeoutError) as exc:
                if _state(self.actors[i]) == "DEAD":
                    raise RuntimeError(f"{self.role} actor {i} died and has no restarts left "
                                       f"(raise {self.role}.max_restarts): {exc}") from exc
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.role} actor {i} did not come back within "
                                       f"{self.restart_timeout_s:g}s") from None
                time.sleep(0.5)

    def _recover(self, i: int, exc: BaseException) -> None:
        log.warning("%s actor %d failed (%s: %s); waiting for its restart", self.role, i, type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        self.wait_ready(i)
        now = _num_restarts(self.actors[i])
        self.restarts += max(1, now - self._seen[i])
        self._seen[i] = now
        if self.on_restart is not None:
            self.on_restart(i)
        log.warning("%s actor %d is back", self.role, i)

    def recover_restarted(self) -> list[int]:
        """Bring back every actor Ray restarted (or is restarting) since the pool last saw it; the
        indices recovered. For failures outside a pool call, such as a weight sync."""
        back = []
        for i, a in enumerate(self.actors):
            if _num_restarts(a) != self._seen[i] or _state(a) in ("RESTARTING", "DEAD"):
                self._recover(i, RuntimeError("restarted outside a pool call"))
                back.append(i)
        return back

    def call(self, i: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._gather({i: (method, args, kwargs)})[i]

    def _gather(self, calls: dict[int, tuple[str, tuple[Any, ...], dict[str, Any]]]) -> dict[int, Any]:
        refs = {i: getattr(self.actors[i], m).remote(*a, **kw) for i, (m, a, kw) in calls.items()}
        results: dict[int, Any] = {}
        for i, ref in refs.items():
            attempt = 0
            while True:
                try:
                    results[i] = ray.get(ref)
                    break
                except (RayActorError, ActorUnavailableError) as exc:
                    attempt += 1
                    if attempt > self.max_retries:
                        raise RuntimeError(f"{self.role} actor {i} failed {attempt} times in one call") from exc
                    self._recover(i, exc)
                    m, a, kw = calls[i]
                    ref = getattr(self.actors[i], m).remote(*a, **kw)
        stale = [i for i in calls if _num_restarts(self.actors[i]) != self._seen[i]]
        for i in stale:  # restarted without a failed call: the answer may come from a fresh actor
            self._recover(i, RuntimeError("restarted between calls"))
        if stale:
            results.update(self._gather({i: calls[i] for i in stale}))
        return results

    def map(self, method: str, items: Sequence[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Split `items` evenly across the actors, call `method(chunk, *args)` on each and
        concatenate the returned lists in order."""
        chunks = split_evenly(items, len(self.actors))
        calls = {i: (method, (c, *args), kwargs) for i, c in enumerate(chunks) if c}
        results = self._gather(calls)
        return [x for i in sorted(results) for x in results[i]]

    def map_tensors(self, method: str, batch: dict[str, Any], *args: Any) -> Any:
        """Split a dict of tensors along dim 0 across the actors; concatenate tensor results."""
        import torch

        n = next(iter(batch.values())).shape[0]
        chunks = [c for c in split_evenly(range(n), len(self.actors))]
        calls = {i: (method, ({k: v[c[0]:c[-1] + 1] for k, v in batch.items()}, *args), {})
                 for i, c in enumerate(chunks) if c}
        results = self._gather(calls)
        return torch.cat([results[i] for i in sorted(results)])

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        results = self._gather({i: (method, args, kwargs) for i in range(len(self.actors))})
        return [results[i] for i in range(len(self.actors))]


def _num_restarts(actor: Any) -> int:
    """How often Ray has restarted the actor (0 when the GCS does not know it yet)."""
    try:
        info = ray._private.state.actors(actor._actor_id.hex())
        return int(info.get("NumRestarts", 0)) if isinstance(info, dict) else 0
    except Exception:
        return 0


def _state(actor: Any) -> str | None:
    """The actor's state in the GCS (ALIVE, RESTARTING, DEAD, ...), None when unknown."""
    try:
        info = ray._private.state.actors(actor._actor_id.hex())
        return info.get("State") if isinstance(info, dict) else None
    except Exception:
        return None
