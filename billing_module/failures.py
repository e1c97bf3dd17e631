"""Failed accounting: nothing is lost, everything is visible and retried.

An event that cannot be accounted keeps its ``accounting_records`` row (status ``failed``, its
payload intact) and has exactly one ``llmusage_accounting_failed`` row (unique per record) with
the last reason and the retry count. Automatic retries back off exponentially up to
``accounting.max_retries``; then the row waits for an admin (``retry_state = exhausted``). An
admin can retry it now or mark it handled with a note. A successful retry resolves the row.
"""
from __future__ import annotations

import logging
from typing import Any

from . import clock
from .accounting import Accounting, Event, record_row, record_view
from .alerts import Alerts
from .config import Config
from .db import dialect as dialects
from .db.database import Database, Row, Tx, where
from .db.schema import load_models
from .errors import BillingError, InvalidParam, NotFound
from .ids import new_id
from .money import from_micro
from .pricing import PriceResult

log = logging.getLogger("billing_module.failures")

_LIST_SORT = "f.failed_time desc, f.id desc"
# rebuilding the same stored bytes fails the same way: such a row waits for an admin
_NOT_RETRIED = ("invalid_event",)


class Failures:
    """The failed-accounting rows: record, resolve, mark handled, search. It needs no other
    service; retrying a failure is ``FailureRetries``, which has accounting as well."""

    def __init__(self, db: Database, config: Config, alerts: Alerts) -> None:
        self.db = db
        self.config = config
        self.alerts = alerts

    def backoff_seconds(self, retry_count: int) -> float:
        acc = self.config.accounting
        return min(acc.retry_base_seconds * (2 ** retry_count), acc.retry_max_seconds)

    async def record(self, ev: Event | None, exc: BaseException, price: PriceResult | None = None,
                     record: Row | None = None) -> str | None:
        """Store a failure of event ``ev`` (or of stored ``record`` when the payload no longer
        parses). Runs in its own transaction; returns the failed row id."""
        code = exc.code if isinstance(exc, BillingError) else "db_error"
        message = (exc.message if isinstance(exc, BillingError) else f"{type(exc).__name__}: {exc}")[:2000]
        source = ev if ev is not None else record
        if source is None:
            raise ValueError("Failures.record needs the event or its stored record")
        request_id = source.request_id

        async def work(tx):
            now = clock.now_text()
            rec = await tx.lock_by_key("accounting_records", "request_id", request_id)
            if rec is None:
                assert ev is not None, "an event known only by its record has that record"
                row = record_row(ev, now, "failed", self.config.currency, price)
                row.update(error_code=code, error_msg=message, attempts=1)
                await tx.insert("accounting_records", row)
                rec_id, use_time, amount, cost = row["id"], row["use_time"], row["amount"], row["cost"]
                llmid, user_id = row["llmid"], row["user_id"]
                customer_id, model_name = row["customer_id"], row["model_name"]
            elif rec.status == "accounted":
                return None           # accounted meanwhile: nothing failed
            else:
                await tx.execute("update accounting_records set status = 'failed', error_code = ${c}$, "
                                 "error_msg = ${m}$, attempts = coalesce(attempts, 0) + 1, updated_at = ${now}$ "
                                 "where id = ${i}$",
                                 {"c": code, "m": message, "now": now, "i": rec.id})
                rec_id, use_time, amount, cost = rec.id, rec.use_time, price.amount if price else rec.amount, \
                    price.cost if price else rec.cost
                llmid, user_id, customer_id, model_name = rec.llmid, rec.user_id, rec.customer_id, rec.model_name
            existing = await tx.one("select id, retry_count, handled from llmusage_accounting_failed "
                                    "where llmusageid = ${r}$", {"r": rec_id})
            if existing is None:
                failed_id = new_id()
                exhausted = not self.config.accounting.max_retries or code in _NOT_RETRIED
                await tx.insert("llmusage_accounting_failed", {
                    "id": failed_id, "llmusageid": rec_id, "llmid": llmid, "userid": user_id,
                    "userorgid": customer_id, "use_date": (use_time or "")[:10] or None, "use_time": use_time,
                    "amount": amount or 0, "cost": cost or 0, "failed_reason": message, "failed_time": now,
                    "retry_count": 0, "handled": "0", "request_id": request_id, "model_name": model_name,
                    "failure_code": code,
                    "retry_state": "exhausted" if exhausted else "waiting",
                    "next_retry_at": clock.now_text(self.backoff_seconds(0)),
                })
                if exhausted:
                    await self._exhausted(tx, failed_id, 0, rec_id, request_id, customer_id, code, message)
                return rec_id
            retries = int(existing.retry_count or 0) + 1
            exhausted = retries >= self.config.accounting.max_retries
            await tx.execute(
                "update llmusage_accounting_failed set retry_count = ${n}$, failed_reason = ${m}$, "
                "failed_time = ${now}$, failure_code = ${c}$, amount = ${amt}$, cost = ${cost}$, "
                "retry_state = ${st}$, next_retry_at = ${nx}$, "
                "handled = '0', resolved_time = null where id = ${i}$",
                {"n": retries, "m": message, "now": now, "c": code, "amt": amount or 0, "cost": cost or 0,
                 "st": "exhausted" if exhausted else "waiting",
                 "nx": None if exhausted else clock.now_text(self.backoff_seconds(retries)), "i": existing.id})
            if exhausted:
                await self._exhausted(tx, existing.id, retries, rec_id, request_id, customer_id, code, message)
            return rec_id
        try:
            return await self.db.run(work)
        except Exception as e:
            if dialects.is_unique_violation(e):   # a concurrent first failure of the same event
                return await self.db.run(work)
            raise

    async def _exhausted(self, tx, failed_id, retries, record_id, request_id, customer_id, code, message):
        """``failed_exhausted``, in the transaction that leaves the row waiting for an admin: once
        per exhaustion (an admin's retry that fails again is a new one, with a higher count)."""
        await self.alerts.emit_once(tx, f"failed_exhausted:{failed_id}:{retries}", "failed_exhausted", customer_id, {
            "failed_id": failed_id, "record_id": record_id, "request_id": request_id, "failure_code": code,
            "reason": message[:500], "retry_count": retries})

    async def resolve_in(self, tx: Tx, record_id: str, now: str) -> None:
        """Inside the accounting transaction that finally charged ``record_id``."""
        await tx.execute("update llmusage_accounting_failed set retry_state = 'resolved', resolved_time = ${now}$, "
                         "next_retry_at = null, handled = '1', handled_time = coalesce(handled_time, ${now}$), "
                         "handled_note = coalesce(handled_note, 'accounted on retry') "
                         "where llmusageid = ${r}$ and retry_state <> 'resolved'", {"now": now, "r": record_id})

    # --- automatic retries: which are due, and a claim on one --------------------------------------
    async def due(self, limit: int) -> list[Row]:
        """The waiting failures whose retry time has come, soonest first."""
        async with self.db.read() as tx:
            return await tx.select("select id, llmusageid, next_retry_at from llmusage_accounting_failed "
                                   "where retry_state = 'waiting' and next_retry_at <= ${now}$ "
                                   "order by next_retry_at limit ${n}$", {"now": clock.now_text(), "n": limit})

    async def claim(self, row: Row) -> bool:
        """Claim a due failure by pushing its next_retry_at forward with a conditional update, so
        two instances never retry the same row at once. False: another instance has it."""
        async def work(tx):
            return await tx.execute(
                "update llmusage_accounting_failed set next_retry_at = ${until}$ where id = ${i}$ "
                "and retry_state = 'waiting' and next_retry_at = ${was}$",
                {"until": clock.now_text(self.config.accounting.claim_seconds), "i": row.id, "was": row.next_retry_at})
        return await self.db.run(work) == 1

    async def mark_handled(self, failed_id: str, note: str, operator: str | None) -> dict[str, Any]:
        if not note or not isinstance(note, str):
            raise InvalidParam("note: required")
        row = await self.row(failed_id)
        now = clock.now_text()
        async with self.db.transaction() as tx:
            await tx.execute("update llmusage_accounting_failed set handled = '1', handled_time = ${now}$, "
                             "handled_note = ${note}$, handled_by = ${op}$, next_retry_at = null, "
                             "retry_state = case when retry_state = 'resolved' then 'resolved' else 'exhausted' end "
                             "where id = ${i}$",
                             {"now": now, "note": note[:2000], "op": (operator or "")[:64], "i": row.id})
        return await self.get(failed_id)

    async def row(self, failed_id: str) -> Row:
        """The failed-accounting row ``failed_id``, or NotFound."""
        async with self.db.read() as tx:
            row = await tx.one("select * from llmusage_accounting_failed where id = ${i}$", {"i": failed_id})
        if row is None:
            raise NotFound(f"no failed accounting record {failed_id}")
        return row

    async def get(self, failed_id: str) -> dict[str, Any]:
        return failed_view(await self.row(failed_id))

    async def search(self, customer_id: str | None = None, user_id: str | None = None, llmid: str | None = None,
                     handled: str | None = None, start_date: str | None = None, end_date: str | None = None,
                     retry_state: str | None = None, page: int = 1, rows: int = 20) -> dict[str, Any]:
        cond, ns = where(("f.userorgid = ${c}$", "c", customer_id), ("f.userid = ${u}$", "u", user_id),
                         ("f.llmid = ${m}$", "m", llmid), ("f.handled = ${h}$", "h", handled),
                         ("f.retry_state = ${rs}$", "rs", retry_state),
                         ("f.failed_time >= ${start}$", "start", start_date),
                         ("f.failed_time < ${end}$", "end", end_date))
        sql = ("select f.*, u.name as userorgid_text, m.name as llmid_text "
               "from llmusage_accounting_failed f "
               "left join users_cache u on u.id = f.userorgid and u.entity_kind = 'org' "
               "left join llmage_cache m on m.id = f.llmid "
               f"where {cond}")
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, _LIST_SORT, page, rows)
        result["rows"] = [failed_view(r) for r in result["rows"]]
        return result

    async def backup_accounted(self, before: str) -> int:
        """Move accounted records used before ``before`` into the history table, in one
        transaction. Returns how many moved."""
        cols = [f["name"] for f in load_models()["accounting_records"]["fields"]]
        col_list = ", ".join(cols)
        ns = {"before": before, "now": clock.now_text()}

        async def work(tx):
            moved = await tx.execute(
                f"insert into accounting_records_history ({col_list}, backup_time) select {col_list}, ${{now}}$ "
                "from accounting_records where status = 'accounted' and use_time < ${before}$", ns)
            deleted = await tx.execute("delete from accounting_records where status = 'accounted' "
                                       "and use_time < ${before}$", ns)
            if moved != deleted:
                raise RuntimeError(f"history move mismatch: copied {moved}, deleted {deleted}; rolled back")
            return moved
        return await self.db.run(work)


