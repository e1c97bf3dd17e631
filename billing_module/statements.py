"""Monthly statements: what a customer's books did in one calendar month.

A statement covers the ledger entries *written* in the month (``ledger_entry.created_at`` in
``[period_start, period_end)``, the month's midnights in the deployment's ``timezone`` as UTC), so it is
a cut of the ledger and adds up exactly: ``opening`` is the ledger's sum before the period,
``closing = opening + recharges - charges + refunds + adjustments`` is its sum before the cut-off.
An event used in a closed month but accounted after the cut-off is charged in the month it was
written: it shows on the next statement as prior-period usage (``prior_period_charges``) and never
changes the closed one.

A closed statement is a row of ``statement`` written once and never updated. Closing is idempotent
and safe from several instances: the unique key (customer_id, month) decides who closed it, the
unique key (number_year, number_seq) who got a number (a collision takes the next one). A month is
closed ``statements.close_grace_seconds`` after its end, so a transaction that stamped its entry
just before the cut-off has committed; ``reconcile`` proves every closed statement against the
ledger (a late commit inside a closed period would show there).
"""
import datetime
import json
import logging
import zoneinfo
from dataclasses import asdict, dataclass

from . import clock, validation
from .config import Config
from .db import dialect as dialects
from .db.database import Database
from .errors import Conflict, NotFound
from .ids import new_id
from .money import from_micro

log = logging.getLogger("billing_module.statements")

# how each entry type counts on a statement; a type not listed counts as an adjustment, so a
# statement always adds up to the ledger
ENTRY_GROUPS = {"recharge": "recharges", "usage": "charges", "settle": "charges", "overage": "charges",
                "subscription": "charges", "refund": "refunds", "adjust": "adjustments"}
_CHARGE_TYPES = tuple(t for t, g in ENTRY_GROUPS.items() if g == "charges")
_NUMBER_ATTEMPTS = 20
MAX_LISTED_HOLDS = 500
MONEY_FIELDS = ("opening", "recharges", "charges", "prior_period_charges", "refunds", "adjustments", "closing",
                "held_at_close")

_SUM_BEFORE = ("select coalesce(sum(amount), 0) as total from ledger_entry "
               "where customer_id = ${c}$ and created_at < ${t}$")
_MOVEMENTS = ("select entry_type, coalesce(sum(amount), 0) as total from ledger_entry "
              "where customer_id = ${c}$ and created_at >= ${s}$ and created_at < ${e}$ group by entry_type")
# every charge entry of the period in exactly one line: (entry type, model, product)
_CHARGE_LINES = (
    "select e.entry_type as entry_type, r.model_name as model, p.code as product, count(*) as n, "
    "sum(-e.amount) as amount, "
    "sum(case when coalesce(r.use_time, u.use_time) < ${s}$ then -e.amount else 0 end) as prior "
    "from ledger_entry e "
    "left join accounting_records r on e.ref_type = 'accounting_records' and r.id = e.ref_id "
    "left join product_usage_log u on e.ref_type = 'product_usage_log' and u.id = e.ref_id "
    "left join product_subscription ps on e.ref_type = 'product_subscription' and ps.id = e.ref_id "
    "left join product p on p.id = coalesce(u.product_id, ps.product_id) "
    "where e.customer_id = ${c}$ and e.created_at >= ${s}$ and e.created_at < ${e}$ "
    f"and e.entry_type in ({', '.join(repr(t) for t in _CHARGE_TYPES)}) "
    "group by e.entry_type, r.model_name, p.code order by e.entry_type, r.model_name, p.code")
# holds open at the cut-off: created before it and not closed before it
_OPEN_HOLDS_WHERE = ("from billing_hold where customer_id = ${c}$ and created_at < ${e}$ "
                     "and (closed_at is null or closed_at >= ${e}$)")


def month_bounds(month: str, time_zone: str) -> tuple[str, str]:
    """``[start, end)`` of a month ``YYYY-MM`` in ``time_zone``, as UTC texts."""
    year, mon = (int(x) for x in month.split("-"))
    tz = zoneinfo.ZoneInfo(time_zone)
    start = datetime.datetime(year, mon, 1, tzinfo=tz)
    end = datetime.datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=tz)
    return (clock.fmt(start.astimezone(datetime.timezone.utc)), clock.fmt(end.astimezone(datetime.timezone.utc)))


def month_of(utc: datetime.datetime, time_zone: str) -> str:
    local = utc.replace(tzinfo=datetime.timezone.utc).astimezone(zoneinfo.ZoneInfo(time_zone))
    return f"{local.year:04d}-{local.month:02d}"


def previous_month(month: str) -> str:
    year, mon = (int(x) for x in month.split("-"))
    return f"{year - 1:04d}-12" if mon == 1 else f"{year:04d}-{mon - 1:02d}"


