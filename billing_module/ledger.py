"""Balances, holds and the append-only ledger.

``customer_balance`` is a projection: ``balance`` is the sum of the customer's
``ledger_entry`` amounts and ``held`` the sum of its open holds; ``reconcile`` proves it.

Every money movement is one conditional UPDATE of the balance row whose row count is checked,
plus its ledger entry, in one transaction; never a read-check-write in Python. Each operation
is idempotent on the caller's ``request_id`` (unique per entry type in the database): the same
request again returns the first result with ``duplicate: true``; the same ``request_id`` with a
different payload is a ``conflict``.

Bounds: every balance change keeps the balance within ``ledger.max_balance`` (both signs), checked
by the same conditional UPDATE (refused as ``amount_out_of_range``). With the maximum at most 1e18
micro-units the SQL sum never leaves the signed 64-bit range, where SQLite would turn it into a float.

Availability rule: a debit that must be covered (a hold, a usage charge when arrears are not
allowed) passes when ``balance - held - amount >= -credit_limit``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol

from cachetools import LRUCache

from . import clock
from .budgets import BudgetExceeded, Budgets, Spender
from .config import Config
from .db import dialect as dialects
from .db.database import Database, Row, Tx, where
from .db.schema import refresh_derived
from .errors import (
    AccountSuspended,
    AmountOutOfRange,
    BillingError,
    Conflict,
    Forbidden,
    InsufficientBalance,
    InvalidParam,
    NotFound,
    RefundExceedsCharges,
    UnknownCustomer,
)
from .ids import new_id, payload_hash
from .money import MAX_MICRO, MICRO, from_micro

log = logging.getLogger("billing_module.ledger")

STATUSES = ("active", "suspended", "arrears")

_ENTRY_COLUMNS = ("id", "customer_id", "entry_type", "amount", "request_id", "payload_hash", "ref_type", "ref_id",
                  "reason", "operator", "created_at")
# balance_after and currency come from the balance row this transaction's update has just
# changed (and holds locked; an assumed update that did not change it rolls this back with it);
# ``debited_after``: the (signed) sum of the entries written after this one by the same update
_INSERT_ENTRY = (f"insert into ledger_entry ({', '.join(_ENTRY_COLUMNS)}, balance_after, currency) "
                 f"select {', '.join('${' + c + '}$' for c in _ENTRY_COLUMNS)}, balance - ${{debited_after}}$, "
                 "currency from customer_balance where id = ${customer_id}$")

_BALANCE_COLUMNS = ("id, balance, held, credit_limit, currency, status, last_recharge, "
                    "last_consumption, version, updated_at")

# what post_many needs of a balance row its caller read under the row's lock
_LOCKED_COLUMNS = ("balance", "currency", "low_balance_set")
# the balance row as a batch's debit left it (the entries' running balances start from it)
_READ_AFTER_DEBIT = "select balance, currency, low_balance_set from customer_balance where id = ${c}$"

# the items of a batch refused by post_many, each with its error (None: refused with the batch)
Refusals = list[tuple[dict[str, Any], "BillingError | None"]]


class FlagSet(Exception):
    """A debit told to ``defer_to`` a flag found it set: nothing was written; ``row`` is the
    balance row (its currency and flags), locked for the caller's transaction."""

    def __init__(self, row: Row) -> None:
        super().__init__("the balance row has a flag set")
        self.row = row


class BalanceWatch(Protocol):
    """Told of debits inside their transaction, after the balance row changed (and while that
    change holds the row), or after an assumed debit was written (its first read sends it and
    checks it): alerts.LowBalanceWatch. ``every_debit``: of every debit (a threshold
    for all customers), else only of those whose balance row has ``low_balance_set``."""

    every_debit: bool

    async def debited(self, tx: Tx, customer_id: str, amount_micros: int) -> None: ...


def _balance_update(must_cover, refuse_suspended, guard="", currency=False, unflagged=()):
    """The conditional UPDATE behind every money movement (parameters c, amt, hd, now, et, maxb);
    ``guard``: one more SQL condition the update must meet (a refund's limit); ``currency``: the
    balance must be in currency ``cur``; ``unflagged``: flag columns of the row that must be 0
    (a debit that nothing else applies to, see ``Ledger.post``)."""
    # status comes first: MySQL evaluates SET left to right with the new values, SQLite with
    # the old ones; read before the balance changes, both see the old balance.
    sets = ("status = case when status = 'arrears' and balance + ${amt}$ >= -coalesce(credit_limit, 0) "
            "then 'active' when status = 'active' and balance + ${amt}$ < -coalesce(credit_limit, 0) "
            "then 'arrears' else status end, "
            "balance = balance + ${amt}$, held = held + ${hd}$, version = version + 1, updated_at = ${now}$, "
            "last_recharge = case when ${amt}$ > 0 and ${et}$ = 'recharge' then ${now}$ else last_recharge end, "
            "last_consumption = case when ${amt}$ < 0 and ${et}$ in ('usage', 'settle', 'overage', 'subscription') "
            "then ${now}$ else last_consumption end")
    cond = "id = ${c}$ and balance + ${amt}$ <= ${maxb}$ and balance + ${amt}$ >= -${maxb}$"
    if guard:
        cond += f" and {guard}"
    if currency:
        cond += " and currency = ${cur}$"
    if must_cover or refuse_suspended:
        cond += " and status <> 'suspended'"
    if must_cover:
        cond += " and balance - held + ${amt}$ - ${hd}$ >= -coalesce(credit_limit, 0)"
    for flag in unflagged:
        cond += f" and {flag} = 0"
    return f"update customer_balance set {sets} where {cond}"


