"""Sync from the central platform (the client side) and the export side that lets a
deployment of this module be the centre. The protocol: docs/sync-protocol.md.

``SyncManager(db, config, catalog, alerts)`` is the service (``core.sync``): ``sync()`` runs entities now,
``run_due()`` is the periodic job, ``status()`` reads ``sync_state``.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..alerts import Alerts
from ..catalog import Catalog
from ..config import Config
from ..db.database import Database
from ..errors import InvalidParam
from .base import ENTITY_ORDER, EntitySync, PageError, SyncBusy, SyncNotConfigured, SyncStateStore
from .llmage import LlmageSync
from .pricing import PricingSync
from .uapi import UapiSync
from .users import UsersSync

log = logging.getLogger("billing_module.sync")

SYNC_CLASSES = {c.entity: c for c in (UsersSync, PricingSync, LlmageSync, UapiSync)}
_MAX_TICK_SECONDS = 30


class SyncManager:
    def __init__(self, db: Database, config: Config, catalog: Catalog, alerts: Alerts | None = None) -> None:
        self.db = db
        self.config = config
        self.catalog = catalog
        self.store = SyncStateStore(db, alerts)
        self.syncs = {name: SYNC_CLASSES[name](self) for name in ENTITY_ORDER}

    def entity(self, name: str) -> EntitySync:
        if name not in self.syncs:
            raise InvalidParam(f"entity must be one of {', '.join(ENTITY_ORDER)}")
        return self.syncs[name]

    async def sync(self, entity: str | None = None, full: bool = False,
                   progress: Callable[[str, dict], None] | None = None) -> list[dict[str, Any]]:
        """Run one entity (or all, in dependency order) now: a list of result dicts. A failed
        entity does not stop the next; SyncBusy / SyncNotConfigured are raised."""
        names = [self.entity(entity).entity] if entity else list(ENTITY_ORDER)
        return [await self.syncs[n].run(full=full, progress=progress) for n in names]

    async def status(self) -> list[dict[str, Any]]:
        rows = {r.entity_type: r for r in await self.store.all()}
        out = []
        for name in ENTITY_ORDER:
            r = rows.get(name)
            out.append({"entity": name, "interval_seconds": self.syncs[name].interval,
                        **({k: r[k] for k in ("sync_status", "sync_version", "last_sync_time", "error_msg",
                                               "retry_count", "items_synced", "next_sync_at", "updated_at")}
                           if r else {"sync_status": "never"})})
        return out

    async def run_due(self) -> list[dict[str, Any]]:
        """The periodic job: every entity whose next_sync_at has come. Another instance's run
        of the same entity is left alone."""
        results = []
        for name in await self.store.due(ENTITY_ORDER):
            try:
                results.append(await self.syncs[name].run())
            except SyncBusy:
                continue
        return results

    def background_jobs(self) -> list[tuple[str, Callable[[], Awaitable[Any]], float]]:
        """(name, coroutine function, interval seconds): none unless ``sync.enabled``."""
        cfg = self.config.sync
        if not cfg.enabled:
            return []
        if not (cfg.central_url and cfg.app_key and cfg.app_secret):
            log.error("sync.enabled is set but sync.central_url / app_key / app_secret are not: no periodic sync")
            return []
        tick = min([s.interval for s in self.syncs.values()] + [_MAX_TICK_SECONDS])
        return [("sync", self.run_due, tick)]


__all__ = ["SyncManager", "SyncBusy", "SyncNotConfigured", "PageError", "EntitySync", "ENTITY_ORDER", "SYNC_CLASSES"]
