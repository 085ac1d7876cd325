"""Run a function on N local ranks forming one torch.distributed group (no Ray).

Used to test the learner with several ranks on one machine; on a cluster, Ray learner groups
start the ranks instead and call the same `Learner`.

    results = spawn_ranks(my_fn, world_size=2, args=(cfg,))   # my_fn(rank, world_size, *args)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from typing import Any

from rayalign.learner.dist import free_port


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple[Any, ...],
           queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report, then let the parent fail loudly
        queue.put((rank, False, traceback.format_exc()))


def spawn_ranks(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...] = (), timeout: float = 600) -> list[Any]:
    """Call fn(rank, world_size, *args) in `world_size` fresh processes; return results by rank.
    fn must be importable (module level). Raises with the failing rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, ok, value = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]}) "
                                       "before reporting a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results))} gave no result "
                                       f"within {timeout}s") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
