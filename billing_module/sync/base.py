"""base_sync: pulling one entity from the central platform into its cache table.

A run claims the entity's ``sync_state`` row (status ``pending``; one run per entity across
all instances), then pages ``GET <central><sync.path>?since=<version>&limit=<n>`` until
``has_more`` is false. Each page is applied in ONE transaction together with the state row's
new ``sync_version``, so a page and the version it reached commit together: a run that fails
half-way keeps the pages it applied, is recorded ``failed`` (error, retry_count, next_sync_at
with backoff), and the next run resumes after the last applied version. A full run
(``full=True``) starts at 0 and, with its last page, deletes the local rows the centre did
not send. After each page the entity's in-memory caches are dropped.

All SQL of ``sync_state`` lives in ``SyncStateStore`` (the export side's version counter too).
"""
from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import clock
from ..alerts import Alerts
from ..catalog import ENTITIES
from ..db import dialect as dialects
from ..db.database import Database, Row, Tx
from ..errors import BillingError, Conflict
from ..http import RemoteError, SignedClient
from ..ids import new_id

log = logging.getLogger("billing_module.sync")

ENTITY_ORDER = ("users", "pricing", "llmage", "uapi")   # models refer to pricing programs
MAX_VERSION_DIGITS = 18                                  # fits a signed 64-bit integer

Page = collections.namedtuple("Page", "items deleted version has_more")


class SyncBusy(Conflict):
    code = "sync_busy"


class SyncNotConfigured(BillingError):
    status, code = 503, "sync_not_configured"


class PageError(Exception):
    """A reply that does not follow the protocol; nothing of it is applied."""


def version_int(text: object, what: str = "version") -> int:
    """A protocol version (an integer, or its decimal text) as an int."""
    if isinstance(text, bool):
        raise PageError(f"{what} must be an integer or a string of digits, not {text!r}")
    if isinstance(text, int) and text >= 0:
        text = str(text)
    if not isinstance(text, str) or not text.isdigit() or not text.isascii() or len(text) > MAX_VERSION_DIGITS:
        raise PageError(f"{what} must be a string of 1-{MAX_VERSION_DIGITS} digits, not {str(text)[:40]!r}")
    return int(text)


def parse_page(entity: str, body: object, since: int) -> Page:
    """Check one reply against the protocol; ``Page`` or PageError."""
    if not isinstance(body, dict):
        raise PageError("reply is not a JSON object")
    if body.get("entity") != entity:
        raise PageError(f"reply is for entity {str(body.get('entity'))[:40]!r}, not {entity!r}")
    version = version_int(body.get("version"), "version")
    items, deleted, has_more = body.get("items"), body.get("deleted", []), body.get("has_more")
    if not isinstance(items, list):
        raise PageError("items must be a list")
    if not isinstance(deleted, list):
        raise PageError("deleted must be a list of ids")
    ids = []
    for d in deleted:
        if isinstance(d, bool) or not isinstance(d, (str, int)) or not 1 <= len(str(d)) <= 32:
            raise PageError(f"deleted: {str(d)[:40]!r} is not an id")
        ids.append(str(d))
    if not isinstance(has_more, bool):
        raise PageError("has_more must be true or false")
    if version < since:
        raise PageError(f"the centre's version went back from {since} to {version} "
                        f"(was it reset? a full sync starts again from 0)")
    if has_more and version == since:
        raise PageError(f"has_more is true but the version stays at {since}: the sync would never end")
    return Page(items, ids, version, has_more)


def _later(seconds):
    return clock.now_text(seconds)


