"""Suppliers and routing: who delivers a bound resource, at what unit cost, and which of them a
use goes to. Unit costs are integers of 1e-8 of the currency unit."""
from appPublic.dictObject import DictObject

from .. import clock
from ..db.database import Tx
from ..errors import Conflict, InvalidParam, NotFound
from ..ids import new_id
from ..validation import flag
from .catalogue import Catalogue, run_unique
from .values import COST_PER_MICRO, MAX_PRIORITY, QSCALE, NoSupplier, cost_text, count, div_half_up, ident, text
from .values import unit_cost as parse_unit_cost  # the parameters named unit_cost shadow it
from .views import Row, supplier_view

# Routing: the enabled supplier of an enabled binding, by priority, then cost, then weight
# (higher first), then supplier org and id so that equal candidates always resolve the same way.
_ROUTE_SQL = (
    "select s.id, s.product_resource_id, s.supplier_org_id, s.unit_cost, r.resource_type, r.resource_ref_id "
    "from product_resource_supplier s join product_resource r on r.id = s.product_resource_id "
    "where r.product_id = ${p}$ and r.enabled = '1' and s.enabled = '1' "
    "and (${rid}$ is null or r.id = ${rid}$) "
    "order by s.priority, s.unit_cost, s.weight desc, s.supplier_org_id, s.id limit 1")


def supplier_cost(supplier: Row | None, q: int) -> int:
    """Supplier cost in micro-units of ``q`` (1e-4 units) at the supplier's 1e-8 unit cost, half-up."""
    if supplier is None:
        return 0
    return div_half_up(q * int(supplier.unit_cost), QSCALE * COST_PER_MICRO)


class Suppliers:
    def __init__(self, db, catalogue: Catalogue):
        self.db = db
        self.catalogue = catalogue

    async def add_supplier(self, product_resource_id: object, supplier_org_id: object, unit_cost: object,
                           priority: object = 100, weight: object = 1, supplier_name: object = None) -> dict:
        binding_id = ident(product_resource_id, "product_resource_id")
        rec = {"supplier_org_id": ident(supplier_org_id, "supplier_org_id"),
               "unit_cost": parse_unit_cost(unit_cost),
               "priority": count(priority, "priority", 0, MAX_PRIORITY, 100),
               "weight": count(weight, "weight", 0, MAX_PRIORITY, 1),
               "supplier_name": text(supplier_name, "supplier_name", 128)}

        async def work(tx):
            if await self.catalogue.binding(tx, binding_id) is None:
                raise NotFound(f"no product resource binding {binding_id}")
            now = clock.now_text()
            row = dict(rec, id=new_id(), product_resource_id=binding_id, enabled="1", version=0,
                       created_at=now, updated_at=now)
            await tx.insert("product_resource_supplier", row)
            return DictObject(**row)
        return supplier_view(await run_unique(self.db, work, Conflict(
            f"supplier {rec['supplier_org_id']} is already on this resource; update it instead",
            code="duplicate_supplier")))

    async def update_supplier(self, supplier_id: object, unit_cost: object = None, priority: object = None,
                              weight: object = None, enabled: object = None, supplier_name: object = None) -> dict:
        supplier_id = ident(supplier_id, "supplier_id")
        changes: dict[str, object] = {}
        if unit_cost not in (None, ""):
            changes["unit_cost"] = parse_unit_cost(unit_cost)
        if priority not in (None, ""):
            changes["priority"] = count(priority, "priority", 0, MAX_PRIORITY)
        if weight not in (None, ""):
            changes["weight"] = count(weight, "weight", 0, MAX_PRIORITY)
        if enabled not in (None, ""):
            changes["enabled"] = flag(enabled, "enabled", None)
        if supplier_name not in (None, ""):
            changes["supplier_name"] = text(supplier_name, "supplier_name", 128)
        if not changes:
            raise InvalidParam("nothing to update: give unit_cost, priority, weight, enabled or supplier_name")
        return await self._change_supplier(supplier_id, changes)

    async def disable_supplier(self, supplier_id: object) -> dict:
        return await self._change_supplier(ident(supplier_id, "supplier_id"), {"enabled": "0"})

    async def _change_supplier(self, supplier_id, changes):
        async def work(tx):
            sets = ", ".join(f"{k} = ${{{k}}}$" for k in changes)
            n = await tx.execute(f"update product_resource_supplier set {sets}, version = version + 1, "
                                 f"updated_at = ${{now}}$ where id = ${{sid}}$",
                                 dict(changes, sid=supplier_id, now=clock.now_text()))
            if n == 0:
                raise NotFound(f"no supplier {supplier_id}")
            return await tx.one("select * from product_resource_supplier where id = ${sid}$", {"sid": supplier_id})
        return supplier_view(await self.db.run(work))

    async def suppliers(self, product_resource_id: object = None, product_id: object = None,
                        include_disabled: object = True) -> dict:
        ns = {"b": ident(product_resource_id, "product_resource_id", required=False),
              "p": ident(product_id, "product_id", required=False), "all": "1" if include_disabled else "0"}
        async with self.db.read() as tx:
            rows = await tx.select(
                "select s.* from product_resource_supplier s join product_resource r on r.id = s.product_resource_id "
                "where (${b}$ is null or s.product_resource_id = ${b}$) and (${p}$ is null or r.product_id = ${p}$) "
                "and (${all}$ = '1' or s.enabled = '1') "
                "order by s.product_resource_id, s.priority, s.unit_cost, s.weight desc, s.supplier_org_id, s.id", ns)
        return {"total": len(rows), "rows": [supplier_view(r) for r in rows]}

    async def route_in(self, tx: Tx, product_id: str, product_resource_id: str | None = None) -> Row | None:
        """The supplier a use of the product goes to, read inside the caller's transaction."""
        return await tx.one(_ROUTE_SQL, {"p": product_id, "rid": product_resource_id})

    async def serving(self, tx: Tx, product_id: str, product_resource_id: str | None = None) -> Row | None:
        """The supplier a use goes to, or None for a product that sells no bound resource (the
        reseller's own, cost 0). A product with bindings but no enabled supplier of an enabled
        binding sells nothing: 409 ``no_supplier``, before anything is written."""
        supplier = await self.route_in(tx, product_id, product_resource_id)
        if supplier is None and await self.catalogue.has_bindings(tx, product_id):
            raise NoSupplier(f"no enabled supplier can serve product {product_id}"
                             + (f" through binding {product_resource_id}" if product_resource_id else ""))
        return supplier

    async def route(self, product_id: object, product_resource_id: object = None) -> dict | None:
        """The supplier a use of the product would go to now (None: no enabled supplier)."""
        async with self.db.read() as tx:
            s = await self.route_in(tx, ident(product_id, "product_id"),
                                    ident(product_resource_id, "product_resource_id", required=False))
        if s is None:
            return None
        return {"supplier_id": s.id, "supplier_org_id": s.supplier_org_id, "product_resource_id": s.product_resource_id,
                "unit_cost": cost_text(int(s.unit_cost)), "resource_type": s.resource_type,
                "resource_ref_id": s.resource_ref_id}

