"""A least-recently-used cache bounded in bytes: merged weights of the preference vectors a Serve
replica has built, so a popular soup is merged once.

    cache = ByteLRU(max_bytes=2 * 1024**3)
    weights = cache.get(key)
    if weights is None:
        weights = build(...)
        cache.put(key, weights, nbytes=state_dict_bytes(weights))
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch


def state_dict_bytes(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


class ByteLRU:
    def __init__(self, max_bytes: int, on_evict: Callable[[str, Any], None] | None = None):
        """`on_evict(key, value)` is called for every entry pushed out (files to remove, say)."""
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Insert (or refresh) `key`, evicting the least recently used entries until it fits.
        An entry larger than the whole cache is not kept; returns whether it was."""
        evicted: list[tuple[str, Any]] = []
        with self._lock:
            if key in self._items:
                old, size = self._items.pop(key)
                self.bytes -= size
                if old is not value:
                    evicted.append((key, old))
            kept = nbytes <= self.max_bytes
            while kept and self.bytes + nbytes > self.max_bytes and self._items:
                k, (v, size) = self._items.popitem(last=False)
                self.bytes -= size
                self.evictions += 1
                evicted.append((k, v))
            if kept:
                self._items[key] = (value, nbytes)
                self.bytes += nbytes
        if self.on_evict is not None:
            for k, v in evicted:
                self.on_evict(k, v)
        return kept

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "hit_rate": self.hits / total if total else 0.0}
