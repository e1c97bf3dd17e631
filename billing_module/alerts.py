"""Alerts: an outbox written in the transaction of the change that raises them, delivered as
signed JSON webhooks (docs/webhooks.md).

``emit(tx, type, customer_id, data)`` inserts one ``alert_outbox`` row and one
``alert_delivery`` row per receiver (the deployment's ``alerts.webhook_url``, the customer's
own webhook) inside the caller's transaction: a change that rolls back leaves no alert, a
change that commits has its alert stored before anything is sent, so a SIGKILL loses nothing.

``deliver_due`` (a background job on every instance) claims each due delivery with a
conditional UPDATE (a claim token, its next_attempt_at pushed to the end of the claim), POSTs
it and records the outcome under the same token: 2xx is ``delivered``; anything else is
retried with exponential backoff until ``alerts.max_attempts``, then ``failed`` (an admin may
redeliver). At least once: a receiver dedupes by the alert ``id``.

The alert sources: ``low_balance`` from ``LowBalanceWatch`` (called by ``Ledger.post`` /
``post_many`` after a debit, inside its transaction, once per crossing), ``failed_exhausted``
(failures.py) and ``sync_failing`` (sync/base.py) through ``emit_once`` with a key that makes
them once per exhaustion / failing streak.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import aiohttp

from . import clock, metrics
from .auth import SecretBox
from .config import Config
from .db import dialect as dialects
from .db.database import Database, Row, Tx, where
from .db.schema import refresh_derived
from .errors import InvalidParam, NotFound
from .ids import new_id
from .money import from_micro, to_micro

log = logging.getLogger("billing_module.alerts")

ALERT_TYPES = ("low_balance", "budget_80", "budget_100", "failed_exhausted", "sync_failing")
STATUSES = ("pending", "delivered", "failed")
DEPLOYMENT, CUSTOMER = "deployment", "customer"
SECRET_MIN_LEN, SECRET_MAX_LEN = 16, 200
_BASE_KEYS = ("id", "type", "customer_id", "created_at")
_MAX_ERROR_CHARS = 500


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``<timestamp>.<raw body>``: the X-Billing-Signature header."""
    return hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def _iso(value: Any) -> str:
    when = value if hasattr(value, "year") else clock.parse(str(value))
    return when.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def body_of(alert: Row) -> bytes:
    """The webhook body: the alert's own keys first; ``data`` cannot overwrite them."""
    data = json.loads(alert.data or "{}")
    body = {"id": alert.id, "type": alert.alert_type, "customer_id": alert.customer_id,
            "created_at": _iso(alert.created_at)}
    body.update((k, v) for k, v in data.items() if k not in _BASE_KEYS)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Alerts:
    """The outbox (``emit``), its delivery job, the per-customer webhooks and the alert list."""

    def __init__(self, db: Database, config: Config, secret_box: SecretBox) -> None:
        self.db = db
        self.config = config
        self.secret_box = secret_box

    # --- the outbox -----------------------------------------------------------------------------
    async def emit(self, tx: Tx, type: str, customer_id: str | None, data: dict[str, Any]) -> None:
        """Store an alert and its deliveries inside the caller's transaction ``tx``."""
        await self._store(tx, type, customer_id, data, None)

    async def emit_once(self, tx: Tx, dedupe_key: str, type: str, customer_id: str | None,
                        data: dict[str, Any]) -> bool:
        """``emit`` unless an alert with ``dedupe_key`` exists (a unique index decides): False then."""
        return await self._store(tx, type, customer_id, data, dedupe_key[:160])

    async def _store(self, tx, type_, customer_id, data, dedupe_key) -> bool:
        assert type_ in ALERT_TYPES, f"unknown alert type {type_!r}"
        now = clock.now_text()
        alert_id = new_id()
        row = {"id": alert_id, "alert_type": type_, "customer_id": customer_id, "dedupe_key": dedupe_key,
               "data": json.dumps(data, ensure_ascii=False, default=str), "created_at": now}
        if dedupe_key is None:
            await tx.insert("alert_outbox", row)
        elif await tx.execute(f"{dialects.insert_ignore(tx.dialect)} into alert_outbox "
                              "(id, alert_type, customer_id, dedupe_key, data, created_at) values "
                              "(${id}$, ${alert_type}$, ${customer_id}$, ${dedupe_key}$, ${data}$, ${created_at}$)",
                              row) != 1:
            return False
        targets = []
        if self.config.alerts.webhook_url:
            targets.append((DEPLOYMENT, self.config.alerts.webhook_url))
        if customer_id:
            url = await tx.scalar("select webhook_url from alert_webhook where customer_id = ${c}$", {"c": customer_id})
            if url:
                targets.append((CUSTOMER, url))
        if targets:
            await tx.insert_many("alert_delivery", [
                {"id": new_id(), "alert_id": alert_id, "target": target, "url": url, "status": "pending",
                 "attempts": 0, "next_attempt_at": now, "claim_token": None, "last_status": None,
                 "last_error": None, "delivered_at": None, "created_at": now, "updated_at": now}
                for target, url in targets])
        return True

    # --- delivery ---------------------------------------------------------------------------------
    def backoff_seconds(self, attempts: int) -> int:
        cfg = self.config.alerts
        return int(min(cfg.retry_base_seconds * (2 ** min(attempts, 30)), cfg.retry_max_seconds))

    async def _due(self, limit: int) -> list[Row]:
        async with self.db.read() as tx:
            return await tx.select("select id, next_attempt_at from alert_delivery where status = 'pending' "
                                   "and next_attempt_at <= ${now}$ order by next_attempt_at limit ${n}$",
                                   {"now": clock.now_text(), "n": limit})

    async def _claim(self, row: Row) -> str | None:
        """Take a due delivery for the length of one attempt: a conditional UPDATE that only one
        instance wins (the next_attempt_at it read must still be there). Returns the claim token."""
        token = new_id()
        until = clock.now_text(self.config.alerts.timeout_seconds + 60)

        async def work(tx):
            return await tx.execute(
                "update alert_delivery set claim_token = ${tok}$, next_attempt_at = ${until}$ "
                "where id = ${i}$ and status = 'pending' and next_attempt_at = ${was}$",
                {"tok": token, "until": until, "i": row.id, "was": row.next_attempt_at})
        return token if await self.db.run(work) == 1 else None

    async def deliver_due(self) -> int:
        """The background job: claim and send the due deliveries. Returns how many were delivered."""
        delivered = 0
        rows = await self._due(self.config.alerts.batch_size)
        if not rows:
            return 0
        timeout = aiohttp.ClientTimeout(total=self.config.alerts.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for row in rows:
                token = await self._claim(row)
                if token is not None:
                    delivered += await self._attempt(session, row.id, token)
        return delivered

    async def _attempt(self, session: aiohttp.ClientSession, delivery_id: str, token: str) -> int:
        async with self.db.read() as tx:
            d = await tx.one("select * from alert_delivery where id = ${i}$ and claim_token = ${t}$",
                             {"i": delivery_id, "t": token})
            alert = None if d is None else await tx.one("select * from alert_outbox where id = ${a}$",
                                                        {"a": d.alert_id})
        if d is None or alert is None:
            return 0
        status, error = 0, None
        secret = await self._secret(d.target, alert.customer_id)
        if not secret:   # the customer's webhook was removed since: nothing to sign with, give up
            return await self._record(d, token, 0, "the receiver's webhook secret is no longer set", final=True)
        try:
            body = body_of(alert)
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", "X-Billing-Timestamp": timestamp,
                       "X-Billing-Signature": sign(secret, timestamp, body), "X-Billing-Alert-Id": alert.id}
            async with session.post(d.url, data=body, headers=headers, allow_redirects=False) as r:
                status = r.status
                if not 200 <= status < 300:
                    error = f"HTTP {status}: {(await r.text(errors='replace'))[:200]}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
        return await self._record(d, token, status, error)

    async def _secret(self, target: str, customer_id: str | None) -> str:
        if target == DEPLOYMENT:
            return self.config.alerts.webhook_secret
        async with self.db.read() as tx:
            enc = await tx.scalar("select secret_enc from alert_webhook where customer_id = ${c}$", {"c": customer_id})
        return self.secret_box.decrypt(enc) if enc else ""

    async def _record(self, d: Row, token: str, status: int, error: str | None, final: bool = False) -> int:
        """The outcome of one attempt, under the claim token (a claim that ran out and was taken
        over by another instance records nothing here)."""
        now = clock.now_text()
        attempts = int(d.attempts or 0) + 1
        ns = {"i": d.id, "t": token, "now": now, "n": attempts, "st": status, "err": error}
        if error is None:
            sql = ("update alert_delivery set status = 'delivered', delivered_at = ${now}$, attempts = ${n}$, "
                   "last_status = ${st}$, last_error = null, claim_token = null, next_attempt_at = null, "
                   "updated_at = ${now}$ where id = ${i}$ and claim_token = ${t}$")
            metrics.webhook_delivered(d.target)
        else:
            gave_up = final or attempts >= self.config.alerts.max_attempts
            ns.update(state="failed" if gave_up else "pending",
                      nx=None if gave_up else clock.now_text(self.backoff_seconds(attempts - 1)))
            sql = ("update alert_delivery set status = ${state}$, attempts = ${n}$, last_status = ${st}$, "
                   "last_error = ${err}$, claim_token = null, next_attempt_at = ${nx}$, updated_at = ${now}$ "
                   "where id = ${i}$ and claim_token = ${t}$")
            metrics.webhook_failed(d.target, "gave_up" if gave_up else "retry")
            log.info("webhook delivery %s to %s failed (attempt %s): %s", d.id, d.url, attempts, error)

        async def work(tx):
            return await tx.execute(sql, ns)
        await self.db.run(work)
        return 1 if error is None else 0

    async def redeliver(self, delivery_id: str | None = None, alert_id: str | None = None) -> dict[str, Any]:
        """Admin: send again now one delivery, or every delivery of an alert that is not pending
        (a failed one, or a delivered one once more). Returns the alert."""
        now = clock.now_text()
        column, key = ("id", delivery_id) if delivery_id else ("alert_id", alert_id)
        if not key:
            raise InvalidParam("delivery_id or id (the alert's): required")

        async def work(tx):
            await tx.execute(
                "update alert_delivery set status = 'pending', attempts = 0, next_attempt_at = ${now}$, "
                f"claim_token = null, updated_at = ${{now}}$ where {column} = ${{k}}$ and status <> 'pending'",
                {"now": now, "k": key})
            if delivery_id:
                return await tx.scalar("select alert_id from alert_delivery where id = ${k}$", {"k": key})
            return await tx.scalar("select id from alert_outbox where id = ${k}$", {"k": key})
        found = await self.db.run(work)
        if found is None:
            raise NotFound(f"no alert {'delivery ' if delivery_id else ''}{key}")
        return await self.alert(found)

    async def alert(self, alert_id: str) -> dict[str, Any]:
        async with self.db.read() as tx:
            row = await tx.one("select * from alert_outbox where id = ${i}$", {"i": alert_id})
            if row is None:
                raise NotFound(f"no alert {alert_id}")
            deliveries = await tx.select("select * from alert_delivery where alert_id = ${i}$ order by target",
                                         {"i": alert_id})
        return alert_view(row, [delivery_view(d) for d in deliveries])

    # --- reads ------------------------------------------------------------------------------------
    async def search(self, customer_id: str | None = None, type: str | None = None, status: str | None = None,
                     page: int = 1, rows: int = 20) -> dict[str, Any]:
        """Alerts, newest first, each with its deliveries. ``status``: alerts with a delivery
        pending / failed, or delivered to every receiver."""
        status_cond = {
            "pending": "exists (select 1 from alert_delivery d where d.alert_id = a.id and d.status = 'pending')",
            "failed": "exists (select 1 from alert_delivery d where d.alert_id = a.id and d.status = 'failed')",
            "delivered": ("exists (select 1 from alert_delivery d where d.alert_id = a.id) and not exists "
                          "(select 1 from alert_delivery d where d.alert_id = a.id and d.status <> 'delivered')"),
        }
        cond, ns = where(("a.customer_id = ${c}$", "c", customer_id), ("a.alert_type = ${t}$", "t", type))
        if status and status not in status_cond:
            raise InvalidParam(f"status: must be one of {', '.join(STATUSES)}")
        if status:
            cond = f"{cond} and {status_cond[status]}"
        async with self.db.read() as tx:
            result = await tx.page(f"select a.* from alert_outbox a where {cond}", ns,
                                   "a.created_at desc, a.id desc", page, rows)
            ids = [r.id for r in result["rows"]]
            deliveries: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            if ids:
                dns: dict[str, Any] = {}
                in_sql = tx.in_list(ids, dns)
                for d in await tx.select(f"select * from alert_delivery where alert_id in {in_sql} "
                                         "order by target", dns):
                    deliveries[d.alert_id].append(delivery_view(d))
        result["rows"] = [alert_view(r, deliveries[r.id]) for r in result["rows"]]
        return result

    async def undelivered_count(self) -> dict[str, int]:
        """Deliveries not delivered yet, by status (the index card and the metrics gauge)."""
        async with self.db.read() as tx:
            rows = await tx.select("select status, count(*) as n from alert_delivery where status <> 'delivered' "
                                   "group by status")
        return {r.status: int(r.n) for r in rows}

    # --- per-customer settings --------------------------------------------------------------------
    async def webhook(self, customer_id: str) -> dict[str, Any]:
        async with self.db.read() as tx:
            row = await tx.one("select * from alert_webhook where customer_id = ${c}$", {"c": customer_id})
        return webhook_view(row, customer_id)

    async def set_webhook(self, customer_id: str, changes: dict[str, Any], operator: str | None) -> dict[str, Any]:
        """Change a customer's webhook (``url``, ``secret``) and low-balance override
        (``low_balance_amount`` in micro-units or ``low_balance_percent`` of the last recharge; at
        most one of them). Keys absent from ``changes`` stay; a None value clears. The values
        have been validated by the caller (validation.py); the combination is checked here."""
        now = clock.now_text()

        async def work(tx):
            await tx.execute(f"{dialects.insert_ignore(tx.dialect)} into alert_webhook (customer_id, created_at, "
                             "updated_at) values (${c}$, ${now}$, ${now}$)", {"c": customer_id, "now": now})
            cur = await tx.one(f"select * from alert_webhook where customer_id = ${{c}}${tx.for_update()}",
                               {"c": customer_id})
            sets = {"updated_at": now, "updated_by": (operator or "")[:64] or None}
            if "url" in changes:
                sets["webhook_url"] = changes["url"]
                if changes["url"] is None:
                    sets.update(secret_enc=None, secret_hint=None)
            if changes.get("secret") is not None:
                sets.update(secret_enc=self.secret_box.encrypt(changes["secret"]),
                            secret_hint=changes["secret"][:4] + "…")
            if sets.get("webhook_url", cur.webhook_url) and not sets.get("secret_enc", cur.secret_enc):
                raise InvalidParam("secret: required with a webhook url (at least "
                                   f"{SECRET_MIN_LEN} characters; receivers verify the signature with it)")
            if changes.get("low_balance_amount") is not None and changes.get("low_balance_percent") is not None:
                raise InvalidParam("low_balance_amount, low_balance_percent: give one of them, not both")
            for key in ("low_balance_amount", "low_balance_percent"):
                if key in changes:
                    sets[key] = changes[key]
                    if changes[key] is not None:   # one override replaces the other
                        other = "low_balance_percent" if key == "low_balance_amount" else "low_balance_amount"
                        sets.setdefault(other, None)
            names = ", ".join(f"{k} = ${{{k}}}$" for k in sets)
            await tx.execute(f"update alert_webhook set {names} where customer_id = ${{c}}$", dict(sets, c=customer_id))
            # whether the customer has its own threshold, on the balance row a debit updates anyway
            # (LowBalanceWatch.every_debit): set in this transaction, under that row's lock
            await tx.execute(refresh_derived("customer_balance", ["low_balance_set"], "id = ${c}$"),
                             {"c": customer_id})
            return await tx.one("select * from alert_webhook where customer_id = ${c}$", {"c": customer_id})
        return webhook_view(await self.db.run(work), customer_id)


