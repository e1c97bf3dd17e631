"""The product catalogue and resource bindings: what is sold (a product with its plan: package
price, included quantity, period, overage price) and which resources it sells (an LLM model, an
upstream API, a service). Bindings are disabled, never deleted, so usage rows keep their reference."""
from collections.abc import Awaitable, Callable

from appPublic.dictObject import DictObject

from .. import clock, validation
from ..db import dialect as dialects
from ..db.database import Database, Tx
from ..errors import Conflict, NotFound
from ..ids import new_id
from .values import (
    MAX_PERIOD_MONTHS,
    PRODUCT_STATUSES,
    PRODUCT_TYPES,
    RESOURCE_TYPES,
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


class Catalogue:
    def __init__(self, db, currency: str):
        self.db = db
        self.currency = currency      # of a product saved without one

    async def save_product(self, code: object, product_name: object, quantity_unit: object, product_id: object = None,
                           product_type: object = "llm_model", status: object = "active", currency: object = None,
                           org_id: object = "0", list_price: object = 0, included_quantity: object = 0,
                           period_months: object = 1, overage_price: object = None, price_per: object = 1,
                           description: object = None) -> dict:
        """Create the product, or replace every field of an existing one (``product_id`` given).
        ``overage_price`` None: no use beyond the quota and no pay-as-you-go (refused)."""
        rec = {
            "org_id": ident(org_id, "org_id"), "code": ident(code, "code", max_len=64),
            "product_name": text(product_name, "product_name", 128, required=True),
            "product_type": choice(product_type, "product_type", PRODUCT_TYPES, "llm_model"),
            "status": choice(status, "status", PRODUCT_STATUSES, "active"),
            "currency": ident(currency or self.currency, "currency", max_len=8),
            "list_price": validation.amount(list_price, "list_price", non_negative=True),
            "included_quantity": quantity(included_quantity, "included_quantity"),
            "quantity_unit": ident(quantity_unit, "quantity_unit"),
            "period_months": count(period_months, "period_months", 1, MAX_PERIOD_MONTHS, 1),
            "overage_price": validation.amount(overage_price, "overage_price", required=False, non_negative=True),
            "price_per": count(price_per, "price_per", 1, 10**12, 1),
            "description": text(description, "description", 500),
        }
        product_id = ident(product_id, "product_id", required=False)

        async def work(tx):
            now = clock.now_text()
            rec["updated_at"] = now
            if product_id is not None:
                sets = ", ".join(f"{k} = ${{{k}}}$" for k in rec)
                n = await tx.execute(f"update product set {sets}, version = version + 1 where id = ${{id}}$",
                                     dict(rec, id=product_id))
                if n == 1:
                    return await self.product_row(tx, product_id)
            row = dict(rec, id=product_id or new_id(), version=0, created_at=now)
            await tx.insert("product", row)
            return DictObject(**row)
        return product_view(await run_unique(
            self.db, work, Conflict(f"product code {rec['code']} already exists in org {rec['org_id']}")))

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

    async def _binding_by_key(self, tx, product_id, resource_type, ref):
        return await tx.one("select * from product_resource where product_id = ${p}$ and resource_type = ${t}$ "
                            "and resource_ref_id = ${r}$", {"p": product_id, "t": resource_type, "r": ref})

    async def binding(self, tx: Tx, binding_id: str) -> Row | None:
        return await tx.one("select * from product_resource where id = ${b}$", {"b": binding_id})

    async def unbind(self, product_resource_id: object = None, product_id: object = None,
                     resource_type: object = None, resource_ref_id: object = None) -> dict:
        """Disable a binding (kept, so usage rows keep their reference); its suppliers stop routing."""
        binding_id = ident(product_resource_id, "product_resource_id", required=False)
        if binding_id is None:
            key = (ident(product_id, "product_id"), choice(resource_type, "resource_type", RESOURCE_TYPES),
                   ident(resource_ref_id, "resource_ref_id"))

        async def work(tx):
            b = await (self.binding(tx, binding_id) if binding_id else self._binding_by_key(tx, *key))
            if b is None:
                raise NotFound("no such product resource binding")
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
