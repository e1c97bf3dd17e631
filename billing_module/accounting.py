"""Usage event -> price -> subscription quota -> ledger, and the queue of submitted events.

``post_usage`` accounts one event now, in one transaction: the ``accounting_records`` row
(status ``accounted``), the balance debit and its ledger entry commit together or not at all.
``submit_usage`` stores the event as ``pending`` and returns; the background accountant
accounts pending events in batches. Both are idempotent on ``request_id``.

Several instances may share one database: the accountant claims rows in the database
(``claimed_by`` / ``claim_until``) and locks them while it accounts them, so an event is never
accounted twice, and the claims of a crashed instance expire and are taken over.
"""
import json
import logging
from dataclasses import dataclass, field
from decimal import Decimal

from appPublic.dictObject import DictObject

from . import clock
from .db import dialect as dialects
from .errors import BillingError, Conflict, InvalidParam, UnknownCustomer
from .ids import new_id, payload_hash
from .money import from_micro
from .pricing import Usage

log = logging.getLogger("billing_module.accounting")

_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:@-")
# refusals that leave the event stored as failed (retried later) rather than rejected
ACCOUNTING_FAILURES = ("no_pricing", "unknown_customer", "insufficient_balance", "account_suspended")


def _ident(raw, name, required=False, max_len=32):
    v = raw.get(name)
    if v is None or v == "":
        if required:
            raise InvalidParam(f"{name}: required")
        return None
    if not isinstance(v, str):
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        else:
            raise InvalidParam(f"{name}: expected a string")
    if len(v) > max_len:
        raise InvalidParam(f"{name}: at most {max_len} characters")
    if not set(v) <= _ID_CHARS:
        raise InvalidParam(f"{name}: only letters, digits and _ . : @ - are allowed")
    return v


@dataclass
class Event:
    request_id: str
    customer_id: str
    usage: Usage
    user_id: str = None
    llmid: str = None
    product_id: str = None
    use_time: str = None
    transno: str = None
    payload: dict = field(default_factory=dict)
    hash: str = ""

    @property
    def day(self):
        return clock.parse(self.use_time).date()


def parse_event(raw):
    """Validate a usage event (dict). Bad input raises InvalidParam and nothing is written."""
    if not isinstance(raw, dict):
        raise InvalidParam("event: must be an object")
    request_id = _ident(raw, "request_id", required=True, max_len=64)
    customer_id = _ident(raw, "customer_id", required=True)
    user_id = _ident(raw, "user_id")
    llmid = _ident(raw, "llmid")
    product_id = _ident(raw, "product_id")
    transno = _ident(raw, "transno", max_len=64)
    model_name = raw.get("model_name")
    if model_name is not None and (not isinstance(model_name, str) or len(model_name) > 128):
        raise InvalidParam("model_name: a string of at most 128 characters")
    if not (model_name or llmid or product_id):
        raise InvalidParam("one of model_name, llmid or product_id is required")
    usage = Usage.from_event(dict(raw, model_name=model_name or llmid or product_id))
    use_time = raw.get("use_time")
    use_time = clock.fmt(clock.parse(use_time, "use_time")) if use_time not in (None, "") else clock.now_text()
    payload = {
        "request_id": request_id, "customer_id": customer_id, "user_id": user_id, "llmid": llmid,
        "product_id": product_id, "model_name": model_name, "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens, "cached_tokens": usage.cached_tokens,
        "quantity": format(usage.quantity.normalize(), "f") if usage.quantity else "0", "unit": usage.unit,
        "use_time": use_time, "transno": transno, "attributes": usage.attributes or None,
    }
    # the hash covers what is charged; use_time defaults to "now" and must not make a retry differ
    hashed = {k: v for k, v in payload.items() if k != "use_time" or raw.get("use_time") not in (None, "")}
    return Event(request_id, customer_id, usage, user_id, llmid, product_id, use_time, transno, payload,
                 payload_hash(hashed))


