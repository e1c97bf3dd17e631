"""Usage event -> price -> subscription quota -> ledger, and the queue of submitted events.

``post_usage`` accounts one event now, in one transaction: the ``accounting_records`` row
(status ``accounted``), the balance debit and its ledger entry commit together or not at all.
``submit_usage`` stores the event as ``pending`` and returns; the background accountant
accounts pending events in batches. Both are idempotent on ``request_id``.

Several instances may share one database: the accountant's transaction claims its rows (a
locking read with SKIP LOCKED on MySQL, the write lock on SQLite), so an event is never accounted
twice, and a crashed instance's claims vanish with its rolled-back transaction.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any, Protocol, cast

from . import clock, jsontext, metrics, provider_usage, validation
from .budgets import BudgetExceeded, Budgets, Spender
from .catalog import Catalog, price_for_model
from .config import Config
from .db import dialect as dialects
from .db.database import Database, Row, Tx
from .db.group import Fallback, GroupCommit
from .errors import (
    BillingError,
    Conflict,
    CurrencyMismatch,
    DatabaseUnavailable,
    InvalidEvent,
    InvalidParam,
    UnknownCustomer,
    UnpricedFactor,
)
from .ids import new_id, payload_hash
from .ledger import FlagSet, Ledger
from .money import from_micro
from .pricing import COUNT_FIELDS, PriceResult, Usage, json_text

log = logging.getLogger("billing_module.accounting")

# refusals that leave the event stored as failed (retried later) rather than rejected
ACCOUNTING_FAILURES = ("no_pricing", "unknown_customer", "insufficient_balance", "account_suspended",
                       "currency_mismatch", "unpriced_factor", "no_supplier")
# a budget refuses a posted event outright (the caller learns it at once, nothing is stored);
# a queued event, which no caller waits for, is stored as failed and retried (next period, or
# after the limit is raised) like the refusals above
STORED_FAILURES = ACCOUNTING_FAILURES + ("budget_exceeded",)


# count factors stored in the payload only when non-zero (newer than the payload's first fields)
EXTRA_COUNTS = tuple(name for name in COUNT_FIELDS if name not in ("input_tokens", "output_tokens", "cached_tokens"))


def _ident(raw, name, required=False, max_len=32):
    value = raw.get(name)
    if value is None and not required:
        return None       # not given (validation.ident's answer, without the calls: most fields are absent)
    return validation.ident(value, name, required=required, max_len=max_len)


@dataclass
class Event:
    request_id: str
    customer_id: str
    usage: Usage
    user_id: str | None = None
    llmid: str | None = None
    product_id: str | None = None
    use_time: str = ""          # normalised "YYYY-MM-DD HH:MM:SS"; parse_event sets it
    transno: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    hash: str = ""
    key_id: str | None = None   # the API key the usage is charged to (its budget), if any

    @property
    def spender(self) -> Spender:
        return Spender(self.customer_id, self.user_id, self.key_id)

    @property
    def day(self) -> datetime.date:
        return datetime.date.fromisoformat(self.use_time[:10])   # use_time is stored normalised


_DEFAULT_TIMES = clock.TimeRange()


def parse_event(raw: dict[str, Any], times: clock.TimeRange = _DEFAULT_TIMES) -> Event:
    """Validate a usage event (dict). Bad input raises InvalidParam and nothing is written.
    ``use_time`` must lie in ``times`` (a stored time must sort and parse back, and the
    accountant dates the price by it)."""
    if not isinstance(raw, dict):
        raise InvalidParam("event: must be an object")
    request_id = _ident(raw, "request_id", required=True, max_len=64)
    customer_id = _ident(raw, "customer_id", required=True)
    user_id = _ident(raw, "user_id")
    llmid = _ident(raw, "llmid")
    product_id = _ident(raw, "product_id")
    transno = _ident(raw, "transno", max_len=64)
    key_id = _ident(raw, "key_id")
    model_name = raw.get("model_name")
    if model_name is not None and (not isinstance(model_name, str) or len(model_name) > 128):
        raise InvalidParam("model_name: a string of at most 128 characters")
    if not (model_name or llmid or product_id):
        raise InvalidParam("one of model_name, llmid or product_id is required")
    raw = provider_usage.merged_event(raw)      # a new dict: the name to price by is set in it
    raw["model_name"] = model_name or llmid or product_id
    usage = Usage.from_event(raw)
    use_time = raw.get("use_time")
    time_given = use_time not in (None, "")
    use_time = times.parse(use_time, "use_time") if time_given else clock.now_text()
    payload = {
        "request_id": request_id, "customer_id": customer_id, "user_id": user_id, "llmid": llmid,
        "product_id": product_id, "model_name": model_name, "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens, "cached_tokens": usage.cached_tokens,
        "quantity": format(usage.quantity.normalize(), "f") if usage.quantity else "0", "unit": usage.unit,
        "use_time": use_time, "transno": transno, "attributes": usage.attributes or None,
    }
    # the newer factors only when present: an event without them keeps the payload (and hash) it always had
    payload.update({name: getattr(usage, name) for name in EXTRA_COUNTS if getattr(usage, name)})
    if key_id is not None:      # only when given: an event without it keeps its hash
        payload["key_id"] = key_id
    if raw.get("usage") is not None:   # the provider's object, kept as sent
        payload.update(usage=raw["usage"], usage_format=raw["usage_format"])
    # the hash covers what is charged; use_time defaults to "now" and must not make a retry differ
    hashed = payload if time_given else {k: v for k, v in payload.items() if k != "use_time"}
    return Event(request_id, customer_id, usage, user_id, llmid, product_id, use_time, transno, payload,
                 payload_hash(hashed), key_id)


def _rebuilds_as_parsed(ev: Event) -> bool:
    """Whether ``rebuild_event`` of a just parsed event's payload gives that event itself: its
    model is named (no lookup by llmid to make) and its quantity reads back from the payload's
    text as the same Decimal (``1.50`` is stored as ``1.5``, and the record shows the rebuilt one).
    Every other field of the payload was written from the parsed event's own values."""
    return bool(ev.payload["model_name"]) and str(ev.usage.quantity) == ev.payload["quantity"]


