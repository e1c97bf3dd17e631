"""Subscriptions: a customer buys a product's plan for a period (the package price is charged to
the balance, ledger entry 'subscription'), renews it each period or lets it expire, cancels it;
and what a subscription's quota has left.

Renewals claim their row with a conditional UPDATE on ``version``; only the instance whose update
matched renews it, and a renewal that cannot be paid leaves the subscription expired with the
ledger untouched."""
import logging
from collections.abc import Callable
from typing import Any

from appPublic.dictObject import DictObject

from .. import clock, validation
from ..db.database import Tx
from ..db.schema import refresh_derived
from ..errors import Conflict, NotFound
from ..ids import new_id, payload_hash
from ..money import from_micro
from ..validation import flag
from . import quota
from .catalogue import Catalogue
from .values import (
    MAX_PERIOD_MONTHS,
    SUBSCRIPTION_STATUSES,
    UNPAID,
    choice,
    count,
    ident,
    local_date,
    local_start,
    period,
    period_index,
    quantity,
    text,
)
from .views import Row, subscription_view

log = logging.getLogger("billing_module.products")


async def check_currency(tx: Tx, customer_id: str, currency: str) -> None:
    """A charge in ``currency`` must be in the currency of the customer's account (if it has one)."""
    acct = await tx.one("select currency from customer_balance where id = ${c}$", {"c": customer_id})
    if acct is not None and acct.currency != currency:
        raise Conflict(f"the product is priced in {currency}, the account of {customer_id} in {acct.currency}",
                       code="currency_mismatch")


async def recount(tx: Tx, customer_id: str) -> None:
    """The balance row's count of active subscriptions, in the transaction that changed one: a
    charge consults the quota hook only when it is > 0 (``Accounting._charge``)."""
    await tx.execute(refresh_derived("customer_balance", ["subscription_count"], "id = ${c}$"), {"c": customer_id})


