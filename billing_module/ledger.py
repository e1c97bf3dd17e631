"""Balances, holds and the append-only ledger.

``customer_balance`` is a projection: ``balance`` is the sum of the customer's
``ledger_entry`` amounts and ``held`` the sum of its open holds; ``reconcile`` proves it.

Every money movement is one conditional UPDATE of the balance row whose row count is checked,
plus its ledger entry, in one transaction; never a read-check-write in Python. Each operation
is idempotent on the caller's ``request_id`` (unique per entry type in the database): the same
request again returns the first result with ``duplicate: true``; the same ``request_id`` with a
different payload is a ``conflict``.

Availability rule: a debit that must be covered (a hold, a usage charge when arrears are not
allowed) passes when ``balance - held - amount >= -credit_limit``.
"""
import logging

from appPublic.dictObject import DictObject

from . import clock
from .db import dialect as dialects
from .db.database import where
from .errors import (AccountSuspended, BillingError, Conflict, InsufficientBalance, InvalidParam, NotFound,
                     UnknownCustomer)
from .ids import new_id, payload_hash
from .money import MAX_MICRO, from_micro

log = logging.getLogger("billing_module.ledger")

STATUSES = ("active", "suspended", "arrears")

_ENTRY_COLUMNS = ("id", "customer_id", "entry_type", "amount", "request_id", "payload_hash", "ref_type", "ref_id",
                  "reason", "operator", "created_at")
_INSERT_ENTRY = (f"insert into ledger_entry ({', '.join(_ENTRY_COLUMNS)}, balance_after, currency) "
                 f"select {', '.join('${%s}$' % c for c in _ENTRY_COLUMNS)}, balance, currency "
                 "from customer_balance where id = ${customer_id}$")

_BALANCE_COLUMNS = ("id, balance, held, credit_limit, currency, status, last_recharge, "
                    "last_consumption, version, updated_at")


def _balance_update(must_cover, refuse_suspended):
    """The conditional UPDATE behind every money movement (parameters c, amt, hd, now, et)."""
    # status comes first: MySQL evaluates SET left to right with the new values, SQLite with
    # the old ones; read before the balance changes, both see the old balance.
    sets = ("status = case when status = 'arrears' and balance + ${amt}$ >= -coalesce(credit_limit, 0) "
            "then 'active' when status = 'active' and balance + ${amt}$ < -coalesce(credit_limit, 0) "
            "then 'arrears' else status end, "
            "balance = balance + ${amt}$, held = held + ${hd}$, version = version + 1, updated_at = ${now}$, "
            "last_recharge = case when ${amt}$ > 0 and ${et}$ = 'recharge' then ${now}$ else last_recharge end, "
            "last_consumption = case when ${amt}$ < 0 and ${et}$ in ('usage', 'settle', 'overage', 'subscription') "
            "then ${now}$ else last_consumption end")
    cond = "id = ${c}$"
    if must_cover or refuse_suspended:
        cond += " and status <> 'suspended'"
    if must_cover:
        cond += " and balance - held + ${amt}$ - ${hd}$ >= -coalesce(credit_limit, 0)"
    return f"update customer_balance set {sets} where {cond}"


def balance_view(row):
    """The reply shape of a balance row (money as decimal strings)."""
    credit = int(row.credit_limit or 0)
    balance, held = int(row.balance), int(row.held)
    return {
        "customer_id": row.id, "balance": from_micro(balance), "held": from_micro(held),
        "available": from_micro(balance - held), "credit_limit": from_micro(credit),
        "spendable": from_micro(balance - held + credit), "currency": row.currency,
        "status": row.status, "last_recharge": row.last_recharge, "last_consumption": row.last_consumption,
    }


def entry_view(entry, duplicate=False):
    return {
        "entry_id": entry.id, "customer_id": entry.customer_id, "entry_type": entry.entry_type,
        "amount": from_micro(int(entry.amount)), "balance_after": from_micro(int(entry.balance_after)),
        "currency": entry.currency, "request_id": entry.request_id, "created_at": entry.created_at,
        "duplicate": duplicate,
    }


