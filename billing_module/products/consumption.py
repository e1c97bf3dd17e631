"""Products: resource bindings, suppliers, subscriptions with quota, and the consumption engine.

A product sells a resource (an LLM model, an upstream API, a service) by a quantity unit
(``token``, ``call``, ``second``, ...). A customer either subscribes to it (a package price per
period buys ``included_quantity`` units) or uses it pay-as-you-go at the per-unit price.

Quantities are integers of 1e-4 of the unit (``QSCALE``; the same scale as the decimal(15,4)
columns of ``product_usage_log``), so quota arithmetic is exact in SQL on both databases.
Money is integer micro-units; supplier unit costs are integers of 1e-8 of the currency unit.

Billing modes of ``product_usage_log.billing_mode``:
  '1' included: the whole amount came out of a subscription's quota;
  '2' overage: a subscription covered the use but (part of) it exceeded the quota; the row's
      ``included_amount`` / ``overage_amount`` hold the exact split;
  '3' pay-as-you-go: no subscription covered the use.

Race rules: the quota row is locked (``select ... for update``; SQLite's writer lock) before its
remaining quota is read, and decremented by one conditional UPDATE whose row count is checked,
in the same transaction as the ledger entry and the usage log row. Renewals claim their row with
a conditional UPDATE on ``version``; only the instance whose update matched renews it.
"""
import calendar
import datetime
import logging
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from appPublic.dictObject import DictObject

from . import clock
from .accounting import _ident
from .db import dialect as dialects
from .errors import (AccountSuspended, BillingError, Conflict, InsufficientBalance, InvalidParam, NotFound,
                     UnknownCustomer)
from .ids import new_id, payload_hash
from .money import from_micro, parse_count, parse_quantity, to_micro

log = logging.getLogger("billing_module.products")

QSCALE = 10_000            # quantities: integers of 1e-4 of the unit
COST_PER_MICRO = 100       # unit costs are 1e-8 of the currency unit, money is 1e-6
MODE_INCLUDED, MODE_OVERAGE, MODE_PAYG = "1", "2", "3"
BILLING_MODES = {MODE_INCLUDED: "included", MODE_OVERAGE: "overage", MODE_PAYG: "pay_as_you_go"}
RESOURCE_TYPES = ("llm", "uapi", "service")
PRODUCT_TYPES = ("llm_model", "api", "bundle")
PRODUCT_STATUSES = ("active", "disabled")
SUBSCRIPTION_STATUSES = ("active", "cancelled", "expired")
STATS_GROUPS = ("product", "supplier", "customer", "day")
TOKEN_UNIT, CALL_UNIT = "token", "call"
# accounting's own usage rows are keyed by their record; product_use may not forge such keys
HOOK_SOURCE_TABLE = "accounting_records"
MAX_PERIOD_MONTHS = 120
MAX_PRIORITY = 1_000_000
# refusals of a renewal charge that expire the subscription (anything else is retried)
_UNPAID = (InsufficientBalance, AccountSuspended, UnknownCustomer)


class QuotaExceeded(BillingError):
    status, code = 402, "quota_exceeded"


class NotSubscribed(BillingError):
    status, code = 402, "not_subscribed"


@dataclass
class QuotaResult:
    """What the accounting quota hook returns: charge only ``charge_amount`` (the overage part)."""
    charge_amount: int
    subscription_id: str
    included: Decimal
    overage: Decimal
    usage_id: str


# --- value parsing and formatting (bad input raises InvalidParam before anything is written) ------
def _id(value, name, required=True, max_len=32):
    return _ident({name: value}, name, required=required, max_len=max_len)


def _money(value, name, required=True):
    if value is None or value == "":
        if required:
            raise InvalidParam(f"{name}: required")
        return None
    micro = to_micro(value, name)
    if micro < 0:
        raise InvalidParam(f"{name}: must not be negative")
    return micro


def _quantity(value, name, positive=False):
    """A quantity of units -> integer 1e-4 units (at most 4 decimal places)."""
    if value is None or value == "":
        raise InvalidParam(f"{name}: required")
    q = int(parse_quantity(value, name, places=4).scaleb(4))
    if positive and q <= 0:
        raise InvalidParam(f"{name}: must be positive")
    return q


def _unit_cost(value, name="unit_cost"):
    """A supplier unit cost in currency units (up to 8 decimal places) -> integer 1e-8 units."""
    if isinstance(value, float):
        raise InvalidParam(f"{name}: floating-point numbers are not accepted for money; send a decimal string")
    if value is None or value == "":
        raise InvalidParam(f"{name}: required")
    return int(parse_quantity(value, name, places=8).scaleb(8))


def _count(value, name, minimum, maximum, default=None):
    if value is None or value == "":
        if default is None:
            raise InvalidParam(f"{name}: required")
        return default
    n = parse_count(value, name)
    if not minimum <= n <= maximum:
        raise InvalidParam(f"{name}: must be between {minimum} and {maximum}")
    return n


def _choice(value, name, choices, default=None):
    if value is None or value == "":
        if default is None:
            raise InvalidParam(f"{name}: required")
        return default
    if value not in choices:
        raise InvalidParam(f"{name}: must be one of {', '.join(choices)}")
    return value


def _flag(value, name, default):
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return "1" if value else "0"
    if str(value) in ("1", "0"):
        return str(value)
    raise InvalidParam(f"{name}: expected 0 or 1")


def _text(value, name, max_len, required=False):
    if value is None or value == "":
        if required:
            raise InvalidParam(f"{name}: required")
        return None
    if not isinstance(value, str):
        raise InvalidParam(f"{name}: expected a string")
    value = value.strip()
    if not value and required:
        raise InvalidParam(f"{name}: required")
    if len(value) > max_len or "\x00" in value:
        raise InvalidParam(f"{name}: at most {max_len} characters")
    return value or None


def _bound(value, name, end=False):
    """A day or a time; as the end bound a day ('YYYY-MM-DD') includes that whole day (the usage
    reports' convention). Returns 'YYYY-MM-DD HH:MM:SS'; the end is exclusive."""
    if value in (None, ""):
        return None
    dt = clock.parse(value, name)
    if end and isinstance(value, str) and len(value.strip()) == 10:
        dt += datetime.timedelta(days=1)
    return clock.fmt(dt)