@dataclass(frozen=True)
class Totals:
    """A statement's figures in micro-units; ``charges`` positive (what was debited)."""
    opening: int
    recharges: int
    charges: int
    prior_period_charges: int
    refunds: int
    adjustments: int
    held_at_close: int

    @property
    def closing(self) -> int:
        return self.opening + self.recharges - self.charges + self.refunds + self.adjustments


def _line_view(row) -> dict:
    kind = ("holds" if row.entry_type == "settle" else "product" if row.entry_type in ("overage", "subscription")
            else "model")
    name = row.product if kind == "product" else row.model if kind == "model" else "settled holds"
    return {"kind": kind, "entry_type": row.entry_type, "name": name or "(unknown)", "count": int(row.n),
            "amount": int(row.amount or 0), "prior_period": int(row.prior or 0)}


def statement_view(row, totals: Totals, details: dict) -> dict:
    """The reply shape: money as decimal strings."""
    view = {k: getattr(row, k, None) for k in ("id", "number", "customer_id", "month", "status", "currency",
                                                "time_zone", "period_start", "period_end", "closed_at")}
    for k in ("period_start", "period_end", "closed_at"):      # MySQL reads datetimes as datetime
        view[k] = None if view[k] is None else str(view[k])
    figures = dict(asdict(totals), closing=totals.closing)
    view.update({k: from_micro(figures[k]) for k in MONEY_FIELDS})
    view["lines"] = [dict(line, amount=from_micro(line["amount"]), prior_period=from_micro(line["prior_period"]))
                     for line in details["lines"]]
    view["holds"] = [dict(h, amount=from_micro(h["amount"])) for h in details["holds"]]
    return view


class _Row(dict):
    __getattr__ = dict.get