def hold_view(hold, duplicate=False):
    return {
        "hold_id": hold.id, "customer_id": hold.customer_id, "request_id": hold.request_id,
        "amount": from_micro(int(hold.amount)), "status": hold.status,
        "settled_amount": None if hold.settled_amount is None else from_micro(int(hold.settled_amount)),
        "expires_at": hold.expires_at, "created_at": hold.created_at, "duplicate": duplicate,
    }


def _check_amount(amount, what, allow_zero=False, signed=False):
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidParam(f"{what}: internal amounts are integer micro-units")
    if abs(amount) > MAX_MICRO:
        raise InvalidParam(f"{what}: too large")
    if signed:
        if amount == 0:
            raise InvalidParam(f"{what}: must not be zero")
    elif amount < 0 or (amount == 0 and not allow_zero):
        raise InvalidParam(f"{what}: must be {'zero or ' if allow_zero else ''}positive")


class Ledger:
    def __init__(self, db, config):
        self.db = db
        self.config = config

    # --- reads -----------------------------------------------------------------------------
    async def balance(self, customer_id):
        async with self.db.read() as tx:
            row = await tx.one(f"select {_BALANCE_COLUMNS} from customer_balance where id = ${{c}}$",
                               {"c": customer_id})
        if row is None:
            raise UnknownCustomer(f"no balance for customer {customer_id}")
        return balance_view(row)

    async def balances(self, page=1, rows=20, customer_id=None, status=None):
        cond, ns = where(("b.id like ${cid}$", "cid", f"%{customer_id}%" if customer_id else None),
                         ("b.status = ${status}$", "status", status))
        sql = (f"select b.{_BALANCE_COLUMNS.replace(', ', ', b.')}, u.name as customer_name "
               f"from customer_balance b left join users_cache u on u.id = b.id and u.entity_kind = 'org' "
               f"where {cond}")
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, "b.id", page, rows)
        result["rows"] = [dict(balance_view(r), customer_name=r.customer_name) for r in result["rows"]]
        return result

    async def entries(self, customer_id=None, page=1, rows=20, entry_type=None):
        cond, ns = where(("customer_id = ${c}$", "c", customer_id), ("entry_type = ${t}$", "t", entry_type))
        sql = f"select * from ledger_entry where {cond}"
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, "created_at desc, id desc", page, rows)
        result["rows"] = [dict(entry_view(e), reason=e.reason, operator=e.operator, ref_type=e.ref_type,
                               ref_id=e.ref_id) for e in result["rows"]]
        return result

    # --- the one primitive every money movement uses ------------------------------------------
    async def post(self, tx, customer_id, amount, entry_type, request_id, phash, *, must_cover=False,
                   refuse_suspended=False, want_balance=True,
                   held_delta=0, ref_type=None, ref_id=None, reason=None, operator=None, create=False,
                   currency=None):
        """Apply ``amount`` (signed micro-units) to the balance and append its ledger entry, inside
        the caller's transaction. ``must_cover``: refuse with ``insufficient_balance`` when the
        debit would take ``balance - held`` below ``-credit_limit``. Returns the entry row."""
        now = clock.now_text()
        ns = {"c": customer_id, "amt": amount, "hd": held_delta, "now": now, "et": entry_type}
        sql = _balance_update(must_cover, refuse_suspended)
        n = await tx.execute(sql, ns)
        if n == 0 and create:
            await self._create_account(tx, customer_id, now, currency)
            n = await tx.execute(sql, ns)
        if n == 0:
            await self._explain_refusal(tx, customer_id)
        entry = {
            "id": new_id(), "customer_id": customer_id, "entry_type": entry_type, "amount": amount,
            "request_id": request_id, "payload_hash": phash, "ref_type": ref_type, "ref_id": ref_id,
            "reason": (reason or "")[:255] or None, "operator": (operator or "")[:64] or None, "created_at": now,
        }
        # balance_after and currency come from the row this transaction has just changed (and
        # holds locked): one statement instead of a read and a write
        await tx.execute(_INSERT_ENTRY, entry)
        entry = DictObject(**entry)
        if want_balance:
            row = await tx.one("select balance, currency from customer_balance where id = ${c}$", ns)
            entry.update(balance_after=int(row.balance), currency=row.currency)
        return entry

    async def post_many(self, tx, customer_id, items, entry_type, *, must_cover=False, refuse_suspended=False,
                        all_or_nothing=False):
        """Debit a batch of one customer's items inside the caller's transaction: one conditional
        update for their total when it is covered, else item by item in order until the balance
        runs out (``all_or_nothing``: refuse them all instead). ``items``: dicts with amount (signed
        micro), request_id, payload_hash, ref_type, ref_id. Returns (entries, refused) where refused
        is [(item, BillingError or None)]. Entries are
        written with one multi-row insert, each with its exact running balance_after."""
        now = clock.now_text()
        sql = _balance_update(must_cover, refuse_suspended)
        ns = {"c": customer_id, "hd": 0, "now": now, "et": entry_type, "amt": sum(i["amount"] for i in items)}
        accepted, refused = list(items), []
        if await tx.execute(sql, ns) == 0:
            if all_or_nothing:
                return [], [(item, None) for item in items]
            accepted = []
            for item in items:
                if await tx.execute(sql, dict(ns, amt=item["amount"])) == 1:
                    accepted.append(item)
                    continue
                try:
                    await self._explain_refusal(tx, customer_id)
                except BillingError as e:
                    refused.append((item, e))
        if not accepted:
            return [], refused
        row = await tx.one("select balance, currency from customer_balance where id = ${c}$", ns)
        running = int(row.balance) - sum(i["amount"] for i in accepted)
        entries = []
        for item in accepted:
            running += item["amount"]
            entries.append({"id": new_id(), "customer_id": customer_id, "entry_type": entry_type,
                            "amount": item["amount"], "balance_after": running, "currency": row.currency,
                            "request_id": item["request_id"], "payload_hash": item["payload_hash"],
                            "ref_type": item.get("ref_type"), "ref_id": item.get("ref_id"), "reason": None,
                            "operator": None, "created_at": now})
        await tx.insert_many("ledger_entry", entries)
        return entries, refused

    async def can_cover(self, tx, customer_id, amount, allow_arrears=False):
        """Whether a usage debit of ``amount`` would pass now: the account exists and, for a
        charge, is not suspended and (unless arrears are allowed) covers it. The row stays
        locked, so a post that follows in this transaction sees the same balance. For callers
        that must decide before they write (the subscription quota hook)."""
        acct = await tx.one("select status, balance - held + coalesce(credit_limit, 0) as spendable "
                            "from customer_balance where id = ${c}$" + tx.for_update(), {"c": customer_id})
        if acct is None:
            return False
        if amount <= 0:
            return True
        return acct.status != "suspended" and (allow_arrears or int(acct.spendable) >= amount)

    async def _create_account(self, tx, customer_id, now, currency=None):
        await tx.execute(
            f"{dialects.insert_ignore(tx.dialect)} into customer_balance (id, balance, held, currency, credit_limit, "
            "status, version, cached_at, created_at, updated_at) values (${c}$, 0, 0, ${cur}$, 0, 'active', 0, "
            "${now}$, ${now}$, ${now}$)",
            {"c": customer_id, "cur": currency or self.config.currency, "now": now})

    async def _explain_refusal(self, tx, customer_id):
        row = await tx.one("select balance, held, credit_limit, status from customer_balance where id = ${c}$",
                           {"c": customer_id})
        if row is None:
            raise UnknownCustomer(f"customer {customer_id} has no account")
        if row.status == "suspended":
            raise AccountSuspended(f"customer {customer_id} is suspended")
        raise InsufficientBalance(
            f"customer {customer_id} has {from_micro(int(row.balance) - int(row.held) + int(row.credit_limit or 0))} "
            f"available including credit")

    async def find_entry(self, tx, entry_type, request_id):
        return await tx.one("select * from ledger_entry where entry_type = ${t}$ and request_id = ${r}$",
                            {"t": entry_type, "r": request_id})

    async def _idempotent(self, entry_type, request_id, phash, work):
        """Run ``work(tx)`` once per (entry_type, request_id). A replay returns the first entry."""
        async def attempt(tx):
            existing = await self.find_entry(tx, entry_type, request_id)
            if existing is not None:
                return _replay(existing, phash, request_id)
            return entry_view(await work(tx))
        find = lambda tx: self.find_entry(tx, entry_type, request_id)  # noqa: E731
        result, existing = await self.db.run_or_existing(attempt, find, refused_check=True)
        return result if existing is None else _replay(existing, phash, request_id)

    # --- operations ----------------------------------------------------------------------------
    async def recharge(self, customer_id, amount, request_id, operator=None, note=None, currency=None):
        _check_amount(amount, "amount")
        phash = payload_hash({"op": "recharge", "customer_id": customer_id, "amount": amount})

        async def work(tx):
            return await self.post(tx, customer_id, amount, "recharge", request_id, phash, create=True,
                                   reason=note, operator=operator, currency=currency)
        return await self._idempotent("recharge", request_id, phash, work)

    async def refund(self, customer_id, amount, request_id, reason, operator=None, ref_id=None):
        _check_amount(amount, "amount")
        phash = payload_hash({"op": "refund", "customer_id": customer_id, "amount": amount, "ref_id": ref_id})

        async def work(tx):
            return await self.post(tx, customer_id, amount, "refund", request_id, phash, reason=reason,
                                   operator=operator, ref_type="accounting_records" if ref_id else None, ref_id=ref_id)
        return await self._idempotent("refund", request_id, phash, work)

    async def adjust(self, customer_id, amount, request_id, reason, operator=None):
        _check_amount(amount, "amount", signed=True)
        if not reason:
            raise InvalidParam("reason: required for an adjustment")
        phash = payload_hash({"op": "adjust", "customer_id": customer_id, "amount": amount, "reason": reason})

        async def work(tx):
            return await self.post(tx, customer_id, amount, "adjust", request_id, phash, reason=reason,
                                   operator=operator, create=True)
        return await self._idempotent("adjust", request_id, phash, work)

    async def update_account(self, customer_id, credit_limit=None, status=None):
        """Set the credit limit and/or the status (active / suspended); creates the account."""
        if credit_limit is not None:
            _check_amount(credit_limit, "credit_limit", allow_zero=True)
        if status is not None and status not in ("active", "suspended"):
            raise InvalidParam("status: must be active or suspended (arrears follows the balance)")

        async def work(tx):
            now = clock.now_text()
            await self._create_account(tx, customer_id, now)
            sets, ns = ["version = version + 1", "updated_at = ${now}$"], {"c": customer_id, "now": now}
            if credit_limit is not None:
                sets.append("credit_limit = ${cl}$")
                ns["cl"] = credit_limit
            if status is not None:
                # leaving suspension lands in arrears when the balance is below the credit line
                sets.append("status = case when ${st}$ = 'suspended' then 'suspended' "
                            "when balance < -coalesce(${cl2}$, credit_limit, 0) then 'arrears' else 'active' end")
                ns.update(st=status, cl2=credit_limit)
            await tx.execute(f"update customer_balance set {', '.join(sets)} where id = ${{c}}$", ns)
            return await tx.one(f"select {_BALANCE_COLUMNS} from customer_balance where id = ${{c}}$", ns)
        return balance_view(await self.db.run(work))

    # --- holds ---------------------------------------------------------------------------------
    async def hold(self, customer_id, amount, request_id, ttl_seconds=None, note=None):
        _check_amount(amount, "amount")
        holds = self.config.holds
        ttl = holds.default_ttl_seconds if ttl_seconds is None else ttl_seconds
        if not 1 <= ttl <= holds.max_ttl_seconds:
            raise InvalidParam(f"ttl_seconds: must be between 1 and {holds.max_ttl_seconds}")
        phash = payload_hash({"op": "hold", "customer_id": customer_id, "amount": amount})

        async def work(tx):
            existing = await self._hold_by_request(tx, request_id)
            if existing is not None:
                if existing.payload_hash != phash:
                    raise Conflict(f"request_id {request_id} was used for a different hold")
                return hold_view(existing, duplicate=True)
            now = clock.now_text()
            n = await tx.execute(
                "update customer_balance set held = held + ${amt}$, version = version + 1, updated_at = ${now}$ "
                "where id = ${c}$ and status <> 'suspended' "
                "and balance - held - ${amt}$ >= -coalesce(credit_limit, 0)",
                {"c": customer_id, "amt": amount, "now": now})
            if n == 0:
                await self._explain_refusal(tx, customer_id)
            hold = {"id": new_id(), "customer_id": customer_id, "request_id": request_id, "amount": amount,
                    "status": "open", "payload_hash": phash, "note": (note or "")[:255] or None,
                    "expires_at": clock.now_text(ttl), "created_at": now, "updated_at": now}
            await tx.insert("billing_hold", hold)
            return hold_view(DictObject(**dict(hold, settled_amount=None)))
        result, existing = await self.db.run_or_existing(work, lambda tx: self._hold_by_request(tx, request_id),
                                                         refused_check=True)
        return result if existing is None else _replay_hold(existing, phash, request_id)

    async def _hold_by_request(self, tx, request_id):
        return await tx.one("select * from billing_hold where request_id = ${r}$", {"r": request_id})

    async def _find_hold(self, tx, hold_id=None, request_id=None, lock=False):
        suffix = tx.for_update() if lock else ""
        if hold_id:
            return await tx.one(f"select * from billing_hold where id = ${{h}}${suffix}", {"h": hold_id})
        return await tx.one(f"select * from billing_hold where request_id = ${{r}}${suffix}", {"r": request_id})

    async def hold_customer(self, hold_id: str | None = None, request_id: str | None = None) -> str | None:
        """The customer whose hold this is, or None when there is no such hold."""
        async with self.db.read() as tx:
            hold = await self._find_hold(tx, hold_id, request_id)
        return None if hold is None else hold.customer_id

    async def settle(self, amount, hold_id=None, request_id=None, operator=None):
        """Charge the actual usage of a hold and release the rest. Usage already delivered is
        charged even past the available balance (the account may go into arrears), and even
        when the hold has expired; a released hold cannot be settled."""
        _check_amount(amount, "amount", allow_zero=True)

        async def work(tx):
            hold = await self._find_hold(tx, hold_id, request_id, lock=True)
            if hold is None:
                raise NotFound("no such hold")
            if hold.status == "settled":
                if int(hold.settled_amount) != amount:
                    raise Conflict(f"hold {hold.id} was already settled for {from_micro(int(hold.settled_amount))}")
                entry = await self.find_entry(tx, "settle", hold.request_id)
                return dict(hold_view(hold, duplicate=True), entry=entry_view(entry, duplicate=True))
            if hold.status == "released":
                raise Conflict(f"hold {hold.id} was released and cannot be settled", code="hold_closed")
            was_open = hold.status == "open"
            n = await tx.execute(
                "update billing_hold set status = 'settled', settled_amount = ${amt}$, updated_at = ${now}$, "
                "closed_at = ${now}$ where id = ${h}$ and status = ${st}$",
                {"amt": amount, "now": clock.now_text(), "h": hold.id, "st": hold.status})
            if n != 1:
                raise Conflict(f"hold {hold.id} changed while settling; send it again")
            phash = payload_hash({"op": "settle", "hold": hold.id, "amount": amount})
            entry = await self.post(tx, hold.customer_id, -amount, "settle", hold.request_id, phash,
                                    held_delta=-int(hold.amount) if was_open else 0,
                                    ref_type="billing_hold", ref_id=hold.id, operator=operator)
            hold.status, hold.settled_amount = "settled", amount
            return dict(hold_view(hold), entry=entry_view(entry))
        return await self.db.run(work)

    async def release(self, hold_id=None, request_id=None):
        async def work(tx):
            hold = await self._find_hold(tx, hold_id, request_id, lock=True)
            if hold is None:
                raise NotFound("no such hold")
            if hold.status in ("released", "expired"):
                return hold_view(hold, duplicate=True)
            if hold.status == "settled":
                raise Conflict(f"hold {hold.id} is settled and cannot be released", code="hold_closed")
            await self._close_hold(tx, hold, "released")
            hold.status = "released"
            return hold_view(hold)
        return await self.db.run(work)

    async def _close_hold(self, tx, hold, status):
        now = clock.now_text()
        n = await tx.execute("update billing_hold set status = ${st}$, updated_at = ${now}$, closed_at = ${now}$ "
                             "where id = ${h}$ and status = 'open'", {"st": status, "now": now, "h": hold.id})
        if n == 1:
            await tx.execute("update customer_balance set held = held - ${amt}$, version = version + 1, "
                             "updated_at = ${now}$ where id = ${c}$",
                             {"amt": int(hold.amount), "now": now, "c": hold.customer_id})
        return n

    async def expire_holds(self, limit=500):
        """Release open holds past their expiry. Safe with several instances: each hold closes
        through a conditional update, so only one of them releases it."""
        async with self.db.read() as tx:
            due = await tx.select("select id, customer_id, amount from billing_hold where status = 'open' "
                                  "and expires_at <= ${now}$ order by expires_at limit ${n}$",
                                  {"now": clock.now_text(), "n": limit})
        expired = 0
        for hold in due:
            async def work(tx, hold=hold):
                return await self._close_hold(tx, hold, "expired")
            expired += await self.db.run(work)
        if expired:
            log.info("expired %d holds", expired)
        return expired

    # --- proof -------------------------------------------------------------------------------------
    async def reconcile(self):
        """Every customer whose balance is not the sum of its ledger entries, or whose held amount
        is not the sum of its open holds, plus ledger entries of customers with no balance row."""
        sql = ("select b.id as customer_id, b.balance, b.held, coalesce(l.total, 0) as ledger_total, "
               "coalesce(h.total, 0) as open_holds from customer_balance b "
               "left join (select customer_id, sum(amount) as total from ledger_entry group by customer_id) l "
               "on l.customer_id = b.id "
               "left join (select customer_id, sum(amount) as total from billing_hold where status = 'open' "
               "group by customer_id) h on h.customer_id = b.id")
        orphan_sql = ("select distinct l.customer_id from ledger_entry l left join customer_balance b "
                      "on b.id = l.customer_id where b.id is null")
        async with self.db.read() as tx:
            rows = await tx.select(sql)
            orphans = await tx.select(orphan_sql)
        problems = []
        for r in rows:
            if int(r.balance) != int(r.ledger_total) or int(r.held) != int(r.open_holds):
                problems.append({"customer_id": r.customer_id, "balance": from_micro(int(r.balance)),
                                 "ledger_total": from_micro(int(r.ledger_total)), "held": from_micro(int(r.held)),
                                 "open_holds": from_micro(int(r.open_holds))})
        for o in orphans:
            problems.append({"customer_id": o.customer_id, "problem": "ledger entries without a balance row"})
        return {"customers": len(rows), "mismatches": problems}


def _replay(existing, phash, request_id):
    if existing.payload_hash != phash:
        raise Conflict(f"request_id {request_id} was already used with a different payload")
    return entry_view(existing, duplicate=True)


def _replay_hold(existing, phash, request_id):
    if existing.payload_hash != phash:
        raise Conflict(f"request_id {request_id} was used for a different hold")
    return hold_view(existing, duplicate=True)