def _qtext(q):
    """Integer 1e-4 units -> plain decimal text without trailing zeros ('2.5', '10')."""
    s = format(Decimal(int(q)).scaleb(-4), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def _qdb(q):
    """Integer 1e-4 units -> the decimal(15,4) column value."""
    return format(Decimal(int(q)).scaleb(-4), "f")


def _q_from_db(v):
    """A decimal(15,4) column (Decimal on MySQL; int or float on SQLite, exact to 15 digits)."""
    return 0 if v is None else int(Decimal(str(v)).scaleb(4).to_integral_value())


def _int_from_db(v):
    return 0 if v is None else int(Decimal(str(v)))


def _cost_text(c):
    return f"{c // 10**8}.{c % 10**8:08d}"


def _div_half_up(num, den):
    """round(num / den) half-up, for non-negative integers (exact, no Decimal needed)."""
    return (2 * num + den) // (2 * den)


def add_months(dt, months):
    """``dt`` plus whole months; the day is clamped to the month's last day (Jan 31 -> Feb 28)."""
    y, m = divmod(dt.month - 1 + months, 12)
    year, month = dt.year + y, m + 1
    return dt.replace(year=year, month=month, day=min(dt.day, calendar.monthrange(year, month)[1]))


def _period(started_at, months, k):
    """Start and end of period ``k`` (0 = the first); every period is anchored on the first start,
    so month-end clamping never drifts (Jan 31 -> Feb 28 -> Mar 31)."""
    start = clock.parse(started_at)
    return clock.fmt(add_months(start, k * months)), clock.fmt(add_months(start, (k + 1) * months))


def _ledger_key(key):
    """A ledger request_id (at most 64 characters) derived from a usage idempotency key."""
    return key if len(key) <= 64 else "h:" + payload_hash(key)[:62]


# --- views: the reply shapes (money as decimal strings) ---------------------------------------------
def product_view(p):
    return {
        "product_id": p.id, "org_id": p.org_id, "code": p.code, "product_name": p.product_name,
        "product_type": p.product_type, "status": p.status, "currency": p.currency,
        "list_price": from_micro(int(p.list_price)), "included_quantity": _qtext(p.included_quantity),
        "quantity_unit": p.quantity_unit, "period_months": int(p.period_months),
        "overage_price": None if p.overage_price is None else from_micro(int(p.overage_price)),
        "price_per": str(int(p.price_per)), "description": p.description,
        "created_at": p.created_at, "updated_at": p.updated_at,
    }


def binding_view(r):
    return {
        "product_resource_id": r.id, "product_id": r.product_id, "resource_type": r.resource_type,
        "resource_ref_id": r.resource_ref_id, "resource_name": r.resource_name, "enabled": r.enabled,
        "created_at": r.created_at, "updated_at": r.updated_at,
    }


def supplier_view(s):
    return {
        "supplier_id": s.id, "product_resource_id": s.product_resource_id, "supplier_org_id": s.supplier_org_id,
        "supplier_name": s.supplier_name, "unit_cost": _cost_text(int(s.unit_cost)), "priority": int(s.priority),
        "weight": int(s.weight), "enabled": s.enabled, "created_at": s.created_at, "updated_at": s.updated_at,
    }


def subscription_view(s, duplicate=False):
    included, used = int(s.included_quantity), int(s.used_quantity)
    return {
        "subscription_id": s.id, "customer_id": s.customer_id, "user_id": s.user_id, "product_id": s.product_id,
        "request_id": s.request_id, "status": s.status, "status_reason": s.status_reason,
        "included": _qtext(included), "used": _qtext(used), "remaining": _qtext(max(0, included - used)),
        "unit": s.quantity_unit, "package_price": from_micro(int(s.package_price)), "currency": s.currency,
        "period_months": int(s.period_months), "started_at": s.started_at, "period_start": s.period_start,
        "period_end": s.period_end, "renewals": int(s.renewals), "auto_renew": s.auto_renew,
        "cancelled_at": s.cancelled_at, "ledger_entry_id": s.ledger_entry_id, "created_at": s.created_at,
        "duplicate": duplicate,
    }


# what a customer-scoped caller must not see of a usage row (supplier and cost data)
COST_FIELDS = ("product_resource_id", "supplier_org_id", "unit_cost", "total_cost")


def usage_view(r, duplicate=False):
    return {
        "usage_id": r.id, "product_id": r.product_id, "subscription_id": r.subscription_id,
        "customer_id": r.user_org_id, "user_id": r.user_id, "billing_mode": r.billing_mode,
        "amount": _qtext(_q_from_db(r.used_amount)), "unit": r.used_unit,
        "included_amount": _qtext(_q_from_db(r.included_amount)),
        "overage_amount": _qtext(_q_from_db(r.overage_amount)),
        "sell_price": from_micro(_int_from_db(r.sell_price)), "currency": r.currency,
        "ledger_entry_id": r.ledger_entry_id, "source_ref_table": r.source_ref_table, "source_ref_id": r.source_ref_id,
        "resource_type": r.resource_type, "resource_ref_id": r.resource_ref_id,
        "product_resource_id": r.product_resource_id, "supplier_org_id": r.supplier_org_id,
        "unit_cost": _cost_text(_int_from_db(r.unit_cost)), "total_cost": from_micro(_int_from_db(r.total_cost)),
        "use_time": r.use_time, "created_at": r.created_at, "duplicate": duplicate,
    }


# --- SQL used from more than one place ------------------------------------------------------------------
# The active subscription covering a use at ${at}$: by product, or (for LLM events) through an
# enabled 'llm' binding of the event's model id, or of its model name when the event has no id.
# A subscription with quota left is preferred, then the one ending first.
_COVERING_SQL = (
    "select s.id, s.product_id, s.quantity_unit, r.id as product_resource_id, r.resource_ref_id "
    "from product_subscription s left join product_resource r on r.product_id = s.product_id "
    "and r.resource_type = 'llm' and r.enabled = '1' and (r.resource_ref_id = ${llm}$ or (${llm}$ is null "
    "and r.resource_ref_id in (select m.id from llmage_cache m where m.name = ${mname}$))) "
    "where s.customer_id = ${c}$ and s.status = 'active' and s.period_start <= ${at}$ and s.period_end > ${at}$ "
    "and (s.product_id = ${pid}$ or r.id is not null) "
    "order by case when s.used_quantity < s.included_quantity then 0 else 1 end, s.period_end, s.id")

# Routing: the enabled supplier of an enabled binding, by priority, then cost, then weight
# (higher first), then supplier org and id so that equal candidates always resolve the same way.
_ROUTE_SQL = (
    "select s.id, s.product_resource_id, s.supplier_org_id, s.unit_cost, r.resource_type, r.resource_ref_id "
    "from product_resource_supplier s join product_resource r on r.id = s.product_resource_id "
    "where r.product_id = ${p}$ and r.enabled = '1' and s.enabled = '1' "
    "and (${rid}$ is null or r.id = ${rid}$) "
    "order by s.priority, s.unit_cost, s.weight desc, s.supplier_org_id, s.id limit 1")


class ProductManager:
    def __init__(self, core):
        self.core = core
        self.db = core.db
        self.config = core.config

    # --- catalogue ----------------------------------------------------------------------------------
    async def save_product(self, code, product_name, quantity_unit, product_id=None, product_type="llm_model",
                           status="active", currency=None, org_id="0", list_price=0, included_quantity=0,
                           period_months=1, overage_price=None, price_per=1, description=None):
        """Create the product, or replace every field of an existing one (``product_id`` given).
        ``overage_price`` None: no use beyond the quota and no pay-as-you-go (refused)."""
        rec = {
            "org_id": _id(org_id, "org_id"), "code": _id(code, "code", max_len=64),
            "product_name": _text(product_name, "product_name", 128, required=True),
            "product_type": _choice(product_type, "product_type", PRODUCT_TYPES, "llm_model"),
            "status": _choice(status, "status", PRODUCT_STATUSES, "active"),
            "currency": _id(currency or self.config.currency, "currency", max_len=8),
            "list_price": _money(list_price, "list_price"),
            "included_quantity": _quantity(included_quantity, "included_quantity"),
            "quantity_unit": _id(quantity_unit, "quantity_unit"),
            "period_months": _count(period_months, "period_months", 1, MAX_PERIOD_MONTHS, 1),
            "overage_price": _money(overage_price, "overage_price", required=False),
            "price_per": _count(price_per, "price_per", 1, 10**12, 1),
            "description": _text(description, "description", 500),
        }
        product_id = _id(product_id, "product_id", required=False)

        async def work(tx):
            now = clock.now_text()
            rec["updated_at"] = now
            if product_id is not None:
                sets = ", ".join(f"{k} = ${{{k}}}$" for k in rec)
                n = await tx.execute(f"update product set {sets}, version = version + 1 where id = ${{id}}$",
                                     dict(rec, id=product_id))
                if n == 1:
                    return await self._product_row(tx, product_id)
            row = dict(rec, id=product_id or new_id(), version=0, created_at=now)
            await tx.insert("product", row)
            return DictObject(**row)
        try:
            return product_view(await self.db.run(work))
        except Exception as e:
            if dialects.is_unique_violation(e):
                raise Conflict(f"product code {rec['code']} already exists in org {rec['org_id']}") from None
            raise

    async def _product_row(self, tx, product_id):
        return await tx.one("select * from product where id = ${p}$", {"p": product_id})

    async def _require_product(self, tx, product_id):
        p = await self._product_row(tx, product_id)
        if p is None:
            raise NotFound(f"no product {product_id}")
        return p

    async def product(self, product_id):
        async with self.db.read() as tx:
            return product_view(await self._require_product(tx, _id(product_id, "product_id")))

    # --- resource bindings ----------------------------------------------------------------------------
    async def bind(self, product_id, resource_type, resource_ref_id, resource_name=None):
        """Bind a resource to a product (or re-enable an earlier binding). Idempotent."""
        product_id = _id(product_id, "product_id")
        resource_type = _choice(resource_type, "resource_type", RESOURCE_TYPES)
        ref = _id(resource_ref_id, "resource_ref_id")
        name = _text(resource_name, "resource_name", 128)

        async def work(tx):
            await self._require_product(tx, product_id)
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
        return binding_view(await self._run_unique(work))

    async def _run_unique(self, work):
        try:
            return await self.db.run(work)
        except Exception as e:
            if not dialects.is_unique_violation(e):
                raise
        return await self.db.run(work)   # a concurrent insert of the same key won; this run updates it

    async def _binding_by_key(self, tx, product_id, resource_type, ref):
        return await tx.one("select * from product_resource where product_id = ${p}$ and resource_type = ${t}$ "
                            "and resource_ref_id = ${r}$", {"p": product_id, "t": resource_type, "r": ref})

    async def _binding(self, tx, binding_id):
        return await tx.one("select * from product_resource where id = ${b}$", {"b": binding_id})

    async def unbind(self, product_resource_id=None, product_id=None, resource_type=None, resource_ref_id=None):
        """Disable a binding (kept, so usage rows keep their reference); its suppliers stop routing."""
        binding_id = _id(product_resource_id, "product_resource_id", required=False)
        if binding_id is None:
            key = (_id(product_id, "product_id"), _choice(resource_type, "resource_type", RESOURCE_TYPES),
                   _id(resource_ref_id, "resource_ref_id"))

        async def work(tx):
            b = await (self._binding(tx, binding_id) if binding_id else self._binding_by_key(tx, *key))
            if b is None:
                raise NotFound("no such product resource binding")
            await tx.execute("update product_resource set enabled = '0', updated_at = ${now}$ where id = ${b}$",
                             {"b": b.id, "now": clock.now_text()})
            return await self._binding(tx, b.id)
        return binding_view(await self.db.run(work))

    async def bindings(self, product_id=None, resource_type=None, resource_ref_id=None, include_disabled=False):
        ns = {"p": _id(product_id, "product_id", required=False),
              "t": None if resource_type in (None, "") else _choice(resource_type, "resource_type", RESOURCE_TYPES),
              "r": _id(resource_ref_id, "resource_ref_id", required=False),
              "all": "1" if include_disabled else "0"}
        async with self.db.read() as tx:
            rows = await tx.select(
                "select * from product_resource where (${p}$ is null or product_id = ${p}$) "
                "and (${t}$ is null or resource_type = ${t}$) and (${r}$ is null or resource_ref_id = ${r}$) "
                "and (${all}$ = '1' or enabled = '1') order by product_id, resource_type, resource_ref_id", ns)
        return {"total": len(rows), "rows": [binding_view(r) for r in rows]}

    # --- suppliers --------------------------------------------------------------------------------------
    async def add_supplier(self, product_resource_id, supplier_org_id, unit_cost, priority=100, weight=1,
                           supplier_name=None):
        binding_id = _id(product_resource_id, "product_resource_id")
        rec = {"supplier_org_id": _id(supplier_org_id, "supplier_org_id"), "unit_cost": _unit_cost(unit_cost),
               "priority": _count(priority, "priority", 0, MAX_PRIORITY, 100),
               "weight": _count(weight, "weight", 0, MAX_PRIORITY, 1),
               "supplier_name": _text(supplier_name, "supplier_name", 128)}

        async def work(tx):
            if await self._binding(tx, binding_id) is None:
                raise NotFound(f"no product resource binding {binding_id}")
            now = clock.now_text()
            row = dict(rec, id=new_id(), product_resource_id=binding_id, enabled="1", version=0,
                       created_at=now, updated_at=now)
            await tx.insert("product_resource_supplier", row)
            return DictObject(**row)
        try:
            return supplier_view(await self.db.run(work))
        except Exception as e:
            if dialects.is_unique_violation(e):
                raise Conflict(f"supplier {rec['supplier_org_id']} is already on this resource; update it instead",
                               code="duplicate_supplier") from None
            raise

    async def update_supplier(self, supplier_id, unit_cost=None, priority=None, weight=None, enabled=None,
                              supplier_name=None):
        supplier_id = _id(supplier_id, "supplier_id")
        changes = {}
        if unit_cost not in (None, ""):
            changes["unit_cost"] = _unit_cost(unit_cost)
        if priority not in (None, ""):
            changes["priority"] = _count(priority, "priority", 0, MAX_PRIORITY)
        if weight not in (None, ""):
            changes["weight"] = _count(weight, "weight", 0, MAX_PRIORITY)
        if enabled not in (None, ""):
            changes["enabled"] = _flag(enabled, "enabled", None)
        if supplier_name not in (None, ""):
            changes["supplier_name"] = _text(supplier_name, "supplier_name", 128)
        if not changes:
            raise InvalidParam("nothing to update: give unit_cost, priority, weight, enabled or supplier_name")
        return await self._change_supplier(supplier_id, changes)

    async def disable_supplier(self, supplier_id):
        return await self._change_supplier(_id(supplier_id, "supplier_id"), {"enabled": "0"})

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

    async def suppliers(self, product_resource_id=None, product_id=None, include_disabled=True):
        ns = {"b": _id(product_resource_id, "product_resource_id", required=False),
              "p": _id(product_id, "product_id", required=False), "all": "1" if include_disabled else "0"}
        async with self.db.read() as tx:
            rows = await tx.select(
                "select s.* from product_resource_supplier s join product_resource r on r.id = s.product_resource_id "
                "where (${b}$ is null or s.product_resource_id = ${b}$) and (${p}$ is null or r.product_id = ${p}$) "
                "and (${all}$ = '1' or s.enabled = '1') "
                "order by s.product_resource_id, s.priority, s.unit_cost, s.weight desc, s.supplier_org_id, s.id", ns)
        return {"total": len(rows), "rows": [supplier_view(r) for r in rows]}

    async def _route(self, tx, product_id, product_resource_id=None):
        return await tx.one(_ROUTE_SQL, {"p": product_id, "rid": product_resource_id})

    async def route(self, product_id, product_resource_id=None):
        """The supplier a use of the product would go to now (None: no enabled supplier)."""
        async with self.db.read() as tx:
            s = await self._route(tx, _id(product_id, "product_id"),
                                  _id(product_resource_id, "product_resource_id", required=False))
        if s is None:
            return None
        return {"supplier_id": s.id, "supplier_org_id": s.supplier_org_id, "product_resource_id": s.product_resource_id,
                "unit_cost": _cost_text(int(s.unit_cost)), "resource_type": s.resource_type,
                "resource_ref_id": s.resource_ref_id}

    # --- subscriptions --------------------------------------------------------------------------------
    async def subscribe(self, customer_id, product_id, request_id, user_id=None, included_quantity=None,
                        package_price=None, period_months=None, auto_renew=True, operator=None):
        """Subscribe a customer to a product and charge the first period's package price (ledger entry
        'subscription', must be covered). The plan is the product's unless given (admin). Idempotent on
        ``request_id``; one active subscription per customer and product."""
        customer_id = _id(customer_id, "customer_id")
        product_id = _id(product_id, "product_id")
        request_id = _id(request_id, "request_id", max_len=60)   # the ledger key adds 'sub:'
        user_id = _id(user_id, "user_id", required=False)
        plan = {
            "included": None if included_quantity in (None, "") else _quantity(included_quantity, "included_quantity"),
            "price": _money(package_price, "package_price", required=False),
            "months": None if period_months in (None, "") else _count(period_months, "period_months", 1,
                                                                        MAX_PERIOD_MONTHS),
        }
        auto = _flag(auto_renew, "auto_renew", "1")
        phash = payload_hash({"op": "subscribe", "customer_id": customer_id, "product_id": product_id,
                              "plan": plan, "auto_renew": auto})

        async def work(tx):
            existing = await self._subscription_by_request(tx, request_id)
            if existing is not None:
                return _replay_subscription(existing, phash, request_id)
            product = await self._require_product(tx, product_id)
            if product.status != "active":
                raise Conflict(f"product {product_id} is not available for subscription", code="product_disabled")
            active_key = f"{customer_id}:{product_id}"
            if await tx.one("select id from product_subscription where active_key = ${k}$", {"k": active_key}):
                raise Conflict(f"customer {customer_id} already has an active subscription to {product_id}",
                               code="already_subscribed")
            now = clock.now_text()
            months = plan["months"] or int(product.period_months)
            price = int(product.list_price) if plan["price"] is None else plan["price"]
            start, end = _period(now, months, 0)
            sub = {
                "id": new_id(), "customer_id": customer_id, "user_id": user_id, "product_id": product_id,
                "request_id": request_id, "payload_hash": phash, "active_key": active_key, "status": "active",
                "included_quantity": int(product.included_quantity) if plan["included"] is None else plan["included"],
                "used_quantity": 0, "quantity_unit": product.quantity_unit, "package_price": price,
                "currency": product.currency, "period_months": months, "started_at": start, "period_start": start,
                "period_end": end, "renewals": 0, "auto_renew": auto, "status_reason": None, "cancelled_at": None,
                "ledger_entry_id": None, "version": 0, "created_at": now, "updated_at": now,
            }
            if price > 0:
                await self._check_currency(tx, customer_id, product.currency)
                entry = await self.core.ledger.post(
                    tx, customer_id, -price, "subscription", f"sub:{request_id}", phash, must_cover=True,
                    refuse_suspended=True, ref_type="product_subscription", ref_id=sub["id"],
                    reason=f"subscribe {product.code} {start[:10]}..{end[:10]}", operator=operator)
                sub["ledger_entry_id"] = entry.id
            await tx.insert("product_subscription", sub)
            return subscription_view(DictObject(**sub))
        # a concurrent subscribe may commit first: the same request (a replay) or another one
        result, existing = await self.db.run_or_existing(
            work, lambda tx: self._subscription_by_request(tx, request_id),
            Conflict(f"customer {customer_id} already has an active subscription to {product_id}",
                     code="already_subscribed"))
        return result if existing is None else _replay_subscription(existing, phash, request_id)

    async def _subscription_by_request(self, tx, request_id):
        return await tx.one("select * from product_subscription where request_id = ${r}$", {"r": request_id})

    async def _subscription_row(self, tx, subscription_id):
        return await tx.one("select * from product_subscription where id = ${s}$", {"s": subscription_id})

    async def subscription(self, subscription_id):
        async with self.db.read() as tx:
            s = await self._subscription_row(tx, _id(subscription_id, "subscription_id"))
        if s is None:
            raise NotFound(f"no subscription {subscription_id}")
        return subscription_view(s)

    async def _check_currency(self, tx, customer_id, currency):
        acct = await tx.one("select currency from customer_balance where id = ${c}$", {"c": customer_id})
        if acct is not None and acct.currency != currency:
            raise Conflict(f"the product is priced in {currency}, the account of {customer_id} in {acct.currency}",
                           code="currency_mismatch")

    async def cancel(self, subscription_id, at_period_end=False, reason=None):
        """Cancel now (the quota is no longer usable; no refund), or at the period end (no renewal)."""
        subscription_id = _id(subscription_id, "subscription_id")
        reason = _text(reason, "reason", 255) or "cancelled"

        async def work(tx):
            ns = {"s": subscription_id, "now": clock.now_text(), "why": reason}
            if at_period_end:
                n = await tx.execute("update product_subscription set auto_renew = '0', status_reason = ${why}$, "
                                     "version = version + 1, updated_at = ${now}$ "
                                     "where id = ${s}$ and status = 'active'", ns)
            else:
                n = await tx.execute("update product_subscription set status = 'cancelled', active_key = null, "
                                     "status_reason = ${why}$, cancelled_at = ${now}$, version = version + 1, "
                                     "updated_at = ${now}$ where id = ${s}$ and status = 'active'", ns)
            sub = await self._subscription_row(tx, subscription_id)
            if sub is None:
                raise NotFound(f"no subscription {subscription_id}")
            if n == 0 and not (sub.status == "cancelled" and not at_period_end):
                raise Conflict(f"subscription {subscription_id} is {sub.status}", code="subscription_closed")
            return subscription_view(sub, duplicate=n == 0)
        return await self.db.run(work)

    async def subscriptions(self, customer_id=None, product_id=None, status=None, page=1, rows=20):
        ns = {"c": _id(customer_id, "customer_id", required=False), "p": _id(product_id, "product_id", required=False),
              "st": None if status in (None, "") else _choice(status, "status", SUBSCRIPTION_STATUSES)}
        sql = ("select * from product_subscription where (${c}$ is null or customer_id = ${c}$) "
               "and (${p}$ is null or product_id = ${p}$) and (${st}$ is null or status = ${st}$)")
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, "created_at desc, id desc", page, rows)
        result["rows"] = [subscription_view(s) for s in result["rows"]]
        return result

    async def renew_due(self, limit=100):
        """Renew (or expire) active subscriptions whose period has ended. Each subscription is claimed
        by a conditional update on its version, so two instances never renew one twice; the charge,
        the new period and the quota reset commit together, and a renewal that cannot be paid leaves
        the subscription expired with the ledger untouched. Returns {"renewed", "expired"}."""
        now = clock.now_text()
        async with self.db.read() as tx:
            due = await tx.select("select id, version from product_subscription where status = 'active' "
                                  "and period_end <= ${now}$ order by period_end, id limit ${n}$",
                                  {"now": now, "n": int(limit)})
        done = {"renewed": 0, "expired": 0}
        for sub in due:
            async def work(tx, sub=sub):
                return await self._renew_one(tx, sub.id, int(sub.version), now)
            outcome = await self.db.run(work)
            if outcome:
                done[outcome] += 1
        if due:
            log.info("subscriptions: %d renewed, %d expired", done["renewed"], done["expired"])
        return done

    async def _renew_one(self, tx, sub_id, version, now):
        n = await tx.execute("update product_subscription set version = version + 1, updated_at = ${now}$ "
                             "where id = ${s}$ and version = ${v}$ and status = 'active' and period_end <= ${now}$",
                             {"s": sub_id, "v": version, "now": now})
        if n != 1:
            return None     # another instance claimed it, or it changed since it was listed
        sub = await self._subscription_row(tx, sub_id)
        product = await self._product_row(tx, sub.product_id)
        if sub.auto_renew != "1":
            return await self._expire(tx, sub, now, sub.status_reason or "not renewed")
        if product is None or product.status != "active":
            return await self._expire(tx, sub, now, "product no longer available")
        k = int(sub.renewals) + 1
        start, end = _period(sub.started_at, int(sub.period_months), k)
        price, entry_id = int(sub.package_price), None
        if price > 0:
            try:
                entry = await self.core.ledger.post(
                    tx, sub.customer_id, -price, "subscription", f"renew:{sub.id}:{k}",
                    payload_hash({"op": "renew", "subscription": sub.id, "k": k, "amount": price}),
                    must_cover=True, refuse_suspended=True, ref_type="product_subscription", ref_id=sub.id,
                    reason=f"renew {product.code} {start[:10]}..{end[:10]}")
            except _UNPAID as e:
                # post() refused before writing anything; the claim and the expiry commit together
                return await self._expire(tx, sub, now, f"renewal not paid: {e.code}")
            entry_id = entry.id
        await tx.execute("update product_subscription set period_start = ${ps}$, period_end = ${pe}$, "
                         "used_quantity = 0, renewals = ${k}$, ledger_entry_id = coalesce(${e}$, ledger_entry_id), "
                         "updated_at = ${now}$ where id = ${s}$",
                         {"ps": start, "pe": end, "k": k, "e": entry_id, "now": now, "s": sub.id})
        return "renewed"

    async def _expire(self, tx, sub, now, reason):
        await tx.execute("update product_subscription set status = 'expired', active_key = null, "
                         "status_reason = ${why}$, updated_at = ${now}$ where id = ${s}$",
                         {"s": sub.id, "why": reason[:255], "now": now})
        return "expired"

    # --- quota ------------------------------------------------------------------------------------------
    async def _covering(self, tx, customer_id, at, product_id=None, llmid=None, model_name=None):
        return await tx.one(_COVERING_SQL, {"c": customer_id, "at": at, "pid": product_id, "llm": llmid,
                                            "mname": model_name})

    async def _lock_quota(self, tx, sub_id, at):
        """The subscription's quota row, locked until the transaction ends; None if it stopped covering."""
        return await tx.one("select id, included_quantity, used_quantity from product_subscription "
                            "where id = ${s}$ and status = 'active' and period_start <= ${at}$ and period_end > ${at}$"
                            + tx.for_update(), {"s": sub_id, "at": at})

    async def _take_quota(self, tx, sub_id, q):
        # the condition keeps the quota exact even without the lock; the row count proves it held
        n = await tx.execute("update product_subscription set used_quantity = used_quantity + ${q}$, "
                             "updated_at = ${now}$ where id = ${s}$ and status = 'active' "
                             "and used_quantity + ${q}$ <= included_quantity",
                             {"q": q, "s": sub_id, "now": clock.now_text()})
        if n != 1:
            raise Conflict("the subscription's quota changed during the use; send it again")

    @staticmethod
    def _split(locked, q):
        """(included part, overage part) of ``q`` against the locked quota row."""
        if locked is None:
            return 0, q
        take = min(q, max(0, int(locked.included_quantity) - int(locked.used_quantity)))
        return take, q - take

    async def check_quota(self, customer_id, product_id):
        """Included, used and remaining quantity in the current period, and what happens past it."""
        customer_id, product_id = _id(customer_id, "customer_id"), _id(product_id, "product_id")
        now = clock.now_text()
        async with self.db.read() as tx:
            product = await self._require_product(tx, product_id)
            cov = await self._covering(tx, customer_id, now, product_id=product_id)
            sub = await self._subscription_row(tx, cov.id) if cov else None
        over = None if product.overage_price is None else from_micro(int(product.overage_price))
        result = {"customer_id": customer_id, "product_id": product_id, "unit": product.quantity_unit,
                  "subscribed": sub is not None, "overage_price": over, "price_per": str(int(product.price_per)),
                  "currency": product.currency}
        if sub is None:
            result.update(included="0", used="0", remaining="0", subscription_id=None,
                          past_quota="pay_as_you_go" if over is not None and product.status == "active" else "refused")
            return result
        view = subscription_view(sub)
        result.update({k: view[k] for k in ("subscription_id", "included", "used", "remaining", "period_start",
                                            "period_end", "auto_renew", "status")},
                      unit=sub.quantity_unit, past_quota="overage" if over is not None else "refused")
        return result

    # --- consumption ------------------------------------------------------------------------------------
    async def product_use(self, customer_id, user_id, product_id, amount, unit=None, source_ref_table=None,
                          source_ref_id=None, product_resource_id=None):
        """Consume ``amount`` units of a product: quota first, the rest charged to the balance at the
        product's overage price (ledger entry 'overage'), one usage log row; all in one transaction.
        Idempotent on (source_ref_table, source_ref_id)."""
        customer_id, product_id = _id(customer_id, "customer_id"), _id(product_id, "product_id")
        user_id = _id(user_id, "user_id")
        q = _quantity(amount, "amount", positive=True)
        unit = _id(unit, "unit", required=False)
        table = _id(source_ref_table, "source_ref_table", max_len=64)
        ref = _id(source_ref_id, "source_ref_id")
        binding_id = _id(product_resource_id, "product_resource_id", required=False)
        if table == HOOK_SOURCE_TABLE:
            raise InvalidParam(f"source_ref_table: {HOOK_SOURCE_TABLE} is reserved for accounted usage events")
        key = f"{table}:{ref}"
        phash = payload_hash({"op": "product_use", "key": key, "customer_id": customer_id, "product_id": product_id,
                              "amount": q})

        async def work(tx):
            existing = await self._usage_by_key(tx, key)
            if existing is not None:
                return _replay_use(existing, customer_id, product_id, q, key)
            product = await self._require_product(tx, product_id)
            if unit is not None and unit != product.quantity_unit:
                raise InvalidParam(f"unit: product {product_id} is used in {product.quantity_unit}, not {unit}")
            if binding_id is not None:
                b = await self._binding(tx, binding_id)
                if b is None or b.product_id != product_id:
                    raise InvalidParam(f"product_resource_id: {binding_id} is not a binding of {product_id}")
            now = clock.now_text()
            cov = await self._covering(tx, customer_id, now, product_id=product_id)
            locked = await self._lock_quota(tx, cov.id, now) if cov else None
            take, over = self._split(locked, q)
            if locked is None and product.status != "active":
                raise NotSubscribed(f"product {product_id} is not available without a subscription")
            charge = 0
            if over:
                if product.overage_price is None:
                    if locked is None:
                        raise NotSubscribed(f"customer {customer_id} has no active subscription to {product_id}")
                    raise QuotaExceeded(f"the quota of subscription {locked.id} has {_qtext(take)} "
                                        f"{product.quantity_unit} left and the product allows no overage")
                charge = _div_half_up(over * int(product.overage_price), int(product.price_per) * QSCALE)
            if take:
                await self._take_quota(tx, locked.id, take)
            usage_id, entry_id = new_id(), None
            if charge > 0:
                await self._check_currency(tx, customer_id, product.currency)
                entry = await self.core.ledger.post(
                    tx, customer_id, -charge, "overage", _ledger_key(key), phash, must_cover=True,
                    refuse_suspended=True, ref_type="product_usage_log", ref_id=usage_id,
                    reason=f"{product.code} {_qtext(over)} {product.quantity_unit} past quota" if locked
                    else f"{product.code} {_qtext(over)} {product.quantity_unit}")
                entry_id = entry.id
            mode = MODE_INCLUDED if not over else (MODE_OVERAGE if locked else MODE_PAYG)
            supplier = await self._route(tx, product_id, binding_id)
            row = self._usage_row(
                usage_id, product, customer_id, user_id, locked.id if locked else None, supplier, q, take, over,
                product.quantity_unit, charge, self._supplier_cost(supplier, q), mode, table, ref, key, now, entry_id)
            if supplier is None and binding_id is not None:
                b = await self._binding(tx, binding_id)
                row.update(product_resource_id=b.id, resource_type=b.resource_type, resource_ref_id=b.resource_ref_id)
            await tx.insert("product_usage_log", row)
            return usage_view(DictObject(**row))
        # the same source reference may be used concurrently and commit first
        result, existing = await self.db.run_or_existing(work, lambda tx: self._usage_by_key(tx, key),
                                               f"usage {key} collided with another request; send it again")
        return result if existing is None else _replay_use(existing, customer_id, product_id, q, key)

    async def _usage_by_key(self, tx, key):
        return await tx.one("select * from product_usage_log where idempotency_key = ${k}$", {"k": key})

    @staticmethod
    def _supplier_cost(supplier, q):
        """Supplier cost in micro-units of ``q`` (1e-4 units) at the supplier's 1e-8 unit cost, half-up."""
        if supplier is None:
            return 0
        return _div_half_up(q * int(supplier.unit_cost), QSCALE * COST_PER_MICRO)

    @staticmethod
    def _usage_row(usage_id, product, customer_id, user_id, sub_id, supplier, q, take, over, unit, charge, cost,
                   mode, table, ref, key, use_time, entry_id):
        return {
            "id": usage_id, "product_id": product.id, "subscription_id": sub_id, "user_id": user_id,
            "user_org_id": customer_id,
            "product_resource_id": supplier.product_resource_id if supplier else None,
            "supplier_org_id": supplier.supplier_org_id if supplier else None,
            "resource_type": supplier.resource_type if supplier else None,
            "resource_ref_id": supplier.resource_ref_id if supplier else None,
            "used_amount": _qdb(q), "used_unit": unit, "unit_cost": int(supplier.unit_cost) if supplier else 0,
            "total_cost": cost, "sell_price": charge, "billing_mode": mode, "source_ref_table": table,
            "source_ref_id": ref, "use_time": use_time, "created_at": clock.now_text(), "idempotency_key": key,
            "included_amount": _qdb(take), "overage_amount": _qdb(over), "currency": product.currency,
            "ledger_entry_id": entry_id,
        }

    # --- the accounting hook --------------------------------------------------------------------------
    async def subscribed_customers(self, tx, customer_ids):
        """Which of ``customer_ids`` have an active subscription at all: one query for a whole
        batch, so the accountant calls the quota hook only for events that may be covered."""
        ids = sorted(set(customer_ids))
        if not ids:
            return set()
        ns = {}
        rows = await tx.select(f"select distinct customer_id from product_subscription where status = 'active' "
                               f"and customer_id in {tx.in_list(ids, ns)}", ns)
        return {r.customer_id for r in rows}

    async def quota_hook(self, tx, ev, price, record_id):
        """Accounting's quota hook: an LLM event covered by an active subscription of its customer
        (through an 'llm' binding of its model, or its product_id) consumes quota first; the
        returned charge is the overage part's share of ``price.amount``, rounded half-up. None when
        the event is not covered; accounting then charges the full price.

        The batch accountant commits its transaction even when it refuses some events' charges, so
        this hook writes nothing for an event whose charge cannot pass (it returns None, and the
        full price is refused the same way), and an event whose reservation outlived a refusal
        reuses it when it is accounted again (one reservation per accounting record)."""
        key = f"{HOOK_SOURCE_TABLE}:{record_id}"
        reserved = await self._usage_by_key(tx, key)
        if reserved is not None:
            return await self._hook_replay(tx, reserved, price)
        at = ev.use_time or clock.now_text()
        cov = await self._covering(tx, ev.customer_id, at, product_id=ev.product_id, llmid=ev.llmid,
                                   model_name=None if ev.llmid else ev.payload.get("model_name"))
        if cov is None:
            return None
        q = _event_quantity(ev.usage, cov.quantity_unit)
        if q <= 0:
            return None
        locked = await self._lock_quota(tx, cov.id, at)
        if locked is None:
            return None
        take, over = self._split(locked, q)
        charge = _div_half_up(int(price.amount) * over, q)
        if not await self.core.ledger.can_cover(tx, ev.customer_id, charge,
                                                allow_arrears=self.config.accounting.allow_arrears):
            return None
        if take:
            await self._take_quota(tx, cov.id, take)
        product = await self._product_row(tx, cov.product_id)
        supplier = await self._route(tx, cov.product_id, cov.product_resource_id)
        cost = self._supplier_cost(supplier, q) if supplier else int(price.cost or 0)
        row = self._usage_row(
            new_id(), product, ev.customer_id, ev.user_id or ev.customer_id, cov.id, supplier, q, take, over,
            cov.quantity_unit, charge, cost, MODE_OVERAGE if over else MODE_INCLUDED, HOOK_SOURCE_TABLE, record_id,
            key, at, None)
        if supplier is None and cov.product_resource_id:
            row.update(product_resource_id=cov.product_resource_id, resource_type="llm",
                       resource_ref_id=cov.resource_ref_id)
        row["currency"] = price.currency or product.currency
        await tx.insert("product_usage_log", row)
        return QuotaResult(charge, cov.id, Decimal(take).scaleb(-4), Decimal(over).scaleb(-4), row["id"])

    async def _hook_replay(self, tx, row, price):
        """The reservation an earlier attempt of this record made: the same split, the overage
        priced at this attempt's price."""
        q, over = _q_from_db(row.used_amount), _q_from_db(row.overage_amount)
        charge = _div_half_up(int(price.amount) * over, q)
        if charge != _int_from_db(row.sell_price):
            await tx.execute("update product_usage_log set sell_price = ${sp}$ where id = ${u}$",
                             {"sp": charge, "u": row.id})
        return QuotaResult(charge, row.subscription_id, Decimal(q - over).scaleb(-4), Decimal(over).scaleb(-4),
                           row.id)

    async def release_quota(self, tx, record_id):
        """Undo, inside the accountant's transaction, the reservation the hook made for an
        accounting record whose charge was then refused: the quota goes back and the usage row
        goes. Returns whether there was one."""
        row = await self._usage_by_key(tx, f"{HOOK_SOURCE_TABLE}:{record_id}")
        if row is None:
            return False
        included = _q_from_db(row.included_amount)
        if included and row.subscription_id:
            await tx.execute("update product_subscription set used_quantity = used_quantity - ${q}$, "
                             "updated_at = ${now}$ where id = ${s}$ and used_quantity >= ${q}$",
                             {"q": included, "s": row.subscription_id, "now": clock.now_text()})
        await tx.execute("delete from product_usage_log where id = ${u}$", {"u": row.id})
        return True

    # --- reports ----------------------------------------------------------------------------------------
    def _usage_filter(self, customer_id=None, product_id=None, subscription_id=None, billing_mode=None,
                      supplier_org_id=None, start=None, end=None, overage_only=False):
        ns = {"c": _id(customer_id, "customer_id", required=False), "p": _id(product_id, "product_id", required=False),
              "s": _id(subscription_id, "subscription_id", required=False),
              "m": None if billing_mode in (None, "") else _choice(billing_mode, "billing_mode", tuple(BILLING_MODES)),
              "sup": _id(supplier_org_id, "supplier_org_id", required=False),
              "t0": _bound(start, "start"), "t1": _bound(end, "end", end=True), "ov": "1" if overage_only else "0"}
        if ns["t0"] and ns["t1"] and ns["t0"] >= ns["t1"]:
            raise InvalidParam("start: must be before end")
        where = ("(${c}$ is null or l.user_org_id = ${c}$) and (${p}$ is null or l.product_id = ${p}$) "
                 "and (${s}$ is null or l.subscription_id = ${s}$) and (${m}$ is null or l.billing_mode = ${m}$) "
                 "and (${sup}$ is null or l.supplier_org_id = ${sup}$) "
                 "and (${t0}$ is null or l.use_time >= ${t0}$) and (${t1}$ is null or l.use_time < ${t1}$) "
                 "and (${ov}$ = '0' or l.billing_mode in ('2', '3'))")
        return where, ns

    async def usage_list(self, page=1, rows=20, **filters):
        where, ns = self._usage_filter(**filters)
        async with self.db.read() as tx:
            result = await tx.page(f"select l.* from product_usage_log l where {where}", ns,
                                   "l.use_time desc, l.id desc", page, rows)
        result["rows"] = [usage_view(r) for r in result["rows"]]
        return result

    async def overage(self, customer_id=None, product_id=None, start=None, end=None, page=1, rows=20):
        """Usage charged beyond a quota or without one, with its total and the product's price."""
        where, ns = self._usage_filter(customer_id=customer_id, product_id=product_id, start=start, end=end,
                                       overage_only=True)
        async with self.db.read() as tx:
            total = await tx.scalar(f"select coalesce(sum(l.sell_price), 0) as s from product_usage_log l "
                                    f"where {where}", ns)
            result = await tx.page(f"select l.* from product_usage_log l where {where}", ns,
                                   "l.use_time desc, l.id desc", page, rows)
            product = await self._require_product(tx, ns["p"]) if ns["p"] else None
        result["rows"] = [usage_view(r) for r in result["rows"]]
        result["total_charged"] = from_micro(_int_from_db(total))
        if product is not None:
            result["price"] = {k: v for k, v in product_view(product).items()
                               if k in ("product_id", "quantity_unit", "overage_price", "price_per", "currency")}
        return result

    async def stats(self, group_by="product", start=None, end=None, customer_id=None, product_id=None,
                    supplier_org_id=None):
        """Usage, supplier cost, revenue (what the usage charged) and margin, by product, supplier,
        customer or day, from SQL aggregates. Package fees are ledger 'subscription' entries and are
        not part of usage revenue. Quantities are per unit, since units differ between products."""
        group_by = _choice(group_by, "group_by", STATS_GROUPS, "product")
        where, ns = self._usage_filter(customer_id=customer_id, product_id=product_id,
                                       supplier_org_id=supplier_org_id, start=start, end=end)
        key = {"product": "l.product_id", "supplier": "coalesce(l.supplier_org_id, '')",
               "customer": "l.user_org_id", "day": dialects.substr_date(self.db.dialect, "l.use_time")}[group_by]
        # round(x * 10000) turns decimal(15,4) into exact integers (SQLite stores them as floats)
        sql = (f"select {key} as k, l.used_unit as unit, count(*) as uses, "
               "sum(round(l.used_amount * 10000)) as q, sum(round(coalesce(l.included_amount, 0) * 10000)) as qi, "
               "sum(round(coalesce(l.overage_amount, 0) * 10000)) as qo, sum(l.total_cost) as cost, "
               "sum(l.sell_price) as revenue "
               f"from product_usage_log l where {where} group by {key}, l.used_unit order by 1, 2")
        async with self.db.read() as tx:
            rows = await tx.select(sql, ns)
        groups, totals = {}, {"uses": 0, "cost": 0, "revenue": 0}
        for r in rows:
            g = groups.setdefault(r.k, {"key": r.k, "uses": 0, "cost": 0, "revenue": 0, "quantities": []})
            uses, cost, revenue = int(r.uses), _int_from_db(r.cost), _int_from_db(r.revenue)
            g["uses"] += uses
            g["cost"] += cost
            g["revenue"] += revenue
            g["quantities"].append({"unit": r.unit, "amount": _qtext(_int_from_db(r.q)),
                                    "included": _qtext(_int_from_db(r.qi)), "overage": _qtext(_int_from_db(r.qo))})
            totals["uses"] += uses
            totals["cost"] += cost
            totals["revenue"] += revenue
        return {"group_by": group_by, "rows": [_money_stats(g) for g in groups.values()],
                "totals": _money_stats(dict(totals))}


def _money_stats(g):
    margin = g["revenue"] - g["cost"]
    rate = None
    if g["revenue"]:
        rate = str((Decimal(margin) / Decimal(g["revenue"])).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP))
    return dict(g, cost=from_micro(g["cost"]), revenue=from_micro(g["revenue"]), margin=from_micro(margin),
                margin_rate=rate)


def _event_quantity(usage, unit):
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


def _replay_subscription(existing, phash, request_id):
    if existing.payload_hash != phash:
        raise Conflict(f"request_id {request_id} was already used for a different subscription")
    return subscription_view(existing, duplicate=True)


def _replay_use(existing, customer_id, product_id, q, key):
    if (existing.user_org_id, existing.product_id, _q_from_db(existing.used_amount)) != (customer_id, product_id, q):
        raise Conflict(f"usage {key} was already recorded with a different customer, product or amount")
    return usage_view(existing, duplicate=True)