class LowBalanceWatch:
    """``low_balance`` once per crossing: called by the ledger after a debit, inside its
    transaction, while the balance row is locked by that debit's UPDATE (an assumed debit's
    UPDATE is sent, and checked, by this watch's first read). Balance after: the row
    now; before: after minus the debit. An alert when before >= threshold > after, so several
    debits below the line make one alert, and a recharge above it arms the next one."""

    def __init__(self, config: Config, alerts: Alerts) -> None:
        self.alerts = alerts
        amount = config.alerts.low_balance_amount
        self.default_micros: int | None = to_micro(amount, "alerts.low_balance_amount") if amount else None
        # without a deployment threshold only customers with their own are watched: the ledger
        # calls ``debited`` for those alone (their balance row has low_balance_set)
        self.every_debit = self.default_micros is not None

    async def debited(self, tx: Tx, customer_id: str, amount_micros: int) -> None:
        row = await tx.one("select b.balance, b.currency, w.low_balance_amount, w.low_balance_percent "
                           "from customer_balance b left join alert_webhook w on w.customer_id = b.id "
                           "where b.id = ${c}$", {"c": customer_id})
        if row is None:
            return
        threshold, basis = self.default_micros, "deployment"
        if row.low_balance_amount is not None:
            threshold, basis = int(row.low_balance_amount), "customer"
        elif row.low_balance_percent is not None:
            last = await tx.scalar("select amount from ledger_entry where customer_id = ${c}$ "
                                   "and entry_type = 'recharge' order by created_at desc, id desc limit 1",
                                   {"c": customer_id})
            threshold = int(last) * int(row.low_balance_percent) // 100 if last else None
            basis = f"{int(row.low_balance_percent)}% of the last recharge"
        if threshold is None:
            return
        after = int(row.balance)
        before = after - amount_micros
        if before >= threshold > after:
            await self.alerts.emit(tx, "low_balance", customer_id, {
                "balance": from_micro(after), "balance_before": from_micro(before),
                "threshold": from_micro(threshold), "threshold_basis": basis, "currency": row.currency})


