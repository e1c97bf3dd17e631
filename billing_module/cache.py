"""LRU + TTL caches in front of the cache tables, with hit / miss counters.

Pricing and authorisation read through these, so they answer from memory (and, on a miss,
from the local cache tables) while the central platform is down. A sync that changes a table
invalidates its cache.

Hits and misses are counted in plain ints and moved into the Prometheus counters in batches
(``flush``): a counter's ``inc`` takes a lock, and with ``serve --workers N`` writes a shared
memory-mapped file, which would cost more than the lookup itself on the pricing path. A batch
is moved every ``FLUSH_EVERY`` lookups of a cache, by the scrape that this process answers, and
every ``FLUSH_SECONDS`` by a background job (so a scrape answered by another worker lags this
one's counts by at most that).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from . import metrics

_MISSING = object()
FLUSH_EVERY = 256
FLUSH_SECONDS = 5.0


class NamedCache:
    """An LRU cache whose entries expire ``ttl`` seconds after they were stored: an OrderedDict
    (least recently used first) of (value, deadline). Every step of a lookup is a C call; with
    cachetools' TTLCache a lookup took three Python frames and a linked list, more than the rest
    of a warm quote's lookups together."""

    def __init__(self, name: str, size: int, ttl: float, timer: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._data: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()
        self._size, self._ttl, self._timer = size, ttl, timer
        self.hits = 0
        self.misses = 0
        self._hit_counter, self._miss_counter = metrics.cache_counters(name)
        self._flushed_hits = self._flushed_misses = 0
        self._until_flush = FLUSH_EVERY

    def get(self, key: Hashable) -> Any:
        self._until_flush -= 1
        if not self._until_flush:
            self.flush()
        entry = self._data.get(key)
        if entry is None or entry[1] <= self._timer():
            if entry is not None:
                del self._data[key]
            self.misses += 1
            return _MISSING
        self._data.move_to_end(key)
        self.hits += 1
        return entry[0]

    def flush(self) -> None:
        """Move the hits and misses counted since the last flush into the Prometheus counters."""
        self._until_flush = FLUSH_EVERY
        hits, misses = self.hits - self._flushed_hits, self.misses - self._flushed_misses
        if hits:
            self._hit_counter.inc(hits)
        if misses:
            self._miss_counter.inc(misses)
        self._flushed_hits, self._flushed_misses = self.hits, self.misses

    def put(self, key: Hashable, value: Any) -> None:
        data = self._data
        data[key] = (value, self._timer() + self._ttl)
        data.move_to_end(key)
        if len(data) > self._size:
            data.popitem(last=False)

    async def get_or_load(self, key: Hashable, loader: Callable[[], Awaitable[Any]]) -> Any:
        """``loader()`` is awaited on a miss; ``None`` results are cached too (a known miss)."""
        value = self.get(key)
        if value is _MISSING:
            value = await self.load(key, loader)
        return value

    async def load(self, key: Hashable, loader: Callable[[], Awaitable[Any]]) -> Any:
        """``loader()``'s value, cached under ``key``: what ``get_or_load`` does on a miss, for a
        caller that looked ``key`` up with ``get`` itself (to stay synchronous on a hit)."""
        value = await loader()
        self.put(key, value)
        return value

    def invalidate(self, key: Any = _MISSING) -> None:
        if key is _MISSING:
            self._data.clear()
        else:
            self._data.pop(key, None)

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._data), "maxsize": self._size}


def _under(cache_name: str, name: str) -> bool:
    """Whether ``cache_name`` is ``name`` or one of its caches (``name:...``)."""
    return cache_name == name or cache_name.startswith(name + ":")


class CacheManager:
    def __init__(self, size: int = 10000, ttl: float = 300.0, timer: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl, self.timer = size, ttl, timer
        self._caches: dict[str, NamedCache] = {}
        self._depends: dict[str, tuple[str, ...]] = {}

    def cache(self, name: str, depends_on: tuple[str, ...] = ()) -> NamedCache:
        """The cache ``name``; ``depends_on``: the names whose invalidation clears it too (a cache
        of values derived from several entities)."""
        c = self._caches.get(name)
        if c is None:
            c = self._caches[name] = NamedCache(name, self.size, self.ttl, self.timer)
        if depends_on:
            self._depends[name] = depends_on
        return c

    def invalidate(self, name: str | None = None) -> None:
        for n, c in self._caches.items():
            if name is None or _under(n, name) or any(_under(d, name) for d in self._depends.get(n, ())):
                c.invalidate()

    def stats(self) -> dict[str, dict[str, float]]:
        return {n: c.stats() for n, c in sorted(self._caches.items())}

    def flush(self) -> None:
        """Every cache's counts into the Prometheus counters (see the module docstring)."""
        for c in list(self._caches.values()):
            c.flush()

    async def flush_job(self) -> None:
        self.flush()


MISSING = _MISSING
__all__ = ["CacheManager", "NamedCache", "MISSING"]
