"""The middle adapter tier: an in-memory LRU of loaded adapters bounded in bytes, between the mixer's
slots (hot) and the library's packs (memory-mapped, cold). Counts hits, misses (loads from the library),
evictions and load time; :meth:`stats` feeds ``loramix stats``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

__all__ = ["AdapterCache"]


def _nbytes(w: Any) -> int:
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in w.layers.values())


class AdapterCache:
    """``cache(id) -> LoraWeights``: from memory when cached, else ``lib.load`` (then cached).

    Pass it as the mixer's loader: ``MixedModel(base, AdapterCache(lib, 256 << 20))``.
    """

    def __init__(self, lib: Any, max_bytes: int = 256 << 20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.lib = lib
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.load_seconds = 0.0

    def __call__(self, adapter_id: str) -> Any:
        with self._lock:
            hit = self._data.get(adapter_id)
            if hit is not None:
                self._data.move_to_end(adapter_id)
                self.hits += 1
                return hit[0]
        t0 = time.perf_counter()
        w = self.lib.load(adapter_id)
        size = _nbytes(w)
        with self._lock:
            self.misses += 1
            self.load_seconds += time.perf_counter() - t0
            if size <= self.max_bytes and adapter_id not in self._data:
                self._data[adapter_id] = (w, size)
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, (_, s) = self._data.popitem(last=False)
                    self.bytes -= s
                    self.evictions += 1
        return w

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._data

    def __len__(self) -> int:
        return len(self._data)

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            hit = self._data.pop(adapter_id, None)
            if hit is not None:
                self.bytes -= hit[1]

    def stats(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"adapters": len(self._data), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "hit_rate": self.hits / total if total else 0.0,
                "load_seconds": round(self.load_seconds, 6)}