def record_view(rec, duplicate=False):
    """The reply for an accounted (or failed / pending) record: built only from stored fields, so
    a replay returns exactly what the first call returned."""
    lines = json.loads(rec.price_lines) if rec.price_lines else []
    return {
        "record_id": rec.id, "request_id": rec.request_id, "customer_id": rec.customer_id,
        "status": rec.status, "amount": from_micro(int(rec.amount or 0)),
        "original_amount": from_micro(int(rec.original_amount or 0)), "cost": from_micro(int(rec.cost or 0)),
        "discount": rec.discount, "currency": rec.currency, "pricing_id": rec.pricing_id,
        "price_version": rec.price_version, "lines": lines, "subscription_id": rec.subscription_id,
        "included_quantity": None if rec.included_quantity is None else format(Decimal(str(rec.included_quantity)).normalize(), "f"),
        "ledger_entry_id": rec.ledger_entry_id, "use_time": rec.use_time, "duplicate": duplicate,
    }


class Accounting:
    def __init__(self, core):
        self.core = core
        self.db = core.db
        self.config = core.config
        self.quota_hook = None   # ProductManager fills it: (tx, event, price) -> QuotaResult | None

    # --- public entry points ---------------------------------------------------------------------
    async def post_usage(self, raw):
        ev = await self._prepare(raw)
        try:
            price, model = await self.core.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"],
                                                         ev.customer_id, ev.day)
        except BillingError as e:
            # a replay of an event accounted before its price went away is still a replay
            replay = await self._replay_if_done(ev)
            if replay is not None:
                return replay
            await self.core.failures.record(ev, e)
            raise

        async def work(tx):
            existing = await self._locked_record(tx, ev.request_id)
            if existing is not None:
                if existing.payload_hash != ev.hash:
                    raise Conflict(f"request_id {ev.request_id} was already used with a different payload")
                if existing.status == "accounted":
                    return record_view(existing, duplicate=True)
            return await self._charge(tx, ev, price, model, existing)

        try:
            return await self.db.run(work)
        except BillingError as e:
            if e.code in ACCOUNTING_FAILURES:
                await self.core.failures.record(ev, e, price=price)
            raise
        except Exception as e:
            if not dialects.is_unique_violation(e):
                raise
        # the same request_id committed concurrently
        replay = await self._replay_if_done(ev)
        if replay is None:
            raise Conflict(f"request_id {ev.request_id} is being accounted by another request; send it again")
        return replay

    async def submit_usage(self, raw):
        """Store the event as pending and return at once; the accountant charges it."""
        ev = await self._prepare(raw)
        now = clock.now_text()
        row = self._record_row(ev, now, status="pending")
        try:
            async with self.db.transaction() as tx:
                await tx.insert("accounting_records", row)
            return {"record_id": row["id"], "request_id": ev.request_id, "status": "pending", "duplicate": False}
        except Exception as e:
            if not dialects.is_unique_violation(e):
                raise
        async with self.db.read() as tx:
            existing = await tx.one("select * from accounting_records where request_id = ${r}$", {"r": ev.request_id})
        if existing.payload_hash != ev.hash:
            raise Conflict(f"request_id {ev.request_id} was already used with a different payload")
        return dict(record_view(existing, duplicate=True))

    async def quote(self, raw):
        ev = await self._prepare(dict(raw, request_id=raw.get("request_id") or "quote"))
        price, model = await self.core.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"], ev.customer_id, ev.day)
        return dict(price.to_dict(), llmid=model.id, model_name=model.name)

    async def record(self, record_id=None, request_id=None):
        async with self.db.read() as tx:
            if record_id:
                rec = await tx.one("select * from accounting_records where id = ${i}$", {"i": record_id})
            else:
                rec = await tx.one("select * from accounting_records where request_id = ${r}$", {"r": request_id})
        return rec

    # --- the background accountant -----------------------------------------------------------------
    async def account_pending(self, limit=None):
        """Claim up to ``limit`` pending events, account them in one transaction; returns how many
        were accounted. Events that cannot be accounted are recorded as failed."""
        limit = limit or self.config.accounting.batch_size
        claimed = await self._claim(limit)
        if not claimed:
            return 0
        priced, failed = [], []
        for rec in claimed:
            try:
                ev = parse_event(json.loads(rec.payload))
                price, model = await self.core.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"],
                                                             ev.customer_id, ev.day)
                priced.append((rec.id, ev, price, model))
            except BillingError as e:
                failed.append((rec, e, None))

        async def work(tx):
            done, refused = 0, []
            ids = [p[0] for p in priced]
            ns = {"me": self.core.instance_id}
            owned = await tx.select(f"select * from accounting_records where id in {tx.in_list(ids, ns)} "
                                    f"and claimed_by = ${{me}}$ and status = 'pending'{tx.for_update()}", ns)
            owned = {r.id: r for r in owned}
            for rec_id, ev, price, model in priced:
                rec = owned.get(rec_id)
                if rec is None:
                    continue   # our claim expired and another instance took the event
                try:
                    await self._charge(tx, ev, price, model, rec)
                    done += 1
                except BillingError as e:   # the refused debit changed nothing; go on with the batch
                    refused.append((rec, e, price))
            return done, refused

        done, refused = (await self.db.run(work)) if priced else (0, [])
        for rec, e, price in failed + refused:
            await self.core.failures.record(parse_event_or_none(rec), e, price=price, record=rec)
        return done

    async def _claim(self, limit):
        now = clock.now_text()
        until = clock.now_text(self.config.accounting.claim_seconds)

        async def work(tx):
            ns = {"now": now, "n": limit}
            rows = await tx.select(
                "select id from accounting_records where status = 'pending' and "
                "(claim_until is null or claim_until < ${now}$) order by created_at, id limit ${n}$"
                + tx.skip_locked(), ns)
            if not rows:
                return []
            ids = [r.id for r in rows]
            ns.update(me=self.core.instance_id, until=until)
            await tx.execute(f"update accounting_records set claimed_by = ${{me}}$, claim_until = ${{until}}$ "
                             f"where id in {tx.in_list(ids, ns)} and status = 'pending'", ns)
            return await tx.select(f"select id, payload from accounting_records where id in {tx.in_list(ids, ns)} "
                                   f"and claimed_by = ${{me}}$", ns)
        return await self.db.run(work)

    async def account_record(self, record_id):
        """Account one stored (pending or failed) record now. Returns its view; raises the
        accounting error (after recording it) when it still cannot be accounted."""
        rec = await self.record(record_id=record_id)
        if rec is None:
            from .errors import NotFound
            raise NotFound(f"no accounting record {record_id}")
        if rec.status == "accounted":
            return record_view(rec, duplicate=True)
        ev = parse_event(json.loads(rec.payload))
        try:
            price, model = await self.core.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"],
                                                         ev.customer_id, ev.day)
        except BillingError as e:
            await self.core.failures.record(ev, e, record=rec)
            raise

        async def work(tx):
            locked = await self._locked_record(tx, ev.request_id)
            if locked.status == "accounted":
                return record_view(locked, duplicate=True)
            return await self._charge(tx, ev, price, model, locked)
        try:
            return await self.db.run(work)
        except BillingError as e:
            if e.code in ACCOUNTING_FAILURES:
                await self.core.failures.record(ev, e, price=price, record=rec)
            raise

    # --- internals -----------------------------------------------------------------------------
    async def _prepare(self, raw):
        ev = parse_event(raw)
        if not ev.payload["model_name"] and ev.llmid:
            model = await self.core.catalog.model(ev.llmid)
            if model is not None:
                ev.usage = Usage.from_event(dict(ev.payload, model_name=model.name,
                                                 quantity=ev.payload["quantity"], attributes=ev.usage.attributes))
        return ev

    async def _replay_if_done(self, ev):
        async with self.db.read() as tx:
            rec = await tx.one("select * from accounting_records where request_id = ${r}$", {"r": ev.request_id})
        if rec is None:
            return None
        if rec.payload_hash != ev.hash:
            raise Conflict(f"request_id {ev.request_id} was already used with a different payload")
        return record_view(rec, duplicate=True) if rec.status == "accounted" else None

    async def _locked_record(self, tx, request_id):
        """The record of ``request_id`` locked for this transaction, or None. The lookup itself
        does not lock: on MySQL a locking read of a missing key takes a gap lock, and two such
        transactions that then insert into the gap deadlock. A missing record is inserted, and
        the unique index turns a concurrent insert into a duplicate-key error (a replay)."""
        return await tx.lock_by_key("accounting_records", "request_id", request_id)

    def _record_row(self, ev, now, status, price=None, model=None):
        u = ev.usage
        row = {
            "id": new_id(), "customer_id": ev.customer_id, "llmid": (model.id if model else ev.llmid),
            "model_name": (model.name if model else ev.payload["model_name"]) or u.model_name,
            "pricing_id": price.program_id if price else None,
            "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens, "cached_tokens": u.cached_tokens,
            "quantity": str(u.quantity), "unit": u.unit, "amount": price.amount if price else 0,
            "original_amount": price.original_amount if price else None, "cost": price.cost if price else None,
            "discount": price.discount if price else None, "price_version": price.version_id if price else None,
            "price_lines": json.dumps([ln.to_dict() for ln in price.lines]) if price else None,
            "currency": price.currency if price else self.config.currency,
            "request_id": ev.request_id, "transno": ev.transno, "status": status, "user_id": ev.user_id,
            "product_id": ev.product_id, "use_time": ev.use_time,
            "payload": json.dumps(ev.payload, ensure_ascii=False), "payload_hash": ev.hash,
            "attempts": 0, "created_at": now, "updated_at": now,
        }
        return row

    async def _charge(self, tx, ev, price, model, existing):
        """Debit and write the accounted record inside ``tx``. ``existing``: the pending or failed
        row of this request to complete, or None to insert a new one."""
        now = clock.now_text()
        row = self._record_row(ev, now, "accounted", price, model)
        if existing is not None:
            row["id"] = existing.id
        amount = price.amount
        quota = await self.quota_hook(tx, ev, price, row["id"]) if self.quota_hook else None
        if quota is not None:
            amount = quota.charge_amount
            row.update(subscription_id=quota.subscription_id, included_quantity=str(quota.included))
        row["amount"] = amount
        if amount > 0:
            entry = await self.core.ledger.post(
                tx, ev.customer_id, -amount, "usage", ev.request_id, ev.hash,
                must_cover=not self.config.accounting.allow_arrears, refuse_suspended=True,
                ref_type="accounting_records", ref_id=row["id"])
            row["ledger_entry_id"] = entry.id
        else:
            acct = await tx.one("select status from customer_balance where id = ${c}$", {"c": ev.customer_id})
            if acct is None:
                raise UnknownCustomer(f"customer {ev.customer_id} has no account")
        row["accounted_at"] = now
        if existing is None:
            await tx.insert("accounting_records", row)
        else:
            row.pop("created_at")
            keep = ("id", "request_id", "payload", "payload_hash")
            row["attempts"] = int(existing.attempts or 0) + 1
            row.update(claimed_by=None, claim_until=None, next_attempt_at=None, error_code=None, error_msg=None)
            sets = ", ".join(f"{k} = ${{{k}}}$" for k in row if k not in keep)
            await tx.execute(f"update accounting_records set {sets} where id = ${{id}}$", row)
            await self.core.failures.resolve_in(tx, existing.id, now)
        rec = DictObject(**row)
        rec.setdefault("created_at", existing.created_at if existing is not None else now)
        return record_view(rec)


def parse_event_or_none(rec):
    try:
        return parse_event(json.loads(rec.payload))
    except (BillingError, ValueError, TypeError):
        return None

