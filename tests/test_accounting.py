"""Usage accounting on both databases: exact charges, idempotency under concurrency, no
overdraft, failures that are retried and charged exactly once, the batched accountant."""
import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing_module.core import BillingCore
from billing_module.errors import Conflict, InsufficientBalance, InvalidParam, NoPricing, UnknownCustomer
from tests.helpers import (
    CHAT_A_PRICE,
    PROGRAM,
    accounting_with_quota,
    mark_subscribed,
    other_node,
    seed_pricing,
    units,
    usage,
)


async def _ledger_sum(core, customer):
    async with core.db.read() as tx:
        return int(await tx.scalar("select coalesce(sum(amount), 0) as s from ledger_entry where customer_id = ${c}$",
                                   {"c": customer}))


async def test_post_usage_charges_the_exact_price_once(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    first = await core.accounting.post_usage(usage("u1"))
    assert first["amount"] == CHAT_A_PRICE and first["status"] == "accounted" and first["duplicate"] is False
    assert first["cost"] == "0.003000"   # 1,000 x 1.0/1e6 + 500 x 4.0/1e6
    again = await core.accounting.post_usage(usage("u1"))
    assert again == dict(first, duplicate=True)
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.994000"
    with pytest.raises(Conflict):
        await core.accounting.post_usage(usage("u1", output_tokens=501))
    assert (await core.ledger.reconcile())["mismatches"] == []


async def test_same_request_id_three_times_at_once_charges_once(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    results = await asyncio.gather(*[core.accounting.post_usage(usage("dup")) for _ in range(3)],
                                   return_exceptions=True)
    assert all(not isinstance(r, Exception) for r in results), results
    assert sorted(r["duplicate"] for r in results) == [False, True, True]
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.994000"
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from ledger_entry where entry_type = 'usage'") == 1


async def test_fifty_workers_never_overdraw(core):
    """50 workers x 100 events against a balance worth 1,000 events and no credit."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("6"), "r1")   # 1,000 events x 0.006
    assert (await core.ledger.balance("cust-1"))["balance"] == "6.000000"
    lowest = []

    async def worker(w):
        ok = 0
        for i in range(100):
            try:
                await core.accounting.post_usage(usage(f"w{w}-{i}"))
                ok += 1
            except InsufficientBalance:
                pass
            if i % 25 == 0:
                lowest.append((await core.ledger.balance("cust-1"))["balance"])
        return ok

    charged = sum(await asyncio.gather(*[worker(w) for w in range(50)]))
    bal = await core.ledger.balance("cust-1")
    assert charged == 1000 and bal["balance"] == "0.000000"
    assert all(not b.startswith("-") for b in lowest)
    assert await _ledger_sum(core, "cust-1") == 0
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from accounting_records where status = 'accounted'") == 1000
        assert await tx.scalar("select count(*) as n from accounting_records where status = 'failed'") == 4000
    assert (await core.ledger.reconcile())["mismatches"] == []


async def test_refusals_are_kept_as_failures_and_retried_once_priced(core):
    await core.ledger.recharge("cust-1", units("1"), "r1")
    with pytest.raises(NoPricing):
        await core.accounting.post_usage(usage("late-price"))
    failed = await core.failures.search(customer_id="cust-1")
    assert failed["total"] == 1
    row = failed["rows"][0]
    assert row["failure_code"] == "no_pricing" and row["retry_state"] == "waiting" and row["handled"] == "0"
    # the retry before the price appears fails again and counts the retry on the same row
    with pytest.raises(NoPricing):
        await core.retries.retry(row["id"])
    assert (await core.failures.get(row["id"]))["retry_count"] == 1
    await seed_pricing(core)
    done = await core.retries.retry(row["id"])
    assert done["status"] == "accounted" and done["amount"] == CHAT_A_PRICE
    again = await core.retries.retry(row["id"])
    assert again["duplicate"] is True
    # the caller's own retry of the request is a replay, not a second charge
    assert (await core.accounting.post_usage(usage("late-price")))["duplicate"] is True
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.994000"
    resolved = await core.failures.get(row["id"])
    assert resolved["retry_state"] == "resolved" and resolved["handled"] == "1"
    assert (await core.failures.search(customer_id="cust-1"))["total"] == 1


async def test_automatic_retries_back_off_then_wait_for_an_admin(core, fixed_clock):
    core.config.accounting.max_retries = 2
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("0.001"), "r1")
    with pytest.raises(InsufficientBalance):
        await core.accounting.post_usage(usage("poor"))
    row = (await core.failures.search())["rows"][0]
    assert row["failure_code"] == "insufficient_balance"
    assert await core.retries.retry_due() == 0            # not due yet
    fixed_clock.advance(core.failures.backoff_seconds(0) + 1)
    assert await core.retries.retry_due() == 0            # still insufficient: retried and failed
    row = await core.failures.get(row["id"])
    assert row["retry_count"] == 1 and row["retry_state"] == "waiting"
    fixed_clock.advance(core.failures.backoff_seconds(1) + 1)
    await core.retries.retry_due()
    row = await core.failures.get(row["id"])
    assert row["retry_count"] == 2 and row["retry_state"] == "exhausted" and row["next_retry_at"] is None
    fixed_clock.advance(10**6)
    assert await core.retries.retry_due() == 0
    handled = await core.failures.mark_handled(row["id"], "customer will pay by invoice", "ops")
    assert handled["handled"] == "1" and handled["handled_note"] == "customer will pay by invoice"
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.001000"


async def test_unknown_customer_and_bad_input(core):
    await seed_pricing(core)
    with pytest.raises(UnknownCustomer):
        await core.accounting.post_usage(usage("u1", customer="ghost"))
    for bad in ({"customer_id": "c"}, usage("u2", input_tokens=-1), usage("u3", input_tokens=1.5),
                usage("u4", cached_tokens=5000), usage("u5 space"), usage("u6", use_time="yesterday"),
                usage("u7", quantity="NaN", unit="second"), usage("u8", model_name="x" * 200)):
        with pytest.raises(InvalidParam):
            await core.accounting.post_usage(bad)
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from accounting_records") == 1   # only the ghost's failure


async def test_submitted_usage_is_accounted_by_the_batch_accountant(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    for i in range(30):
        r = await core.accounting.submit_usage(usage(f"s{i}"))
        assert r["status"] == "pending"
    assert (await core.accounting.submit_usage(usage("s0")))["duplicate"] is True
    assert await core.accounting.account_pending(limit=20) == 20
    assert await core.accounting.account_pending(limit=20) == 10
    assert await core.accounting.account_pending() == 0
    bal = await core.ledger.balance("cust-1")
    assert bal["balance"] == "0.820000"    # 1 - 30 x 0.006
    assert (await core.accounting.post_usage(usage("s3")))["duplicate"] is True
    assert (await core.ledger.reconcile())["mismatches"] == []


async def test_one_batch_prices_each_product_id_as_its_own_model(core):
    """The accountant looks models up once per batch: two events named by product_id alone are
    two models (a memo keyed without the name priced the second as the first)."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("10"), "r1")
    chat = dict(usage("by-product-chat", model=None), product_id="chat-a")
    flat = dict(usage("by-product-flat", model=None), product_id="flat-1")
    for ev in (chat, flat):
        await core.accounting.submit_usage({k: v for k, v in ev.items() if v is not None})
    assert await core.accounting.account_pending() == 2
    chat_rec = await core.accounting.record(request_id="by-product-chat")
    flat_rec = await core.accounting.record(request_id="by-product-flat")
    assert (chat_rec.model_name, chat_rec.amount) == ("chat-a", units("0.006"))
    assert (flat_rec.model_name, flat_rec.amount) == ("flat-1", units("1"))


async def test_two_accountants_on_one_database_account_each_event_once(core, config, db_desc, tmp_path):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("10"), "r1")
    for i in range(300):
        await core.accounting.submit_usage(usage(f"e{i}"))
    other = BillingCore(config=config, db_desc=other_node(db_desc), data_dir=str(tmp_path), instance_id="instance-2")
    try:
        async def drain(c):
            n = 0
            while True:
                done = await c.accounting.account_pending(limit=25)
                if done == 0:
                    async with c.db.read() as tx:
                        left = await tx.scalar("select count(*) as n from accounting_records where status = 'pending'")
                    if not left:
                        return n
                    await asyncio.sleep(0.01)
                n += done
        counts = await asyncio.gather(drain(core), drain(other))
    finally:
        await other.close()
    assert sum(counts) == 300, counts
    # SKIP LOCKED: both take batches at the same time. Not on Galera: row locks stay on their node,
    # both instances claim the head of the queue and certification lets one of them win each batch
    if core.db.dialect == "mysql" and not core.db.galera:
        assert all(c > 0 for c in counts), counts
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from ledger_entry where entry_type = 'usage'") == 300
    assert (await core.ledger.balance("cust-1"))["balance"] == "8.200000"
    assert (await core.ledger.reconcile())["mismatches"] == []


async def test_a_crashed_accountants_rows_are_taken_over(core):
    """An accountant that dies mid-batch (its transaction never commits) charges nothing, and
    the next accountant accounts every event of that batch exactly once."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await mark_subscribed(core, "cust-1")      # so that the dying hook is called
    for i in range(5):
        await core.accounting.submit_usage(usage(f"c{i}"))

    class Crash(Exception):
        pass

    async def dying_hook(tx, ev, price, record_id):
        if ev.request_id == "c3":
            raise Crash()       # the process dies after charging c0-c2 inside the transaction
        return None
    with pytest.raises(Crash):
        await accounting_with_quota(core, dying_hook).account_pending()
    assert (await core.ledger.balance("cust-1"))["balance"] == "1.000000"
    assert await core.accounting.account_pending() == 5
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.970000"


async def test_backup_moves_old_accounted_records_in_one_step(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await core.accounting.post_usage(usage("old", use_time="2026-01-01 00:00:00"))
    await core.accounting.post_usage(usage("new", use_time="2026-11-01 00:00:00"))
    assert await core.failures.backup_accounted("2026-06-01 00:00:00") == 1
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from accounting_records") == 1
        assert await tx.scalar("select request_id from accounting_records_history") == "old"


async def test_subscriptions_hook_is_consulted(core):
    """The quota hook (filled by the products module) decides what part is charged."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await mark_subscribed(core, "cust-1")

    class Quota:
        charge_amount, cost, subscription_id, included = 0, 0, "sub-1", 1

    async def hook(tx, ev, price, record_id):
        return Quota()
    r = await accounting_with_quota(core, hook).post_usage(usage("q1"))
    assert r["amount"] == "0.000000" and r["subscription_id"] == "sub-1"
    assert (await core.ledger.balance("cust-1"))["balance"] == "1.000000"


OPS = st.lists(st.tuples(st.sampled_from(["recharge", "usage", "hold", "settle", "release", "adjust"]),
                         st.integers(min_value=0, max_value=3_000_000), st.integers(min_value=0, max_value=5)),
               min_size=1, max_size=25)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
async def test_random_operation_sequences_keep_the_books(core, ops):
    await seed_pricing(core)
    key = f"p{id(ops)}-"
    holds = []
    for n, (op, amount, pick) in enumerate(ops):
        rid = f"{key}{n}"
        before = await _books(core)
        refused = False
        try:
            if op == "recharge":
                await core.ledger.recharge("prop", amount or 1, rid)
            elif op == "usage":
                await core.accounting.post_usage(usage(rid, customer="prop", input_tokens=amount))
            elif op == "hold":
                holds.append((await core.ledger.hold("prop", amount or 1, rid))["hold_id"])
            elif op == "settle" and holds:
                await core.ledger.settle(amount, hold_id=holds[pick % len(holds)])
            elif op == "release" and holds:
                await core.ledger.release(hold_id=holds[pick % len(holds)])
            elif op == "adjust":
                await core.ledger.adjust("prop", -(amount or 1), rid, reason="test")
        except (InsufficientBalance, UnknownCustomer, Conflict, NoPricing, InvalidParam):   # settle above the hold
            refused = True
        assert (await core.ledger.reconcile())["mismatches"] == []
        after = await _books(core)
        if refused:
            assert after == before            # a refusal changes nothing
        elif op in ("usage", "hold") and after is not None and after != before:
            # only delivered usage (settle) and admin adjustments may overdraw; these never do
            assert after[1] >= 0, (op, before, after)


async def _books(core):
    """(balance, available) of the property test's customer, None before it exists."""
    try:
        bal = await core.ledger.balance("prop")
    except UnknownCustomer:
        return None
    return units(bal["balance"]), units(bal["available"])


def test_event_json_round_trip_keeps_quantities_exact():
    from billing_module.accounting import parse_event
    ev = parse_event(usage("q", quantity="100", unit="second"))
    again = parse_event(json.loads(json.dumps(ev.payload)))
    assert again.hash == ev.hash and again.usage.quantity == ev.usage.quantity


async def test_a_fresh_event_is_the_event_its_payload_rebuilds(core):
    """The posting paths take a just validated event as it is where ``rebuild_event`` of its
    payload would give the same: the same fields, the quantity with the same digits."""
    from billing_module.accounting import _rebuilds_as_parsed, parse_event
    await seed_pricing(core)
    events = [usage("f1"), usage("f2", quantity="1.50", unit="second"), usage("f3", quantity=100, unit="second"),
              usage("f4", quantity=0.5, unit="second"), usage("f5", quantity="0.00", unit="second"),
              usage("f6", attributes={"region": "eu", "n": [1, 2]}, user_id="u-1", transno="t-1"),
              usage("f7", reasoning_tokens=100, cached_tokens=10, web_search_calls=2, key_id="k-1"),
              usage("f8", model=None, llmid="llm-a"), usage("f9", model=" chat-a ", use_time=None),
              usage("f10", prompt_tokens=5, input_tokens=None, unit=" call ", quantity="2")]
    taken = 0
    for raw in events:
        ev = await core.accounting._prepare(raw)
        rebuilt = await core.accounting.rebuild_event(ev.payload, ev.hash)
        assert repr(ev) == repr(rebuilt), raw
        taken += _rebuilds_as_parsed(parse_event(raw, core.accounting.times))
    assert 0 < taken < len(events)       # both ways are exercised


def test_program_fixture_is_valid():
    from billing_module.pricing import Program
    assert Program.from_payload(PROGRAM).id == "pp-chat"


async def test_background_jobs_account_queued_usage_and_expire_holds(core, fixed_clock):
    core.config.accounting.interval_seconds = 0.01
    core.config.holds.sweep_interval_seconds = 0.01
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await core.ledger.hold("cust-1", units("0.5"), "h1", ttl_seconds=5)
    for i in range(3):
        await core.accounting.submit_usage(usage(f"bg{i}"))
    fixed_clock.advance(6)
    await core.start_background()
    try:
        for _ in range(200):
            bal = await core.ledger.balance("cust-1")
            if bal["balance"] == "0.982000" and bal["held"] == "0.000000":
                break
            await asyncio.sleep(0.02)
    finally:
        await core.stop_background()
    assert bal["balance"] == "0.982000" and bal["held"] == "0.000000"   # 1 - 3 x 0.006; hold expired