def failed_view(r: Row) -> dict[str, Any]:
    view = dict(r)
    view["amount"] = from_micro(int(r.amount or 0))
    view["cost"] = from_micro(int(r.cost or 0))
    return view


class FailureRetries:
    """Retries of failed accounting: the automatic ones when their time has come, an admin's now.
    It has both sides (the failure rows and accounting), so neither of them needs the other."""

    def __init__(self, failures: Failures, accounting: Accounting) -> None:
        self.failures = failures
        self.accounting = accounting

    async def retry_due(self, limit: int = 100) -> int:
        """Automatic retries whose time has come, each claimed first (``Failures.claim``)."""
        accounted = 0
        for row in await self.failures.due(limit):
            if not await self.failures.claim(row):
                continue
            try:
                await self.accounting.account_record(row.llmusageid)
                accounted += 1
            except BillingError as e:
                log.info("retry of %s failed again: %s", row.llmusageid, e.message)
        return accounted

    async def retry(self, failed_id: str, operator: str | None = None) -> dict[str, Any]:
        """Admin: account it now. Returns the accounted record; raises the reason it still fails."""
        row = await self.failures.row(failed_id)
        if row.retry_state == "resolved":
            rec = await self.accounting.record(record_id=row.llmusageid)
            if rec is None:
                raise NotFound(f"failed accounting {failed_id} names no accounting record")
            return dict(record_view(rec, duplicate=True))
        return await self.accounting.account_record(row.llmusageid)