def record_view(rec: dict[str, Any], duplicate: bool = False) -> dict[str, Any]:
    """The reply for an accounted (or failed / pending) record: built only from stored fields, so
    a replay returns exactly what the first call returned (the lines too: read back from their
    text by orjson, faster than building them again from the price)."""
    get = rec.get   # a Row is a dict: plain lookups (its attribute access is a Python call per column)
    text = get("price_lines")
    stored = jsontext.loads(text) if text else []
    lines = [ln for ln in stored if not ln.get("unpriced")]
    unpriced = [ln["factor"] for ln in stored if ln.get("unpriced")]
    included = get("included_quantity")
    return {
        "record_id": get("id"), "request_id": get("request_id"), "customer_id": get("customer_id"),
        "status": get("status"), "amount": from_micro(int(get("amount") or 0)),
        "original_amount": from_micro(int(get("original_amount") or 0)), "cost": from_micro(int(get("cost") or 0)),
        "discount": get("discount"), "currency": get("currency"), "pricing_id": get("pricing_id"),
        "price_version": get("price_version"), "lines": lines, "subscription_id": get("subscription_id"),
        "included_quantity": None if included is None else format(Decimal(str(included)).normalize(), "f"),
        "ledger_entry_id": get("ledger_entry_id"), "use_time": get("use_time"), "duplicate": duplicate,
        "unpriced_factors": unpriced,
    }


class FailureStore(Protocol):
    """What accounting needs of failed accounting (``failures.Failures``): store a failure in its
    own transaction; resolve one inside the transaction that finally charged it."""

    async def record(self, ev: Event | None, exc: BaseException, price: PriceResult | None = None,
                     record: Row | None = None) -> str | None: ...

    async def resolve_in(self, tx: Tx, record_id: str, now: str) -> None: ...


class QuotaSource(Protocol):
    """Subscriptions' quota (``products.hook.QuotaHook``): taken first, inside the charge's
    transaction; given back when a batch refuses the charge. Consulted only for customers whose
    balance row counts active subscriptions (``subscription_count``, kept by the subscription writes)."""

    async def quota_hook(self, tx: Tx, ev: Event, price: PriceResult, record_id: str) -> Any: ...

    async def release_quota(self, tx: Tx, record_id: str) -> bool: ...

    async def link_ledger(self, tx: Tx, record_ids: list[str]) -> None: ...


def _currency(accounts: dict[str, Row], customer_id: str) -> str | None:
    account = accounts.get(customer_id)
    return None if account is None else account.currency