class SyncStateStore:
    """The ``sync_state`` rows: ``(entity, '')`` for this instance's pull of an entity,
    ``(entity, 'export')`` for the last version the export side stamped."""

    CLIENT, EXPORT = "", "export"

    def __init__(self, db: Database, alerts: Alerts | None = None) -> None:
        self.db = db
        self.alerts = alerts   # sync_failing; the export side raises no alert

    async def _ensure(self, tx, entity, entity_id):
        now = clock.now_text()
        await tx.execute(
            f"{dialects.insert_ignore(tx.dialect)} into sync_state (id, entity_type, entity_id, sync_version, "
            "sync_status, retry_count, items_synced, created_at, updated_at) values "
            "(${id}$, ${e}$, ${eid}$, '0', 'success', 0, 0, ${now}$, ${now}$)",
            {"id": new_id(), "e": entity, "eid": entity_id, "now": now})

    async def get(self, entity: str, tx: Tx | None = None) -> Row | None:
        sql = "select * from sync_state where entity_type = ${e}$ and entity_id = ${eid}$"
        ns = {"e": entity, "eid": self.CLIENT}
        if tx is not None:
            return await tx.one(sql, ns)
        async with self.db.read() as t:
            return await t.one(sql, ns)

    async def all(self) -> list[Row]:
        async with self.db.read() as tx:
            return await tx.select("select * from sync_state where entity_id = ${eid}$ order by entity_type",
                                   {"eid": self.CLIENT})

    async def claim(self, entity: str, stale_seconds: float) -> Row:
        """Mark the entity's run ``pending`` and return its row; SyncBusy while another run
        (here or in another instance) holds it and has made progress within ``stale_seconds``."""
        async def work(tx):
            await self._ensure(tx, entity, self.CLIENT)
            n = await tx.execute(
                "update sync_state set sync_status = 'pending', items_synced = 0, updated_at = ${now}$ "
                "where entity_type = ${e}$ and entity_id = ${eid}$ "
                "and (sync_status <> 'pending' or updated_at < ${stale}$)",
                {"e": entity, "eid": self.CLIENT, "now": clock.now_text(), "stale": clock.now_text(-stale_seconds)})
            row = await self.get(entity, tx)
            return n, row
        n, row = await self.db.run(work)
        if n != 1:
            raise SyncBusy(f"a sync of {entity} is already running (its last progress was at {row.updated_at} UTC)")
        return row

    async def page_applied(self, tx: Tx, entity: str, version: int, count: int, final: bool, interval: float) -> None:
        """Inside the page's transaction: the version reached, and on the last page success."""
        ns = {"e": entity, "eid": self.CLIENT, "v": str(version), "n": count, "now": clock.now_text()}
        if not final:
            await tx.execute("update sync_state set sync_version = ${v}$, items_synced = items_synced + ${n}$, "
                             "updated_at = ${now}$ where entity_type = ${e}$ and entity_id = ${eid}$", ns)
            return
        ns["next"] = _later(interval)
        await tx.execute("update sync_state set sync_version = ${v}$, items_synced = items_synced + ${n}$, "
                         "sync_status = 'success', last_sync_time = ${now}$, error_msg = null, retry_count = 0, "
                         "next_sync_at = ${next}$, updated_at = ${now}$ "
                         "where entity_type = ${e}$ and entity_id = ${eid}$", ns)

    async def failed(self, entity: str, message: str, next_in_seconds: float, interval: float) -> None:
        async with self.db.transaction() as tx:
            await tx.execute("update sync_state set sync_status = 'failed', error_msg = ${m}$, "
                             "retry_count = retry_count + 1, next_sync_at = ${next}$, updated_at = ${now}$ "
                             "where entity_type = ${e}$ and entity_id = ${eid}$",
                             {"e": entity, "eid": self.CLIENT, "m": message[:4000], "now": clock.now_text(),
                              "next": _later(next_in_seconds)})
            if self.alerts is not None:
                await self._failing_alert(tx, entity, message, interval)

    async def _failing_alert(self, tx: Tx, entity: str, message: str, interval: float) -> None:
        """``sync_failing`` once per failing streak, when the streak has lasted longer than the
        entity's interval. The streak began when the run after the last success was due (last
        success + interval), or at the first attempt of an entity never synced; it is named by
        that last success, so the next streak (after a success) alerts again."""
        row = await self.get(entity, tx)
        assert row is not None and self.alerts is not None, "failed() runs after claim() made the row"
        last_ok = row.last_sync_time
        began = clock.parse(str(last_ok)) + datetime.timedelta(seconds=interval) if last_ok \
            else clock.parse(str(row.created_at))
        if (clock.utcnow() - began.replace(tzinfo=None)).total_seconds() <= interval:
            return
        streak = clock.fmt(last_ok) if hasattr(last_ok, "year") else str(last_ok or f"never:{row.id}")
        await self.alerts.emit_once(tx, f"sync_failing:{entity}:{streak}", "sync_failing", None, {
            "entity": entity, "last_success": None if not last_ok else streak, "failures": int(row.retry_count or 0),
            "error": message[:500], "interval_seconds": interval})

    async def due(self, entities: Iterable[str]) -> list[str]:
        """The entities whose next run time has come (never synced counts as due)."""
        now = clock.now_text()
        rows = {r.entity_type: r for r in await self.all()}
        return [e for e in entities
                if e not in rows or not rows[e].next_sync_at or rows[e].next_sync_at <= now]

    # --- the export side ---------------------------------------------------------------------
    async def lock_export_version(self, tx: Tx, entity: str) -> int:
        """The last version the export stamped for ``entity``; the row stays locked until
        ``tx`` ends, so two exporters never hand out the same version to different rows."""
        await self._ensure(tx, entity, self.EXPORT)
        row = await tx.one("select sync_version from sync_state where entity_type = ${e}$ and entity_id = ${eid}$"
                           f"{tx.for_update()}", {"e": entity, "eid": self.EXPORT})
        return int(row.sync_version) if row.sync_version and row.sync_version.isdigit() else 0

    async def set_export_version(self, tx: Tx, entity: str, version: int) -> None:
        await tx.execute("update sync_state set sync_version = ${v}$, last_sync_time = ${now}$, updated_at = ${now}$ "
                         "where entity_type = ${e}$ and entity_id = ${eid}$",
                         {"v": str(version), "now": clock.now_text(), "e": entity, "eid": self.EXPORT})

    async def known_version(self, tx: Tx, entity: str) -> int:
        """The highest version this instance has recorded for ``entity`` (pulled or stamped):
        the export never reports less, even after the rows carrying it were deleted."""
        num = dialects.as_integer(tx.dialect, "sync_version")
        v = await tx.scalar(f"select max({num}) as v from sync_state where entity_type = ${{e}}$ "
                            "and sync_version is not null and sync_version <> ''", {"e": entity})
        return int(v or 0)