class Subscriptions:
    def __init__(self, db, ledger, catalogue: Catalogue, timezone: str = "UTC"):
        self.db = db
        self.ledger = ledger
        self.catalogue = catalogue
        self.timezone = timezone      # periods start at local midnight and are labelled in this zone

    async def subscribe(self, customer_id: object, product_id: object, request_id: object, user_id: object = None,
                        included_quantity: object = None, package_price: object = None, period_months: object = None,
                        auto_renew: object = True, operator: object = None) -> dict[str, Any]:
        """Subscribe a customer to a product and charge the first period's package price (ledger entry
        'subscription', must be covered). The plan is the product's unless given (admin). Idempotent on
        ``request_id``; one active subscription per customer and product."""
        customer_id = ident(customer_id, "customer_id")
        product_id = ident(product_id, "product_id")
        request_id = ident(request_id, "request_id", max_len=60)   # the ledger key adds 'sub:'
        user_id = ident(user_id, "user_id", required=False)
        plan = {
            "included": None if included_quantity in (None, "") else quantity(included_quantity, "included_quantity"),
            "price": validation.amount(package_price, "package_price", required=False, non_negative=True),
            "months": None if period_months in (None, "") else count(period_months, "period_months", 1,
                                                                        MAX_PERIOD_MONTHS),
        }
        auto = flag(auto_renew, "auto_renew", "1")
        phash = payload_hash({"op": "subscribe", "customer_id": customer_id, "product_id": product_id,
                              "plan": plan, "auto_renew": auto})

        async def work(tx):
            existing = await self._subscription_by_request(tx, request_id)
            if existing is not None:
                return _replay_subscription(existing, phash, request_id)
            product = await self.catalogue.require_product(tx, product_id)
            if product.status != "active":
                raise Conflict(f"product {product_id} is not available for subscription", code="product_disabled")
            active_key = f"{customer_id}:{product_id}"
            if await tx.one("select id from product_subscription where active_key = ${k}$", {"k": active_key}):
                raise Conflict(f"customer {customer_id} already has an active subscription to {product_id}",
                               code="already_subscribed")
            now = clock.now_text()
            months = plan["months"] or int(product.period_months)
            price = int(product.list_price) if plan["price"] is None else plan["price"]
            start, end = period(local_start(now, self.timezone, product.period_anchor), months, 0, self.timezone)
            sub = {
                "id": new_id(), "customer_id": customer_id, "user_id": user_id, "product_id": product_id,
                "request_id": request_id, "payload_hash": phash, "active_key": active_key, "status": "active",
                "included_quantity": int(product.included_quantity) if plan["included"] is None else plan["included"],
                "used_quantity": 0, "quantity_unit": product.quantity_unit, "package_price": price,
                "currency": product.currency, "period_months": months, "started_at": start, "period_start": start,
                "period_end": end, "renewals": 0, "auto_renew": auto, "status_reason": None, "cancelled_at": None,
                "ledger_entry_id": None, "skipped_periods": 0, "version": 0, "created_at": now, "updated_at": now,
            }
            if price > 0:
                await check_currency(tx, customer_id, product.currency)
                entry = await self.ledger.post(
                    tx, customer_id, -price, "subscription", f"sub:{request_id}", phash, must_cover=True,
                    refuse_suspended=True, ref_type="product_subscription", ref_id=sub["id"],
                    reason=f"subscribe {product.code} {self._label(start, end)}", operator=operator)
                sub["ledger_entry_id"] = entry.id
            await tx.insert("product_subscription", sub)
            await recount(tx, customer_id)
            return subscription_view(DictObject(**sub))
        # a concurrent subscribe may commit first: the same request (a replay) or another one
        result, existing = await self.db.run_or_existing(
            work, lambda tx: self._subscription_by_request(tx, request_id),
            Conflict(f"customer {customer_id} already has an active subscription to {product_id}",
                     code="already_subscribed"))
        return result if existing is None else _replay_subscription(existing, phash, request_id)

    async def _subscription_by_request(self, tx, request_id):
        return await tx.one("select * from product_subscription where request_id = ${r}$", {"r": request_id})

    async def subscription_row(self, tx: Tx, subscription_id: str) -> Row | None:
        return await tx.one("select * from product_subscription where id = ${s}$", {"s": subscription_id})

    async def subscription(self, subscription_id: object) -> dict[str, Any]:
        async with self.db.read() as tx:
            s = await self.subscription_row(tx, ident(subscription_id, "subscription_id"))
        if s is None:
            raise NotFound(f"no subscription {subscription_id}")
        return subscription_view(s)

    async def cancel(self, subscription_id: object, at_period_end: object = False,
                     reason: object = None) -> dict[str, Any]:
        """Cancel now (the quota is no longer usable; no refund), or at the period end (no renewal;
        ``resume`` undoes it before the period ends). Idempotent: a second cancel changes nothing,
        keeps the first reason and answers ``duplicate: true``."""
        reason = text(reason, "reason", 255) or "cancelled"
        if at_period_end:
            # cancelled_at marks the cancel, so a repeat is recognised as one (and resume can undo it)
            sql = ("update product_subscription set auto_renew = '0', status_reason = ${why}$, "
                   "cancelled_at = ${now}$, version = version + 1, updated_at = ${now}$ "
                   "where id = ${s}$ and status = 'active' and cancelled_at is null")
        else:
            sql = ("update product_subscription set status = 'cancelled', active_key = null, "
                   "status_reason = case when cancelled_at is null then ${why}$ else status_reason end, "
                   "cancelled_at = coalesce(cancelled_at, ${now}$), version = version + 1, updated_at = ${now}$ "
                   "where id = ${s}$ and status = 'active'")
        return await self._transition(
            subscription_id, sql, {"why": reason},
            repeat=lambda sub: bool(sub.status == "cancelled" or (at_period_end and sub.status == "active")),
            refusal=lambda sub: f"subscription {sub.id} is {sub.status}", ends=not at_period_end)

    async def resume(self, subscription_id: object) -> dict[str, Any]:
        """Undo a cancel at the period end while the period lasts: the subscription renews again.
        Resuming one that is not cancelled changes nothing (``duplicate: true``)."""
        return await self._transition(
            subscription_id,
            "update product_subscription set auto_renew = '1', status_reason = null, cancelled_at = null, "
            "version = version + 1, updated_at = ${now}$ where id = ${s}$ and status = 'active' "
            "and cancelled_at is not null and period_end > ${now}$", {},
            repeat=lambda sub: sub.status == "active" and sub.cancelled_at is None,
            refusal=lambda sub: f"subscription {sub.id} is {sub.status}, its period ends {sub.period_end}: "
                                "it cannot be resumed")

    async def _transition(self, subscription_id: object, update_sql: str, values: dict[str, Any],
                          repeat: Callable[[Row], bool], refusal: Callable[[Row], str],
                          ends: bool = False) -> dict[str, Any]:
        """Run one state change of a subscription: ``update_sql`` matched no row and ``repeat(sub)``
        holds -> the change was made before (``duplicate: true``); otherwise a 409. ``ends``: the
        change ends the subscription (its customer's count of active ones changes)."""
        subscription_id = ident(subscription_id, "subscription_id")

        async def work(tx):
            n = await tx.execute(update_sql, dict(values, s=subscription_id, now=clock.now_text()))
            sub = await self.subscription_row(tx, subscription_id)
            if sub is None:
                raise NotFound(f"no subscription {subscription_id}")
            if n == 0 and not repeat(sub):
                raise Conflict(refusal(sub), code="subscription_closed")
            if n and ends:
                await recount(tx, sub.customer_id)
            return subscription_view(sub, duplicate=n == 0)
        return await self.db.run(work)

    async def subscriptions(self, customer_id: object = None, product_id: object = None, status: object = None,
                            page: object = 1, rows: object = 20) -> dict[str, Any]:
        ns = {"c": ident(customer_id, "customer_id", required=False),
              "p": ident(product_id, "product_id", required=False),
              "st": choice(status, "status", SUBSCRIPTION_STATUSES, required=False)}
        page, rows = validation.page(page, rows)
        # with the product's name and status: a disabled product's subscriptions are listed too
        sql = ("select s.*, p.product_name, p.status as product_status from product_subscription s "
               "left join product p on p.id = s.product_id where (${c}$ is null or s.customer_id = ${c}$) "
               "and (${p}$ is null or s.product_id = ${p}$) and (${st}$ is null or s.status = ${st}$)")
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, "s.created_at desc, s.id desc", page, rows)
        result["rows"] = [dict(subscription_view(s), product_name=s.product_name, product_status=s.product_status)
                          for s in result["rows"]]
        return result

    async def renew_due(self, limit: int = 100) -> dict[str, int]:
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

    async def renew_in(self, tx: Tx, due: Row, at: str) -> str | None:
        """Renew (or expire) the due subscription ``due`` inside the caller's transaction, the same
        claim and renewal the sweep makes: a use at or after the period end renews it first."""
        return await self._renew_one(tx, due.id, int(due.version), at)

    async def _renew_one(self, tx, sub_id, version, now):
        n = await tx.execute("update product_subscription set version = version + 1, updated_at = ${now}$ "
                             "where id = ${s}$ and version = ${v}$ and status = 'active' and period_end <= ${now}$",
                             {"s": sub_id, "v": version, "now": now})
        if n != 1:
            return None     # another instance claimed it, or it changed since it was listed
        sub = await self.subscription_row(tx, sub_id)
        assert sub is not None, f"subscription {sub_id} was updated just above"
        product = await self.catalogue.product_row(tx, sub.product_id)
        if sub.auto_renew != "1":
            return await self._expire(tx, sub, now, sub.status_reason or "not renewed")
        if product is None or product.status != "active":
            return await self._expire(tx, sub, now, "product no longer available")
        # a late renewal starts the period that contains now: the periods that passed are skipped, not billed
        k = max(int(sub.renewals) + 1, period_index(sub.started_at, int(sub.period_months), now, self.timezone))
        skipped = k - int(sub.renewals) - 1
        start, end = period(sub.started_at, int(sub.period_months), k, self.timezone)
        price, entry_id = int(sub.package_price), None
        if price > 0:
            try:
                entry = await self.ledger.post(
                    tx, sub.customer_id, -price, "subscription", f"renew:{sub.id}:{k}",
                    payload_hash({"op": "renew", "subscription": sub.id, "k": k, "amount": price}),
                    must_cover=True, refuse_suspended=True, ref_type="product_subscription", ref_id=sub.id,
                    reason=f"renew {product.code} {self._label(start, end)}"
                    + (f" ({skipped} passed period(s) skipped)" if skipped else ""))
            except UNPAID as e:
                # post() refused before writing anything; the claim and the expiry commit together
                return await self._expire(tx, sub, now, f"renewal not paid: {e.code}")
            entry_id = entry.id
        await tx.execute("update product_subscription set period_start = ${ps}$, period_end = ${pe}$, "
                         "used_quantity = 0, renewals = ${k}$, skipped_periods = skipped_periods + ${sk}$, "
                         "ledger_entry_id = coalesce(${e}$, ledger_entry_id), updated_at = ${now}$ where id = ${s}$",
                         {"ps": start, "pe": end, "k": k, "sk": skipped, "e": entry_id, "now": now, "s": sub.id})
        if skipped:
            log.info("subscription %s renewed late: %d passed period(s) skipped", sub.id, skipped)
        return "renewed"

    def _label(self, start: str, end: str) -> str:
        """A period as its dates in the configured time zone ('2026-12-01..2027-01-01')."""
        return f"{local_date(start, self.timezone)}..{local_date(end, self.timezone)}"

    async def _expire(self, tx, sub, now, reason):
        await tx.execute("update product_subscription set status = 'expired', active_key = null, "
                         "status_reason = ${why}$, updated_at = ${now}$ where id = ${s}$",
                         {"s": sub.id, "why": reason[:255], "now": now})
        await recount(tx, sub.customer_id)
        return "expired"

    # --- quota -----------------------------------------------------------------------------------------
    async def check_quota(self, customer_id: object, product_id: object) -> dict[str, Any]:
        """Included, used and remaining quantity in the current period, and what happens past it."""
        customer_id, product_id = ident(customer_id, "customer_id"), ident(product_id, "product_id")
        now = clock.now_text()

        async def renew_first(tx):
            # a subscription whose period ended renews now, as a use would renew it: no gap
            due = await quota.due(tx, customer_id, now, product_id=product_id)
            if due is not None:
                await self.renew_in(tx, due, now)
        await self.db.run(renew_first)
        async with self.db.read() as tx:
            product = await self.catalogue.require_product(tx, product_id)
            cov = await quota.covering(tx, customer_id, now, product_id=product_id)
            sub = await self.subscription_row(tx, cov.id) if cov else None
        over = None if product.overage_price is None else from_micro(int(product.overage_price))
        result = {"customer_id": customer_id, "product_id": product_id, "unit": product.quantity_unit,
                  "subscribed": sub is not None, "overage_price": over, "price_per": str(int(product.price_per)),
                  "currency": product.currency,
                  # what accounted model usage past the quota is charged: one price with product_use
                  "model_usage_past_quota": "overage_price" if over is not None else "model_price"}
        if sub is None:
            result.update(included="0", used="0", remaining="0", subscription_id=None,
                          past_quota="pay_as_you_go" if over is not None and product.status == "active" else "refused")
            return result
        view = subscription_view(sub)
        result.update({k: view[k] for k in ("subscription_id", "included", "used", "remaining", "period_start",
                                            "period_end", "auto_renew", "status")},
                      unit=sub.quantity_unit, past_quota="overage" if over is not None else "refused")
        return result


def _replay_subscription(existing, phash, request_id):
    if existing.payload_hash != phash:
        raise Conflict(f"request_id {request_id} was already used for a different subscription")
    return subscription_view(existing, duplicate=True)
