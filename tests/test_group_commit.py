"""The group writer on both databases: a group is charged without looking its request_ids up
first (a repeat is a duplicate key that sends the group the careful way), and ``post_many``'s
running balances stay exact whatever balance row its caller read."""
import asyncio

import pytest

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


def _items(prefix, n, amount="0.1"):
    return [{"amount": -units(amount), "request_id": f"{prefix}-{i}", "payload_hash": "h",
             "ref_type": None, "ref_id": None} for i in range(n)]


async def _unflagged(core, customer, items, currency="CNY", defer_to=(), assumes=False):
    """post_many_unflagged in a transaction that ``assumes`` (as the group writer's, through
    ``Database.run``) or not."""
    async with core.db.transaction(assumes=assumes) as tx:
        return await core.ledger.post_many_unflagged(tx, customer, items, "usage", currency=currency,
                                                     must_cover=True, refuse_suspended=True, defer_to=defer_to)


@pytest.mark.parametrize("assumes", [False, True])
async def test_post_many_unflagged_debits_with_exact_running_balances_without_a_read_first(core, assumes):
    """Not assuming, the update and the balance it left come back together; assuming, the update
    goes with the entries, each of which takes its running balance from the row as it left it."""
    await core.ledger.recharge("cust-1", units("1"), "r1")
    entries = await _unflagged(core, "cust-1", _items("u", 3), assumes=assumes)
    assert [e["request_id"] for e in entries] == ["u-0", "u-1", "u-2"]
    if not assumes:
        assert [e["balance_after"] for e in entries] == [units("0.9"), units("0.8"), units("0.7")]
        assert [e["currency"] for e in entries] == ["CNY"] * 3
    stored = await _entries(core, "cust-1")
    assert [(e.request_id, e.balance_after) for e in stored if e.amount < 0] == \
        [("u-0", units("0.9")), ("u-1", units("0.8")), ("u-2", units("0.7"))]
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.700000"


@pytest.mark.parametrize("assumes", [False, True])
async def test_post_many_unflagged_writes_nothing_where_the_careful_way_has_work(core, assumes):
    """Each refusal leaves the balance and the ledger as they were, and answers None (the caller
    then reads the row under its lock and decides): another currency, a total the balance does not
    cover, no account, a suspended account, a flag of the caller's, a low-balance threshold.
    Assuming, each refuses the same way at the end of the transaction (``AssumptionRefuted``:
    ``Database.run`` would run it again, not assuming)."""
    from billing_module.db.database import AssumptionRefuted

    async def refused(customer, items, **kw):
        if not assumes:
            return await _unflagged(core, customer, items, **kw) is None
        with pytest.raises(AssumptionRefuted):
            await _unflagged(core, customer, items, assumes=True, **kw)
        return True
    await core.ledger.recharge("cust-1", units("1"), "r1")
    before = (await core.ledger.balance("cust-1"))["balance"]
    assert await refused("cust-1", _items("usd", 1), currency="USD")
    assert await refused("cust-1", _items("short", 3, "0.4"))
    assert await refused("nobody", _items("none", 1))
    await core.db.run(lambda tx: tx.execute("update customer_balance set subscription_count = 1 where id = 'cust-1'"))
    assert await refused("cust-1", _items("sub", 1), defer_to=("subscription_count",))
    await core.db.run(lambda tx: tx.execute(
        "update customer_balance set subscription_count = 0, low_balance_set = 1 where id = 'cust-1'"))
    assert await refused("cust-1", _items("low", 1))
    await core.db.run(lambda tx: tx.execute(
        "update customer_balance set low_balance_set = 0, status = 'suspended' where id = 'cust-1'"))
    assert await refused("cust-1", _items("susp", 1))
    assert (await core.ledger.balance("cust-1"))["balance"] == before
    assert [e for e in await _entries(core, "cust-1") if e.amount < 0] == []


async def test_a_plain_group_waits_little_and_flagged_customers_keep_their_treatment(core, monkeypatch):
    """One group, three customers: a plain one (its debit with no read first), one with a budget
    (read under lock, the budget spent) and one with a low-balance threshold (the debit seen by the
    watch). Each is charged exactly as alone; the plain group alone, its debit assumed to pass,
    waits for the database once (SQLite; twice on MySQL, where the COMMIT travels alone)."""
    from tests.test_handoffs import _count_trips
    await seed_pricing(core)
    for c in ("c-plain", "c-budget", "c-low"):
        await core.ledger.recharge(c, units("1"), f"top-{c}")
    await core.budgets.set_budget("c-budget", "org", "c-budget", "day", units("0.5"))
    await core.alerts.set_webhook("c-low", {"low_balance_amount": units("0.999")}, "admin")
    await core.accounting.post_usage(usage("warm", customer="c-plain"))
    prepared = [await core.accounting._prepare(usage(f"g-{i}", customer="c-plain")) for i in range(4)]

    async def item(ev):
        price, model = await core.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"], ev.customer_id, ev.day)
        return core.accounting._charge_item(ev, price, model, "2026-12-03 09:00:00")
    items = [await item(ev) for ev in prepared]
    trips = _count_trips(core, monkeypatch)
    outcomes = await core.accounting.group.write(items)
    assert trips[0] == (1 if core.db.dialect == "sqlite" else 2) and [e for _, e in outcomes] == [None] * 4
    mixed = [await item(await core.accounting._prepare(usage(f"m-{c}-{i}", customer=c)))
             for i in range(2) for c in ("c-plain", "c-budget", "c-low")]
    outcomes = await core.accounting.group.write(mixed)
    assert [e for _, e in outcomes] == [None] * 6
    assert (await core.ledger.balance("c-plain"))["balance"] == "0.958000"     # warm + 4 + 2 charges of 0.006
    assert (await core.ledger.balance("c-budget"))["balance"] == "0.988000"
    assert (await core.ledger.balance("c-low"))["balance"] == "0.988000"
    spent = (await core.budgets.list_budgets("c-budget", "org"))["rows"][0]
    assert units(spent["spent"]) == units("0.012")
    alerts = (await core.alerts.search(rows=100, type="low_balance"))["rows"]
    assert [a["customer_id"] for a in alerts] == ["c-low"]
    entries = await _entries(core, "c-plain")
    assert [e.balance_after for e in entries] == sorted((e.balance_after for e in entries), reverse=True)
    assert len({e.balance_after for e in entries}) == len(entries)


async def test_a_caller_gone_while_its_group_is_written_is_charged_once_and_sent_again_a_duplicate(core):
    """A caller cancelled (a client that hung up) after its request joined a group: the group is
    written all the same, by the task that writes groups, and the other requests in it get
    their replies; sent again, the request is the duplicate of its charge, never a second one."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    group = core.accounting.group
    write, writing, release = group.write, [], asyncio.Event()

    async def held(items):             # the group's write waits until its caller has gone
        writing.extend(item[0].request_id for item in items)
        await release.wait()
        return await write(items)
    group.write = held
    gone = asyncio.ensure_future(core.accounting.post_usage(usage("gone")))
    stays = asyncio.ensure_future(core.accounting.post_usage(usage("stays")))
    while "gone" not in writing:
        await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    release.set()
    assert (await stays)["duplicate"] is False
    with pytest.raises(asyncio.CancelledError):
        await gone
    await group._flushing              # the groups are written
    again = await core.accounting.post_usage(usage("gone"))
    assert again["duplicate"] is True and again["amount"] == CHAT_A_PRICE
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.988000"     # two charges of 0.006