_HOLD = ("update customer_balance set held = held + ${amt}$, version = version + 1, updated_at = ${now}$ "
         "where id = ${c}$ and status <> 'suspended' and balance - held - ${amt}$ >= -coalesce(credit_limit, 0)")

# What a refund may still return, as conditions on the balance row being updated (correlated, so
# they are evaluated under that row's lock: two refunds of one customer are serialised by it, and
# on MySQL the subqueries of an UPDATE are locking reads that see the latest committed entries).
_CHARGE_TYPES = "('usage', 'settle', 'overage', 'subscription')"
_REFUND_WITHIN_CHARGES = (
    "${amt}$ <= (select coalesce(-sum(amount), 0) from ledger_entry where customer_id = customer_balance.id "
    f"and entry_type in {_CHARGE_TYPES}) - (select coalesce(sum(amount), 0) from ledger_entry "
    "where customer_id = customer_balance.id and entry_type = 'refund')")
_REFUND_WITHIN_RECORD = (
    "${amt}$ <= (select coalesce(-sum(amount), 0) from ledger_entry where customer_id = customer_balance.id "
    "and entry_type = 'usage' and request_id = ${rreq}$) - (select coalesce(sum(amount), 0) from ledger_entry "
    "where customer_id = customer_balance.id and entry_type = 'refund' and ref_type = 'accounting_records' "
    "and ref_id = ${rid}$)")


def balance_view(row: Row) -> dict[str, Any]:
    """The reply shape of a balance row (money as decimal strings)."""
    credit = int(row.credit_limit or 0)
    balance, held = int(row.balance), int(row.held)
    return {
        "customer_id": row.id, "balance": from_micro(balance), "held": from_micro(held),
        "available": from_micro(balance - held), "credit_limit": from_micro(credit),
        "spendable": from_micro(balance - held + credit), "currency": row.currency,
        "status": row.status, "last_recharge": row.last_recharge, "last_consumption": row.last_consumption,
    }


def entry_view(entry: Row, duplicate: bool = False) -> dict[str, Any]:
    return {
        "entry_id": entry.id, "customer_id": entry.customer_id, "entry_type": entry.entry_type,
        "amount": from_micro(int(entry.amount)), "balance_after": from_micro(int(entry.balance_after)),
        "currency": entry.currency, "request_id": entry.request_id, "created_at": entry.created_at,
        "duplicate": duplicate,
    }