def alert_view(r: Row, deliveries: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = {d["status"] for d in deliveries}
    overall = ("none" if not deliveries else "failed" if "failed" in statuses
               else "pending" if "pending" in statuses else "delivered")
    data = json.loads(r.data or "{}")
    return {"id": r.id, "type": r.alert_type, "customer_id": r.customer_id, "created_at": _text(r.created_at),
            "data": data, "status": overall, "deliveries": deliveries,
            # flat texts for a grid row
            "summary": ", ".join(f"{k}: {v}" for k, v in data.items())[:300],
            "delivery_summary": "; ".join(f"{d['target']} {d['status']} ({d['attempts']} attempts"
                                          f"{', HTTP ' + str(d['last_status']) if d['last_status'] else ''})"
                                          for d in deliveries)}


def delivery_view(d: Row) -> dict[str, Any]:
    return {"delivery_id": d.id, "alert_id": d.alert_id, "target": d.target, "url": d.url, "status": d.status,
            "attempts": int(d.attempts or 0), "next_attempt_at": _text(d.next_attempt_at),
            "last_status": d.last_status, "last_error": d.last_error, "delivered_at": _text(d.delivered_at)}


def webhook_view(row: Row | None, customer_id: str) -> dict[str, Any]:
    """A customer's alert settings; the secret only as its first characters."""
    if row is None:
        return {"customer_id": customer_id, "url": None, "secret_set": False, "secret_hint": None,
                "low_balance_amount": None, "low_balance_percent": None, "updated_at": None}
    return {"customer_id": customer_id, "url": row.webhook_url, "secret_set": bool(row.secret_enc),
            "secret_hint": row.secret_hint,
            "low_balance_amount": None if row.low_balance_amount is None else from_micro(int(row.low_balance_amount)),
            "low_balance_percent": None if row.low_balance_percent is None else int(row.low_balance_percent),
            "updated_at": _text(row.updated_at)}


def _text(value: Any) -> str | None:
    return None if value is None else clock.fmt(value) if hasattr(value, "year") else str(value)
