"""Consumption: a use of a product spends the subscription's quota first and charges the rest
(ledger entry 'overage') at the product's overage price; one usage log row records the split,
the supplier it went to and its cost; all in one transaction, idempotent on the source reference.

Billing modes of ``product_usage_log.billing_mode``:
  '1' included: the whole amount came out of a subscription's quota;
  '2' overage: a subscription covered the use but (part of) it exceeded the quota; the row's
      ``included_amount`` / ``overage_amount`` hold the exact split;
  '3' pay-as-you-go: no subscription covered the use.
"""
from dataclasses import asdict, dataclass, replace
from typing import Any

from appPublic.dictObject import DictObject

from .. import clock
from ..budgets import BudgetExceeded, Budgets, Spender
from ..db.database import Tx
from ..errors import Conflict, InvalidParam
from ..ids import new_id, payload_hash
from . import quota
from .catalogue import Catalogue
from .subscriptions import Subscriptions, check_currency
from .suppliers import Suppliers, supplier_cost
from .values import (
    HOOK_SOURCE_TABLE,
    MODE_INCLUDED,
    MODE_OVERAGE,
    MODE_PAYG,
    QSCALE,
    NotSubscribed,
    QuotaExceeded,
    ident,
    ledger_key,
    plan_overage,
    q_from_db,
    qdb,
    qtext,
    quantity,
)
from .views import Row, usage_view


@dataclass(frozen=True)
class Supply:
    """Where a use went: the bound resource and, when one is routed, its supplier and unit cost."""
    product_resource_id: str | None = None
    resource_type: str | None = None
    resource_ref_id: str | None = None
    supplier_org_id: str | None = None
    unit_cost: int = 0            # 1e-8 of the currency unit

    @classmethod
    def routed(cls, supplier: Row | None) -> "Supply | None":
        if supplier is None:
            return None
        return cls(supplier.product_resource_id, supplier.resource_type, supplier.resource_ref_id,
                   supplier.supplier_org_id, int(supplier.unit_cost))


@dataclass(frozen=True)
class UsageRow:
    """One ``product_usage_log`` row. Quantities are integers of 1e-4 units (``quantity`` is the
    whole use, ``included`` + ``overage`` its split); money is micro-units."""
    id: str
    product_id: str
    customer_id: str
    user_id: str
    subscription_id: str | None
    supply: Supply | None
    quantity: int
    included: int
    overage: int
    unit: str
    sell_price: int
    total_cost: int
    billing_mode: str
    source_ref_table: str
    source_ref_id: str
    idempotency_key: str
    use_time: str
    currency: str
    ledger_entry_id: str | None = None

    def record(self) -> dict:
        """The row as the table stores it."""
        supply = asdict(self.supply) if self.supply else dict.fromkeys(
            ("product_resource_id", "resource_type", "resource_ref_id", "supplier_org_id"), None)
        supply.setdefault("unit_cost", 0)
        return dict(
            supply, id=self.id, product_id=self.product_id, subscription_id=self.subscription_id,
            user_id=self.user_id, user_org_id=self.customer_id, used_amount=qdb(self.quantity), used_unit=self.unit,
            included_amount=qdb(self.included), overage_amount=qdb(self.overage), total_cost=self.total_cost,
            sell_price=self.sell_price, billing_mode=self.billing_mode, source_ref_table=self.source_ref_table,
            source_ref_id=self.source_ref_id, idempotency_key=self.idempotency_key, use_time=self.use_time,
            created_at=clock.now_text(), currency=self.currency, ledger_entry_id=self.ledger_entry_id)

    async def insert(self, tx: Tx) -> dict:
        row = self.record()
        await tx.insert("product_usage_log", row)
        return row


async def usage_by_key(tx: Tx, key: str) -> Row | None:
    return await tx.one("select * from product_usage_log where idempotency_key = ${k}$", {"k": key})


