"""A role's actors as one pool: work is split evenly across them, and an actor that dies is
restarted by Ray (`max_restarts`), brought back to the run's state by `on_restart` (for rollout
workers: a weight re-sync) and given its share of the work again, so the step is not lost.

A restart can also be invisible to the caller: an actor killed between two calls is back before
the next one, which then succeeds -- on a fresh actor that never received the run's weights. So
with every call the pool asks the actor for its incarnation (a token drawn once per process,
fetched right behind the call through Ray's public `__ray_call__`, so it costs no extra round
trip) and treats a token it has not seen like a failure: recover, then redo that actor's share.

    pool = ActorPool("rollout", actors, on_restart=lambda i: sync.resync(i))
    outs = pool.map("generate", prompt_ids, sampling)      # items split across actors, order kept
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

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


_PROCESS_TOKEN = uuid.uuid4().hex  # drawn once per process: a restarted actor is a new process


def _incarnation(_actor: Any) -> str:
    """Run inside an actor by `__ray_call__`: the token of the actor's process."""
    return _PROCESS_TOKEN


def incarnation(actor: Any) -> Any:
    """An ObjectRef to the actor's incarnation token (queued behind the calls already submitted)."""
    return actor.__ray_call__.remote(_incarnation)


class ActorPool:
    def __init__(self, role: str, actors: Sequence[Any], on_restart: Callable[[int], None] | None = None,
                 max_retries: int = 3, restart_timeout_s: float = 300.0, dead_after_s: float = 10.0):
        """`dead_after_s`: an actor that keeps answering 'died' for this long has no restarts left."""
        self.role, self.actors = role, list(actors)
        self.on_restart = on_restart
        self.max_retries, self.restart_timeout_s, self.dead_after_s = max_retries, restart_timeout_s, dead_after_s
        self.restarts = 0
        self._seen = ray.get([incarnation(a) for a in self.actors])

    def __len__(self) -> int:
        return len(self.actors)

    def wait_ready(self, i: int) -> str:
        """Block until actor i answers (Ray restarts a dead actor that has restarts left); its
        incarnation token."""
        deadline = time.monotonic() + self.restart_timeout_s
        died_since: float | None = None
        while True:
            try:
                return ray.get(incarnation(self.actors[i]), timeout=30)
            except ActorDiedError as exc:  # right after a death this can precede the restart; for good after
                now = time.monotonic()
                died_since = died_since if died_since is not None else now
                if now - died_since > self.dead_after_s:
                    raise RuntimeError(f"{self.role} actor {i} died and has no restarts left "
                                       f"(raise {self.role}.max_restarts): {exc}") from exc
            except (ActorUnavailableError, RayActorError, ray.exceptions.GetTimeoutError):
                died_since = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.role} actor {i} did not come back within "
                                   f"{self.restart_timeout_s:g}s") from None
            time.sleep(0.5)

    def _recover(self, i: int, exc: BaseException) -> None:
        log.warning("%s actor %d failed (%s: %s); waiting for its restart", self.role, i, type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        self._seen[i] = self.wait_ready(i)
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(i)
        log.warning("%s actor %d is back", self.role, i)

    def recover_restarted(self) -> list[int]:
        """Bring back every actor Ray restarted (or is restarting) since the pool last saw it; the
        indices recovered. For failures outside a pool call, such as a weight sync."""
        back = []
        for i in range(len(self.actors)):
            if self.wait_ready(i) != self._seen[i]:  # waits out a restart, or a call still running
                self._recover(i, RuntimeError("restarted outside a pool call"))
                back.append(i)
        return back

    def call(self, i: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._gather({i: (method, args, kwargs)})[i]

    def _gather(self, calls: dict[int, tuple[str, tuple[Any, ...], dict[str, Any]]]) -> dict[int, Any]:
        refs = {i: (getattr(self.actors[i], m).remote(*a, **kw), incarnation(self.actors[i]))
                for i, (m, a, kw) in calls.items()}
        results: dict[int, Any] = {}
        stale = []
        for i, (ref, token_ref) in refs.items():
            attempt = 0
            while True:
                try:
                    results[i] = ray.get(ref)
                    token = ray.get(token_ref)
                    break
                except (RayActorError, ActorUnavailableError) as exc:
                    attempt += 1
                    if attempt > self.max_retries:
                        raise RuntimeError(f"{self.role} actor {i} failed {attempt} times in one call") from exc
                    self._recover(i, exc)
                    m, a, kw = calls[i]
                    ref, token_ref = getattr(self.actors[i], m).remote(*a, **kw), incarnation(self.actors[i])
            if token != self._seen[i]:  # restarted without a failed call: the answer came from a fresh actor
                stale.append(i)
        for i in stale:
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
