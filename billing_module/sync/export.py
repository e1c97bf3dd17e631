"""The export side of the sync protocol: this module's own cache tables served as pages, so a
deployment of this module can be the centre for others (``wwwroot/sync/<entity>.dspy`` ->
``api/sync_export.py``, the edge that checks the signature and signs the reply).

Versions are the tables' ``version`` column read as integers. Rows written locally without
one (``Catalog.put`` from demo or admin seeding writes an empty version; so does an edit of
an existing row) are stamped just before a page is served: in one transaction that holds the
entity's export counter row (``sync_state``, entity_id ``'export'``), groups of at most
``_STAMP_GROUP`` rows get the next versions. Locking the counter means no two exporters hand
out one version to different rows, and a version never goes back even when the rows that
carried the highest one are deleted.

A page never splits the rows of one version (the protocol's cursor is the version alone), so
it may hold up to ``_STAMP_GROUP - 1`` rows more than ``limit``. Deletions reach edges only
through a full resync: the cache tables keep no tombstones, so ``deleted`` is always empty here.
"""
from __future__ import annotations

import json
from typing import Any

from ..catalog import ENTITIES
from ..db import dialect as dialects
from ..db.database import Database
from .base import SyncStateStore

_STAMP_GROUP = 500


def _item(entity, row):
    item = None
    if row.payload:
        try:
            item = json.loads(row.payload)
        except ValueError:
            item = None
    if not isinstance(item, dict):
        # a row written without the centre's payload: its columns are the item
        item = {c: row[c] for c in ENTITIES[entity][1] if row[c] is not None}
        if entity == "users":
            item["kind"] = item.pop("entity_kind", None)
    item["id"] = row.id
    item["version"] = row.version
    return item


async def stamp_unversioned(db: Database, entity: str) -> int:
    """Give rows without an integer version the next versions; returns how many were stamped."""
    table = ENTITIES[entity][0]
    async with db.read() as tx:
        pending = await tx.one(f"select id from {table} where "
                               f"{dialects.not_integer_text(tx.dialect, 'version')} limit 1")
    if pending is None:
        return 0
    store = SyncStateStore(db)

    async def work(tx):
        unversioned = dialects.not_integer_text(tx.dialect, "version")
        num = dialects.as_integer(tx.dialect, "version")
        counter = await store.lock_export_version(tx, entity)
        top = await tx.scalar(f"select max({num}) as v from {table} where not {unversioned}")
        version = max(counter, await store.known_version(tx, entity), int(top or 0))
        ids = [r.id for r in await tx.select(f"select id from {table} where {unversioned} order by id")]
        for start in range(0, len(ids), _STAMP_GROUP):
            version += 1
            ns = {"v": str(version)}
            where = tx.in_list(ids[start:start + _STAMP_GROUP], ns)
            await tx.execute(f"update {table} set version = ${{v}}$ where id in {where}", ns)
        await store.set_export_version(tx, entity, version)
        return len(ids)
    return await db.run(work)


async def export_page(db: Database, entity: str, since: int, limit: int) -> dict[str, Any]:
    """The protocol reply for ``GET <entity>?since=&limit=``."""
    table = ENTITIES[entity][0]
    await stamp_unversioned(db, entity)
    async with db.read() as tx:
        num = dialects.as_integer(tx.dialect, "version")
        rows = await tx.select(f"select * from {table} where {num} > ${{since}}$ order by {num}, id "
                               "limit ${limit}$", {"since": since, "limit": limit})
        has_more = False
        if len(rows) == limit:
            last = rows[-1]
            # the rest of the last version's rows, so the next page can start after it
            rows += await tx.select(f"select * from {table} where {num} = ${{v}}$ and id > ${{k}}$ order by id",
                                    {"v": int(last.version), "k": last.id})
            has_more = await tx.one(f"select id from {table} where {num} > ${{v}}$ limit 1",
                                    {"v": int(last.version)}) is not None
        if rows:
            version = int(rows[-1].version)
        else:
            top = await tx.scalar(f"select max({num}) as v from {table}")
            version = max(int(top or 0), await SyncStateStore(db).known_version(tx, entity))
    return {"entity": entity, "version": str(version), "items": [_item(entity, r) for r in rows],
            "deleted": [], "has_more": has_more}