class EntitySync:
    """One entity's pull. Subclasses name the entity and add its own checks."""

    entity: str      # each subclass names its entity

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.db = manager.db
        self.config = manager.config
        self.catalog = manager.catalog
        self.store = manager.store
        self._lock = asyncio.Lock()
        self.table = ENTITIES[self.entity][0]

    # --- hooks -------------------------------------------------------------------------------
    def validate(self, items: list[dict[str, Any]]) -> None:
        """Raise PageError / BillingError for items this entity cannot take (before any write)."""

    async def after_apply(self, tx: Tx, items: list[dict[str, Any]]) -> list[str]:
        """Inside the page's transaction, after the upsert: warnings (text) to report."""
        return []

    # --- the run -----------------------------------------------------------------------------
    @property
    def interval(self) -> float:
        s = self.config.sync
        return getattr(s, f"{self.entity}_interval_seconds") or s.interval_seconds

    def client(self) -> SignedClient:
        try:
            return SignedClient.from_config(self.config)
        except ValueError as e:
            raise SyncNotConfigured(f"sync is not configured: {e} (sync.central_url, sync.app_key, "
                                    "sync.app_secret)") from None

    async def run(self, full: bool = False, progress: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
        """Pull until the centre has nothing more. Returns a result dict (``status`` success or
        failed; a failure is also recorded in sync_state). SyncBusy / SyncNotConfigured are
        raised before anything is touched."""
        client = self.client()
        async with self._lock:
            state = await self.store.claim(self.entity, self.config.sync.claim_seconds)
            since = 0 if full else int(state.sync_version) if (state.sync_version or "").isdigit() else 0
            result: dict[str, Any] = {"entity": self.entity, "status": "success", "full": bool(full), "since": since,
                      "version": since, "pages": 0, "items": 0, "deleted": 0, "warnings": [], "error": None}
            started = time.monotonic()
            try:
                async with client:
                    await self._pages(client, full, result, progress)
            except asyncio.CancelledError:
                await asyncio.shield(self._record_failure(state, result, "interrupted (the process stopped)"))
                raise
            except Exception as e:
                await self._record_failure(state, result, self._describe(e, result["version"]))
            result["seconds"] = round(time.monotonic() - started, 3)
            return result

    async def _pages(self, client, full, result, progress):
        cfg = self.config.sync
        path = cfg.path.format(entity=self.entity)
        seen: set[str] | None = set() if full else None
        since = result["since"]
        while True:
            page = parse_page(self.entity, await client.get_json(path, {"since": since, "limit": cfg.page_size}),
                              since)
            self.validate(page.items)
            if seen is not None:
                seen.update(str(i.get("id")) for i in page.items if isinstance(i, dict))
            final = not page.has_more
            items_applied, deleted_applied, warnings = await self.db.run(
                lambda tx, page=page, final=final: self._apply(tx, page, seen, final))
            self.catalog.invalidate(self.entity)
            since = page.version
            result["pages"] += 1
            result["items"] += items_applied
            result["deleted"] += deleted_applied
            result["version"] = since
            result["warnings"] += warnings
            if progress is not None:
                progress(self.entity, {"page": result["pages"], "items": items_applied, "deleted": deleted_applied,
                                       "version": since, "total_items": result["items"],
                                       "total_deleted": result["deleted"], "has_more": page.has_more})
            if final:
                return

    async def _apply(self, tx, page, seen, final):
        deleted = list(page.deleted)
        if seen is not None and final:
            # full run: what the centre did not send no longer exists there
            gone = set(deleted)
            local = {r.id for r in await tx.select(f"select id from {self.table}")}
            deleted += sorted(local - seen - gone)
        n_items, n_deleted = await self.catalog.apply(tx, self.entity, page.items, deleted, str(page.version))
        warnings = await self.after_apply(tx, page.items)
        await self.store.page_applied(tx, self.entity, page.version, n_items + n_deleted, final, self.interval)
        return n_items, n_deleted, warnings

    def _describe(self, e, version):
        where = f"{self.entity}: page after version {version}"
        if isinstance(e, BillingError):
            return f"{where} refused: {e.message}"
        if isinstance(e, (RemoteError, PageError)):
            return f"{where}: {e}"
        log.exception("sync of %s failed", self.entity)
        return f"{where}: {type(e).__name__}: {e}"

    async def _record_failure(self, state, result, message):
        result.update(status="failed", error=message)
        # doubles with each failure in a row, never beyond the entity's normal interval
        doubling = 2 ** min(state.retry_count or 0, 20)
        backoff = min(self.interval, self.config.sync.failure_backoff_seconds * doubling)
        log.warning("sync failed: %s (next attempt in %ss)", message, backoff)
        try:
            await self.store.failed(self.entity, message, backoff, self.interval)
        except Exception:
            log.exception("could not record the failed sync of %s", self.entity)
