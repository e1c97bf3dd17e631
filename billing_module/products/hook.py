"""The accounting quota hook: an accounted LLM event covered by a subscription of its customer
spends the quota first; accounting then charges only the overage part. The hook runs inside the
batch accountant's transaction and writes one usage log row per accounting record."""
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .. import clock
from ..db.database import Tx
from ..ids import new_id
from ..pricing import PriceResult, Usage
from . import quota
from .catalogue import Catalogue
from .consumption import Supply, UsageRow, usage_by_key
from .subscriptions import Subscriptions
from .suppliers import Suppliers, supplier_cost
from .values import (
    CALL_UNIT,
    HOOK_SOURCE_TABLE,
    MODE_INCLUDED,
    MODE_OVERAGE,
    TOKEN_UNIT,
    div_half_up,
    int_from_db,
    plan_overage,
    q_from_db,
)
from .views import Row


@dataclass
class QuotaResult:
    """What the accounting quota hook returns: charge only ``charge_amount`` (the overage part)."""
    charge_amount: int
    cost: int                 # micro-units: the usage row's cost, which the record states too
    subscription_id: str
    included: Decimal
    overage: Decimal
    usage_id: str


class QuotaHook:
    def __init__(self, ledger, catalogue: Catalogue, suppliers: Suppliers, subscriptions: Subscriptions,
                 accounting_config):
        self.ledger = ledger
        self.catalogue = catalogue
        self.suppliers = suppliers
        self.subscriptions = subscriptions
        self.accounting_config = accounting_config   # allow_arrears: what the accountant's charges may leave

    async def quota_hook(self, tx: Tx, ev: Any, price: PriceResult, record_id: str) -> QuotaResult | None:
        """An LLM event covered by an active subscription of its customer (through an 'llm' binding
        of its model, or its product_id) consumes quota first; the returned charge is the overage
        part's share of ``price.amount``, rounded half-up. None when the event is not covered;
        accounting then charges the full price.

        The batch accountant commits its transaction even when it refuses some events' charges, so
        this hook writes nothing for an event whose charge cannot pass (it returns None, and the
        full price is refused the same way), and an event whose reservation outlived a refusal
        reuses it when it is accounted again (one reservation per accounting record)."""
        key = f"{HOOK_SOURCE_TABLE}:{record_id}"
        reserved = await usage_by_key(tx, key)
        if reserved is not None:
            return await self._replay(tx, reserved, price)
        at = ev.use_time or clock.now_text()
        match = {"product_id": ev.product_id, "llmid": ev.llmid,
                 "model_name": None if ev.llmid else ev.payload.get("model_name")}
        due = await quota.due(tx, ev.customer_id, at, **match)
        if due is not None:     # an event at or after the period end renews the subscription first
            await self.subscriptions.renew_in(tx, due, at)
        cov = await quota.covering(tx, ev.customer_id, at, current=due is not None, **match)
        if cov is None:
            return None
        q = event_quantity(ev.usage, cov.quantity_unit)
        if q <= 0:
            return None
        supplier = await self.suppliers.serving(tx, cov.product_id, cov.product_resource_id)
        locked = await quota.lock(tx, cov.id, at)
        if locked is None:
            return None
        take, over = quota.split(locked, q)
        product = await self.catalogue.require_product(tx, cov.product_id)
        charge = overage_charge(product, price, q, over)
        allow_arrears = self.accounting_config.allow_arrears
        if not await self.ledger.can_cover(tx, ev.customer_id, charge, allow_arrears=allow_arrears):
            return None
        if take:
            await quota.take(tx, cov.id, take)
        supply = Supply.routed(supplier)
        if supply is None and cov.product_resource_id:
            supply = Supply(cov.product_resource_id, "llm", cov.resource_ref_id)
        row = UsageRow(
            id=new_id(), product_id=product.id, customer_id=ev.customer_id, user_id=ev.user_id or ev.customer_id,
            subscription_id=cov.id, supply=supply, quantity=q, included=take, overage=over, unit=cov.quantity_unit,
            sell_price=charge, total_cost=supplier_cost(supplier, q) if supplier else int(price.cost or 0),
            billing_mode=MODE_OVERAGE if over else MODE_INCLUDED, source_ref_table=HOOK_SOURCE_TABLE,
            source_ref_id=record_id, idempotency_key=key, use_time=at, currency=price.currency or product.currency)
        await row.insert(tx)
        return QuotaResult(charge, row.total_cost, cov.id, Decimal(take).scaleb(-4), Decimal(over).scaleb(-4), row.id)

    async def _replay(self, tx, row: Row, price) -> QuotaResult:
        """The reservation an earlier attempt of this record made: the same split, the overage
        priced at this attempt's price."""
        q, over = q_from_db(row.used_amount), q_from_db(row.overage_amount)
        charge = overage_charge(await self.catalogue.require_product(tx, row.product_id), price, q, over)
        if charge != int_from_db(row.sell_price):
            await tx.execute("update product_usage_log set sell_price = ${sp}$ where id = ${u}$",
                             {"sp": charge, "u": row.id})
        return QuotaResult(charge, int_from_db(row.total_cost), row.subscription_id, Decimal(q - over).scaleb(-4),
                           Decimal(over).scaleb(-4), row.id)

    async def link_ledger(self, tx: Tx, record_ids: list[str]) -> None:
        """After accounting posted the records' charges: their usage rows carry the ledger entry."""
        ns: dict[str, object] = {}
        await tx.execute("update product_usage_log set ledger_entry_id = (select a.ledger_entry_id from "
                         "accounting_records a where a.id = product_usage_log.source_ref_id) "
                         f"where source_ref_table = '{HOOK_SOURCE_TABLE}' and source_ref_id in "
                         f"{tx.in_list(record_ids, ns)}", ns)

    async def release_quota(self, tx: Tx, record_id: str) -> bool:
        """Undo, inside the accountant's transaction, the reservation the hook made for an
        accounting record whose charge was then refused: the quota goes back and the usage row
        goes. Returns whether there was one."""
        row = await usage_by_key(tx, f"{HOOK_SOURCE_TABLE}:{record_id}")
        if row is None:
            return False
        included = q_from_db(row.included_amount)
        if included and row.subscription_id:
            await quota.give_back(tx, row.subscription_id, included)
        await tx.execute("delete from product_usage_log where id = ${u}$", {"u": row.id})
        return True


def overage_charge(product: Row, price: PriceResult, q: int, over: int) -> int:
    """What ``over`` of an event's ``q`` units past the quota costs: the plan's overage price when
    it has one (the price ``product_quota`` shows), else the model's price for that share of the
    event (``product_quota`` says ``model_price``); half-up, like every charge."""
    if not over:
        return 0
    if product.overage_price is not None:
        return plan_overage(product, over)
    return div_half_up(int(price.amount) * over, q)


def event_quantity(usage: Usage, unit: str) -> int:
    """How much of a plan's unit one LLM event uses, in 1e-4 units: 'token' counts input + output
    tokens (cached tokens are part of input), 'call' counts 1 per event, any other unit counts the
    event's quantity when the event is in that unit; otherwise 0 (the plan does not cover it)."""
    if unit == TOKEN_UNIT:
        n = Decimal(usage.input_tokens + usage.output_tokens)
    elif unit == CALL_UNIT:
        n = Decimal(1)
    elif usage.unit == unit:
        n = usage.quantity
    else:
        return 0
    return int(n.scaleb(4).to_integral_value())
