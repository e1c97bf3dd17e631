"""The local copies of the central platform's data (the four cache tables) and the lookups
pricing needs: model -> pricing program, customer -> discount.

Writes come from the sync (and from demo / admin seeding) through ``apply``; reads go through
the LRU + TTL caches of ``cache.py``, so a price is computed from memory on a hit.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Collection, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

from . import clock
from .cache import MISSING, CacheManager
from .db import dialect as dialects
from .db.database import Database, Row, Tx, where
from .errors import InvalidParam, ModelMismatch, NoPricing
from .pricing import NO_DISCOUNT, PriceResult, Program, Usage, price_usage

# entity -> (table, columns taken from an item besides id / payload / version / cached_at)
ENTITIES = {
    "users": ("users_cache", ("entity_kind", "name", "org_id", "org_type", "status", "discount")),
    "pricing": ("pricing_cache", ("name", "ownerid", "providerid", "currency")),
    "llmage": ("llmage_cache", ("name", "ppid", "ownerid", "providerid", "upappid", "status")),
    "uapi": ("uapi_cache", ("name", "upappid", "path", "httpmethod", "stream")),
}
_MAX_LEN = {"entity_kind": 8, "currency": 8, "status": 16, "discount": 16, "httpmethod": 16, "stream": 16,
            "name": 128, "path": 255}


def _item_row(entity, item, version, now):
    table, columns = ENTITIES[entity]
    if not isinstance(item, dict):
        raise InvalidParam(f"{entity}: every item must be an object")
    key = item.get("id")
    if not isinstance(key, str) or not key or len(key) > 32:
        raise InvalidParam(f"{entity}: item id must be a string of 1-32 characters")
    row: dict[str, str | None] = {"id": key}
    for c in columns:
        v = item.get(c, item.get("kind") if c == "entity_kind" else None)
        if v is not None and not isinstance(v, str):
            v = str(v)
        if v is not None and len(v) > _MAX_LEN.get(c, 32):
            raise InvalidParam(f"{entity} {key}: {c} is too long")
        row[c] = v
    if entity == "pricing":
        Program.from_payload(item)          # a program that cannot price is refused whole
    if entity == "users":
        if row["entity_kind"] not in ("user", "org"):
            raise InvalidParam(f"users {key}: kind must be user or org")
        if row["discount"] is not None:
            _discount(row["discount"], key)
    row["payload"] = json.dumps(item, ensure_ascii=False, sort_keys=True)
    row["version"] = str(item.get("version", version) or "")[:32]
    row["cached_at"] = now
    return row


def _discount(text, customer_id):
    try:
        d = Decimal(str(text))
    except InvalidOperation:
        raise InvalidParam(f"customer {customer_id}: discount {text!r} is not a number") from None
    if not d.is_finite() or not Decimal(0) < d <= Decimal(10):
        raise InvalidParam(f"customer {customer_id}: discount must be in (0, 10]")
    return d


def _same_model(row, llmid, model_name):
    """``row`` (the model of ``llmid``), or ModelMismatch when the caller named another model."""
    if row is not None and model_name and row.name != model_name:
        raise ModelMismatch(f"llmid {llmid} is model {row.name}, not {model_name}", llmid=llmid, model_name=row.name)
    return row


def price_for_model(program: Program, model: Row, usage: Usage, day: datetime.date, discount: Decimal) -> PriceResult:
    """Price ``usage`` as the catalogue's ``model``: the rules' model filters see its name, never
    a name the event carried (the stored event of an unknown id carries the id itself)."""
    name = model["name"]     # a Row's attribute is read through a failed lookup first: dearer
    if usage.model_name != name:
        usage = dataclasses.replace(usage, model_name=name)
    return price_usage(program, usage, day, discount)


class Catalog:
    def __init__(self, db: Database, caches: CacheManager) -> None:
        self.db = db
        self.caches = caches
        # the caches a quote reads, held here: a warm quote looks them up without awaiting
        self._models_by_id = caches.cache("llmage:id")
        self._models_by_name = caches.cache("llmage:name")
        self._programs = caches.cache("pricing")
        self._discounts = caches.cache("users:discount")
        # (llmid, model name, customer) -> (model, its program, the customer's discount): one
        # lookup for a warm quote instead of three; cleared with any of the three
        self._priced = caches.cache("quote:priced", depends_on=("llmage", "pricing", "users"))

    # --- writes (sync, demo, admin) --------------------------------------------------------------
    async def apply(self, tx: Tx, entity: str, items: Iterable[dict[str, Any]] = (), deleted: Collection[str] = (),
                    version: str | None = None) -> tuple[int, int]:
        """Upsert ``items`` and delete ``deleted`` ids of one entity inside ``tx``."""
        if entity not in ENTITIES:
            raise InvalidParam(f"unknown entity {entity!r}")
        table, _ = ENTITIES[entity]
        now = clock.now_text()
        rows = [_item_row(entity, item, version, now) for item in items]
        if rows:
            await tx.execute_many(dialects.upsert(tx.dialect, table, list(rows[0])), rows)
        for key in deleted:
            await tx.execute(f"delete from {table} where id = ${{k}}$", {"k": str(key)})
        return len(rows), len(deleted)

    async def put(self, entity: str, items: Iterable[dict[str, Any]] = (),
                  deleted: Collection[str] = ()) -> tuple[int, int]:
        """``apply`` in its own transaction, then drop the cached copies."""
        async with self.db.transaction() as tx:
            result = await self.apply(tx, entity, items, deleted)
        self.invalidate(entity)
        return result

    def invalidate(self, entity: str | None = None) -> None:
        self.caches.invalidate(entity)

    # --- reads ----------------------------------------------------------------------------------
    # Each read is a synchronous lookup in its cache (``get``: the value or MISSING) and, on a
    # miss, a load from the cache table; ``quote`` makes the lookups itself and awaits only a miss.
    async def _row(self, table, condition, ns):
        async with self.db.read() as tx:
            return await tx.one(f"select * from {table} where {condition}", ns)

    async def model(self, llmid: str | None = None, model_name: str | None = None) -> Row | None:
        """The cached LLM model row by id, else by name; None if unknown. Given both, the id
        decides, and a name that is not that model's is refused (``model_mismatch``): an event
        must not be priced as a model of the caller's choosing while recorded as another."""
        row = self._cached_model(llmid, model_name)
        return await self._load_model(llmid, model_name) if row is MISSING else row

    def _cached_model(self, llmid, model_name):
        if llmid:
            row = self._models_by_id.get(llmid)
            return row if row is MISSING else _same_model(row, llmid, model_name)
        if model_name:
            return self._models_by_name.get(model_name)
        return None

    async def _load_model(self, llmid, model_name):
        if llmid:
            row = await self._models_by_id.load(
                llmid, lambda: self._row("llmage_cache", "id = ${k}$", {"k": llmid}))
            return _same_model(row, llmid, model_name)
        return await self._models_by_name.load(
            model_name, lambda: self._row("llmage_cache", "name = ${k}$ order by id limit 1", {"k": model_name}))

    async def program(self, ppid: str) -> Program | None:
        """The compiled pricing program (parsed once per cache lifetime), or None."""
        program = self._programs.get(ppid)
        return await self._load_program(ppid) if program is MISSING else program

    async def _load_program(self, ppid):
        async def load():
            row = await self._row("pricing_cache", "id = ${k}$", {"k": ppid})
            if row is None:
                return None
            try:
                return Program.from_payload(json.loads(row.payload))
            except (ValueError, InvalidParam) as e:
                # a row written around the sync (which validates) prices nothing, for nobody
                message = e.message if isinstance(e, InvalidParam) else f"{type(e).__name__}: {e}"
                raise NoPricing(f"pricing program {ppid} in the cache cannot be read: {message}"[:500]) from None
        return await self._programs.load(ppid, load)

    async def discount(self, customer_id: str) -> Decimal:
        discount = self._discounts.get(customer_id)
        return await self._load_discount(customer_id) if discount is MISSING else discount

    async def _load_discount(self, customer_id):
        async def load():
            row = await self._row("users_cache", "id = ${k}$ and entity_kind = 'org'", {"k": customer_id})
            return _discount(row.discount, customer_id) if row and row.discount else NO_DISCOUNT
        return await self._discounts.load(customer_id, load)

    async def org(self, customer_id: str) -> Row | None:
        return await self.caches.cache("users:org").get_or_load(
            customer_id, lambda: self._row("users_cache", "id = ${k}$ and entity_kind = 'org'", {"k": customer_id}))

    async def user_org(self, user_id: str) -> str | None:
        """The organisation of a user the users cache knows, or None for a user it does not know."""
        row = await self.caches.cache("users:user").get_or_load(
            user_id, lambda: self._row("users_cache", "id = ${k}$ and entity_kind = 'user'", {"k": user_id}))
        return None if row is None else row.org_id

    async def quote(self, usage: Usage, llmid: str | None = None, model_name: str | None = None,
                    customer_id: str | None = None, day: datetime.date | None = None) -> tuple[PriceResult, Row]:
        """Price a usage without charging. Returns (PriceResult, model row). ``model_name`` is the
        name the caller sent (compared with ``llmid``'s model), not one derived from the id."""
        # Warm, this awaits nothing: each lookup is tried in memory first (see "reads").
        model_name = model_name or (None if llmid else usage.model_name)
        priced = self._priced.get((llmid, model_name, customer_id))
        if priced is MISSING:
            priced = await self._priced_model(llmid, model_name, customer_id)
        model, program, discount = priced
        return price_for_model(program, model, usage, day or clock.today(), discount), model

    async def _priced_model(self, llmid, model_name, customer_id):
        """(model, program, discount) of a quote, kept in ``quote:priced`` once model and program
        are found; otherwise the precise ``no_pricing`` (or ``model_mismatch``) refusal."""
        model = self._cached_model(llmid, model_name)
        if model is MISSING:
            model = await self._load_model(llmid, model_name)
        if model is None:
            raise NoPricing(f"unknown model {llmid or model_name}")
        ppid = model.ppid
        if not ppid:
            raise NoPricing(f"model {model.name} has no pricing program")
        program = await self.program(ppid)
        if program is None:
            raise NoPricing(f"pricing program {ppid} of model {model.name} is not in the pricing cache")
        discount = NO_DISCOUNT
        if customer_id:
            discount = self._discounts.get(customer_id)
            if discount is MISSING:
                discount = await self._load_discount(customer_id)
        priced = (model, program, discount)
        self._priced.put((llmid, model_name, customer_id), priced)
        return priced

    async def priced_models(self) -> list[dict[str, Any]]:
        """Every cached model with its pricing program's current price rules (for the pricing API)."""
        async with self.db.read() as tx:
            rows = await tx.select("select m.id, m.name, m.ppid, p.name as program_name, p.payload "
                                   "from llmage_cache m left join pricing_cache p on p.id = m.ppid "
                                   "order by m.name, m.id")
        out = []
        today = clock.today()
        for r in rows:
            item = {"llmid": r.id, "model_name": r.name, "pricing_id": r.ppid, "program_name": r.program_name,
                    "prices": None}
            program = await self.program(r.ppid) if r.payload else None
            if program is not None:
                try:
                    version = program.version_on(today)
                    item["price_version"] = version.id
                    item["prices"] = version.describe(r.name)
                except NoPricing:
                    item["prices"] = None
            out.append(item)
        return out

    async def users(self, page: int = 1, rows: int = 20, kind: str | None = None, org_id: str | None = None,
                    name: str | None = None) -> dict[str, Any]:
        cond, ns = where(("entity_kind = ${kind}$", "kind", kind), ("org_id = ${org}$", "org", org_id),
                         ("name like ${name}$", "name", f"%{name}%" if name else None))
        sql = ("select id, entity_kind as kind, name, org_id, org_type, status, discount, version, cached_at "
               f"from users_cache where {cond}")
        async with self.db.read() as tx:
            return await tx.page(sql, ns, "entity_kind, name, id", page, rows)

    def stats(self) -> dict[str, dict[str, float]]:
        return self.caches.stats()


__all__ = ["Catalog", "ENTITIES", "MISSING"]
