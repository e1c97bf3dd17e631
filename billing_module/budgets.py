"""Budgets: spend limits per organisation (``org``), user (``user``) or API key (``key``), in
money (micro-units, the customer's currency), per calendar ``day`` / ``week`` (ISO, from Monday)
/ ``month`` in the configured ``timezone``.

Spend is kept per (budget, period start) in ``billing_budget_spend``: a new period has no row yet,
so it starts at 0 with no reset job that could be missed. Every debit of a customer (a usage
charge, a product use's overage, a hold) calls ``spend`` inside the transaction of the debit: one
conditional UPDATE per applicable budget, ``spent + amt <= limit``, whose row count is checked
(the balance's pattern, never a read-check-write). A refusal raises ``BudgetExceeded`` and the
caller's transaction rolls back, the debit with it. A customer without budgets pays nothing for
them: its balance row's ``budget_count`` (recounted by ``set_budget`` in its transaction) is 0,
and the debit's own conditional update checks that (``Ledger.post``; a batch reads it with its
accounts), so ``spend`` runs only for customers that have budgets.

Holds reserve: ``spend`` at authorize (its charges remembered in ``billing_budget_hold``),
``settle_hold`` moves the reservation to the settled amount, ``release_hold`` (release, expiry)
gives it back, all in the hold's own period.
"""
from __future__ import annotations

import datetime
import logging
import zoneinfo
from dataclasses import dataclass
from typing import Any, Protocol

from . import clock, validation
from .config import Config
from .db import dialect as dialects
from .db.database import Database, Row, Tx, where
from .db.schema import refresh_derived
from .errors import BillingError, DatabaseUnavailable, InvalidParam, NotFound
from .ids import new_id
from .money import from_micro

log = logging.getLogger("billing_module.budgets")

SCOPES = ("org", "user", "key")
PERIODS = ("day", "week", "month")
ALERT_LEVELS = ((100, "budget_100"), (80, "budget_80"))   # percent of the limit, highest first


class BudgetExceeded(BillingError):
    """A debit would take a budget's spend in its current period past its limit."""
    status, code = 402, "budget_exceeded"