def hold_view(hold: Row, duplicate: bool = False) -> dict[str, Any]:
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
    def __init__(self, db: Database, config: Config, watch: BalanceWatch | None = None,
                 budgets: Budgets | None = None) -> None:
        self.db = db
        self.config = config
        self.watch = watch
        # holds reserve against the customer's budgets (None: no budgets are enforced)
        self.budgets = budgets
        self.max_balance_micros = config.ledger.max_balance * MICRO
        # customers whose last debit made without assuming needed more than the plain update (a
        # flag set, a refusal): their debits are not assumed to pass. A hint only: the update decides.
        self._not_plain: LRUCache[str, bool] = LRUCache(maxsize=10_000)

    # --- reads -----------------------------------------------------------------------------
    async def balance(self, customer_id: str) -> dict[str, Any]:
        async with self.db.read() as tx:
            row = await tx.one(f"select {_BALANCE_COLUMNS} from customer_balance where id = ${{c}}$",
                               {"c": customer_id})
        if row is None:
            raise UnknownCustomer(f"no balance for customer {customer_id}")
        return balance_view(row)

    async def balances(self, page: int = 1, rows: int = 20, customer_id: str | None = None,
                       status: str | None = None) -> dict[str, Any]:
        cond, ns = where(("b.id like ${cid}$", "cid", f"%{customer_id}%" if customer_id else None),
                         ("b.status = ${status}$", "status", status))
        sql = (f"select b.{_BALANCE_COLUMNS.replace(', ', ', b.')}, u.name as customer_name "
               f"from customer_balance b left join users_cache u on u.id = b.id and u.entity_kind = 'org' "
               f"where {cond}")
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, "b.id", page, rows)
        result["rows"] = [dict(balance_view(r), customer_name=r.customer_name) for r in result["rows"]]
        return result

    async def entries(self, customer_id: str | None = None, page: int = 1, rows: int = 20,
                      entry_type: str | None = None) -> dict[str, Any]:
        cond, ns = where(("customer_id = ${c}$", "c", customer_id), ("entry_type = ${t}$", "t", entry_type))
        sql = f"select * from ledger_entry where {cond}"
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, "created_at desc, id desc", page, rows)
        result["rows"] = [dict(entry_view(e), reason=e.reason, operator=e.operator, ref_type=e.ref_type,
                               ref_id=e.ref_id) for e in result["rows"]]
        return result

    # --- the one primitive every money movement uses ------------------------------------------
    async def post(self, tx: Tx, customer_id: str, amount: int, entry_type: str, request_id: str, phash: str, *,
                   must_cover: bool = False, refuse_suspended: bool = False, want_balance: bool = True,
                   held_delta: int = 0, ref_type: str | None = None, ref_id: str | None = None,
                   reason: str | None = None, operator: str | None = None, create: bool = False,
                   currency: str | None = None,
                   guard: tuple[str, dict[str, Any], BillingError | None] | None = None,
                   currency_is: tuple[str, Callable[[str], BillingError]] | None = None,
                   spender: Spender | None = None, defer_to: tuple[str, ...] = (), learn: bool = True) -> Row:
        """Apply ``amount`` (signed micro-units) to the balance and append its ledger entry, inside
        the caller's transaction. ``must_cover``: refuse with ``insufficient_balance`` when the
        debit would take ``balance - held`` below ``-credit_limit``. ``guard``: (SQL condition, its
        parameters, the error when it fails). ``currency_is``: (the currency the amount is in, the
        error for a balance in another): checked by the update itself, one statement fewer than a
        read first; the error is built only when the update refuses. ``spender``: a charge that is
        also spent from the budgets of the customer, user and key (``budget_exceeded`` before
        any refusal of the balance). A debit is told to ``watch`` (low-balance alerts). Budgets
        and alerts act in this transaction, so they commit or roll back with the debit.
        ``defer_to``: balance-row flags of the caller's own (a debit's subscriptions): when one is
        set, nothing is written and ``FlagSet`` hands the caller the locked row to act first.
        Returns the entry row.

        Budgets and low-balance overrides are rare, so the debit first assumes that none apply:
        the update also requires the balance row's flags for them to be 0 (kept by the budget and
        alert settings in their own transactions, so no instance ever decides from a stale copy).
        Only when that update refuses are the flags read, under the row's lock, and the debit
        made again after the budgets took their part.

        In a transaction that ``assumes`` (``Tx``), a debit goes further and assumes the update
        passes: it is written later, with its entry, and its count is checked where they are
        sent (with ``want_balance=False`` nothing is read: they go with the caller's next writes
        or the COMMIT). When it did not pass, the transaction runs again without assumptions and
        takes the way above; that customer's next debits do too, until one passes plainly
        (``_not_plain``). ``learn=False``: this debit's outcome says nothing of that (a debit
        made after a ``FlagSet`` sent the caller elsewhere first, without ``defer_to``)."""
        now = clock.now_text()
        ns = {"c": customer_id, "amt": amount, "hd": held_delta, "now": now, "et": entry_type,
              "maxb": self.max_balance_micros}
        shape = (must_cover, refuse_suspended, guard[0] if guard else "", currency_is is not None)
        flags = self._flags(amount, spender is not None) + (defer_to if amount < 0 else ())
        if guard:
            ns.update(guard[1])
        if currency_is is not None:
            ns["cur"] = currency_is[0]
        if self._assumes(tx, customer_id, amount) and not create:
            await tx.execute(_balance_update(*shape, unflagged=flags), ns, later=True, expect=1)
            return await self._entry(tx, customer_id, amount, entry_type, request_id, phash, ref_type, ref_id,
                                     reason, operator, now, want_balance)
        n = await tx.execute(_balance_update(*shape, unflagged=flags), ns)
        if amount < 0 and learn:
            self._plain(customer_id, n == 1)
        if n == 0 and create:
            await self._create_account(tx, customer_id, now, currency)
            n = await tx.execute(_balance_update(*shape, unflagged=flags), ns)
        flagged = None
        if n == 0 and flags:
            flagged = await tx.one(f"select currency, {', '.join(flags)} from customer_balance where id = ${{c}}$"
                                   f"{tx.for_update()}", ns)
            if flagged is not None and any(flagged[f] for f in defer_to if f in flags):
                raise FlagSet(flagged)
            if flagged is not None and any(flagged[f] for f in flags):
                if spender is not None and self.budgets is not None and flagged.budget_count:
                    await self.budgets.spend(tx, spender, -amount)
                n = await tx.execute(_balance_update(*shape), ns)
        if n == 0:
            await self._explain_refusal(tx, customer_id, amount, otherwise=guard[2] if guard else None,
                                        currency_is=currency_is)
        return await self._entry(tx, customer_id, amount, entry_type, request_id, phash, ref_type, ref_id,
                                 reason, operator, now, want_balance,
                                 low_balance_set=flagged is not None and flagged.low_balance_set)

    async def _entry(self, tx, customer_id, amount, entry_type, request_id, phash, ref_type, ref_id, reason,
                     operator, now, want_balance, low_balance_set=False):
        """``post``'s ledger entry, written after its balance update: one statement (sent with
        the next one) takes the balance after it from the row; the watch is told of a debit."""
        entry = {
            "id": new_id(), "customer_id": customer_id, "entry_type": entry_type, "amount": amount,
            "request_id": request_id, "payload_hash": phash, "ref_type": ref_type, "ref_id": ref_id,
            "reason": (reason or "")[:255] or None, "operator": (operator or "")[:64] or None, "created_at": now,
        }
        await tx.execute(_INSERT_ENTRY, dict(entry, debited_after=0), later=True)
        if amount < 0 and self.watch is not None and (self.watch.every_debit or low_balance_set):
            await self.watch.debited(tx, customer_id, amount)
        entry = Row(entry)
        if want_balance:
            row = await tx.one("select balance, currency from customer_balance where id = ${c}$", {"c": customer_id})
            entry.update(balance_after=int(row.balance), currency=row.currency)
        return entry

    def _assumes(self, tx: Tx, customer_id: str, amount: int) -> bool:
        """Whether a debit of ``amount`` is assumed to pass (``post``)."""
        return tx.assumes and amount < 0 and customer_id not in self._not_plain

    def _plain(self, customer_id: str, plain: bool) -> None:
        """What a debit made without assuming showed: whether the plain update passed."""
        if plain:
            self._not_plain.pop(customer_id, None)
        else:
            self._not_plain[customer_id] = True

    async def post_many(self, tx: Tx, customer_id: str, items: list[dict[str, Any]], entry_type: str, *,
                        must_cover: bool = False, refuse_suspended: bool = False,
                        all_or_nothing: bool = False,
                        locked: Row | None = None) -> tuple[list[dict[str, Any]], Refusals]:
        """Debit a batch of one customer's items inside the caller's transaction: one conditional
        update for their total when it is covered, else item by item in order until the balance
        runs out (``all_or_nothing``: refuse them all instead). ``items``: dicts with amount (signed
        micro), request_id, payload_hash, ref_type, ref_id. Returns (entries, refused) where refused
        is [(item, BillingError or None)]. Entries are
        written with one multi-row insert, each with its exact running balance_after.

        ``locked``: the customer's balance row (balance, currency, low_balance_set) as the caller
        read it under its lock in this transaction. The update then also requires that balance,
        so the balance after it is known without reading the row again; when the balance moved
        meanwhile (this transaction changed it), the update is made the ordinary way."""
        now = clock.now_text()
        sql = _balance_update(must_cover, refuse_suspended)
        total = sum(i["amount"] for i in items)
        ns = {"c": customer_id, "hd": 0, "now": now, "et": entry_type, "amt": total, "maxb": self.max_balance_micros}
        accepted: list[dict[str, Any]] = list(items)
        refused: Refusals = []
        row = None      # the balance row after the debit, when known without reading it again
        if locked is not None and all(c in locked for c in _LOCKED_COLUMNS) and abs(total) <= MAX_MICRO:
            guarded = _balance_update(must_cover, refuse_suspended, guard="balance = ${b0}$")
            if await tx.execute(guarded, dict(ns, b0=int(locked.balance))) == 1:
                row = Row(locked, balance=int(locked.balance) + total)
        # a total past the bounds is not bound as one parameter (it may not fit 64 bits): item by item
        if row is None and (abs(total) > MAX_MICRO or await tx.execute(sql, ns) == 0):
            if all_or_nothing:
                return [], [(item, None) for item in items]
            accepted = []
            for item in items:
                if await tx.execute(sql, dict(ns, amt=item["amount"])) == 1:
                    accepted.append(item)
                    continue
                try:
                    await self._explain_refusal(tx, customer_id, item["amount"])
                except BillingError as e:
                    refused.append((item, e))
        if not accepted:
            return [], refused
        if row is None:
            row = await tx.one(_READ_AFTER_DEBIT, ns)
        return await self._write_entries(tx, customer_id, accepted, entry_type, row, now), refused

    async def post_many_unflagged(self, tx: Tx, customer_id: str, items: list[dict[str, Any]], entry_type: str, *,
                                  currency: str, must_cover: bool = False, refuse_suspended: bool = False,
                                  defer_to: tuple[str, ...] = ()) -> list[dict[str, Any]] | None:
        """``post_many``'s common case in one wait, with no read first: one conditional update
        of the items' total and the balance it left, together. It applies only when nothing more
        is to be done for the customer's debits (none of the balance row's flags is set: budgets,
        a low-balance threshold, the caller's ``defer_to``), the balance is in ``currency`` and
        the update passes (the account exists, covers the total when ``must_cover``). Returns the
        entries; None when the update refused: nothing was written, the caller takes the careful
        way (``post_many`` after reading the row under its lock).

        In a transaction that ``assumes``, the update is assumed to pass, as in ``post``: it is
        written later with the entries, which take their running balances from the row as it
        leaves it (the entries returned carry no ``balance_after`` or ``currency`` then); a
        refusal is ``AssumptionRefuted`` where they are sent."""
        now = clock.now_text()
        total = sum(i["amount"] for i in items)
        if total >= 0 or abs(total) > MAX_MICRO:
            return None
        ns = {"c": customer_id, "hd": 0, "now": now, "et": entry_type, "amt": total, "cur": currency,
              "maxb": self.max_balance_micros}
        update = _balance_update(must_cover, refuse_suspended, currency=True,
                                 unflagged=self._flags(total, True) + defer_to)
        if self._assumes(tx, customer_id, total):
            await tx.execute(update, ns, later=True, expect=1)
            return await self._write_entries(tx, customer_id, items, entry_type, None, now)
        changed, rows = await tx.execute_then_select(update, ns, _READ_AFTER_DEBIT, ns)
        self._plain(customer_id, changed == 1)
        if changed != 1:
            return None
        return await self._write_entries(tx, customer_id, items, entry_type, rows[0], now)

    async def _write_entries(self, tx: Tx, customer_id: str, accepted: list[dict[str, Any]], entry_type: str,
                             row: Row | None, now: str) -> list[dict[str, Any]]:
        """The ledger entries of ``accepted``, debited together and leaving the balance ``row``
        (balance, currency, low_balance_set) as read after the debit: each with its exact running
        balance_after, in one multi-row insert (written later); the watch is told of the debit.
        ``row`` None: the debit is written later too (not read): each entry takes its running
        balance from the row as the debit leaves it (``_INSERT_ENTRY``, one statement each)."""
        debited = sum(i["amount"] for i in accepted)
        running = (0 if row is None else int(row.balance)) - debited
        entries = []
        for item in accepted:
            running += item["amount"]
            entries.append({"id": new_id(), "customer_id": customer_id, "entry_type": entry_type,
                            "amount": item["amount"], "request_id": item["request_id"],
                            "payload_hash": item["payload_hash"], "ref_type": item.get("ref_type"),
                            "ref_id": item.get("ref_id"), "reason": None, "operator": None, "created_at": now})
            if row is None:
                entries[-1]["debited_after"] = -running      # the items after this one
            else:
                entries[-1].update(balance_after=running, currency=row.currency)
        if row is None:
            await tx.execute_many(_INSERT_ENTRY, entries, later=True)
        else:
            await tx.insert_many("ledger_entry", entries, later=True)
        low_balance_set = row is not None and row.low_balance_set     # else 0, required by the debit
        if debited < 0 and self.watch is not None and (self.watch.every_debit or low_balance_set):
            await self.watch.debited(tx, customer_id, debited)   # the batch crosses once at most
        return entries

    async def can_cover(self, tx: Tx, customer_id: str, amount: int, allow_arrears: bool = False) -> bool:
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

    def _flags(self, amount: int, spends: bool) -> tuple[str, ...]:
        """The balance row's flags that would give a debit of ``amount`` more to do: its budgets
        (``spends``: a charge of a spender), its own low-balance threshold (unless the watch sees
        every debit)."""
        if amount >= 0:
            return ()
        flags: tuple[str, ...] = ("budget_count",) if spends and self.budgets is not None else ()
        if self.watch is not None and not self.watch.every_debit:
            flags += ("low_balance_set",)
        return flags

    async def _create_account(self, tx, customer_id, now, currency=None):
        n = await tx.execute(
            f"{dialects.insert_ignore(tx.dialect)} into customer_balance (id, balance, held, currency, credit_limit, "
            "status, version, budget_count, low_balance_set, subscription_count, cached_at, created_at, updated_at) "
            "values (${c}$, 0, 0, ${cur}$, 0, 'active', 0, 0, 0, 0, ${now}$, ${now}$, ${now}$)",
            {"c": customer_id, "cur": currency or self.config.currency, "now": now})
        if n == 1:     # budgets and alert settings may have been made before the account
            await tx.execute(refresh_derived("customer_balance", where="id = ${c}$"), {"c": customer_id})

    async def _explain_refusal(self, tx, customer_id, amount=0, otherwise=None, currency_is=None):
        """Why a conditional balance update changed no row: raise the matching error."""
        row = await tx.one("select balance, held, credit_limit, status, currency from customer_balance "
                           "where id = ${c}$", {"c": customer_id})
        if row is None:
            raise UnknownCustomer(f"customer {customer_id} has no account")
        if currency_is is not None and row.currency != currency_is[0]:
            raise currency_is[1](row.currency)
        limit = self.max_balance_micros
        if not isinstance(row.balance, int) or abs(row.balance + amount) > limit:
            raise AmountOutOfRange(f"the balance of customer {customer_id} would leave the allowed range "
                                   f"of -{from_micro(limit)} to {from_micro(limit)}; nothing was written")
        if otherwise is not None:
            raise otherwise
        if row.status == "suspended":
            raise AccountSuspended(f"customer {customer_id} is suspended")
        raise InsufficientBalance(
            f"customer {customer_id} has {from_micro(int(row.balance) - int(row.held) + int(row.credit_limit or 0))} "
            f"available including credit")

    async def find_entry(self, tx: Tx, entry_type: str, request_id: str) -> Row | None:
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
    async def recharge(self, customer_id: str, amount: int, request_id: str, operator: str | None = None,
                       note: str | None = None, currency: str | None = None) -> dict[str, Any]:
        _check_amount(amount, "amount")
        phash = payload_hash({"op": "recharge", "customer_id": customer_id, "amount": amount})

        async def work(tx):
            return await self.post(tx, customer_id, amount, "recharge", request_id, phash, create=True,
                                   reason=note, operator=operator, currency=currency)
        return await self._idempotent("recharge", request_id, phash, work)

    async def refund(self, customer_id: str, amount: int, request_id: str, reason: str, operator: str | None = None,
                     ref_id: str | None = None) -> dict[str, Any]:
        """Return money charged to the customer: at most its charges minus its earlier refunds, and
        with ``ref_id`` (an accounting record of this customer) at most that record's charge minus
        the refunds that named it. The limits are conditions of the balance update itself."""
        _check_amount(amount, "amount")
        phash = payload_hash({"op": "refund", "customer_id": customer_id, "amount": amount, "ref_id": ref_id})
        refused = RefundExceedsCharges(
            f"a refund of {from_micro(amount)} is more than {'record ' + ref_id if ref_id else customer_id} "
            "was charged, less earlier refunds")

        async def work(tx):
            guard, ns = _REFUND_WITHIN_CHARGES, {}
            if ref_id:
                record = await self._charged_record(tx, customer_id, ref_id)
                guard, ns = f"{guard} and {_REFUND_WITHIN_RECORD}", {"rreq": record.request_id, "rid": ref_id}
            return await self.post(tx, customer_id, amount, "refund", request_id, phash, reason=reason,
                                   operator=operator, ref_type="accounting_records" if ref_id else None, ref_id=ref_id,
                                   guard=(guard, ns, refused))
        return await self._idempotent("refund", request_id, phash, work)

    async def _charged_record(self, tx, customer_id, record_id):
        """The accounting record a refund names: it must exist (live or archived) and be this customer's."""
        for table in ("accounting_records", "accounting_records_history"):
            record = await tx.one(f"select customer_id, request_id from {table} where id = ${{r}}$", {"r": record_id})
            if record is not None:
                break
        if record is None or record.customer_id != customer_id:
            raise NotFound(f"customer {customer_id} has no accounting record {record_id}", code="unknown_record")
        return record

    async def adjust(self, customer_id: str, amount: int, request_id: str, reason: str,
                     operator: str | None = None) -> dict[str, Any]:
        """A signed correction of an existing account (an unknown customer is ``unknown_customer``:
        only a recharge opens an account)."""
        _check_amount(amount, "amount", signed=True)
        if not reason:
            raise InvalidParam("reason: required for an adjustment")
        phash = payload_hash({"op": "adjust", "customer_id": customer_id, "amount": amount, "reason": reason})

        async def work(tx):
            return await self.post(tx, customer_id, amount, "adjust", request_id, phash, reason=reason,
                                   operator=operator)
        return await self._idempotent("adjust", request_id, phash, work)

    async def update_account(self, customer_id: str, credit_limit: int | None = None,
                             status: str | None = None) -> dict[str, Any]:
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
    async def hold(self, customer_id: str, amount: int, request_id: str, ttl_seconds: int | None = None,
                   note: str | None = None, scope: str = "admin", created_by: str | None = None,
                   user_id: str | None = None, key_id: str | None = None) -> dict[str, Any]:
        """Reserve ``amount``. ``scope`` (admin: the platform, customer: a customer key) is recorded:
        the hold belongs to it (see ``settle``). The amount is reserved in the budgets of the
        customer, ``user_id`` and ``key_id`` too (refused with ``budget_exceeded``)."""
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
            ns = {"c": customer_id, "amt": amount, "now": now}
            # as in post: first as if the customer had no budgets, the flag read only when refused
            n = await tx.execute(_HOLD + (" and budget_count = 0" if self.budgets is not None else ""), ns)
            has_budgets = n == 0 and self.budgets is not None and bool(await tx.scalar(
                f"select budget_count from customer_balance where id = ${{c}}${tx.for_update()}", ns))
            if has_budgets:
                n = await tx.execute(_HOLD, ns)
            if n == 0:
                await self._explain_refusal(tx, customer_id)
            hold_id = new_id()
            if has_budgets and self.budgets is not None:
                await self.budgets.reserve_hold(tx, hold_id, Spender(customer_id, user_id, key_id), amount)
            hold = {"id": hold_id, "customer_id": customer_id, "request_id": request_id, "amount": amount,
                    "status": "open", "payload_hash": phash, "note": (note or "")[:255] or None,
                    "created_scope": scope, "created_by": (created_by or "")[:64] or None,
                    "expires_at": clock.now_text(ttl), "created_at": now, "updated_at": now}
            await tx.insert("billing_hold", hold)
            return hold_view(Row(hold, settled_amount=None))
        try:
            result, existing = await self.db.run_or_existing(work, lambda tx: self._hold_by_request(tx, request_id),
                                                             refused_check=True)
        except BudgetExceeded as e:
            if self.budgets is not None:
                await self.budgets.refused(e)     # its alert, now the refused hold has rolled back
            raise
        return result if existing is None else _replay_hold(existing, phash, request_id)

    async def _hold_by_request(self, tx, request_id):
        return await tx.one("select * from billing_hold where request_id = ${r}$", {"r": request_id})

    async def _find_hold(self, tx, hold_id=None, request_id=None, lock=False):
        suffix = tx.for_update() if lock else ""
        if hold_id:
            return await tx.one(f"select * from billing_hold where id = ${{h}}${suffix}", {"h": hold_id})
        return await tx.one(f"select * from billing_hold where request_id = ${{r}}${suffix}", {"r": request_id})

    async def settle(self, amount: int, hold_id: str | None = None, request_id: str | None = None,
                     operator: str | None = None, scope: str = "admin",
                     customer_id: str | None = None) -> dict[str, Any]:
        """Charge the actual usage of a hold and release the rest. Usage already delivered is
        charged even past the available balance (the account may go into arrears), and even
        when the hold has expired; a released hold cannot be settled. ``scope``/``customer_id``:
        who asks (see ``_check_hold_access``); only an admin settles above the held amount, and
        at most ``holds.max_settle_over_hold_ratio`` above it."""
        _check_amount(amount, "amount", allow_zero=True)

        async def work(tx):
            hold = await self._find_hold(tx, hold_id, request_id, lock=True)
            if hold is None:
                raise NotFound("no such hold")
            _check_hold_access(hold, scope, customer_id)
            self._check_settle_amount(hold, amount, scope)
            if hold.status == "settled":
                if int(hold.settled_amount) != amount:
                    raise Conflict(f"hold {hold.id} was already settled for {from_micro(int(hold.settled_amount))}")
                entry = await self.find_entry(tx, "settle", hold.request_id)
                assert entry is not None, f"settled hold {hold.id} has no settle entry"
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
            if self.budgets is not None:     # after the balance row, as in every path
                await self.budgets.close_hold(tx, hold.id, amount)
            hold.status, hold.settled_amount = "settled", amount
            return dict(hold_view(hold), entry=entry_view(entry))
        return await self.db.run(work)

    async def release(self, hold_id: str | None = None, request_id: str | None = None, scope: str = "admin",
                      customer_id: str | None = None) -> dict[str, Any]:
        async def work(tx):
            hold = await self._find_hold(tx, hold_id, request_id, lock=True)
            if hold is None:
                raise NotFound("no such hold")
            _check_hold_access(hold, scope, customer_id)
            if hold.status in ("released", "expired"):
                return hold_view(hold, duplicate=True)
            if hold.status == "settled":
                raise Conflict(f"hold {hold.id} is settled and cannot be released", code="hold_closed")
            await self._close_hold(tx, hold, "released")
            hold.status = "released"
            return hold_view(hold)
        return await self.db.run(work)

    def _check_settle_amount(self, hold, amount, scope):
        held = int(hold.amount)
        if amount <= held:
            return
        if scope != "admin":
            raise Forbidden(f"settling above the held amount ({from_micro(held)}) needs an admin key")
        ratio = Decimal(str(self.config.holds.max_settle_over_hold_ratio))
        limit = held + int(held * ratio)
        if amount > limit:
            raise InvalidParam(f"amount: at most {from_micro(limit)} for hold {hold.id} of {from_micro(held)} "
                               "(holds.max_settle_over_hold_ratio)", code="settle_exceeds_hold")

    async def _close_hold(self, tx, hold, status):
        now = clock.now_text()
        n = await tx.execute("update billing_hold set status = ${st}$, updated_at = ${now}$, closed_at = ${now}$ "
                             "where id = ${h}$ and status = 'open'", {"st": status, "now": now, "h": hold.id})
        if n == 1:
            await tx.execute("update customer_balance set held = held - ${amt}$, version = version + 1, "
                             "updated_at = ${now}$ where id = ${c}$",
                             {"amt": int(hold.amount), "now": now, "c": hold.customer_id})
            if self.budgets is not None:     # the balance row before budget rows, as in every path
                await self.budgets.close_hold(tx, hold.id)
        return n

    async def expire_holds(self, limit: int = 500) -> int:
        """Release open holds past their expiry. Safe with several instances, and against a settle
        or release that closes a hold between the read and the update: each hold closes through a
        conditional update, so only one of them closes it."""
        expired = 0
        for hold in await self.due_holds(limit):
            expired += await self.expire_hold(hold)
        if expired:
            log.info("expired %d holds", expired)
        return expired

    async def due_holds(self, limit: int = 500) -> list[Row]:
        """Open holds past their expiry (read without locks: they may close before ``expire_hold``)."""
        async with self.db.read() as tx:
            return await tx.select("select id, customer_id, amount from billing_hold where status = 'open' "
                                   "and expires_at <= ${now}$ order by expires_at limit ${n}$",
                                   {"now": clock.now_text(), "n": limit})

    async def expire_hold(self, hold: Row) -> int:
        """Expire one hold read by ``due_holds``; 0 when it has been closed meanwhile."""
        return await self.db.run(lambda tx: self._close_hold(tx, hold, "expired"))

    # --- proof -------------------------------------------------------------------------------------
    async def reconcile(self) -> dict[str, Any]:
        """Every customer whose balance is not the sum of its ledger entries, whose held amount is
        not the sum of its open holds, or whose entries' running ``balance_after`` do not chain from
        0 to the balance; plus ledger entries of customers with no balance row. One dict per
        customer in ``mismatches``; nothing raises on bad data."""
        sql = ("select b.id as customer_id, b.balance, b.held, coalesce(l.total, 0) as ledger_total, "
               "coalesce(h.total, 0) as open_holds from customer_balance b "
               "left join (select customer_id, sum(amount) as total from ledger_entry group by customer_id) l "
               "on l.customer_id = b.id "
               "left join (select customer_id, sum(amount) as total from billing_hold where status = 'open' "
               "group by customer_id) h on h.customer_id = b.id")
        orphan_sql = ("select distinct l.customer_id from ledger_entry l left join customer_balance b "
                      "on b.id = l.customer_id where b.id is null")
        async with self.db.read() as tx:
            try:
                rows = await tx.select(sql)
            except Exception as e:     # SQLite's sum() raises on a 64-bit overflow: one customer at a time
                if not dialects.is_integer_overflow(e):
                    raise
                rows = await self._reconcile_each(tx)
            orphans = await tx.select(orphan_sql)
            broken = {r.customer_id: int(r.n) for r in await tx.select(_BROKEN_CHAINS)}
        problems = []
        for r in rows:
            values = [_exact_int(r[k]) for k in ("balance", "ledger_total", "held", "open_holds")]
            if None in values:
                problems.append({"customer_id": r.customer_id, "problem": "an amount outside the 64-bit integer "
                                 f"range or not an integer: balance {r.balance}, ledger total {r.ledger_total}"})
                continue
            chain_ok = r.customer_id not in broken
            if values[0] != values[1] or values[2] != values[3] or not chain_ok:
                problem = {"customer_id": r.customer_id, "balance": from_micro(values[0]),
                           "ledger_total": from_micro(values[1]), "held": from_micro(values[2]),
                           "open_holds": from_micro(values[3])}
                if not chain_ok:
                    problem["running_balance"] = f"{broken[r.customer_id]} balance_after values do not chain"
                problems.append(problem)
        for o in orphans:
            problems.append({"customer_id": o.customer_id, "problem": "ledger entries without a balance row"})
        return {"customers": len(rows), "mismatches": problems}

    async def _reconcile_each(self, tx):
        """The rows of ``reconcile`` with each customer's ledger summed on its own; a sum that
        overflows is reported as None instead of stopping the proof of every other customer."""
        rows = await tx.select("select b.id as customer_id, b.balance, b.held, "
                               "coalesce(sum(h.amount), 0) as open_holds "
                               "from customer_balance b left join billing_hold h on h.customer_id = b.id "
                               "and h.status = 'open' group by b.id, b.balance, b.held")
        for r in rows:
            try:
                r.ledger_total = await tx.scalar("select coalesce(sum(amount), 0) as total from ledger_entry "
                                                 "where customer_id = ${c}$", {"c": r.customer_id})
            except Exception as e:
                if not dialects.is_integer_overflow(e):
                    raise
                r.ledger_total = None
        return rows


