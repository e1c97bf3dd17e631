"""Failed accounting: nothing is lost, everything is visible and retried.

An event that cannot be accounted keeps its ``accounting_records`` row (status ``failed``, its
payload intact) and has exactly one ``llmusage_accounting_failed`` row (unique per record) with
the last reason and the retry count. Automatic retries back off exponentially up to
``accounting.max_retries``; then the row waits for an admin (``retry_state = exhausted``). An
admin can retry it now or mark it handled with a note. A successful retry resolves the row.
"""

import logging

from . import clock
from .db import dialect as dialects
from .db.database import where
from .errors import BillingError, InvalidParam, NotFound
from .ids import new_id
from .money import from_micro

log = logging.getLogger("billing_module.failures")

_LIST_SORT = "f.failed_time desc, f.id desc"
# rebuilding the same stored bytes fails the same way: such a row waits for an admin
_NOT_RETRIED = ("invalid_event",)


class Failures:
    def __init__(self, core):
        self.core = core
        self.db = core.db
        self.config = core.config

    def backoff_seconds(self, retry_count):
        acc = self.config.accounting
        return min(acc.retry_base_seconds * (2 ** retry_count), acc.retry_max_seconds)

    async def record(self, ev, exc, price=None, record=None):
        """Store a failure of event ``ev`` (or of stored ``record`` when the payload no longer
        parses). Runs in its own transaction; returns the failed row id."""
        code = exc.code if isinstance(exc, BillingError) else "db_error"
        message = (exc.message if isinstance(exc, BillingError) else f"{type(exc).__name__}: {exc}")[:2000]

        async def work(tx):
            now = clock.now_text()
            request_id = ev.request_id if ev is not None else record.request_id
            rec = await tx.lock_by_key("accounting_records", "request_id", request_id)
            if rec is None:
                row = self.core.accounting._record_row(ev, now, "failed", price)
                row.update(error_code=code, error_msg=message, attempts=1)
                await tx.insert("accounting_records", row)
                rec_id, use_time, amount, cost = row["id"], row["use_time"], row["amount"], row["cost"]
                llmid, user_id, customer_id, model_name = row["llmid"], row["user_id"], row["customer_id"], row["model_name"]
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
                await tx.insert("llmusage_accounting_failed", {
                    "id": new_id(), "llmusageid": rec_id, "llmid": llmid, "userid": user_id,
                    "userorgid": customer_id, "use_date": (use_time or "")[:10] or None, "use_time": use_time,
                    "amount": amount or 0, "cost": cost or 0, "failed_reason": message, "failed_time": now,
                    "retry_count": 0, "handled": "0", "request_id": request_id, "model_name": model_name,
                    "failure_code": code,
                    "retry_state": "waiting" if self.config.accounting.max_retries and code not in _NOT_RETRIED
                    else "exhausted",
                    "next_retry_at": clock.now_text(self.backoff_seconds(0)),
                })
                return rec_id
            retries = int(existing.retry_count or 0) + 1
            exhausted = retries >= self.config.accounting.max_retries
            await tx.execute(
                "update llmusage_accounting_failed set retry_count = ${n}$, failed_reason = ${m}$, failed_time = ${now}$, "
                "failure_code = ${c}$, amount = ${amt}$, cost = ${cost}$, retry_state = ${st}$, next_retry_at = ${nx}$, "
                "handled = '0', resolved_time = null where id = ${i}$",
                {"n": retries, "m": message, "now": now, "c": code, "amt": amount or 0, "cost": cost or 0,
                 "st": "exhausted" if exhausted else "waiting",
                 "nx": None if exhausted else clock.now_text(self.backoff_seconds(retries)), "i": existing.id})
            return rec_id
        try:
            return await self.db.run(work)
        except Exception as e:
            if dialects.is_unique_violation(e):   # a concurrent first failure of the same event
                return await self.db.run(work)
            raise

    async def resolve_in(self, tx, record_id, now):
        """Inside the accounting transaction that finally charged ``record_id``."""
        await tx.execute("update llmusage_accounting_failed set retry_state = 'resolved', resolved_time = ${now}$, "
                         "next_retry_at = null, handled = '1', handled_time = coalesce(handled_time, ${now}$), "
                         "handled_note = coalesce(handled_note, 'accounted on retry') "
                         "where llmusageid = ${r}$ and retry_state <> 'resolved'", {"now": now, "r": record_id})

    # --- retries ---------------------------------------------------------------------------------
    async def retry_due(self, limit=100):
        """Automatic retries whose time has come. Each is claimed by pushing its next_retry_at
        forward with a conditional update, so two instances never retry the same row at once."""
        now = clock.now_text()
        async with self.db.read() as tx:
            due = await tx.select("select id, llmusageid, next_retry_at from llmusage_accounting_failed "
                                  "where retry_state = 'waiting' and next_retry_at <= ${now}$ "
                                  "order by next_retry_at limit ${n}$", {"now": now, "n": limit})
        accounted = 0
        for row in due:
            async def claim(tx, row=row):
                return await tx.execute(
                    "update llmusage_accounting_failed set next_retry_at = ${until}$ where id = ${i}$ "
                    "and retry_state = 'waiting' and next_retry_at = ${was}$",
                    {"until": clock.now_text(self.config.accounting.claim_seconds), "i": row.id, "was": row.next_retry_at})
            if await self.db.run(claim) != 1:
                continue
            try:
                await self.core.accounting.account_record(row.llmusageid)
                accounted += 1
            except BillingError as e:
                log.info("retry of %s failed again: %s", row.llmusageid, e.message)
        return accounted

    async def retry(self, failed_id, operator=None):
        """Admin: account it now. Returns the accounted record; raises the reason it still fails."""
        row = await self._get(failed_id)
        if row.retry_state == "resolved":
            rec = await self.core.accounting.record(record_id=row.llmusageid)
            from .accounting import record_view
            return dict(record_view(rec, duplicate=True))
        return await self.core.accounting.account_record(row.llmusageid)

    async def mark_handled(self, failed_id, note, operator):
        if not note or not isinstance(note, str):
            raise InvalidParam("note: required")
        row = await self._get(failed_id)
        now = clock.now_text()
        async with self.db.transaction() as tx:
            await tx.execute("update llmusage_accounting_failed set handled = '1', handled_time = ${now}$, "
                             "handled_note = ${note}$, handled_by = ${op}$, next_retry_at = null, "
                             "retry_state = case when retry_state = 'resolved' then 'resolved' else 'exhausted' end "
                             "where id = ${i}$", {"now": now, "note": note[:2000], "op": (operator or "")[:64], "i": row.id})
        return await self.get(failed_id)

    async def _get(self, failed_id):
        async with self.db.read() as tx:
            row = await tx.one("select * from llmusage_accounting_failed where id = ${i}$", {"i": failed_id})
        if row is None:
            raise NotFound(f"no failed accounting record {failed_id}")
        return row

    async def get(self, failed_id):
        return failed_view(await self._get(failed_id))

    async def search(self, customer_id=None, user_id=None, llmid=None, handled=None, start_date=None,
                     end_date=None, retry_state=None, page=1, rows=20):
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

    async def backup_accounted(self, before):
        """Move accounted records used before ``before`` into the history table, in one
        transaction. Returns how many moved."""
        from .db.schema import load_models
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


def failed_view(r):
    view = dict(r)
    view["amount"] = from_micro(int(r.amount or 0))
    view["cost"] = from_micro(int(r.cost or 0))
    return view