class AlertSink(Protocol):
    """Where budget alerts go (the alert outbox): written in the caller's transaction, so an alert
    exists exactly when the spend that triggered it committed."""

    async def emit(self, tx: Tx, type: str, customer_id: str, data: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Spender:
    """Who a debit is charged to, for the budgets that apply: the organisation always, the user
    and the API key when the debit names them."""
    customer_id: str
    user_id: str | None = None
    key_id: str | None = None


# what ``spend`` charged: (budget id, period start, amount), to be undone or moved later
Charges = list[tuple[str, str, int]]


def period_bounds(period: str, utc: datetime.datetime, time_zone: str) -> tuple[str, str]:
    """(start, end) of the calendar ``period`` holding the naive UTC time ``utc``, as UTC time
    text: the local midnights in ``time_zone`` (a week starts on Monday)."""
    tz = zoneinfo.ZoneInfo(time_zone)
    local = utc.replace(tzinfo=datetime.timezone.utc).astimezone(tz).date()
    if period == "day":
        start, end = local, local + datetime.timedelta(days=1)
    elif period == "week":
        start = local - datetime.timedelta(days=local.weekday())
        end = start + datetime.timedelta(days=7)
    elif period == "month":
        start = local.replace(day=1)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    else:
        raise InvalidParam(f"period: one of {', '.join(PERIODS)}")

    def utc_text(day: datetime.date) -> str:
        midnight = datetime.datetime.combine(day, datetime.time(), tzinfo=tz)
        return clock.fmt(midnight.astimezone(datetime.timezone.utc))
    return utc_text(start), utc_text(end)


def _level(spent: int, limit: int) -> int:
    """The highest alert level (percent) ``spent`` has reached, 0 below the lowest."""
    for percent, _ in ALERT_LEVELS:
        if spent * 100 >= limit * percent:
            return percent
    return 0


_APPLICABLE = ("select id, customer_id, scope, subject_id, period, limit_amount from billing_budget "
               "where customer_id = ${c}$ and (scope = 'org' or (scope = 'user' and subject_id = ${u}$) "
               "or (scope = 'key' and subject_id = ${k}$)) order by id")
_SPEND = ("update billing_budget_spend set spent = spent + ${amt}$, updated_at = ${now}$ "
          "where budget_id = ${b}$ and period_start = ${ps}$ and spent + ${amt}$ <= ${lim}$")
_MOVE = ("update billing_budget_spend set spent = spent + ${amt}$, updated_at = ${now}$ "
         "where budget_id = ${b}$ and period_start = ${ps}$")


class Budgets:
    def __init__(self, db: Database, config: Config, alerts: AlertSink | None = None) -> None:
        self.db = db
        self.time_zone = config.timezone
        self.alerts = alerts

    # --- enforcement (inside the debit's transaction) -------------------------------------------
    async def spend(self, tx: Tx, who: Spender, amount: int, memo: dict[Spender, list[Row]] | None = None,
                    deferred: dict[tuple[str, str], tuple[Row, str, str]] | None = None) -> Charges:
        """Add ``amount`` (micro-units, > 0) to every budget that applies to ``who`` in its current
        period, or raise ``BudgetExceeded`` naming the first budget it would overspend, having given
        back what the others took (a batch transaction that goes on, the accountant's, keeps no
        part of a refused spend; a single debit's transaction rolls back anyway). Returns what was
        charged. ``memo``: the budgets looked up once per spender for a batch in one transaction;
        ``deferred``: collects the budgets spent instead of alerting now, for ``alert_reached``
        once the batch knows which spends it keeps."""
        assert amount > 0, "a budget is spent by debits only"
        charges: Charges = []
        budgets = None if memo is None else memo.get(who)
        if budgets is None:
            budgets = await tx.select(_APPLICABLE, {"c": who.customer_id, "u": who.user_id or "",
                                                    "k": who.key_id or ""})
            if memo is not None:
                memo[who] = budgets
        if not budgets:
            return charges
        now = clock.utcnow()
        crossings = []
        for b in budgets:
            start, end = period_bounds(b.period, now, self.time_zone)
            limit = int(b.limit_amount)
            ns = {"b": b.id, "ps": start, "amt": amount, "lim": limit, "now": clock.fmt(now)}
            n = await tx.execute(_SPEND, ns)
            if n == 0 and await self._spent(tx, b.id, start) is None:
                # the period's first spend: its row starts at 0 (a concurrent first insert is ignored)
                await self._open_period(tx, b.id, start)
                n = await tx.execute(_SPEND, ns)
            # the row is ours (locked) from here on: what it says now is what this update did
            spent = await self._spent(tx, b.id, start) or 0
            if n == 0:
                await self.undo(tx, charges)
                raise BudgetExceeded(
                    f"the {b.period} budget of {b.scope} {b.subject_id} ({from_micro(limit)}) has "
                    f"{from_micro(max(limit - spent, 0))} left, less than {from_micro(amount)}",
                    budget=budget_view(b, spent, start, end))
            charges.append((b.id, start, amount))
            crossings.append((b, spent - amount, spent, start, end))
        if deferred is not None:
            deferred.update({(b.id, start): (b, start, end) for b, _, _, start, end in crossings})
            return charges
        for crossing in crossings:      # alerts only for a spend that went through
            await self._alert(tx, *crossing)
        return charges

    async def alert_reached(self, tx: Tx, deferred: dict[tuple[str, str], tuple[Row, str, str]]) -> None:
        """The alerts of the levels the ``deferred`` budgets' spend has reached, after a batch's
        spends and give-backs: a spend the batch gave back (its debit refused) alerts nothing."""
        for b, start, end in deferred.values():
            await self._alert(tx, b, 0, await self._spent(tx, b.id, start) or 0, start, end)

    async def undo(self, tx: Tx, charges: Charges) -> None:
        """Give back what ``spend`` charged (a debit refused after its budgets took it, in a
        transaction that still commits)."""
        for budget_id, start, amount in charges:
            await tx.execute(_MOVE, {"b": budget_id, "ps": start, "amt": -amount, "now": clock.now_text()})

    async def reserve_hold(self, tx: Tx, hold_id: str, who: Spender, amount: int) -> None:
        """A hold reserves its amount in the budgets of ``who`` (refused like a charge)."""
        rows = [{"id": new_id(), "hold_id": hold_id, "budget_id": b, "period_start": ps, "amount": amt}
                for b, ps, amt in await self.spend(tx, who, amount)]
        if rows:
            await tx.insert_many("billing_budget_hold", rows)

    async def close_hold(self, tx: Tx, hold_id: str, settled_amount: int = 0) -> None:
        """The hold closed: its reservation becomes ``settled_amount`` (a settle: usage already
        delivered, so never refused, like the balance; also after an expiry) or is given back (0:
        release, expiry), in the period it was reserved in."""
        rows = await tx.select("select budget_id, period_start, amount from billing_budget_hold "
                               "where hold_id = ${h}$", {"h": hold_id})
        for r in rows:
            await tx.execute(_MOVE, {"b": r.budget_id, "ps": r.period_start, "now": clock.now_text(),
                                     "amt": settled_amount - int(r.amount)})
        if rows:    # kept at what now counts: a settle after expiry then charges its amount in full
            await tx.execute("update billing_budget_hold set amount = ${amt}$ where hold_id = ${h}$",
                             {"h": hold_id, "amt": settled_amount})

    async def _open_period(self, tx: Tx, budget_id: str, start: str, alert_level: int = 0) -> bool:
        """The period's row, at 0 spent (a concurrent first insert is ignored): True when this
        call made it."""
        return await tx.execute(f"{dialects.insert_ignore(tx.dialect)} into billing_budget_spend "
                                "(id, budget_id, period_start, spent, alert_level, updated_at) "
                                "values (${id}$, ${b}$, ${ps}$, 0, ${lvl}$, ${now}$)",
                                {"id": new_id(), "b": budget_id, "ps": start, "lvl": alert_level,
                                 "now": clock.now_text()}) == 1

    async def refused(self, error: BudgetExceeded) -> None:
        """After a refusal rolled its transaction back: ``budget_100`` for the refused budget, in a
        transaction of its own, unless this period has had it (a refusal changes no spend, so the
        period's ``alert_level`` says whether it was sent). The refusal is the caller's answer:
        a database that fails here is logged, never turned into another error."""
        if self.alerts is None:
            return
        view = error.details["budget"]
        data = dict(view, subject=view["subject_id"])

        async def work(tx):
            # the update first, the insert only for a period without a row (the refused spend
            # was its first): an insert's shared lock on the row, then the update's exclusive
            # one, deadlocked concurrent refusals on MariaDB
            if await self._raise_level(tx, view["budget_id"], view["period_start"], 100) or \
                    await self._open_period(tx, view["budget_id"], view["period_start"], alert_level=100):
                await self._emit(tx, view["customer_id"], 100, data)
        try:
            await self.db.run(work)
        except DatabaseUnavailable:
            log.exception("budget %s: the 100 %% alert of a refusal could not be written", view["budget_id"])

    async def _raise_level(self, tx: Tx, budget_id: str, start: str, percent: int) -> bool:
        """Mark the period as alerted at ``percent``; False when it has had that alert or a higher
        one: one per crossing and period, even when spend falls back (a released hold) and rises."""
        return await tx.execute("update billing_budget_spend set alert_level = ${lvl}$ where budget_id = ${b}$ "
                                "and period_start = ${ps}$ and alert_level < ${lvl}$",
                                {"lvl": percent, "b": budget_id, "ps": start}) == 1

    async def _emit(self, tx: Tx, customer_id: str, percent: int, data: dict[str, Any]) -> None:
        assert self.alerts is not None
        await self.alerts.emit(tx, dict(ALERT_LEVELS)[percent], customer_id, data)

    async def _spent(self, tx: Tx, budget_id: str, start: str) -> int | None:
        value = await tx.scalar("select spent from billing_budget_spend where budget_id = ${b}$ "
                                "and period_start = ${ps}$", {"b": budget_id, "ps": start})
        return None if value is None else int(value)

    async def _alert(self, tx: Tx, b: Row, before: int, after: int, start: str, end: str) -> None:
        """The alert of the highest level this spend crossed (before < level <= after), computed
        from the spend before and after the update, once per period (``_raise_level``)."""
        if self.alerts is None:
            return
        limit = int(b.limit_amount)
        was, now = _level(before, limit), _level(after, limit)
        if now > was and await self._raise_level(tx, b.id, start, now):
            await self._emit(tx, b.customer_id, now, dict(budget_view(b, after, start, end), subject=b.subject_id))

    # --- administration --------------------------------------------------------------------------
    async def set_budget(self, customer_id: str, scope: str, subject_id: str, period: str, limit: int | None,
                         operator: str | None = None) -> dict[str, Any]:
        """Create or change a budget; ``limit`` None or 0 removes it (its spend rows go with it)."""
        if scope not in SCOPES:
            raise InvalidParam(f"scope: one of {', '.join(SCOPES)}")
        customer_id = str(validation.ident(customer_id, "customer_id", required=True))
        subject_id = str(validation.ident(subject_id, {"org": "customer_id", "user": "user_id", "key": "key_id"}[scope],
                                          required=True))
        if scope == "org" and subject_id != customer_id:
            raise InvalidParam("an org budget's subject is its customer_id")
        if period not in PERIODS:
            raise InvalidParam(f"period: one of {', '.join(PERIODS)}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidParam("limit: integer micro-units, not negative")
        key = {"c": customer_id, "s": scope, "sub": subject_id, "p": period}
        find = ("select * from billing_budget where customer_id = ${c}$ and scope = ${s}$ "
                "and subject_id = ${sub}$ and period = ${p}$")

        async def work(tx):
            now = clock.now_text()
            existing = await tx.one(find, key)
            if not limit:
                if existing is None:
                    raise NotFound(f"no {period} budget for {scope} {subject_id} of {customer_id}")
                await tx.execute("delete from billing_budget_spend where budget_id = ${b}$", {"b": existing.id})
                await tx.execute("delete from billing_budget where id = ${b}$", {"b": existing.id})
                await self._count(tx, customer_id)
                return {"removed": True, "budget_id": existing.id}
            if existing is None:
                await tx.insert("billing_budget", {
                    "id": new_id(), "customer_id": customer_id, "scope": scope, "subject_id": subject_id,
                    "period": period, "limit_amount": limit, "operator": (operator or "")[:64] or None,
                    "created_at": now, "updated_at": now})
                await self._count(tx, customer_id)
            else:
                await tx.execute("update billing_budget set limit_amount = ${lim}$, operator = ${op}$, "
                                 "updated_at = ${now}$ where id = ${b}$",
                                 {"lim": limit, "op": (operator or "")[:64] or None, "now": now, "b": existing.id})
            return None
        try:
            removed = await self.db.run(work)
        except Exception as e:
            if not dialects.is_unique_violation(e):
                raise
            # a concurrent first set of the same budget won the unique index: ours is an update of it
            removed = await self.db.run(work)
        if removed is not None:
            return removed
        async with self.db.read() as tx:
            row = await tx.one(find, key)
        return (await self._views([row]))[0]

    @staticmethod
    async def _count(tx: Tx, customer_id: str) -> None:
        """The customer's budget count on its balance row, which tells a debit whether to look its
        budgets up (``Ledger.post``): recounted in the transaction that adds or removes one, so it
        takes the balance row's lock and a concurrent debit sees the budget or comes before it."""
        await tx.execute(refresh_derived("customer_balance", ["budget_count"], "id = ${c}$"), {"c": customer_id})

    async def list_budgets(self, customer_id: str | None = None, scope: str | None = None, page: int = 1,
                   rows: int = 20) -> dict[str, Any]:
        """Budgets with their spend in the current period."""
        if scope is not None and scope not in SCOPES:
            raise InvalidParam(f"scope: one of {', '.join(SCOPES)}")
        cond, ns = where(("customer_id = ${c}$", "c", customer_id), ("scope = ${s}$", "s", scope))
        async with self.db.read() as tx:
            result = await tx.page(f"select * from billing_budget where {cond}", ns,
                                   "customer_id, scope, subject_id, period", page, rows)
        result["rows"] = await self._views(result["rows"])
        return result

    async def _views(self, budgets: list[Row]) -> list[dict[str, Any]]:
        now = clock.utcnow()
        views = []
        async with self.db.read() as tx:
            for b in budgets:
                start, end = period_bounds(b.period, now, self.time_zone)
                views.append(budget_view(b, await self._spent(tx, b.id, start) or 0, start, end))
        return views


def budget_view(b: Row, spent: int, start: str, end: str) -> dict[str, Any]:
    """A budget with its spend in the period [start, end) (UTC), money as decimal strings."""
    limit = int(b.limit_amount)
    return {"budget_id": b.id, "customer_id": b.customer_id, "scope": b.scope, "subject_id": b.subject_id,
            "period": b.period, "limit": from_micro(limit), "spent": from_micro(spent),
            "remaining": from_micro(max(limit - spent, 0)), "period_start": start, "period_end": end}
