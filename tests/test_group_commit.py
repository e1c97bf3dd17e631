"""The group writer on both databases: a group is charged without looking its request_ids up
first (a repeat is a duplicate key that sends the group the careful way), and ``post_many``'s
running balances stay exact whatever balance row its caller read."""
import asyncio

from billing_module.db.database import Row
from tests.helpers import CHAT_A_PRICE, seed_pricing, units, usage


async def _entries(core, customer):
    async with core.db.read() as tx:
        return await tx.select("select amount, balance_after, request_id from ledger_entry "
                               "where customer_id = ${c}$ order by balance_after desc", {"c": customer})


async def test_a_group_with_a_replay_and_a_stored_event_charges_each_once(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    first = await core.accounting.post_usage(usage("done"))
    await core.accounting.submit_usage(usage("stored"))          # pending: completed by the group
    grouped = [0]
    write = core.accounting.group.write

    async def counting(items):
        grouped[0] = max(grouped[0], len(items))
        return await write(items)
    core.accounting.group.write = counting
    ids = ("new-1", "done", "stored", "new-2")
    results = await asyncio.gather(*[core.accounting.post_usage(usage(r)) for r in ids])
    assert grouped[0] == 4        # the four went through one group, which fell back for the repeats
    by_id = {r["request_id"]: r for r in results}
    assert by_id["done"] == dict(first, duplicate=True)
    assert [by_id[r]["duplicate"] for r in ("new-1", "stored", "new-2")] == [False, False, False]
    assert all(by_id[r]["amount"] == CHAT_A_PRICE for r in by_id)
    balance = (await core.ledger.balance("cust-1"))["balance"]
    assert balance == "0.976000"      # four charges of 0.006, not five
    entries = await _entries(core, "cust-1")
    assert sorted(e.request_id for e in entries if e.amount < 0) == ["done", "new-1", "new-2", "stored"]


async def _post_many(core, locked):
    async def work(tx):
        items = [{"amount": -units("0.1"), "request_id": f"pm-{i}", "payload_hash": "h",
                  "ref_type": None, "ref_id": None} for i in range(3)]
        return await core.ledger.post_many(tx, "cust-1", items, "usage", must_cover=True, locked=locked)
    return await core.db.run(work)


async def test_post_many_running_balances_are_exact_when_the_callers_row_is_stale(core):
    await core.ledger.recharge("cust-1", units("1"), "r1")
    stale = Row(balance=units("5"), currency="CNY", low_balance_set=0)   # not the balance: the guard misses
    entries, refused = await _post_many(core, stale)
    assert refused == []
    assert [e["balance_after"] for e in entries] == [units("0.9"), units("0.8"), units("0.7")]
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.700000"


async def test_post_many_with_the_callers_locked_row(core):
    await core.ledger.recharge("cust-1", units("1"), "r1")
    locked = Row(balance=units("1"), currency="CNY", low_balance_set=0)
    entries, refused = await _post_many(core, locked)
    assert refused == []
    assert [e["balance_after"] for e in entries] == [units("0.9"), units("0.8"), units("0.7")]
    assert [e["currency"] for e in entries] == ["CNY"] * 3
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.700000"
    short = Row(balance=units("0.7"), currency="CNY", low_balance_set=0)
    big = [{"amount": -units("0.5"), "request_id": f"big-{i}", "payload_hash": "h", "ref_type": None,
            "ref_id": None} for i in range(2)]
    entries, refused = await core.db.run(lambda tx: core.ledger.post_many(
        tx, "cust-1", big, "usage", must_cover=True, all_or_nothing=True, locked=short))
    assert entries == [] and len(refused) == 2     # no overdraft through the guarded update either
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.700000"