class Accounting:
    def __init__(self, db: Database, config: Config, *, catalog: Catalog, ledger: Ledger, failures: FailureStore,
                 quota: QuotaSource | None = None, budgets: Budgets | None = None) -> None:
        self.db = db
        self.config = config
        self.catalog = catalog
        self.ledger = ledger
        self.failures = failures
        # subscriptions take quota first (None: every event is charged in full)
        self.quota = quota
        # the balance-row flag that sends a customer's charges to the quota hook first
        self._subscribed_flag: tuple[str, ...] = ("subscription_count",) if quota is not None else ()
        # every charge is also spent from the budgets that apply (None: no budgets are enforced)
        self.budgets = budgets
        self.times = clock.TimeRange.from_config(self.config.accounting)
        # concurrent post_usage calls share a transaction and its commit
        self.group = GroupCommit(self.db, single=self._charge_new, batch=self._charge_batch)

    # --- public entry points ---------------------------------------------------------------------
    @metrics.observed("post")
    async def post_usage(self, raw: dict[str, Any]) -> dict[str, Any]:
        return await self._post_prepared(await self._prepare(raw))

    async def _post_prepared(self, ev: Event) -> dict[str, Any]:
        try:
            price, model = await self.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"],
                                                    ev.customer_id, ev.day)
        except BillingError as e:
            return await self._unpriced(ev, e)
        # the common case: a new request, written in a group with concurrent ones. No lookup
        # first: the unique keys on the ledger entry and the record turn a repeated request
        # into a duplicate-key error, handled by _after_charge.
        try:
            result = await self.group.run(self._charge_item(ev, price, model, clock.now_text()))
        except Exception as e:
            return await self._after_charge(ev, price, model, None, e)
        return await self._after_charge(ev, price, model, result, None)

    async def _unpriced(self, ev: Event, error: BillingError) -> dict[str, Any]:
        """An event that could not be priced: a replay of one accounted before its price went
        away is still a replay (its reply is returned); otherwise ``error`` is raised, and an
        accounting failure is stored first (retried later)."""
        replay = await self._replay_if_done(ev)
        if replay is not None:
            return replay
        if error.code in ACCOUNTING_FAILURES:      # else the caller's mistake: nothing stored
            await self.failures.record(ev, error)
        raise error

    async def _after_charge(self, ev: Event, price: PriceResult, model: Any, result: Any,
                            error: BaseException | None) -> dict[str, Any]:
        """The reply for one charge's outcome from the group writer (``result``, the record as
        written, or ``error``), shared by the single and the batch endpoint: a request that already
        had a record is replayed or completed, an accounting failure is stored (unless it is a replay)."""
        if error is None:
            return record_view(result)     # built after the commit: not in the writer's lock
        if isinstance(error, BillingError):
            if error.code in STORED_FAILURES:
                replay = await self._replay_if_done(ev)   # a replay is refused by a short balance too
                if replay is not None:
                    return replay
            await self._budget_refused(error)
            if error.code in ACCOUNTING_FAILURES:
                await self.failures.record(ev, error, price=price)
            raise error
        if not dialects.is_unique_violation(error):
            raise error
        return await self._complete_existing(ev, price, model)

    def _charge_item(self, ev: Event, price: PriceResult, model: Any, now: str) -> tuple:
        """What the group writer charges: the event with its accounted row built now, before the
        transaction, so that the writer's transaction holds only its statements (on SQLite every
        other writer waits for it). The row is the writer's template, copied by each run of the
        transaction: a run again (a deadlock, a group gone the careful way) starts from it as built."""
        return ev, price, model, self._accounted_row(ev, now, price, model)

    async def _charge_new(self, tx, item):
        ev, price, model, row = item
        return await self._charge_row(tx, ev, price, model, None, dict(row))

    async def _charge_batch(self, tx, items):
        """Charge a group of new events with a few multi-row statements: one conditional debit
        per customer, one insert of ledger entries per customer, one insert of records. No lookup
        first: a request that has a record already (a replay, a stored event) is a duplicate key,
        and the group writer then runs the group event by event, like anything unusual (a
        refusal, a repeated request_id within the group: ``Fallback``).

        A customer whose debits need nothing more (no budgets, subscriptions or low-balance
        threshold: ``Ledger.post_many_unflagged``) is debited without reading its row first;
        the others (and any that update refuses) after reading their rows under lock
        (``_charge_flagged``)."""
        ids = [item[0].request_id for item in items]
        if len(set(ids)) != len(ids):
            raise Fallback()
        if any(self._refusal(price, None) is not None for _, price, _, _ in items):
            raise Fallback()      # an unpriced factor: refused one by one, that event's alone
        by_customer: dict[str, list[Any]] = {}
        for i, (ev, price, _, built) in enumerate(items):
            # the template stays as built (_charge_item)
            by_customer.setdefault(ev.customer_id, []).append((i, dict(built), ev, price))
        outcomes: list[Any] = [None] * len(items)
        records: list[dict[str, Any]] = []
        flagged: dict[str, list[Any]] = {}
        for customer_id in sorted(by_customer):     # rows locked in one order, as _accounts does
            group = by_customer[customer_id]
            currencies = {price.currency for _, _, _, price in group}
            entries = None
            if len(currencies) == 1 and all(row["amount"] > 0 for _, row, _, _ in group):
                entries = await self.ledger.post_many_unflagged(
                    tx, customer_id, _debits(group), "usage", currency=currencies.pop(),
                    must_cover=not self.config.accounting.allow_arrears, refuse_suspended=True,
                    defer_to=self._subscribed_flag)
            if entries is None:
                flagged[customer_id] = group
            else:
                _settled(group, entries, outcomes, records)
        if flagged:
            await self._charge_flagged(tx, flagged, outcomes, records)
        await tx.insert_many("accounting_records", records, later=True)
        await self._link_usage(tx, records)
        return outcomes

    async def _charge_flagged(self, tx, by_customer, outcomes, records):
        """``_charge_batch`` for the customers whose rows are read first, under their lock: the
        currency checked, the quota hook and the budgets given their part, then the debit."""
        accounts = await self._accounts(tx, set(by_customer))
        if any(self._refusal(price, _currency(accounts, ev.customer_id))
               for group in by_customer.values() for _, _, ev, price in group):
            raise Fallback()      # charged one by one, where the refusal is that event's alone
        covered = self._covered(accounts)
        budget_memo: dict[Any, Any] = {}
        for customer_id, group in by_customer.items():
            for _, row, ev, price in group:
                if customer_id in covered:
                    try:
                        self._apply_quota(row, await self._take_quota(tx, ev, price, row["id"]))
                    except BillingError:
                        raise Fallback() from None     # the product refused it (no_supplier): that event's alone
                try:
                    await self._spend_budgets(tx, ev, row["amount"], budget_memo, accounts.get(customer_id))
                except BudgetExceeded:
                    raise Fallback() from None     # that event's refusal alone
            charged = _debits(group)
            if charged:
                entries, refused = await self.ledger.post_many(
                    tx, customer_id, charged, "usage", must_cover=not self.config.accounting.allow_arrears,
                    refuse_suspended=True, all_or_nothing=True, locked=accounts.get(customer_id))
                if refused:
                    raise Fallback()
            else:
                entries = []
                if customer_id not in accounts:
                    raise Fallback()      # no account: refused one by one
            _settled(group, entries, outcomes, records)

    async def _complete_existing(self, ev, price, model):
        """The request has a record: replay an accounted one, account a pending or failed one."""
        async def work(tx):
            existing = await self._locked_record(tx, ev.request_id)
            if existing is None:
                archived = await tx.one("select * from accounting_records_history where request_id = ${r}$",
                                        {"r": ev.request_id})
                if archived is None:
                    raise Conflict(f"request_id {ev.request_id} is being accounted by another request; send it again")
                existing = archived
            if existing.payload_hash != ev.hash:
                raise _reused(ev)
            if existing.status == "accounted":
                return record_view(existing, duplicate=True)
            return await self._charge(tx, ev, price, model, existing)
        try:
            return await self.db.run(work)
        except BillingError as e:
            if e.code in ACCOUNTING_FAILURES:
                await self.failures.record(ev, e, price=price)
            raise

    async def submit_usage(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Store the event as pending and return at once; the accountant charges it."""
        return await self._submit_prepared(await self._prepare(raw))

    async def _submit_prepared(self, ev: Event) -> dict[str, Any]:
        await self._check_model(ev)
        row = record_row(ev, clock.now_text(), "pending", self.config.currency)
        async def store(tx):
            await tx.insert("accounting_records", row)
            return None
        _, existing = await self.db.run_or_existing(store, lambda tx: tx.one(
            "select * from accounting_records where request_id = ${r}$", {"r": ev.request_id}))
        if existing is None:
            return _queued_view(row)
        if existing.payload_hash != ev.hash:
            raise _reused(ev)
        return dict(record_view(existing, duplicate=True))

    async def _check_model(self, ev: Event) -> None:
        if ev.llmid and ev.payload["model_name"]:
            await self.catalog.model(ev.llmid, ev.payload["model_name"])   # model_mismatch now

    # --- batch ingestion -----------------------------------------------------------------------
    async def post_usage_batch(self, events: list[Any], mode: str = "now") -> list[dict[str, Any]]:
        """Many events in one call, each idempotent on its own request_id: ``now`` accounts them,
        ``queue`` stores them pending for the accountant. Returns one result per event in order:
        the single endpoint's reply (``post_usage`` / ``submit_usage``) with ``outcome``
        (``accounted``, ``duplicate``, ``queued``), or its refusal (``outcome`` ``refused``, the
        error's code and message). One event's refusal never fails the others; a database error
        is no event's fault and fails the call (every event is safe to send again)."""
        if mode not in BATCH_MODES:
            raise InvalidParam(f"mode: one of {', '.join(BATCH_MODES)}")
        check_batch(events, self.config.accounting.batch_max_events)
        results: list[dict[str, Any] | None] = [None] * len(events)
        firsts: list[tuple[int, Event]] = []
        repeats: list[tuple[int, Event]] = []
        seen: set[str] = set()
        async for i, raw in in_turns(enumerate(events)):
            try:
                ev = await self._prepare(raw)
            except BillingError as e:
                results[i] = batch_refusal(e)
                continue
            (repeats if ev.request_id in seen else firsts).append((i, ev))
            seen.add(ev.request_id)
        fresh, stored = await self._replays(firsts, results, mode)
        if mode == "now":
            await self._account_batch(fresh, results)
        else:
            await self._queue_batch(fresh, results)
        # a pending or failed record is completed on its own (in a group, its duplicate key would
        # send the whole group the careful way); the same request_id again in the batch: a
        # replay or a conflict
        for i, ev in stored + repeats:
            results[i] = await _batch_result(self._post_prepared(ev) if mode == "now" else self._submit_prepared(ev))
        done = [r for r in results if r is not None]
        assert len(done) == len(events), "every event has its result"
        metrics.batch_outcomes(done)
        return done

    async def _replays(self, items: list[tuple[int, Event]], results: list[Any],
                       mode: str) -> tuple[list[tuple[int, Event]], list[tuple[int, Event]]]:
        """Fill in the events whose request_id has a record already (one read for the batch);
        returns the others, and in ``now`` mode apart the pending or failed ones (to be accounted)."""
        if not items:
            return [], []
        ns: dict[str, Any] = {}
        async with self.db.read() as tx:
            rows = await tx.select("select * from accounting_records where request_id in "
                                   f"{tx.in_list([ev.request_id for _, ev in items], ns)}", ns)
        existing = {r.request_id: r for r in rows}
        fresh, stored = [], []
        for i, ev in items:
            rec = existing.get(ev.request_id)
            if rec is None:
                fresh.append((i, ev))
            elif mode == "now" and rec.status != "accounted" and rec.payload_hash == ev.hash:
                stored.append((i, ev))
            elif rec.payload_hash != ev.hash:
                results[i] = batch_refusal(_reused(ev))
            else:
                results[i] = _with_outcome(record_view(rec, duplicate=True))
        return fresh, stored

    async def _account_batch(self, items: list[tuple[int, Event]], results: list[Any]) -> None:
        """Price every event (model, program and discount looked up once per batch), then charge
        them in groups through the group writer's multi-row path (``_charge_batch``)."""
        memo: dict[Any, Any] = {}
        priced, charges = [], []
        now = clock.now_text()
        async for i, ev in in_turns(items):
            try:
                price, model = await self._quote_memo(ev, memo)
            except BillingError as e:
                results[i] = await _batch_result(self._unpriced(ev, e))
                continue
            priced.append(i)
            charges.append(self._charge_item(ev, price, model, now))
        size = self.config.accounting.batch_size
        for start in range(0, len(priced), size):
            chunk = charges[start:start + size]
            outcomes = await self.group.write(chunk)
            async for i, (ev, price, model, _), (result, error) in in_turns(zip(priced[start:start + size], chunk,
                                                                                outcomes, strict=True)):
                results[i] = await _batch_result(self._after_charge(ev, price, model, result, error))

    async def _queue_batch(self, items: list[tuple[int, Event]], results: list[Any]) -> None:
        """Store the events pending with one multi-row insert; when a concurrent request took one
        of their request_ids meanwhile, each is stored on its own (``submit_usage``'s way)."""
        now, rows, stored = clock.now_text(), [], []
        for i, ev in items:
            try:
                await self._check_model(ev)
            except BillingError as e:
                results[i] = batch_refusal(e)
                continue
            rows.append(record_row(ev, now, "pending", self.config.currency))
            stored.append((i, ev))
        try:
            await self.db.run(lambda tx: tx.insert_many("accounting_records", rows))
        except Exception as e:
            if not dialects.is_unique_violation(e):
                raise
            for i, ev in stored:
                results[i] = await _batch_result(self._submit_prepared(ev))
            return
        for (i, _), row in zip(stored, rows, strict=True):
            results[i] = _with_outcome(_queued_view(row))

    async def quote(self, raw: dict[str, Any]) -> dict[str, Any]:
        _, price, model = await self._estimate(raw)
        return dict(price.to_dict(), llmid=model.id, model_name=model.name, unpriced_factors=list(price.unpriced))

    async def hold_amount(self, raw: dict[str, Any]) -> int:
        """What to hold for an estimated event: its price in micro-units, refused the way the
        charge would be (another currency than the balance's, an unpriced factor)."""
        ev, price, _ = await self._estimate(raw)
        async with self.db.read() as tx:
            currency = (await self._currencies(tx, {ev.customer_id})).get(ev.customer_id)
        refusal = self._refusal(price, currency)
        if refusal is not None:
            raise refusal
        return price.amount

    async def _estimate(self, raw):
        """(event, price, model) of an event that is priced, not charged (no request_id needed)."""
        ev = await self._prepare(dict(raw, request_id=raw.get("request_id") or "quote"))
        price, model = await self.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"], ev.customer_id, ev.day)
        return ev, price, model

    async def record(self, record_id: str | None = None, request_id: str | None = None) -> Row | None:
        async with self.db.read() as tx:
            if record_id:
                rec = await tx.one("select * from accounting_records where id = ${i}$", {"i": record_id})
            else:
                rec = await tx.one("select * from accounting_records where request_id = ${r}$", {"r": request_id})
        return rec

    # --- the background accountant -----------------------------------------------------------------
    async def account_pending(self, limit: int | None = None) -> int:
        """Account up to ``limit`` pending events in one transaction; returns how many were
        accounted. Events that cannot be accounted are then recorded as failed.

        The batch's rows are claimed by the transaction itself: on MySQL a locking read with SKIP
        LOCKED, so concurrent instances take different rows and never wait on each other; on SQLite
        the write lock taken at BEGIN IMMEDIATE. A crashed instance's transaction rolls back and
        its rows are free again at once: there is nothing to expire.

        Built for throughput: the events were validated when they were stored, so they are rebuilt
        from the record's payload; lookups are memoised per batch; each customer's debits are one
        conditional update (``Ledger.post_many``); entries and record updates are multi-row."""
        limit = limit or self.config.accounting.batch_size

        async def work(tx):
            claimed = await tx.select(CLAIM_PENDING + tx.skip_locked(), {"n": limit})
            failed: list[Any] = []
            memo: dict[Any, Any] = {}
            budget_memo: dict[Any, Any] = {}
            budget_alerts: dict[Any, Any] = {}     # alerted after the debits, for the spends kept
            by_customer: dict[str, list[Any]] = {}
            now = clock.now_text()
            accounts = await self._accounts(tx, {rec["customer_id"] for rec in claimed})
            currencies = {customer_id: acct["currency"] for customer_id, acct in accounts.items()}
            covered = self._covered(accounts)
            for rec in claimed:     # rows read as dicts here: an attribute read is a Python call
                # one event's problem is that event's alone: it goes to failed accounting with its
                # code and the batch goes on (only a database error stops the batch)
                try:
                    ev = await self.rebuild_stored(rec, memo)
                    price, model = await self._quote_memo(ev, memo)
                    refusal = self._refusal(price, currencies.get(ev.customer_id))
                except Exception as e:
                    if dialects.is_database_error(e) or isinstance(e, DatabaseUnavailable):
                        raise          # no event's fault: the batch stops and its rows stay pending
                    failed.append((rec, _event_error(e, rec), None))
                    continue
                if refusal is not None:
                    failed.append((rec, refusal, price))
                    continue
                row = accounted_update(rec, price, model, now)
                if ev.customer_id in covered:
                    try:
                        self._apply_quota(row, await self._take_quota(tx, ev, price, rec["id"]))
                    except BillingError as e:      # the product refused it (no_supplier) before writing
                        failed.append((rec, e, price))
                        continue
                try:
                    spent = await self._spend_budgets(tx, ev, row["amount"], budget_memo,
                                                      accounts.get(ev.customer_id), budget_alerts)
                except BudgetExceeded as e:
                    failed.append((rec, e, price))
                    if self.quota is not None:
                        await self.quota.release_quota(tx, rec["id"])
                    continue
                by_customer.setdefault(ev.customer_id, []).append((row, rec, price, spent))
            rows = []
            for customer_id, items in by_customer.items():
                charged = [{"amount": -row["amount"], "request_id": rec["request_id"],
                            "payload_hash": rec["payload_hash"], "ref_type": "accounting_records", "ref_id": row["id"]}
                           for row, rec, _, _ in items if row["amount"] > 0]
                entries, refusals = (await self.ledger.post_many(
                    tx, customer_id, charged, "usage", must_cover=not self.config.accounting.allow_arrears,
                    refuse_suspended=True, locked=accounts.get(customer_id))) if charged else ([], [])
                no = {item["ref_id"]: e for item, e in refusals}
                if any(row["amount"] == 0 for row, _, _, _ in items) and customer_id not in accounts:
                    no.update({row["id"]: UnknownCustomer(f"customer {customer_id} has no account")
                               for row, _, _, _ in items if row["amount"] == 0})
                entry_of = {e["ref_id"]: e["id"] for e in entries}
                for row, rec, price, spent in items:
                    if row["id"] in no:
                        failed.append((rec, no[row["id"]], price))
                        if self.quota is not None:   # the batch commits: give back what the hook took
                            await self.quota.release_quota(tx, row["id"])
                        if spent and self.budgets is not None:     # and what its budgets took
                            await self.budgets.undo(tx, spent)
                    else:
                        row["ledger_entry_id"] = entry_of.get(row["id"])
                        rows.append(row)
            if budget_alerts and self.budgets is not None:    # now that the batch knows what it keeps
                await self.budgets.alert_reached(tx, budget_alerts)
            await tx.update_many("accounting_records", rows, keep=UPSERT_ONLY, later=True)
            await self._link_usage(tx, rows)
            return len(rows), failed

        started = time.perf_counter()
        done, failed = await self.db.run(work)
        if done or failed:
            metrics.ACCOUNTING_SECONDS.labels("accountant").observe(time.perf_counter() - started)
        metrics.accounted("accountant", done)
        await self._record_failures(failed)
        return done

    async def _record_failures(self, failed):
        """Each in its own transaction, after the batch: a failure that cannot be recorded leaves
        its event pending (the next batch sees it again) and stops no other."""
        for rec, e, price in failed:
            metrics.failed("accountant", getattr(e, "code", "error"))
            try:
                await self._budget_refused(e)
                await self.failures.record(parse_event_or_none(rec), e, price=price, record=rec)
            except Exception:
                log.exception("could not record the failure of accounting record %s", rec.id)

    def _covered(self, accounts: dict[str, Row]) -> set[str]:
        """The customers of a batch whose events the quota hook must see: those with subscriptions
        (``accounts``: their balance rows, from ``_accounts``)."""
        if self.quota is None:
            return set()
        return {customer_id for customer_id, acct in accounts.items() if acct.subscription_count}

    async def _quote_memo(self, ev, memo):
        """catalog.quote with the model, program and discount looked up once per batch."""
        name = ev.payload["model_name"] or (None if ev.llmid else ev.usage.model_name)
        key = ("model", ev.llmid, name)   # exactly what the lookup is asked: two product_ids never share
        found = memo.get(key)
        if found is None:
            model = await self.catalog.model(ev.llmid, name)
            program = await self.catalog.program(model.ppid) if model is not None and model.ppid else None
            found = memo[key] = (model, program)
        model, program = found
        if program is None:   # let quote raise the precise no_pricing error
            return await self.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"], ev.customer_id, ev.day)
        discount = memo.get(("discount", ev.customer_id))
        if discount is None:
            discount = memo[("discount", ev.customer_id)] = await self.catalog.discount(ev.customer_id)
        return price_for_model(program, model, ev.usage, ev.day, discount), model

    async def account_record(self, record_id: str) -> dict[str, Any]:
        """Account one stored (pending or failed) record now. Returns its view; raises the
        accounting error (after recording it) when it still cannot be accounted."""
        rec = await self.record(record_id=record_id)
        if rec is None:
            from .errors import NotFound
            raise NotFound(f"no accounting record {record_id}")
        if rec.status == "accounted":
            return record_view(rec, duplicate=True)
        ev = await self.rebuild_stored(rec)
        try:
            price, model = await self.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"],
                                                    ev.customer_id, ev.day)
        except BillingError as e:
            await self.failures.record(ev, e, record=rec)
            raise

        async def work(tx):
            locked = await self._locked_record(tx, ev.request_id)
            if locked.status == "accounted":
                return record_view(locked, duplicate=True)
            return await self._charge(tx, ev, price, model, locked)
        try:
            return await self.db.run(work)
        except BillingError as e:
            await self._budget_refused(e)
            if e.code in STORED_FAILURES:
                await self.failures.record(ev, e, price=price, record=rec)
            raise

    # --- internals -----------------------------------------------------------------------------
    async def _prepare(self, raw):
        checked = parse_event(raw, self.times)
        if _rebuilds_as_parsed(checked):
            return checked      # what rebuild_event gives for it, without building it twice
        return await self.rebuild_event(checked.payload, checked.hash)

    async def rebuild_event(self, payload: dict, phash: str, memo: dict | None = None) -> Event:
        """The event to account, from its payload as the caller sent it (after ``parse_event``
        validated it; the ``payload`` column of its record). The one way every path gets it: the
        first post, the accountant, the automatic and the admin retry. Never from the record's
        other columns: those hold what an earlier attempt resolved, or failed to.

        An event named by ``llmid`` alone is priced under its model's name, looked up now (once
        per ``memo``, the accountant's batch): a model synced after the first attempt counts."""
        model_name: Any = payload.get("model_name")      # the payload is JSON, validated by parse_event
        llmid = payload.get("llmid")
        if not model_name and llmid:
            model = await self._model_by_id(llmid, memo)
            if model is not None:
                model_name = model.name
        quantity = payload.get("quantity")
        # parse_event let the event in with one of these names
        usage = Usage(cast(str, model_name or llmid or payload.get("product_id")),
                      int(payload.get("input_tokens") or 0),
                      int(payload.get("output_tokens") or 0), int(payload.get("cached_tokens") or 0),
                      Decimal(str(quantity)) if quantity else Decimal(0), payload.get("unit"),
                      dict(payload.get("attributes") or {}),
                      **{name: int(payload.get(name) or 0) for name in EXTRA_COUNTS})
        return Event(payload["request_id"], payload["customer_id"], usage, payload.get("user_id"), llmid,
                     payload.get("product_id"), payload["use_time"], payload.get("transno"), payload, phash,
                     payload.get("key_id"))

    async def rebuild_stored(self, rec: Row, memo: dict | None = None) -> Event:
        """``rebuild_event`` over a stored record's payload, or InvalidEvent saying why it cannot be
        rebuilt: a row written around the API (an unparsable payload, a use_time that is not a time
        or outside the range the API accepts) must not stop the accountant for everyone else. A
        database error is no event's fault and passes through."""
        try:
            payload = jsontext.loads(rec["payload"])
            self._check_use_time(payload["use_time"], memo)
            ev = await self.rebuild_event(payload, rec["payload_hash"], memo)
            _ = ev.day   # the price is dated by it
            return ev
        except Exception as e:
            # a refusal of the event itself (pricing, model) and a database error pass through;
            # what the API would have refused at the door is an admin's case, never retried
            if (isinstance(e, BillingError) and not isinstance(e, InvalidParam)) or dialects.is_database_error(e):
                raise
            raise InvalidEvent(
                f"stored event {rec.request_id} cannot be rebuilt: {type(e).__name__}: {e}"[:500]) from None

    def _check_use_time(self, text: Any, memo: dict | None) -> None:
        """``check_stored`` of a stored event's use_time, once per batch (``memo``) for each time:
        a batch's events share few, and a time that passed stays valid for the batch (the range
        only widens as the clock moves on)."""
        if memo is None or type(text) is not str:
            self.times.check_stored(text, "use_time")
            return
        key = ("use_time", text)
        if key not in memo:
            self.times.check_stored(text, "use_time")
            memo[key] = True

    async def _model_by_id(self, llmid, memo):
        if memo is None:
            return await self.catalog.model(llmid)
        key = ("llmid", llmid)
        if key not in memo:          # an unknown model is memoised too (as None)
            memo[key] = await self.catalog.model(llmid)
        return memo[key]

    async def _replay_if_done(self, ev):
        async with self.db.read() as tx:
            rec = await tx.one("select * from accounting_records where request_id = ${r}$", {"r": ev.request_id})
        if rec is None:
            return None
        if rec.payload_hash != ev.hash:
            raise _reused(ev)
        return record_view(rec, duplicate=True) if rec.status == "accounted" else None

    async def _locked_record(self, tx, request_id):
        """The record of ``request_id`` locked for this transaction, or None. The lookup itself
        does not lock: on MySQL a locking read of a missing key takes a gap lock, and two such
        transactions that then insert into the gap deadlock. A missing record is inserted, and
        the unique index turns a concurrent insert into a duplicate-key error (a replay)."""
        return await tx.lock_by_key("accounting_records", "request_id", request_id)

    def _accounted_row(self, ev, now, price, model, existing=None):
        row = record_row(ev, now, "accounted", self.config.currency, price, model)
        row["accounted_at"] = now
        if existing is not None:
            row.update(id=existing.id, created_at=existing.created_at, attempts=int(existing.attempts or 0) + 1,
                       next_attempt_at=None, error_code=None, error_msg=None)
        return row

    async def _take_quota(self, tx: Tx, ev: Event, price: PriceResult, record_id: str) -> Any:
        """What a subscription of the customer absorbs (None: the event is charged in full)."""
        return None if self.quota is None else await self.quota.quota_hook(tx, ev, price, record_id)

    @staticmethod
    async def _accounts(tx, customer_ids):
        """customer id -> its balance row (balance, currency and flags), for those that have an
        account. A locking read (MySQL), like the debits that follow in the batch: a budget or
        subscription made meanwhile waits for the batch to commit rather than miss its charges, and
        ``post_many`` knows the balance its debit starts from (``locked``)."""
        ns: dict[str, Any] = {}
        rows = await tx.select("select id, balance, currency, budget_count, subscription_count, low_balance_set "
                               "from customer_balance "
                               f"where id in {tx.in_list(sorted(customer_ids), ns)}{tx.for_update()}", ns)
        return {r.id: r for r in rows}

    @staticmethod
    async def _currencies(tx, customer_ids):
        """customer id -> the currency of its balance, for those that have an account."""
        ns: dict[str, Any] = {}
        rows = await tx.select("select id, currency from customer_balance where id in "
                               f"{tx.in_list(sorted(customer_ids), ns)}", ns)
        return {r.id: r.currency for r in rows}

    def _refusal(self, price, currency):
        """Why ``price`` must not be charged to a balance in ``currency`` (None: no account; the
        ledger refuses that), or None. A refusal leaves the event stored as failed."""
        if currency is not None and price.currency != currency:
            return CurrencyMismatch(f"program {price.program_id} prices in {price.currency}, the balance is in "
                                    f"{currency}; no conversion is made")
        if price.unpriced and not self.config.accounting.allow_partial_pricing:
            return UnpricedFactor(f"no price for {', '.join(price.unpriced)} in program {price.program_id} "
                                  f"version {price.version_id}; the event is kept until it has one",
                                  unpriced_factors=list(price.unpriced))
        return None

    @staticmethod
    def _apply_quota(row, quota):
        """A subscription absorbed part of the usage: only ``quota.charge_amount`` is charged."""
        if quota is not None:
            # the record and its usage row state the same sell and cost
            row.update(amount=quota.charge_amount, cost=quota.cost, subscription_id=quota.subscription_id,
                       included_quantity=str(quota.included))

    async def _charge(self, tx, ev, price, model, existing):
        """Debit and write the accounted record inside ``tx``; its reply. ``existing``: the
        pending or failed row of this request to complete, or None to insert a new one."""
        return record_view(await self._charge_row(tx, ev, price, model, existing))

    async def _charge_row(self, tx: Tx, ev: Event, price: PriceResult, model: Any, existing: Row | None,
                          row: dict[str, Any] | None = None) -> dict[str, Any]:
        """``_charge``'s work; returns the record as written. ``row``: the accounted row of a new
        record built before the transaction (this run's own copy), or None to build it here."""
        if self._refusal(price, None) is not None:   # an unpriced factor: refused, under its currency's name first
            raise self._refusal(price, (await self._currencies(tx, {ev.customer_id})).get(ev.customer_id))
        if row is None:
            row = self._accounted_row(ev, clock.now_text(), price, model, existing)
        now = row["updated_at"]
        if row["amount"] > 0:
            # The debit assumes the customer has no subscription (the balance row's flag, checked by
            # the update itself: no query for the common case); one that has gets the quota hook's
            # part taken first, and the rest debited.
            try:
                row["ledger_entry_id"] = await self._debit(tx, ev, price, row, defer_to=self._subscribed_flag)
            except FlagSet as flagged:
                await self._take_covered(tx, ev, price, row, flagged.row)
                if row["amount"] > 0:
                    row["ledger_entry_id"] = await self._debit(tx, ev, price, row, learn=False)
        else:
            acct = await tx.one("select status, currency, subscription_count from customer_balance "
                                "where id = ${c}$", {"c": ev.customer_id})
            if acct is None:
                raise UnknownCustomer(f"customer {ev.customer_id} has no account")
            await self._take_covered(tx, ev, price, row, acct)
        if existing is None:
            await tx.insert("accounting_records", row, later=True)   # its duplicate key raises at COMMIT
        else:
            keep = ("id", "request_id", "payload", "payload_hash", "created_at")
            sets = ", ".join(f"{k} = ${{{k}}}$" for k in row if k not in keep)
            await tx.execute(f"update accounting_records set {sets} where id = ${{id}}$", row)
            await self.failures.resolve_in(tx, existing.id, now)
        await self._link_usage(tx, [row])
        return row

    async def _debit(self, tx: Tx, ev: Event, price: PriceResult, row: dict[str, Any],
                     defer_to: tuple[str, ...] = (), learn: bool = True) -> str:
        """The usage debit of ``row["amount"]`` (its budgets are spent by it: refused, the whole
        charge rolls back); the ledger entry's id. ``learn``: as for ``Ledger.post``."""
        entry = await self.ledger.post(
            tx, ev.customer_id, -row["amount"], "usage", ev.request_id, ev.hash,
            must_cover=not self.config.accounting.allow_arrears, refuse_suspended=True,
            ref_type="accounting_records", ref_id=row["id"], want_balance=False,
            currency_is=(price.currency, lambda currency: self._refusal(price, currency)),
            spender=ev.spender, defer_to=defer_to, learn=learn)
        return entry["id"]

    async def _take_covered(self, tx: Tx, ev: Event, price: PriceResult, row: dict[str, Any],
                            account: Row) -> None:
        """For a customer with subscriptions (``account``: its locked balance row): the currency is
        checked first, then the quota hook takes its part of ``row``'s charge."""
        refusal = self._refusal(price, account.currency)
        if refusal is not None:
            raise refusal
        if self._subscribed_flag and account.subscription_count:
            self._apply_quota(row, await self._take_quota(tx, ev, price, row["id"]))

    async def _spend_budgets(self, tx: Tx, ev: Event, amount: int, memo: dict, account: Row | None,
                             deferred: dict | None = None) -> list[Any]:
        """Spend a batch's charge of ``amount`` from the event's budgets (BudgetExceeded when one
        is short); ``memo``: one per batch transaction, so each spender's budgets are looked up
        once; ``account``: the customer's row from ``_accounts`` (its budget_count)."""
        if self.budgets is None or amount <= 0 or (account is not None and not account.budget_count):
            return []
        return await self.budgets.spend(tx, ev.spender, amount, memo, deferred)

    async def _budget_refused(self, error: BaseException) -> None:
        """A budget refused a charge (its transaction is over): its 100 % alert, once per period."""
        if isinstance(error, BudgetExceeded) and self.budgets is not None:
            await self.budgets.refused(error)

    async def _link_usage(self, tx: Tx, rows: list[dict[str, Any]]) -> None:
        """The usage rows the quota hook wrote for charged records carry their ledger entry."""
        charged = [r["id"] for r in rows if r.get("subscription_id") and r.get("ledger_entry_id")]
        if charged and self.quota is not None:
            await self.quota.link_ledger(tx, charged)


def _debits(group: list[Any]) -> list[dict[str, Any]]:
    """The ledger items of a batch's charges of one customer (``(i, row, ev, price)``), those with
    an amount to debit."""
    return [{"amount": -row["amount"], "request_id": ev.request_id, "payload_hash": ev.hash,
             "ref_type": "accounting_records", "ref_id": row["id"]}
            for _, row, ev, _ in group if row["amount"] > 0]


def _settled(group: list[Any], entries: list[dict[str, Any]], outcomes: list[Any],
             records: list[dict[str, Any]]) -> None:
    """A batch's charges of one customer, debited: each record carries its ledger entry and is
    written; its outcome is the record."""
    entry_of = {e["ref_id"]: e["id"] for e in entries}
    for i, row, _, _ in group:
        row["ledger_entry_id"] = entry_of.get(row["id"])
        records.append(row)
        outcomes[i] = (row, None)


def record_row(ev: Event, now: str, status: str, currency: str, price: PriceResult | None = None,
               model: Row | None = None) -> dict[str, Any]:
    """The ``accounting_records`` row of event ``ev`` (a new id), priced when ``price`` is given;
    ``currency`` is the module's, for a row not priced yet."""
    u = ev.usage
    row = {
        # model["..."]: a Row's attribute is read through a failed lookup first, ~15 times dearer
        "id": new_id(), "customer_id": ev.customer_id, "llmid": (model["id"] if model else ev.llmid),
        "model_name": (model["name"] if model else ev.payload["model_name"]) or u.model_name,
        "pricing_id": price.program_id if price else None,
        "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens, "cached_tokens": u.cached_tokens,
        "quantity": str(u.quantity), "unit": u.unit, "amount": price.amount if price else 0,
        "original_amount": price.original_amount if price else None, "cost": price.cost if price else None,
        "discount": price.discount if price else None, "price_version": price.version_id if price else None,
        "price_lines": _price_lines_json(price) if price else None,
        "currency": price.currency if price else currency,
        "request_id": ev.request_id, "transno": ev.transno, "status": status, "user_id": ev.user_id,
        "product_id": ev.product_id, "use_time": ev.use_time,
        "payload": _payload_text(ev.payload), "payload_hash": ev.hash,
        "attempts": 0, "created_at": now, "updated_at": now,
        # every row has the same columns: a multi-row insert takes its columns from the first
        "subscription_id": None, "included_quantity": None,
    }
    return row


def _payload_encoder() -> Any:
    """``json.dumps(payload, ensure_ascii=False)``, the same text, by json's C encoder built once
    (``json.dumps`` builds one per call). No cycle check: a payload was read from JSON, or written
    by ``payload_hash`` first, whose encoders refuse a cycle."""
    plain = json.JSONEncoder(ensure_ascii=False)
    if c_make_encoder is None:         # a Python without json's C speedups
        return plain.encode
    encode = c_make_encoder(None, plain.default, encode_basestring, None, ": ", ", ", False, False, True)
    return lambda payload: "".join(encode(payload, 0))


_payload_text = _payload_encoder()

BATCH_MODES = ("now", "queue")
TURN_EVENTS = 32    # a batch's events between two turns of the event loop (in_turns)


async def in_turns(items: Iterable[Any]) -> AsyncIterator[Any]:
    """``items`` one by one, with a turn of the event loop every ``TURN_EVENTS``. A batch's
    per-event work takes about a millisecond per 32 events; done in one stretch it would hold the
    loop for tens of milliseconds, and the transaction of another request, waiting to send its
    next statement, would hold the SQLite write lock (every writer's) that much longer."""
    for k, item in enumerate(items):
        if k % TURN_EVENTS == TURN_EVENTS - 1:
            await asyncio.sleep(0)
        yield item


def check_batch(events: Any, limit: int) -> None:
    """The one rule for a batch's size: a list of 1 to ``limit`` events."""
    if not isinstance(events, list) or not 0 < len(events) <= limit:
        raise InvalidParam(f"events: a JSON list of 1 to {limit} usage events")


def batch_refusal(error: BillingError) -> dict:
    """One refused event of a batch: the single endpoint's error reply, with its outcome."""
    return dict(error.to_reply(), outcome="refused")


def _with_outcome(view: dict) -> dict:
    """``view`` (a reply built for this batch alone: taken over, not copied) with its outcome."""
    if view.get("status") == "pending" and not view.get("duplicate"):
        outcome = "queued"
    else:
        outcome = "duplicate" if view.get("duplicate") else "accounted"
    view["success"], view["outcome"] = True, outcome
    return view


async def _batch_result(reply) -> dict:
    """Await one event's reply (a coroutine): its result, or its refusal."""
    try:
        return _with_outcome(await reply)
    except BillingError as e:
        return batch_refusal(e)


def _queued_view(row):
    return {"record_id": row["id"], "request_id": row["request_id"], "status": "pending", "duplicate": False}


def _reused(ev):
    return Conflict(f"request_id {ev.request_id} was already used with a different payload")

# The accountant's claim of up to ${n}$ pending records (plus the dialect's SKIP LOCKED). The event
# itself is rebuilt from the payload (rebuild_event); the other columns are what the update needs.
# Oldest first, in the order of the (status, created_at) index: a tie-break on id would sort every
# pending row of the same second (SQLite's index ends with the rowid, not the id).
CLAIM_PENDING = ("select id, request_id, customer_id, payload, payload_hash, attempts, created_at, status "
                 "from accounting_records where status = 'pending' order by created_at limit ${n}$")


def _event_error(exc, rec):
    """The failure to record for one event of a batch: its own BillingError, or ``invalid_event``
    for anything else it raised (a bug must not stop the others either; the log has the trace)."""
    if isinstance(exc, BillingError):
        return exc
    log.warning("accounting record %s cannot be priced", rec.id, exc_info=exc)
    return InvalidEvent(f"stored event {rec.request_id} cannot be priced: {type(exc).__name__}: {exc}"[:500])


# the NOT NULL columns in accounted_update's rows for MySQL's upsert only: the record keeps them
UPSERT_ONLY = ("customer_id", "created_at")


def accounted_update(rec: Row, price: PriceResult, model: Row, now: str) -> dict[str, Any]:
    """The columns that change when a stored record is accounted (plus the NOT NULL ones an
    upsert needs on MySQL). Per event of every batch: the rows are read as the dicts they are."""
    return {
        "id": rec["id"], "customer_id": rec["customer_id"], "created_at": rec["created_at"], "status": "accounted",
        "amount": price.amount, "original_amount": price.original_amount, "cost": price.cost,
        "discount": price.discount, "currency": price.currency, "pricing_id": price.program_id,
        "price_version": price.version_id, "price_lines": _price_lines_json(price),
        "llmid": model["id"], "model_name": model["name"], "ledger_entry_id": None, "subscription_id": None,
        "included_quantity": None, "attempts": int(rec["attempts"] or 0) + 1, "accounted_at": now, "updated_at": now,
    }


def _price_lines_json(price: PriceResult) -> str:
    """The stored price lines; a factor of the event that had no price is kept as
    ``{"factor": ..., "unpriced": true}`` so the record says what was not charged. The text is
    ``json.dumps`` of that list, written without building it (``PriceLine.to_json``)."""
    parts = [ln.to_json() for ln in price.lines]
    parts += [f'{{"factor": {json_text(f)}, "unpriced": true}}' for f in price.unpriced]
    return "[" + ", ".join(parts) + "]"


def parse_event_or_none(rec: Row) -> Event | None:
    try:
        return parse_event(json.loads(rec.payload))
    except (BillingError, ValueError, TypeError):
        return None

