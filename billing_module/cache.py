"""LRU + TTL caches in front of the cache tables (cachetools), with hit / miss counters.

Pricing and authorisation read through these, so they answer from memory (and, on a miss,
from the local cache tables) while the central platform is down. A sync that changes a table
invalidates its cache.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from cachetools import TTLCache

from . import metrics

_MISSING = object()


class NamedCache:
    def __init__(self, name: str, size: int, ttl: float) -> None:
        self.name = name
        self._data: TTLCache = TTLCache(maxsize=size, ttl=ttl)
        self.hits = 0
        self.misses = 0
        self._hit_counter, self._miss_counter = metrics.cache_counters(name)

    def get(self, key: Hashable) -> Any:
        try:  # one lookup (TTLCache.get would check expiry twice: ``in``, then ``[]``)
            value = self._data[key]
        except KeyError:
            self.misses += 1
            self._miss_counter.inc()
            return _MISSING
        self.hits += 1
        self._hit_counter.inc()
        return value

    def put(self, key: Hashable, value: Any) -> None:
        self._data[key] = value

    async def get_or_load(self, key: Hashable, loader: Callable[[], Awaitable[Any]]) -> Any:
        """``loader()`` is awaited on a miss; ``None`` results are cached too (a known miss)."""
        value = self.get(key)
        if value is _MISSING:
            value = await loader()
            self._data[key] = value
        return value

    def invalidate(self, key: Any = _MISSING) -> None:
        if key is _MISSING:
            self._data.clear()
        else:
            self._data.pop(key, None)

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._data), "maxsize": self._data.maxsize}


class CacheManager:
    def __init__(self, size: int = 10000, ttl: float = 300.0) -> None:
        self.size, self.ttl = size, ttl
        self._caches: dict[str, NamedCache] = {}

    def cache(self, name: str) -> NamedCache:
        c = self._caches.get(name)
        if c is None:
            c = self._caches[name] = NamedCache(name, self.size, self.ttl)
        return c

    def invalidate(self, name: str | None = None) -> None:
        for n, c in self._caches.items():
            if name is None or n == name or n.startswith(name + ":"):
                c.invalidate()

    def stats(self) -> dict[str, dict[str, float]]:
        return {n: c.stats() for n, c in sorted(self._caches.items())}


MISSING = _MISSING
__all__ = ["CacheManager", "NamedCache", "MISSING"]
