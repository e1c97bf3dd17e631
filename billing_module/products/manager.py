"""``ProductManager``: the one object the rest of the module (``services``, the API handlers,
``ServerEnv().billing_product_manager``) holds for products. It builds the concept services with
their collaborators and hands each call to the service that owns it; it holds no logic of its own
beyond shaping the product report into the products' reply."""
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from .. import clock
from ..budgets import Budgets
from ..config import Config
from ..db.database import Database
from ..ledger import Ledger
from ..money import from_micro, to_micro
from ..reports import MAX_STATS_ROWS, Reports, product_filter
from .catalogue import Catalogue
from .consumption import Consumption
from .hook import QuotaHook
from .subscriptions import Subscriptions
from .suppliers import Suppliers
from .values import choice
from .views import usage_view

STATS_GROUPS = ("product", "supplier", "customer", "day", "month")
# what the product's price looks like in the overage report
_PRICE_FIELDS = ("product_id", "quantity_unit", "overage_price", "price_per", "currency")


class ProductManager:
    def __init__(self, *, db: Database, config: Config, ledger: Ledger, budgets: Budgets | None = None) -> None:
        self.db = db
        self.catalogue = Catalogue(db, config.currency)
        self.suppliers_service = Suppliers(db, self.catalogue)
        self.subscriptions_service = Subscriptions(db, ledger, self.catalogue, config.timezone)
        self.consumption = Consumption(db, ledger, self.catalogue, self.suppliers_service, self.subscriptions_service,
                                       budgets)
        self.hook = QuotaHook(ledger, self.catalogue, self.suppliers_service, self.subscriptions_service,
                              config.accounting)
        self.reports = Reports(db, time_zone=config.timezone)
        self.zone = clock.zone(config.timezone)    # naive filter times are wall time here
        # catalogue and bindings
        self.save_product = self.catalogue.save_product
        self.product = self.catalogue.product
        self.products = self.catalogue.products
        self.bind = self.catalogue.bind
        self.unbind = self.catalogue.unbind
        self.bindings = self.catalogue.bindings
        # suppliers and routing
        self.add_supplier = self.suppliers_service.add_supplier
        self.update_supplier = self.suppliers_service.update_supplier
        self.disable_supplier = self.suppliers_service.disable_supplier
        self.suppliers = self.suppliers_service.suppliers
        self.route = self.suppliers_service.route
        # subscriptions and quota
        self.subscribe = self.subscriptions_service.subscribe
        self.subscription = self.subscriptions_service.subscription
        self.cancel = self.subscriptions_service.cancel
        self.resume = self.subscriptions_service.resume
        self.subscriptions = self.subscriptions_service.subscriptions
        self.renew_due = self.subscriptions_service.renew_due
        self.check_quota = self.subscriptions_service.check_quota
        # consumption (services.build_services hands ``hook`` to Accounting)
        self.product_use = self.consumption.product_use

    # --- the product report (reports.py, source "product") in the products' reply shapes ----------------
    async def usage_list(self, page: int = 1, rows: int = 20, **filters: Any) -> dict:
        """One page of usage log rows (newest first); filters as ``reports.product_filter``."""
        result = await self.reports.usage_log(product_filter(**filters, zone=self.zone), page, rows)
        return {"total": result["total"], "rows": [usage_view(r) for r in result["rows"]]}

    async def overage(self, customer_id: object = None, product_id: object = None, start: object = None,
                      end: object = None, page: int = 1, rows: int = 20) -> dict:
        """Usage charged beyond a quota or without one, with its total and the product's price."""
        f = product_filter(customer_id=customer_id, product_id=product_id, start=start, end=end, overage_only=True,
                           zone=self.zone)
        result = await self.reports.usage_log(f, page, rows)
        out = {"total": result["total"], "rows": [usage_view(r) for r in result["rows"]],
               "total_charged": result["totals"]["amount"]}
        if f.product_id:
            out["price"] = {k: v for k, v in (await self.product(f.product_id)).items() if k in _PRICE_FIELDS}
        return out

    async def stats(self, group_by: object = "product", start: object = None, end: object = None,
                    customer_id: object = None, product_id: object = None, supplier_org_id: object = None) -> dict:
        """Per product, supplier, customer, day or month, sorted by key: subscription fees (ledger
        'subscription' entries), usage revenue (overage and pay-as-you-go, what the uses charged),
        supplier cost and the margin of both revenues over the cost; the totals add up with the
        ledger. Fees belong to no supplier. Quantities are per unit, since units differ."""
        group_by = choice(group_by, "group_by", STATS_GROUPS, "product")
        assert group_by is not None, "choice returns its default for a missing value"
        f = product_filter(customer_id=customer_id, product_id=product_id, supplier_org_id=supplier_org_id,
                           start=start, end=end, zone=self.zone)
        result = await self.reports.stats(f, group_by, rows=MAX_STATS_ROWS, order="key")
        fees = await self.reports.subscription_fees(f, group_by)
        by_key = {r["key"]: r for r in result["rows"]}
        rows = []
        for key in sorted(set(by_key) | set(fees)):
            r = by_key.get(key)
            view = _stats_view(r["records"] if r else 0, r["amount"] if r else "0", r["cost"] if r else "0",
                               fees.get(key, 0))
            rows.append(dict(view, key=key, quantities=r["quantities"] if r else []))
        t = result["totals"]
        return {"group_by": group_by, "rows": rows,
                "totals": _stats_view(t["records"], t["amount"], t["cost"], sum(fees.values()))}


def _stats_view(uses: int, usage_revenue: str, cost: str, fees_micros: int) -> dict:
    """The products' statistics row: revenue = subscription fees + usage revenue; margin over cost."""
    usage_micros, cost_micros = to_micro(usage_revenue), to_micro(cost)
    revenue = fees_micros + usage_micros
    margin = revenue - cost_micros
    rate = str((Decimal(margin) / Decimal(revenue)).quantize(Decimal("0.0001"), ROUND_HALF_UP)) if revenue else None
    return {"uses": uses, "subscription_fees": from_micro(fees_micros), "usage_revenue": from_micro(usage_micros),
            "revenue": from_micro(revenue), "cost": from_micro(cost_micros), "margin": from_micro(margin),
            "margin_rate": rate}