def _exact_int(value):
    """An amount read back as an int, or None when it is not one (SQLite turns an integer that
    overflowed into a float; an exact float is accepted only inside the 64-bit range)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        as_int = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return as_int if as_int == value and -2**63 <= as_int < 2**63 and not isinstance(value, float) else None


def _check_hold_access(hold, scope, customer_id):
    """A hold belongs to the scope that created it: a customer key closes only the holds a
    customer key created for its own customer. A hold with no recorded scope (made before the
    column existed) counts as the platform's."""
    if scope == "admin":
        return
    if hold.customer_id != customer_id:
        raise Forbidden("this hold belongs to another customer")
    if hold.created_scope != "customer":
        raise Forbidden(f"hold {hold.id} was placed by the platform: only an admin key can settle or release it")


# The running balance_after check, free of order: entries of concurrent transactions may carry
# ids and created_at out of commit order. In commit order each entry starts where the previous
# one ended (balance_after - amount = the previous balance_after; the first starts at 0) and the
# last ends at the balance row. So per customer the multiset {balance_after - amount} + {balance}
# equals {0} + {balance_after}: every value's count below must net to zero (repeated balances
# count once per entry; a zero amount adds a value to both sides). A customer listed here has
# a value left over; the number is how many.
_BROKEN_CHAINS = (
    "select customer_id, count(*) as n from ("
    " select customer_id, v, sum(k) as net from ("
    "  select customer_id, balance_after - amount as v, 1 as k from ledger_entry"
    "  union all select customer_id, balance_after as v, -1 as k from ledger_entry"
    "  union all select id as customer_id, balance as v, 1 as k from customer_balance"
    "  union all select id as customer_id, 0 as v, -1 as k from customer_balance"
    " ) moves group by customer_id, v having sum(k) <> 0"
    ") unmatched group by customer_id")


def _replay(existing, phash, request_id):
    if existing.payload_hash != phash:
        raise Conflict(f"request_id {request_id} was already used with a different payload")
    return entry_view(existing, duplicate=True)


def _replay_hold(existing, phash, request_id):
    if existing.payload_hash != phash:
        raise Conflict(f"request_id {request_id} was used for a different hold")
    return hold_view(existing, duplicate=True)

