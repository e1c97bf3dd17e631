"""The product catalogue and resource bindings: what is sold (a product with its plan: package
price, included quantity, period, overage price) and which resources it sells (an LLM model, an
upstream API, a service). Bindings are disabled, never deleted, so usage rows keep their reference."""
from collections.abc import Awaitable, Callable

from appPublic.dictObject import DictObject

from .. import clock, validation
from ..db import dialect as dialects
from ..db.database import Database, Tx
from ..errors import Conflict, InvalidParam, NotFound
from ..ids import new_id
from ..validation import flag
from .values import (
    MAX_PERIOD_MONTHS,
    PERIOD_ANCHORS,
    PRODUCT_STATUSES,
    PRODUCT_TYPES,
    RESOURCE_TYPES,
    WHOLE_UNITS,
    choice,
    count,
    ident,
    quantity,
    text,
)
from .views import Row, binding_view, product_view


async def run_unique(db: Database, work: Callable[[Tx], Awaitable[Row]], duplicate: Conflict) -> Row:
    """``db.run(work)``; a unique index refusing the row becomes ``duplicate`` (a 409)."""
    try:
        return await db.run(work)
    except Exception as e:
        if dialects.is_unique_violation(e):
            raise duplicate from None
        raise


# each product field and its rule (bad input raises InvalidParam before anything is written)
_FIELD_RULES = {
    "org_id": lambda v: ident(v, "org_id"),
    "code": lambda v: ident(v, "code", max_len=64),
    "product_name": lambda v: text(v, "product_name", 128, required=True),
    "product_type": lambda v: choice(v, "product_type", PRODUCT_TYPES),
    "status": lambda v: choice(v, "status", PRODUCT_STATUSES),
    "currency": lambda v: ident(v, "currency", max_len=8),
    "list_price": lambda v: validation.amount(v, "list_price", non_negative=True),
    "included_quantity": lambda v: quantity(v, "included_quantity"),
    "quantity_unit": lambda v: ident(v, "quantity_unit"),
    "period_months": lambda v: count(v, "period_months", 1, MAX_PERIOD_MONTHS),
    "overage_price": lambda v: validation.amount(v, "overage_price", non_negative=True),
    "price_per": lambda v: count(v, "price_per", 1, 10**12),
    "description": lambda v: text(v, "description", 500),
    "fractional": lambda v: flag(v, "fractional", None),
    "period_anchor": lambda v: choice(v, "period_anchor", PERIOD_ANCHORS),
}
CLEARABLE = ("overage_price", "description")


def _clear_list(clear: object) -> list[str]:
    """The fields to empty: a list or a comma-separated string of ``CLEARABLE`` names."""
    names = clear.split(",") if isinstance(clear, str) else clear
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidParam("clear: expected field names separated by commas")
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        if n not in CLEARABLE:
            raise InvalidParam(f"clear: only {', '.join(CLEARABLE)} can be cleared, not {n[:40]}")
    return names


# the cache table that knows each resource type's ids ('service' resources are the platform's own: no list)
_RESOURCE_TABLES = {"llm": "llmage_cache", "uapi": "uapi_cache"}


async def _require_resource(tx: Tx, resource_type: str | None, ref: str) -> None:
    """A binding names a resource the caches know: 404 for an unknown model or API."""
    table = _RESOURCE_TABLES.get(resource_type or "")
    if table and await tx.one(f"select id from {table} where id = ${{r}}$", {"r": ref}) is None:
        raise NotFound(f"no {resource_type} resource {ref} (sync the {table.split('_')[0]} cache first)")