class Statements:
    """Computes, closes, reads and proves monthly statements (the SQL of ``statement``)."""

    def __init__(self, db: Database, config: Config) -> None:
        self.db, self.config, self.time_zone = db, config.statements, config.timezone

    def bounds(self, month: str) -> tuple[str, str]:
        return month_bounds(month, self.time_zone)

    async def _compute(self, tx, customer_id: str, start: str, end: str) -> tuple[Totals, dict]:
        ns = {"c": customer_id, "s": start, "e": end, "t": start}
        opening = int(await tx.scalar(_SUM_BEFORE, ns) or 0)
        groups = dict.fromkeys(("recharges", "charges", "refunds", "adjustments"), 0)
        for row in await tx.select(_MOVEMENTS, ns):
            groups[ENTRY_GROUPS.get(row.entry_type, "adjustments")] += int(row.total)
        lines = [_line_view(r) for r in await tx.select(_CHARGE_LINES, ns)]
        holds = await tx.select(f"select id, request_id, amount, created_at {_OPEN_HOLDS_WHERE} "
                                f"order by created_at, id limit {MAX_LISTED_HOLDS}", ns)
        held = int(await tx.scalar(f"select coalesce(sum(amount), 0) as total {_OPEN_HOLDS_WHERE}", ns) or 0)
        totals = Totals(opening=opening, recharges=groups["recharges"], charges=-groups["charges"],
                        prior_period_charges=sum(line["prior_period"] for line in lines),
                        refunds=groups["refunds"], adjustments=groups["adjustments"], held_at_close=held)
        details = {"lines": lines, "holds": [{"hold_id": h.id, "request_id": h.request_id, "amount": int(h.amount),
                                              "created_at": str(h.created_at)} for h in holds]}
        return totals, details

    async def _currency(self, tx, customer_id: str):
        return await tx.scalar("select currency from customer_balance where id = ${c}$", {"c": customer_id})

    async def statement(self, customer_id: str, month: str) -> dict:
        """The closed statement of the month, or the month so far (status ``open``, no number)."""
        closed = await self.find(customer_id, month)
        if closed is not None:
            return closed
        start, end = self.bounds(month)
        async with self.db.read() as tx:
            currency = await self._currency(tx, customer_id)
            if currency is None:
                raise NotFound(f"customer {customer_id} has no account")
            totals, details = await self._compute(tx, customer_id, start, end)
        row = _Row(customer_id=customer_id, month=month, status="open", currency=currency,
                   time_zone=self.time_zone, period_start=start, period_end=end)
        return statement_view(row, totals, details)

    async def _stored(self, where: str, ns: dict):
        async with self.db.read() as tx:
            row = await tx.one(f"select * from statement where {where}", ns)
        if row is None:
            return None
        totals = Totals(**{k: int(row[k]) for k in MONEY_FIELDS if k != "closing"})
        return statement_view(row, totals, json.loads(row.details))

    async def find(self, customer_id: str, month: str):
        return await self._stored("customer_id = ${c}$ and month = ${m}$", {"c": customer_id, "m": month})

    async def by_id(self, statement_id: str) -> dict:
        found = await self._stored("id = ${id}$", {"id": statement_id})
        if found is None:
            raise NotFound(f"no statement {statement_id}")
        return found

    async def closed(self, customer_id: str, page: int, rows: int) -> dict:
        async with self.db.read() as tx:
            found = await tx.page("select id, number, customer_id, month, status, currency, opening, recharges, "
                                  "charges, refunds, adjustments, closing, closed_at from statement "
                                  "where customer_id = ${c}$", {"c": customer_id}, "month desc", page, rows)
        return {"total": found["total"], "rows": [
            {k: (from_micro(int(v)) if k in MONEY_FIELDS else v) for k, v in r.items()} for r in found["rows"]]}

    # --- closing ---------------------------------------------------------------------------------
    async def close(self, customer_id: str, month: str, closed_by: str = "") -> dict:
        """Close one customer's month (idempotent: a closed one is returned as it is)."""
        month = str(validation.month(month, "month", required=True))   # required: never None
        start, end = self.bounds(month)
        if end > clock.now_text():
            raise Conflict(f"{month} has not ended yet (it ends {end} UTC)", code="month_not_ended")
        for _ in range(_NUMBER_ATTEMPTS):
            try:
                await self.db.run(lambda tx: self._close_in(tx, customer_id, month, start, end, closed_by))
            except Exception as e:
                if not dialects.is_unique_violation(e):
                    raise
                # another instance closed this one, or took the number: then the next number
            found = await self.find(customer_id, month)
            if found is not None:
                return found
        raise Conflict("statement numbers kept colliding; close again")

    async def _close_in(self, tx, customer_id, month, start, end, closed_by) -> None:
        if await tx.scalar("select id from statement where customer_id = ${c}$ and month = ${m}$",
                           {"c": customer_id, "m": month}) is not None:
            return
        currency = await self._currency(tx, customer_id)
        if currency is None:
            raise NotFound(f"customer {customer_id} has no account")
        totals, details = await self._compute(tx, customer_id, start, end)
        year = int(month[:4])
        seq = int(await tx.scalar("select coalesce(max(number_seq), 0) as n from statement "
                                  "where number_year = ${y}$", {"y": year}) or 0) + 1
        row = {"id": new_id(), "number": f"{self.config.number_prefix}-{year}-{seq:06d}", "number_year": year,
               "number_seq": seq, "customer_id": customer_id, "month": month, "time_zone": self.time_zone,
               "period_start": start, "period_end": end, "status": "closed", "currency": currency,
               **asdict(totals), "closing": totals.closing, "details": json.dumps(details),
               "closed_at": clock.now_text(), "closed_by": (closed_by or "system")[:128]}
        await tx.insert("statement", row)

    async def close_month(self, month: str, closed_by: str = "") -> int:
        """Close the month for every customer whose account existed before its end or whose
        ledger has an entry before it; returns how many statements this call closed."""
        month = str(validation.month(month, "month", required=True))   # required: never None
        _, end = self.bounds(month)
        async with self.db.read() as tx:
            customers = await tx.select(
                "select id from customer_balance b where (b.created_at < ${e}$ or exists (select 1 from ledger_entry "
                "where customer_id = b.id and created_at < ${e}$)) and b.id not in "
                "(select customer_id from statement where month = ${m}$) order by b.id", {"e": end, "m": month})
        for row in customers:
            await self.close(row.id, month, closed_by)
        return len(customers)

    async def close_due(self) -> int:
        """The job: close the previous month once ``close_grace_seconds`` have passed after its end."""
        now = clock.utcnow() - datetime.timedelta(seconds=self.config.close_grace_seconds)
        return await self.close_month(previous_month(month_of(now, self.time_zone)), closed_by="job")

    # --- proof -----------------------------------------------------------------------------------
    async def reconcile(self) -> list[dict]:
        """Every closed statement against the ledger: its figures recomputed from the entries of
        its period, and its closing equal to the ledger's sum before the cut-off. Mismatches as
        data (one dict per differing figure)."""
        mismatches = []
        async with self.db.read() as tx:
            rows = await tx.select("select * from statement order by month, customer_id", {})
            for row in rows:
                totals, _ = await self._compute(tx, row.customer_id, str(row.period_start), str(row.period_end))
                ledger_at_cutoff = int(await tx.scalar(_SUM_BEFORE, {"c": row.customer_id, "t": str(row.period_end)}))
                expected = dict(asdict(totals), closing=ledger_at_cutoff)
                stored = {k: int(row[k]) for k in MONEY_FIELDS}
                if stored["closing"] != Totals(**{k: stored[k] for k in MONEY_FIELDS if k != "closing"}).closing:
                    expected["closing"] = None   # the stored figures do not add up
                for k in MONEY_FIELDS:
                    if stored[k] != expected[k]:
                        mismatches.append({"statement": row.number, "customer_id": row.customer_id,
                                           "month": row.month, "figure": k, "stored": stored[k],
                                           "ledger": expected[k]})
        return mismatches