class Consumption:
    def __init__(self, db, ledger, catalogue: Catalogue, suppliers: Suppliers, subscriptions: Subscriptions,
                 budgets: Budgets | None = None):
        self.db = db
        self.budgets = budgets      # its refusal alerts (the overage is spent from the budgets by the ledger)
        self.ledger = ledger
        self.catalogue = catalogue
        self.suppliers = suppliers
        self.subscriptions = subscriptions

    async def product_use(self, customer_id: object, user_id: object, product_id: object, amount: object,
                          unit: object = None, source_ref_table: object = None, source_ref_id: object = None,
                          product_resource_id: object = None) -> dict:
        """Consume ``amount`` units of a product: quota first, the rest charged to the balance at the
        product's overage price (ledger entry 'overage'), one usage log row; all in one transaction.
        Idempotent on (source_ref_table, source_ref_id)."""
        customer_id, product_id = ident(customer_id, "customer_id"), ident(product_id, "product_id")
        use: dict[str, Any] = {
               "customer_id": customer_id, "product_id": product_id, "user_id": ident(user_id, "user_id"),
               "q": quantity(amount, "amount", positive=True), "unit": ident(unit, "unit", required=False),
               "table": ident(source_ref_table, "source_ref_table", max_len=64),
               "ref": ident(source_ref_id, "source_ref_id"),
               "binding_id": ident(product_resource_id, "product_resource_id", required=False)}
        if use["table"] == HOOK_SOURCE_TABLE:
            raise InvalidParam(f"source_ref_table: {HOOK_SOURCE_TABLE} is reserved for accounted usage events")
        key = use["key"] = f"{use['table']}:{use['ref']}"
        use["phash"] = payload_hash({"op": "product_use", "key": key, "customer_id": customer_id,
                                     "product_id": product_id, "amount": use["q"]})

        async def work(tx):
            existing = await usage_by_key(tx, key)
            if existing is not None:
                return _replay_use(existing, customer_id, product_id, use["q"], key)
            return await self._use(tx, use)
        # the same source reference may be used concurrently and commit first
        try:
            result, existing = await self.db.run_or_existing(
                work, lambda tx: usage_by_key(tx, key), f"usage {key} collided with another request; send it again")
        except BudgetExceeded as e:
            if self.budgets is not None:
                await self.budgets.refused(e)     # its alert, now the refused use has rolled back
            raise
        return result if existing is None else _replay_use(existing, customer_id, product_id, use["q"], key)

    async def _use(self, tx, use: dict) -> dict:
        product = await self.catalogue.require_product(tx, use["product_id"])
        binding = await self._check_use(tx, use, product)
        supplier = await self.suppliers.serving(tx, product.id, use["binding_id"])
        now = clock.now_text()
        due = await quota.due(tx, use["customer_id"], now, product_id=product.id)
        if due is not None:
            await self.subscriptions.renew_in(tx, due, now)
        cov = await quota.covering(tx, use["customer_id"], now, product_id=product.id, current=due is not None)
        locked = await quota.lock(tx, cov.id, now) if cov else None
        take, over = quota.split(locked, use["q"])
        if locked is None and product.status != "active":
            raise NotSubscribed(f"product {product.id} is not available without a subscription")
        charge = self._overage_charge(product, locked, take, over, use["customer_id"])
        if take and locked is not None:     # only a locked quota row gives a take
            await quota.take(tx, locked.id, take)
        row = UsageRow(
            id=new_id(), product_id=product.id, customer_id=use["customer_id"], user_id=use["user_id"],
            subscription_id=locked.id if locked else None, supply=None, quantity=use["q"], included=take,
            overage=over, unit=product.quantity_unit, sell_price=charge, total_cost=0,
            billing_mode=MODE_INCLUDED if not over else (MODE_OVERAGE if locked else MODE_PAYG),
            source_ref_table=use["table"], source_ref_id=use["ref"], idempotency_key=use["key"], use_time=now,
            currency=product.currency)
        if charge > 0:
            await check_currency(tx, use["customer_id"], product.currency)
            # its budgets are spent by the debit (refused: the whole use rolls back)
            entry = await self.ledger.post(
                tx, use["customer_id"], -charge, "overage", ledger_key(use["key"]), use["phash"], must_cover=True,
                refuse_suspended=True, ref_type="product_usage_log", ref_id=row.id,
                spender=Spender(use["customer_id"], use["user_id"]),
                reason=f"{product.code} {qtext(over)} {product.quantity_unit}" + (" past quota" if locked else ""))
            row = replace(row, ledger_entry_id=entry.id)
        supply = Supply.routed(supplier)
        if supply is None and binding is not None:
            supply = Supply(binding.id, binding.resource_type, binding.resource_ref_id)
        row = replace(row, supply=supply, total_cost=supplier_cost(supplier, use["q"]))
        return usage_view(DictObject(**await row.insert(tx)))

    async def _check_use(self, tx, use: dict, product: Row) -> Row | None:
        """The unit and the binding a use names must be the product's; returns the binding."""
        if use["unit"] is not None and use["unit"] != product.quantity_unit:
            raise InvalidParam(f"unit: product {product.id} is used in {product.quantity_unit}, not {use['unit']}")
        if product.fractional != "1" and use["q"] % QSCALE:
            raise InvalidParam(f"amount: product {product.id} is sold in whole {product.quantity_unit} units")
        if use["binding_id"] is None:
            return None
        b = await self.catalogue.binding(tx, use["binding_id"])
        if b is None or b.product_id != product.id:
            raise InvalidParam(f"product_resource_id: {use['binding_id']} is not a binding of {product.id}")
        return b

    @staticmethod
    def _overage_charge(product: Row, locked: Row | None, take: int, over: int, customer_id: str) -> int:
        """What the part past the quota costs at the product's overage price, half-up; refused when
        the product has no overage price."""
        if not over:
            return 0
        if product.overage_price is None:
            if locked is None:
                raise NotSubscribed(f"customer {customer_id} has no active subscription to {product.id}")
            raise QuotaExceeded(f"the quota of subscription {locked.id} has {qtext(take)} "
                                f"{product.quantity_unit} left and the product allows no overage")
        return plan_overage(product, over)


def _replay_use(existing: Row, customer_id: str, product_id: str, q: int, key: str) -> dict:
    if (existing.user_org_id, existing.product_id, q_from_db(existing.used_amount)) != (customer_id, product_id, q):
        raise Conflict(f"usage {key} was already recorded with a different customer, product or amount")
    return usage_view(existing, duplicate=True)
