"""Balances, holds and the ledger on both databases: idempotency, no overdraft, reconcile."""
import asyncio

import pytest

from billing_module.errors import AccountSuspended, Conflict, InsufficientBalance, InvalidParam, UnknownCustomer
from tests.helpers import units


async def test_recharge_creates_the_account_and_is_idempotent(core):
    first = await core.ledger.recharge("c1", units("10"), "r-1", operator="ops")
    again = await core.ledger.recharge("c1", units("10"), "r-1", operator="ops")
    assert first["duplicate"] is False and again["duplicate"] is True
    assert again["entry_id"] == first["entry_id"] and again["balance_after"] == "10.000000"
    bal = await core.ledger.balance("c1")
    assert bal["balance"] == "10.000000" and bal["available"] == "10.000000" and bal["status"] == "active"
    with pytest.raises(Conflict):
        await core.ledger.recharge("c1", units("11"), "r-1")
    assert (await core.ledger.balance("c1"))["balance"] == "10.000000"


async def test_concurrent_duplicate_recharges_credit_once(core):
    results = await asyncio.gather(*[core.ledger.recharge("c1", units("5"), "same-key") for _ in range(8)],
                                   return_exceptions=True)
    assert all(not isinstance(r, Exception) for r in results), results
    assert sum(1 for r in results if not r["duplicate"]) == 1
    assert (await core.ledger.balance("c1"))["balance"] == "5.000000"
    assert (await core.ledger.reconcile())["mismatches"] == []


async def test_refund_and_adjust(core):
    await core.ledger.recharge("c1", units("1"), "r1")
    hold = await core.ledger.hold("c1", units("0.5"), "h1")
    await core.ledger.settle(units("0.5"), hold_id=hold["hold_id"])       # charged 0.5: refundable
    await core.ledger.refund("c1", units("0.5"), "f1", reason="bad answer")
    await core.ledger.adjust("c1", -units("0.25"), "a1", reason="correction", operator="ops")
    assert (await core.ledger.balance("c1"))["balance"] == "0.750000"
    with pytest.raises(UnknownCustomer):
        await core.ledger.refund("nobody", units("1"), "f2", reason="x")
    with pytest.raises(InvalidParam):
        await core.ledger.adjust("c1", 0, "a2", reason="zero")
    with pytest.raises(InvalidParam):
        await core.ledger.adjust("c1", 5, "a3", reason="")
    entries = await core.ledger.entries("c1")
    assert entries["total"] == 4 and [e["entry_type"] for e in entries["rows"]].count("adjust") == 1


async def test_hold_settle_release_and_limits(core):
    await core.ledger.recharge("c1", units("10"), "r1")
    h = await core.ledger.hold("c1", units("6"), "h1")
    assert (await core.ledger.balance("c1"))["available"] == "4.000000"
    with pytest.raises(InsufficientBalance):
        await core.ledger.hold("c1", units("5"), "h2")
    # settle below the estimate releases the rest
    s = await core.ledger.settle(units("2.5"), hold_id=h["hold_id"])
    assert s["status"] == "settled" and s["entry"]["amount"] == "-2.500000"
    bal = await core.ledger.balance("c1")
    assert bal["balance"] == "7.500000" and bal["held"] == "0.000000"
    # settling again with the same amount is a replay, with another amount a conflict
    assert (await core.ledger.settle(units("2.5"), hold_id=h["hold_id"]))["duplicate"] is True
    with pytest.raises(Conflict):
        await core.ledger.settle(units("3"), hold_id=h["hold_id"])
    h2 = await core.ledger.hold("c1", units("7"), "h3")
    await core.ledger.release(hold_id=h2["hold_id"])
    assert (await core.ledger.balance("c1"))["held"] == "0.000000"
    with pytest.raises(Conflict):
        await core.ledger.settle(units("1"), hold_id=h2["hold_id"])
    assert (await core.ledger.reconcile())["mismatches"] == []


async def test_settle_past_the_balance_puts_the_account_in_arrears(core):
    core.config.holds.max_settle_over_hold_ratio = 2.0      # an admin may settle up to 3x the hold
    await core.ledger.recharge("c1", units("1"), "r1")
    h = await core.ledger.hold("c1", units("1"), "h1")
    await core.ledger.settle(units("3"), hold_id=h["hold_id"])      # delivered: charged in full
    bal = await core.ledger.balance("c1")
    assert bal["balance"] == "-2.000000" and bal["status"] == "arrears"
    with pytest.raises(InsufficientBalance):
        await core.ledger.hold("c1", units("0.01"), "h2")
    await core.ledger.recharge("c1", units("5"), "r2")
    assert (await core.ledger.balance("c1"))["status"] == "active"


async def test_credit_limit_allows_a_negative_available(core):
    await core.ledger.update_account("c1", credit_limit=units("5"))
    await core.ledger.hold("c1", units("5"), "h1")
    with pytest.raises(InsufficientBalance):
        await core.ledger.hold("c1", 1, "h2")


async def test_suspended_refuses_holds_but_settles_delivered_usage(core):
    await core.ledger.recharge("c1", units("10"), "r1")
    h = await core.ledger.hold("c1", units("1"), "h1")
    await core.ledger.update_account("c1", status="suspended")
    with pytest.raises(AccountSuspended):
        await core.ledger.hold("c1", units("1"), "h2")
    await core.ledger.settle(units("1"), hold_id=h["hold_id"])
    assert (await core.ledger.balance("c1"))["balance"] == "9.000000"
    back = await core.ledger.update_account("c1", status="active")
    assert back["status"] == "active"


async def test_expired_holds_are_released_once_and_still_settle(core, fixed_clock):
    await core.ledger.recharge("c1", units("10"), "r1")
    h = await core.ledger.hold("c1", units("4"), "h1", ttl_seconds=60)
    fixed_clock.advance(61)
    counts = await asyncio.gather(core.ledger.expire_holds(), core.ledger.expire_holds())
    assert sum(counts) == 1
    assert (await core.ledger.balance("c1"))["held"] == "0.000000"
    await core.ledger.settle(units("1"), hold_id=h["hold_id"])   # usage delivered before expiry
    bal = await core.ledger.balance("c1")
    assert bal["balance"] == "9.000000" and bal["held"] == "0.000000"
    assert (await core.ledger.reconcile())["mismatches"] == []


async def test_concurrent_holds_never_overdraw(core):
    await core.ledger.recharge("c1", units("1"), "r1")
    results = await asyncio.gather(*[core.ledger.hold("c1", units("0.1"), f"h{i}") for i in range(30)],
                                   return_exceptions=True)
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 10
    assert all(isinstance(r, InsufficientBalance) for r in results if isinstance(r, Exception))
    assert (await core.ledger.balance("c1"))["available"] == "0.000000"


@pytest.mark.tampers
async def test_reconcile_catches_a_tampered_balance(core):
    await core.ledger.recharge("c1", units("10"), "r1")
    await core.ledger.recharge("c2", units("3"), "r2")
    assert (await core.ledger.reconcile())["mismatches"] == []
    async with core.db.transaction() as tx:
        await tx.execute("update customer_balance set balance = balance + 1 where id = 'c1'")
    report = await core.ledger.reconcile()
    assert [m["customer_id"] for m in report["mismatches"]] == ["c1"]
    assert report["mismatches"][0]["balance"] == "10.000001"