class Catalogue:
    def __init__(self, db, currency: str):
        self.db = db
        self.currency = currency      # of a product saved without one

    async def save_product(self, code: object = None, product_name: object = None, quantity_unit: object = None,
                           product_id: object = None, clear: object = (), **fields: object) -> dict:
        """Create a product (no ``product_id``, or one not known yet), or change an existing one:
        only the fields given change (None or "" leaves a field as it is), and a nullable field
        (``overage_price``, ``description``) is emptied only when named in ``clear``.
        ``overage_price`` empty: no use beyond the quota and no pay-as-you-go (refused)."""
        given = dict(fields, code=code, product_name=product_name, quantity_unit=quantity_unit)
        unknown = sorted(set(fields) - set(_FIELD_RULES))
        if unknown:
            raise InvalidParam(f"{unknown[0]}: not a product field")
        changes = {k: _FIELD_RULES[k](v) for k, v in given.items() if validation.given(v)}
        for name in _clear_list(clear):
            changes[name] = None
        product_id = ident(product_id, "product_id", required=False)

        async def work(tx):
            now = clock.now_text()
            if product_id is not None and await self.product_row(tx, product_id) is not None:
                if changes:
                    sets = ", ".join(f"{k} = ${{{k}}}$" for k in changes)
                    await tx.execute(f"update product set {sets}, version = version + 1, updated_at = ${{now}}$ "
                                     "where id = ${id}$", dict(changes, id=product_id, now=now))
                return await self.product_row(tx, product_id)
            row = dict(self._new_product(changes), id=product_id or new_id(), version=0, created_at=now,
                       updated_at=now)
            await tx.insert("product", row)
            return DictObject(**row)
        return product_view(await run_unique(
            self.db, work, Conflict(f"product code {changes.get('code')} already exists in this org")))

    def _new_product(self, changes: dict) -> dict:
        """A new product's row: the fields given, the defaults for the rest; code, name and unit required."""
        for name in ("code", "product_name", "quantity_unit"):
            if changes.get(name) is None:
                raise InvalidParam(f"{name}: required")
        defaults = {"org_id": "0", "product_type": "llm_model", "status": "active", "currency": self.currency,
                    "list_price": 0, "included_quantity": 0, "period_months": 1, "overage_price": None,
                    "price_per": 1, "description": None,
                    "fractional": "0" if changes["quantity_unit"] in WHOLE_UNITS else "1", "period_anchor": "day"}
        return dict(defaults, **changes)

    async def product_row(self, tx: Tx, product_id: str) -> Row | None:
        return await tx.one("select * from product where id = ${p}$", {"p": product_id})

    async def require_product(self, tx: Tx, product_id: str) -> Row:
        p = await self.product_row(tx, product_id)
        if p is None:
            raise NotFound(f"no product {product_id}")
        return p

    async def product(self, product_id: object) -> dict:
        async with self.db.read() as tx:
            return product_view(await self.require_product(tx, ident(product_id, "product_id")))

    async def products(self, status: object = None, resource_type: object = None, resource_ref_id: object = None,
                       page: object = 1, rows: object = 20) -> dict:
        """One page of the catalogue (by code), with each product's plan; ``resource_type`` /
        ``resource_ref_id``: only products with an enabled binding of that resource."""
        ns = {"st": choice(status, "status", PRODUCT_STATUSES, required=False),
              "t": choice(resource_type, "resource_type", RESOURCE_TYPES, required=False),
              "r": ident(resource_ref_id, "resource_ref_id", required=False)}
        page, rows = validation.page(page, rows)
        sql = ("select * from product p where (${st}$ is null or p.status = ${st}$) "
               "and ((${t}$ is null and ${r}$ is null) or exists (select 1 from product_resource r "
               "where r.product_id = p.id and r.enabled = '1' and (${t}$ is null or r.resource_type = ${t}$) "
               "and (${r}$ is null or r.resource_ref_id = ${r}$)))")
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, "p.code, p.org_id, p.id", page, rows)
        result["rows"] = [product_view(p) for p in result["rows"]]
        return result

    # --- resource bindings ----------------------------------------------------------------------------
    async def bind(self, product_id: object, resource_type: object, resource_ref_id: object,
                   resource_name: object = None) -> dict:
        """Bind a resource to a product (or re-enable an earlier binding). Idempotent."""
        product_id = ident(product_id, "product_id")
        resource_type = choice(resource_type, "resource_type", RESOURCE_TYPES)
        ref = ident(resource_ref_id, "resource_ref_id")
        name = text(resource_name, "resource_name", 128)

        async def work(tx):
            await self.require_product(tx, product_id)
            await _require_resource(tx, resource_type, ref)
            now = clock.now_text()
            ns = {"p": product_id, "t": resource_type, "r": ref, "name": name, "now": now}
            n = await tx.execute("update product_resource set enabled = '1', resource_name = "
                                 "coalesce(${name}$, resource_name), updated_at = ${now}$ "
                                 "where product_id = ${p}$ and resource_type = ${t}$ and resource_ref_id = ${r}$", ns)
            if n == 0:
                await tx.insert("product_resource", {
                    "id": new_id(), "product_id": product_id, "resource_type": resource_type, "resource_ref_id": ref,
                    "resource_name": name, "enabled": "1", "created_at": now, "updated_at": now})
            return await self._binding_by_key(tx, product_id, resource_type, ref)
        try:
            return binding_view(await self.db.run(work))
        except Exception as e:
            if not dialects.is_unique_violation(e):
                raise
        # a concurrent insert of the same key won; this run updates it
        return binding_view(await self.db.run(work))

    async def has_bindings(self, tx: Tx, product_id: str) -> bool:
        """Whether the product sells bound resources (a binding, enabled or not, was ever made)."""
        return await tx.one("select id from product_resource where product_id = ${p}$ limit 1",
                            {"p": product_id}) is not None

    async def _binding_by_key(self, tx, product_id, resource_type, ref):
        return await tx.one("select * from product_resource where product_id = ${p}$ and resource_type = ${t}$ "
                            "and resource_ref_id = ${r}$", {"p": product_id, "t": resource_type, "r": ref})

    async def binding(self, tx: Tx, binding_id: str) -> Row | None:
        return await tx.one("select * from product_resource where id = ${b}$", {"b": binding_id})

    async def unbind(self, product_resource_id: object = None, product_id: object = None,
                     resource_type: object = None, resource_ref_id: object = None, force: bool = False) -> dict:
        """Disable a binding (kept, so usage rows keep their reference); its suppliers stop routing.
        Refused (409 ``binding_in_use``) while the product has active subscriptions, whose quota
        covers the resource until their period ends, unless ``force``: then their uses of the
        resource are no longer covered (docs/products.md)."""
        binding_id = ident(product_resource_id, "product_resource_id", required=False)
        if binding_id is None:
            key = (ident(product_id, "product_id"), choice(resource_type, "resource_type", RESOURCE_TYPES),
                   ident(resource_ref_id, "resource_ref_id"))

        async def work(tx):
            b = await (self.binding(tx, binding_id) if binding_id else self._binding_by_key(tx, *key))
            if b is None:
                raise NotFound("no such product resource binding")
            if not force and b.enabled == "1" and await tx.one(
                    "select id from product_subscription where product_id = ${p}$ and status = 'active' limit 1",
                    {"p": b.product_id}):
                raise Conflict(f"product {b.product_id} has active subscriptions that use this resource; "
                               "unbind when they end, or send force=1", code="binding_in_use")
            await tx.execute("update product_resource set enabled = '0', updated_at = ${now}$ where id = ${b}$",
                             {"b": b.id, "now": clock.now_text()})
            return await self.binding(tx, b.id)
        return binding_view(await self.db.run(work))

    async def bindings(self, product_id: object = None, resource_type: object = None, resource_ref_id: object = None,
                       include_disabled: object = False) -> dict:
        ns = {"p": ident(product_id, "product_id", required=False),
              "t": choice(resource_type, "resource_type", RESOURCE_TYPES, required=False),
              "r": ident(resource_ref_id, "resource_ref_id", required=False),
              "all": "1" if include_disabled else "0"}
        async with self.db.read() as tx:
            rows = await tx.select(
                "select * from product_resource where (${p}$ is null or product_id = ${p}$) "
                "and (${t}$ is null or resource_type = ${t}$) and (${r}$ is null or resource_ref_id = ${r}$) "
                "and (${all}$ = '1' or enabled = '1') order by product_id, resource_type, resource_ref_id", ns)
        return {"total": len(rows), "rows": [binding_view(r) for r in rows]}
