"""The routing cache: an LRU of routes keyed by the normalised query and the routing options.

Each entry remembers the (library generation, index generation) it was computed at; an entry from
another generation is a miss, so any library change (an adapter added, removed, re-tagged or re-keyed,
by this process or another) invalidates every cached route without a scan. Only strategies whose answer
depends on nothing but the library and its keys are cached (``CACHEABLE``).
"""

from __future__ import annotations

import dataclasses
import threading
import unicodedata
from collections import OrderedDict
from typing import Any

__all__ = ["CACHEABLE", "RouteCache", "cache_key", "normalize_query"]

CACHEABLE = frozenset({"semantic", "tags", "hybrid"})


def normalize_query(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, stripped (case kept: some strategies see it)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def cache_key(query: str, cfg: Any, tenant: str | None = None) -> tuple[Any, ...] | None:
    """The key of a query under ``cfg`` (a RouteConfig) for ``tenant`` (routes differ by what the caller
    may see); None when the strategy is not cacheable."""
    if cfg.strategy not in CACHEABLE:
        return None
    opts = tuple((f.name, tuple(v) if isinstance(v := getattr(cfg, f.name), list) else v)
                 for f in dataclasses.fields(cfg))
    return (normalize_query(query), opts, tenant)


class RouteCache:
    """A thread-safe LRU of at most ``size`` routes (0 disables it); counts hits and misses."""

    def __init__(self, size: int = 4096) -> None:
        self.size = int(size)
        self._data: OrderedDict[tuple[Any, ...], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: list[tuple[Any, ...] | None], generation: Any) -> list[Any]:
        out: list[Any] = []
        with self._lock:
            for key in keys:
                hit = self._data.get(key) if key is not None and self.size else None
                if hit is not None and hit[0] == generation:
                    self._data.move_to_end(key)  # type: ignore[arg-type]
                    self.hits += 1
                    route = hit[1]
                    out.append(dataclasses.replace(route, adapters=[dataclasses.replace(a) for a in route.adapters]))
                else:
                    if hit is not None:
                        del self._data[key]  # type: ignore[arg-type]
                    self.misses += 1
                    out.append(None)
        return out

    def put(self, key: tuple[Any, ...] | None, generation: Any, route: Any) -> None:
        if key is None or not self.size:
            return
        with self._lock:
            self._data[key] = (generation, route)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def stats(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"size": len(self._data), "capacity": self.size, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / total if total else 0.0}
