"""Which weights a continuously batching engine holds, and which requests may run on them.

Every request names a weights key: a full-weight family's merged model, or the base model that
LoRA families' combined adapters sit on (all of those share one key, so requests of every
preference run in one batch). Requests for the loaded key join the running batch at once. A
request for another key waits; once the oldest such request has waited `max_wait_s`, the loaded
key takes no new requests, its batch drains (each request is bounded by its max_tokens), the
weights are swapped and the waiting key's requests all start together. Keys are served in the
order of their oldest request, so no key waits for more than the keys ahead of it, each for at
most `max_wait_s` plus one drain and one swap. With nothing running on the loaded key, a waiting
key is swapped in at once.

    sched = WeightScheduler(swap=engine_swap, loaded="base", max_wait_s=1.0)
    async with sched.hold("soup@20:14,6"):
        ...                                   # generate on those weights
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class _Waiter:
    key: str
    since: float
    future: asyncio.Future = field(repr=False)


class WeightScheduler:
    def __init__(self, swap: Callable[[str], Awaitable[None]], loaded: str | None = None, max_wait_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._swap_fn, self.loaded, self.max_wait_s, self._clock = swap, loaded, max_wait_s, clock
        self.running = 0  # admitted on the loaded weights and not yet finished
        self.swaps = 0
        self._waiting: list[_Waiter] = []
        self._swapping = False
        self._timer: asyncio.TimerHandle | None = None

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Run the body on the weights of `key` (swapped in when needed); they stay loaded until it exits."""
        await self._admit(key)
        try:
            yield
        finally:
            self.running -= 1
            self._dispatch()

    def waiting(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self._waiting:
            out[w.key] = out.get(w.key, 0) + 1
        return out

    async def _admit(self, key: str) -> None:
        if not self._swapping and key == self.loaded and not self._closed():
            self.running += 1
            return
        w = _Waiter(key, self._clock(), asyncio.get_running_loop().create_future())
        self._waiting.append(w)
        self._dispatch()
        try:
            await w.future  # set when admitted: self.running already counts it
        except asyncio.CancelledError:
            if w in self._waiting:
                self._waiting.remove(w)
            elif w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                self.running -= 1  # admitted just as the caller went away
            self._dispatch()
            raise

    def _closed(self) -> bool:
        """The loaded key takes no new requests: another key's oldest request has waited long enough."""
        now = self._clock()
        return any(w.key != self.loaded and now - w.since >= self.max_wait_s for w in self._waiting)

    def _dispatch(self) -> None:
        if self._swapping:
            return
        if not self._closed():
            admitted = [w for w in self._waiting if w.key == self.loaded]
            for w in admitted:
                self._start(w)
            others = [w for w in self._waiting if w.key != self.loaded]
            if others and self.running > 0:
                self._arm(min(w.since for w in others) + self.max_wait_s)
                return
        if self.running > 0 or not self._waiting:
            return
        others = [w for w in self._waiting if w.key != self.loaded]
        if not others:
            for w in list(self._waiting):
                self._start(w)
            return
        nxt = others[0].key  # the key of the oldest request that needs a swap
        self._swapping = True
        asyncio.get_running_loop().create_task(self._swap_to(nxt))

    def _start(self, w: _Waiter) -> None:
        self._waiting.remove(w)
        if not w.future.done():
            self.running += 1
            w.future.set_result(None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, when - self._clock()) + 1e-3, self._dispatch)

    async def _swap_to(self, key: str) -> None:
        try:
            await self._swap_fn(key)
        except BaseException as exc:  # the key's requests fail with it; the engine's weights are unknown now
            self.loaded = None
            for w in [w for w in self._waiting if w.key == key]:
                self._waiting.remove(w)
                if not w.future.done():
                    w.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
        else:
            self.loaded = key
            self.swaps += 1
            for w in [w for w in self._waiting if w.key == key]:
                self._start(w)
        finally:
            self._swapping = False
            self._dispatch()
