"""Products on both databases: the quota split at the boundary, the last quota units under
concurrency, renewal and expiry, supplier routing, margins, idempotent use, the accounting quota
hook and the HTTP endpoints. Every money value is computed by hand in the comments."""
import asyncio
import datetime

import pytest

from billing_module.core import BillingCore
from billing_module.errors import Conflict, InsufficientBalance, InvalidParam, NotFound
from billing_module.products import NotSubscribed, QuotaExceeded
from tests.helpers import CHAT_A_PRICE, other_node, runs_again, seed_pricing, units, usage


def wire(core):
    """The products service as services.build_services wires it (its quota hook is accounting's)."""
    assert core.accounting.quota is core.products.hook
    return core.products


@pytest.fixture
def pm(core):
    return wire(core)


async def make_product(pm, code="pack", unit="call", included="10", list_price="3", overage="0.5", fractional="1",
                       period_anchor="second", **kw):
    """A product that accepts fractional quantities and starts its periods at the second of
    subscribing unless the test says otherwise."""
    return await pm.save_product(code=code, product_name=f"{code} product", quantity_unit=unit,
                                 included_quantity=included, list_price=list_price, overage_price=overage,
                                 fractional=fractional, period_anchor=period_anchor, **kw)


async def balance(core, customer):
    return (await core.ledger.balance(customer))["balance"]


async def count(core, sql, ns=None):
    async with core.db.read() as tx:
        return int(await tx.scalar(sql, ns or {}))


async def books_clean(core):
    assert (await core.ledger.reconcile())["mismatches"] == []


def use(pm, ref, amount, customer="c1", product=None, **kw):
    return pm.product_use(customer, "u1", product, amount, source_ref_table="task", source_ref_id=ref, **kw)


# --- quota and overage ---------------------------------------------------------------------------------
async def test_an_amount_crossing_the_quota_is_split_exactly(core, pm):
    p = await make_product(pm)                     # 10 calls for 3.00 a month, 0.50 per call beyond
    await core.ledger.recharge("c1", units("10"), "r1")
    sub = await pm.subscribe("c1", p["product_id"], "s1")
    assert sub["package_price"] == "3.000000" and sub["remaining"] == "10" and sub["duplicate"] is False
    assert await balance(core, "c1") == "7.000000"
    pid = p["product_id"]
    a = await use(pm, "t1", 4, product=pid)
    b = await use(pm, "t2", "4.5", product=pid)
    assert (a["billing_mode"], a["sell_price"], b["included_amount"]) == ("1", "0.000000", "4.5")
    c = await use(pm, "t3", "3", product=pid)      # 1.5 left: 1.5 included + 1.5 x 0.50 = 0.75
    assert (c["billing_mode"], c["included_amount"], c["overage_amount"], c["sell_price"]) == \
        ("2", "1.5", "1.5", "0.750000")
    quota = await pm.check_quota("c1", pid)
    assert (quota["included"], quota["used"], quota["remaining"], quota["past_quota"]) == ("10", "10", "0", "overage")
    d = await use(pm, "t4", 1, product=pid)
    assert (d["billing_mode"], d["included_amount"], d["sell_price"]) == ("2", "0", "0.500000")
    assert await balance(core, "c1") == "5.750000"     # 10 - 3 - 0.75 - 0.50
    assert await count(core, "select count(*) from ledger_entry where entry_type = 'overage'") == 2
    await books_clean(core)


async def test_pay_as_you_go_rounds_half_up_and_a_product_without_overage_refuses(core, pm):
    # 0.000001 per 2 calls: 1 call costs 0.5 micro -> 1 micro; 0.5 call costs 0.25 micro -> 0
    payg = await make_product(pm, "payg", included="0", list_price="0", overage="0.000001", price_per=2)
    await core.ledger.recharge("c1", units("1"), "r1")
    one = await use(pm, "h1", 1, product=payg["product_id"])
    half = await use(pm, "h2", "0.5", product=payg["product_id"])
    assert (one["billing_mode"], one["sell_price"], half["sell_price"]) == ("3", "0.000001", "0.000000")
    closed = await make_product(pm, "closed", included="2", list_price="0", overage=None)
    with pytest.raises(NotSubscribed):
        await use(pm, "n1", 1, product=closed["product_id"])
    await pm.subscribe("c1", closed["product_id"], "s-closed")
    with pytest.raises(QuotaExceeded):           # 3 > 2 included and no overage: nothing is consumed
        await use(pm, "n2", 3, product=closed["product_id"])
    assert (await pm.check_quota("c1", closed["product_id"]))["used"] == "0"
    assert (await use(pm, "n3", 2, product=closed["product_id"]))["billing_mode"] == "1"
    assert (await pm.check_quota("c1", closed["product_id"]))["past_quota"] == "refused"
    assert await balance(core, "c1") == "0.999999"
    await books_clean(core)


async def test_concurrent_uses_of_the_last_units_never_both_get_them_free(core, pm):
    p = await make_product(pm, included="10", list_price="0", overage="0.1")
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("100"), "r1")
    await pm.subscribe("c1", pid, "s1")
    await use(pm, "first", 7, product=pid)
    results = await asyncio.gather(*[use(pm, f"last-{i}", 1, product=pid) for i in range(12)])
    modes = sorted(r["billing_mode"] for r in results)
    assert modes == ["1"] * 3 + ["2"] * 9
    # a second subscription: 5 units left, six uses of 2 at once -> 2 + 2 + (1 + 1 over) + 3 x 2 over
    p2 = await make_product(pm, "pack2", included="5", list_price="0", overage="0.1")
    await pm.subscribe("c1", p2["product_id"], "s2")
    results = await asyncio.gather(*[use(pm, f"two-{i}", 2, product=p2["product_id"]) for i in range(6)])
    included = sorted(r["included_amount"] for r in results)
    assert included == ["0", "0", "0", "1", "2", "2"]
    assert sum(int(r["overage_amount"]) for r in results) == 7
    assert (await pm.check_quota("c1", p2["product_id"]))["used"] == "5"
    assert await balance(core, "c1") == "98.400000"   # 100 - 9 x 0.1 - 7 x 0.1
    await books_clean(core)


# --- renewal, expiry, cancellation ---------------------------------------------------------------------
async def test_renewal_at_the_period_end_charges_once_and_resets_the_quota(core, pm, fixed_clock, config, db_desc,
                                                                          tmp_path):
    p = await make_product(pm)
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("10"), "r1")
    sub = await pm.subscribe("c1", pid, "s1")
    assert (sub["period_start"], sub["period_end"]) == ("2026-11-22 12:00:00", "2026-12-22 12:00:00")
    await use(pm, "t1", 6, product=pid)
    assert await pm.renew_due() == {"renewed": 0, "expired": 0}
    fixed_clock.now = datetime.datetime(2026, 12, 22, 12, 0, 0)
    other = BillingCore(config=config, db_desc=other_node(db_desc), data_dir=str(tmp_path), instance_id="instance-2")
    try:
        results = await asyncio.gather(pm.renew_due(), wire(other).renew_due())
    finally:
        await other.close()
    assert sum(r["renewed"] for r in results) == 1 and sum(r["expired"] for r in results) == 0
    sub = await pm.subscription(sub["subscription_id"])
    assert (sub["period_start"], sub["period_end"], sub["used"], sub["renewals"]) == \
        ("2026-12-22 12:00:00", "2027-01-22 12:00:00", "0", 1)
    assert await balance(core, "c1") == "4.000000"
    assert await count(core, "select count(*) from ledger_entry where entry_type = 'subscription'") == 2
    # periods are anchored on the first start: Jan 31 -> Feb 28 -> Mar 31
    fixed_clock.now = datetime.datetime(2027, 1, 31, 10, 0, 0)
    await core.ledger.recharge("c2", units("10"), "r2")
    s2 = await pm.subscribe("c2", pid, "s2")
    assert s2["period_end"] == "2027-02-28 10:00:00"
    fixed_clock.now = datetime.datetime(2027, 2, 28, 10, 0, 0)
    assert (await pm.renew_due())["renewed"] == 2           # c2's first renewal and c1's second
    assert (await pm.subscription(s2["subscription_id"]))["period_end"] == "2027-03-31 10:00:00"
    await books_clean(core)


async def test_a_renewal_that_cannot_be_paid_expires_and_touches_no_money(core, pm, fixed_clock):
    p = await make_product(pm)
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("5"), "r1")
    sub = await pm.subscribe("c1", pid, "s1")
    await use(pm, "t1", 10, product=pid)
    entries = await count(core, "select count(*) from ledger_entry")
    fixed_clock.advance(31 * 86400)
    assert await pm.renew_due() == {"renewed": 0, "expired": 1}
    after = await pm.subscription(sub["subscription_id"])
    assert (after["status"], after["status_reason"]) == ("expired", "renewal not paid: insufficient_balance")
    assert (after["period_end"], after["used"], after["renewals"]) == ("2026-12-22 12:00:00", "10", 0)
    assert await count(core, "select count(*) from ledger_entry") == entries
    assert await balance(core, "c1") == "2.000000"
    assert (await pm.check_quota("c1", pid))["subscribed"] is False
    assert (await use(pm, "t2", 1, product=pid))["billing_mode"] == "3"
    await core.ledger.recharge("c1", units("5"), "r2")
    assert (await pm.subscribe("c1", pid, "s2"))["status"] == "active"   # a new subscription is allowed
    await books_clean(core)


async def test_cancel_now_or_at_the_period_end(core, pm, fixed_clock):
    p = await make_product(pm, list_price="1")
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("10"), "r1")
    sub = await pm.subscribe("c1", pid, "s1")
    assert (await pm.subscribe("c1", pid, "s1"))["duplicate"] is True
    with pytest.raises(Conflict) as e:
        await pm.subscribe("c1", pid, "s1", auto_renew=False)
    assert e.value.code == "conflict"
    with pytest.raises(Conflict) as e:
        await pm.subscribe("c1", pid, "s-again")
    assert e.value.code == "already_subscribed"
    ending = await pm.cancel(sub["subscription_id"], at_period_end=True)
    assert (ending["status"], ending["auto_renew"]) == ("active", "0")
    fixed_clock.advance(31 * 86400)
    assert await pm.renew_due() == {"renewed": 0, "expired": 1}
    assert await balance(core, "c1") == "9.000000"
    now_sub = await pm.subscribe("c1", pid, "s2")
    done = await pm.cancel(now_sub["subscription_id"])
    assert done["status"] == "cancelled" and done["duplicate"] is False
    assert (await pm.cancel(now_sub["subscription_id"]))["duplicate"] is True
    assert (await use(pm, "t1", 1, product=pid))["billing_mode"] == "3"
    with pytest.raises(Conflict):
        await pm.cancel(sub["subscription_id"])     # expired
    await books_clean(core)


async def subscription_count(core, customer):
    return await count(core, "select subscription_count from customer_balance where id = ${c}$", {"c": customer})


async def test_the_balance_row_counts_active_subscriptions(core, pm, fixed_clock):
    """A charge consults the quota hook only when the customer's balance row counts an active
    subscription: every write that starts or ends one keeps the count, in its transaction."""
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)     # the events are used at 10:00
    await seed_pricing(core)
    chat = await make_product(pm, "chat", unit="token", included="1000000", list_price="1", overage=None)
    binding = await pm.bind(chat["product_id"], "llm", "llm-a", "chat-a")
    await pm.add_supplier(binding["product_resource_id"], "sup-1", "0.000001")
    other = (await make_product(pm, "other"))["product_id"]
    await core.ledger.recharge("cust-1", units("20"), "r1")
    assert await subscription_count(core, "cust-1") == 0
    sub = await pm.subscribe("cust-1", chat["product_id"], "s1")
    assert await subscription_count(core, "cust-1") == 1
    assert (await core.accounting.post_usage(usage("e1")))["amount"] == "0.000000"      # covered
    await core.accounting.submit_usage(usage("e2"))
    assert await core.accounting.account_pending() == 1
    assert (await core.accounting.record(request_id="e2")).amount == 0                 # the accountant too
    second = await pm.subscribe("cust-1", other, "s2")
    assert await subscription_count(core, "cust-1") == 2
    await pm.cancel(sub["subscription_id"], at_period_end=True)      # still active until its period ends
    assert await subscription_count(core, "cust-1") == 2
    await pm.cancel(second["subscription_id"])
    assert await subscription_count(core, "cust-1") == 1
    assert (await pm.cancel(second["subscription_id"]))["duplicate"] is True
    assert await subscription_count(core, "cust-1") == 1
    fixed_clock.advance(31 * 86400)
    assert await pm.renew_due() == {"renewed": 0, "expired": 1}
    assert await subscription_count(core, "cust-1") == 0
    fixed_clock.advance(-31 * 86400)
    assert (await core.accounting.post_usage(usage("e3")))["amount"] == CHAT_A_PRICE   # no longer covered
    # a subscription bought (free) before the customer has an account: the account starts counting it
    free = (await make_product(pm, "free", list_price="0"))["product_id"]
    await pm.subscribe("cust-new", free, "s3")
    await core.ledger.recharge("cust-new", units("1"), "r-new")
    assert await subscription_count(core, "cust-new") == 1
    await books_clean(core)


async def test_a_disabled_product_takes_no_new_subscriptions_and_does_not_renew(core, pm, fixed_clock):
    p = await make_product(pm)
    pid = p["product_id"]
    with pytest.raises(Conflict):
        await make_product(pm)                     # the code is unique per org
    await core.ledger.recharge("c1", units("10"), "r1")
    await core.ledger.recharge("c2", units("10"), "r2")
    sub = await pm.subscribe("c1", pid, "s1")
    changed = await make_product(pm, product_id=pid, status="disabled", overage="0.7")
    assert (changed["product_id"], changed["status"], changed["overage_price"]) == (pid, "disabled", "0.700000")
    with pytest.raises(Conflict) as e:
        await pm.subscribe("c2", pid, "s2")
    assert e.value.code == "product_disabled"
    assert (await use(pm, "t1", 11, product=pid))["sell_price"] == "0.700000"   # the running plan is honoured
    with pytest.raises(NotSubscribed):
        await use(pm, "t2", 1, customer="c2", product=pid)
    fixed_clock.advance(31 * 86400)
    assert await pm.renew_due() == {"renewed": 0, "expired": 1}
    assert (await pm.subscription(sub["subscription_id"]))["status_reason"] == "product no longer available"
    assert await balance(core, "c1") == "6.300000"       # 10 - 3 - 0.7, no renewal charge
    await books_clean(core)


# --- suppliers -----------------------------------------------------------------------------------------
async def test_routing_by_priority_cost_weight_and_fallback(core, pm):
    await seed_pricing(core)        # bind checks that the model exists
    p = await make_product(pm, unit="token", included="0", list_price="0", overage="0.000002")
    pid = p["product_id"]
    b = await pm.bind(pid, "llm", "llm-a", "chat-a")
    bid = b["product_resource_id"]
    s = {}
    for org, cost, prio, weight in [("sup-a", "0.000002", 1, 1), ("sup-b", "0.000001", 1, 1),
                                    ("sup-c", "0.000001", 1, 5), ("sup-d", "0.000001", 1, 5),
                                    ("sup-z", "0.0000005", 2, 9)]:
        s[org] = (await pm.add_supplier(bid, org, cost, priority=prio, weight=weight))["supplier_id"]
    with pytest.raises(Conflict):
        await pm.add_supplier(bid, "sup-a", "0.1")
    order = []
    for org in ("sup-c", "sup-d", "sup-b", "sup-a", "sup-z"):
        order.append((await pm.route(pid))["supplier_org_id"])
        await pm.disable_supplier(s[org])
    assert order == ["sup-c", "sup-d", "sup-b", "sup-a", "sup-z"]
    assert await pm.route(pid) is None
    await pm.update_supplier(s["sup-z"], enabled="1")
    await core.ledger.recharge("c1", units("1"), "r1")
    r = await use(pm, "t1", 1, product=pid)        # 0.00000050 x 1 token = 0.5 micro -> 0.000001
    assert (r["supplier_org_id"], r["unit_cost"], r["total_cost"], r["resource_ref_id"]) == \
        ("sup-z", "0.00000050", "0.000001", "llm-a")
    await pm.update_supplier(s["sup-b"], enabled=True, unit_cost="0.0000003", priority=2)
    r = await use(pm, "t2", 1000, product=pid)     # same priority, sup-b is cheaper: 1000 x 0.0000003
    assert (r["supplier_org_id"], r["total_cost"], r["sell_price"]) == ("sup-b", "0.000300", "0.002000")
    await pm.unbind(bid)
    assert (await pm.bindings(pid))["total"] == 0 and await pm.route(pid) is None
    assert (await pm.bind(pid, "llm", "llm-a"))["product_resource_id"] == bid
    assert (await pm.route(pid))["supplier_org_id"] == "sup-b"
    enabled = (await pm.suppliers(product_id=pid, include_disabled=False))["rows"]
    assert [x["supplier_org_id"] for x in enabled] == ["sup-b", "sup-z"]
    await books_clean(core)


async def test_statistics_by_product_supplier_customer_and_day(core, pm, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 8, 0, 0)
    p1 = await make_product(pm, "p1", included="2", list_price="0", overage="0.5")
    p2 = await make_product(pm, "p2", included="0", list_price="0", overage="1.2")
    for p, org, cost in ((p1, "s1", "0.1"), (p2, "s2", "0.75")):
        b = await pm.bind(p["product_id"], "service", f"svc-{org}")
        await pm.add_supplier(b["product_resource_id"], org, cost)
    await core.ledger.recharge("c1", units("10"), "r1")
    await core.ledger.recharge("c2", units("10"), "r2")
    await pm.subscribe("c1", p1["product_id"], "s1")
    await use(pm, "a", 3, customer="c1", product=p1["product_id"])   # 2 free + 1 x 0.5; cost 3 x 0.1
    await use(pm, "b", 2, customer="c2", product=p2["product_id"])   # 2 x 1.2 = 2.4; cost 2 x 0.75
    fixed_clock.now = datetime.datetime(2026, 11, 23, 9, 0, 0)
    await use(pm, "c", 1, customer="c2", product=p2["product_id"])   # 1.2; cost 0.75

    def money(rows):
        return [(r["uses"], r["cost"], r["revenue"], r["margin"], r["margin_rate"]) for r in rows]
    first = (1, "0.300000", "0.500000", "0.200000", "0.4000")
    second = (2, "2.250000", "3.600000", "1.350000", "0.3750")
    by_product = await pm.stats("product")
    assert [r["key"] for r in by_product["rows"]] == sorted([p1["product_id"], p2["product_id"]])
    assert sorted(money(by_product["rows"])) == sorted([first, second])
    assert money((await pm.stats("supplier"))["rows"]) == [first, second]
    assert money((await pm.stats("customer"))["rows"]) == [first, second]
    by_day = await pm.stats("day")
    assert [r["key"] for r in by_day["rows"]] == ["2026-11-22", "2026-11-23"]
    assert money(by_day["rows"]) == [(2, "1.800000", "2.900000", "1.100000", "0.3793"),
                                     (1, "0.750000", "1.200000", "0.450000", "0.3750")]
    assert by_day["rows"][0]["quantities"] == [{"unit": "call", "amount": "5", "included": "2", "overage": "3"}]
    assert money([by_day["totals"]]) == [(3, "2.550000", "4.100000", "1.550000", "0.3780")]
    one_day = await pm.stats("customer", start="2026-11-23", end="2026-11-23")   # a day as the end: inclusive
    assert money(one_day["rows"]) == [(1, "0.750000", "1.200000", "0.450000", "0.3750")]
    over = await pm.overage(customer_id="c2", product_id=p2["product_id"])
    assert (over["total"], over["total_charged"], over["price"]["overage_price"]) == (2, "3.600000", "1.200000")
    await books_clean(core)


# --- idempotency and bad input ---------------------------------------------------------------------------
async def test_product_use_is_idempotent_on_its_source_reference(core, pm):
    p = await make_product(pm, included="0", list_price="0", overage="0.25")
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("1"), "r1")
    first = await use(pm, "same", 2, product=pid)
    again = await use(pm, "same", 2, product=pid)
    assert again == dict(first, duplicate=True)
    with pytest.raises(Conflict):
        await use(pm, "same", 3, product=pid)
    results = await asyncio.gather(*[use(pm, "burst", 1, product=pid) for _ in range(5)])
    assert sorted(r["duplicate"] for r in results) == [False, True, True, True, True]
    assert await balance(core, "c1") == "0.250000"    # 1 - 2 x 0.25 - 1 x 0.25
    assert await count(core, "select count(*) from product_usage_log") == 2
    await books_clean(core)


async def test_bad_input_is_refused_and_changes_nothing(core, pm):
    p = await make_product(pm)
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("10"), "r1")
    bad = [
        lambda: use(pm, "x", "-1", product=pid), lambda: use(pm, "x", "abc", product=pid),
        lambda: use(pm, "x", "1.23456", product=pid), lambda: use(pm, "x", 0, product=pid),
        lambda: use(pm, "x", 1, product=pid, unit="token"),
        lambda: pm.product_use("c1", "u1", pid, 1, source_ref_table="accounting_records", source_ref_id="x"),
        lambda: pm.product_use("c1", "u1", pid, 1, source_ref_table="bad table", source_ref_id="x"),
        lambda: make_product(pm, "f", overage=0.5), lambda: make_product(pm, "f", list_price="-1"),
        lambda: make_product(pm, "f", product_type="car"), lambda: make_product(pm, "f", period_months=0),
        lambda: pm.subscribe("c1", pid, "s1", package_price=1.5),
        lambda: pm.subscribe("c1", pid, "s1", included_quantity="1.00001"),
        lambda: pm.bind(pid, "spaceship", "x"), lambda: pm.add_supplier("nope", "s", 0.1),
        lambda: pm.stats("week"), lambda: pm.usage_list(billing_mode="9"),
        lambda: pm.stats(start="2026-11-23 10:00:00", end="2026-11-23 09:00:00"),
    ]
    for call in bad:
        with pytest.raises(InvalidParam):
            await call()
    with pytest.raises(NotFound):
        await use(pm, "x", 1, product="no-such-product")
    with pytest.raises(NotFound):
        await pm.bind("no-such-product", "llm", "x")
    with pytest.raises(InsufficientBalance):
        await pm.subscribe("c1", pid, "s-big", package_price="11")
    for table in ("product_usage_log", "product_subscription", "product_resource", "product_resource_supplier"):
        assert await count(core, f"select count(*) from {table}") == 0, table
    assert await count(core, "select count(*) from product") == 1
    assert await balance(core, "c1") == "10.000000"
    await books_clean(core)


# --- the accounting quota hook ---------------------------------------------------------------------------
async def test_post_usage_spends_the_quota_first_and_charges_only_the_overage(core, pm, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)     # the events are used at 10:00
    await seed_pricing(core)
    p = await make_product(pm, "chat", unit="token", included="3098", list_price="1", overage=None)
    binding = await pm.bind(p["product_id"], "llm", "llm-a", "chat-a")
    await pm.add_supplier(binding["product_resource_id"], "sup-1", "0.000001")   # no supplier, no sale
    await core.ledger.recharge("cust-1", units("2"), "r1")
    sub = await pm.subscribe("cust-1", p["product_id"], "s1")
    # 1,000 + 500 tokens priced 0.006 (event by model name): all 1,500 included
    r1 = await core.accounting.post_usage(usage("e1"))
    assert (r1["amount"], r1["subscription_id"], r1["included_quantity"]) == \
        ("0.000000", sub["subscription_id"], "1500")
    # 1,000 + 600 tokens priced 0.0068 (by llm id): 1,598 left, 2 over -> 6,800 x 2 / 1,600 = 8.5 -> 0.000009
    r2 = await core.accounting.post_usage(usage("e2", llmid="llm-a", output_tokens=600))
    assert (r2["amount"], r2["included_quantity"]) == ("0.000009", "1598")
    r3 = await core.accounting.post_usage(usage("e3"))           # nothing left: the full 0.006
    assert (r3["amount"], r3["included_quantity"]) == ("0.006000", "0")
    assert (await core.accounting.post_usage(usage("e3")))["duplicate"] is True
    assert await balance(core, "cust-1") == "0.993991"       # 2 - 1 - 0.000009 - 0.006
    log = (await pm.usage_list(customer_id="cust-1", rows=10))["rows"]
    assert sorted((r["billing_mode"], r["included_amount"], r["overage_amount"], r["sell_price"]) for r in log) == [
        ("1", "1500", "0", "0.000000"), ("2", "0", "1500", "0.006000"), ("2", "1598", "2", "0.000009")]
    assert {r["source_ref_table"] for r in log} == {"accounting_records"}
    # a customer without a subscription pays the full price and leaves no product usage row
    await core.ledger.recharge("cust-9", units("1"), "r9")
    assert (await core.accounting.post_usage(usage("e9", customer="cust-9")))["amount"] == "0.006000"
    assert await count(core, "select count(*) from product_usage_log") == 3
    await books_clean(core)


async def _chat_subscriber(core, pm, fixed_clock):
    """cust-1 (2.00 on its balance) subscribed to chat-a with 3,000 tokens included, then the
    list price (1.00 taken for the subscription)."""
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)
    await seed_pricing(core)
    p = await make_product(pm, "chat", unit="token", included="3000", list_price="1", overage=None)
    binding = await pm.bind(p["product_id"], "llm", "llm-a", "chat-a")
    await pm.add_supplier(binding["product_resource_id"], "sup-1", "0.000001")
    await core.ledger.recharge("cust-1", units("2"), "r1")
    await pm.subscribe("cust-1", p["product_id"], "s1")


async def test_a_group_of_a_subscribers_charges_spends_the_quota_first(core, pm, fixed_clock):
    """Charges written together by the group writer (one transaction, one debit per customer)
    reach the quota hook too: the subscriber's included tokens go first, then the full price."""
    await _chat_subscriber(core, pm, fixed_clock)

    async def item(request_id):
        ev = await core.accounting._prepare(usage(request_id))
        price, model = await core.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"], ev.customer_id, ev.day)
        return core.accounting._charge_item(ev, price, model, "2026-11-22 09:00:00")
    outcomes = await core.accounting.group.write([await item(f"g{i}") for i in range(4)])
    assert [e for _, e in outcomes] == [None] * 4
    assert sorted(row["amount"] for row, _ in outcomes) == [0, 0, 6000, 6000]   # 2 x 1,500 tokens included
    assert await balance(core, "cust-1") == "0.988000"      # 2 - 1 (the subscription) - 2 x 0.006
    await books_clean(core)


async def test_a_subscribers_charges_refute_the_assumed_debit_once(core, pm, fixed_clock):
    """A subscriber's charge goes to the quota hook first (a flag on the balance row): the first
    charge's debit, assumed to pass, is refuted and the charge runs the careful way. The customer
    is then known as one whose debits need more, and stays so through the overage debit made
    after the hook: the next charges go the careful way at once (counted by the metric of
    transactions run again)."""
    await _chat_subscriber(core, pm, fixed_clock)
    before = runs_again("assumption")
    amounts = [(await core.accounting.post_usage(usage(f"s{i}")))["amount"] for i in range(4)]
    assert amounts == ["0.000000", "0.000000", "0.006000", "0.006000"]    # 2 x 1,500 tokens included
    assert runs_again("assumption") == before + 1
    assert "cust-1" in core.ledger._not_plain
    assert await balance(core, "cust-1") == "0.988000"
    await books_clean(core)


async def test_a_refused_overage_in_the_hook_leaves_the_quota_untouched(core, pm, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)
    await seed_pricing(core)
    p = await make_product(pm, "calls", unit="call", included="1", list_price="0", overage=None)
    await core.ledger.update_account("cust-2", credit_limit=0)       # an empty account
    await pm.subscribe("cust-2", p["product_id"], "s1")

    def call(rid):
        return usage(rid, customer="cust-2", model="flat-1", product_id=p["product_id"])   # 1.0 per call
    assert (await core.accounting.post_usage(call("c1")))["amount"] == "0.000000"     # the one included call
    with pytest.raises(InsufficientBalance):
        await core.accounting.post_usage(call("c2"))
    # the batch accountant commits what it could account: the refused event left nothing behind
    await core.accounting.submit_usage(call("c3"))
    assert await core.accounting.account_pending() == 0
    assert (await pm.check_quota("cust-2", p["product_id"]))["used"] == "1"
    assert await count(core, "select count(*) from product_usage_log") == 1
    # 1.5 covers one of two overage calls in one batch; the other is refused and accounted later
    await core.ledger.recharge("cust-2", units("1.5"), "r1")
    for rid in ("c4", "c5"):
        await core.accounting.submit_usage(call(rid))
    assert await core.accounting.account_pending() == 1
    await core.ledger.recharge("cust-2", units("1"), "r2")
    records = [await core.accounting.record(request_id=rid) for rid in ("c4", "c5")]
    left = [r for r in records if r.status != "accounted"]
    assert len(left) == 1
    assert (await core.accounting.account_record(left[0].id))["amount"] == "1.000000"
    assert await balance(core, "cust-2") == "0.500000"                 # 1.5 + 1 - 2 x 1.0
    assert await count(core, "select count(*) from product_usage_log") == 3
    assert await count(core, "select count(*) from ledger_entry where entry_type = 'usage'") == 2
    await books_clean(core)


async def test_release_quota_gives_a_reservation_back(core, pm, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)
    await seed_pricing(core)
    p = await make_product(pm, "calls", unit="call", included="5", list_price="0", overage=None)
    await core.ledger.update_account("cust-3", credit_limit=0)
    await pm.subscribe("cust-3", p["product_id"], "s1")
    r = await core.accounting.post_usage(usage("k1", customer="cust-3", model="flat-1", product_id=p["product_id"]))
    async with core.db.transaction() as tx:
        assert await pm.hook.release_quota(tx, r["record_id"]) is True
        assert await pm.hook.release_quota(tx, r["record_id"]) is False
    assert (await pm.check_quota("cust-3", p["product_id"]))["used"] == "0"
    assert await count(core, "select count(*) from product_usage_log") == 0


# --- HTTP ---------------------------------------------------------------------------------------------------
async def test_http_round_trips(http):
    core = http.core
    wire(core)
    admin = http.admin_key
    cust, _ = await core.apikeys.create("customer", customer_id="c1", name="c1 key")
    other, _ = await core.apikeys.create("customer", customer_id="c2", name="c2 key")
    st, body = await http.post("api/recharge.dspy", admin, json={"customer_id": "c1", "amount": "10",
                                                                 "request_id": "r1"})
    assert st == 200, body
    st, body = await http.post("api/product_save.dspy", admin, json={
        "code": "pack", "product_name": "Pack", "quantity_unit": "call", "included_quantity": "10",
        "list_price": "3.00", "overage_price": "0.50"})
    assert st == 200 and body["success"] and body["list_price"] == "3.000000", body
    pid = body["product_id"]
    st, body = await http.post("api/product_save.dspy", admin, json={
        "code": "bad", "product_name": "Bad", "quantity_unit": "call", "overage_price": 0.5})
    assert (st, body["code"]) == (400, "invalid_param")
    st, body = await http.post("api/product_save.dspy", cust, json={"code": "x"})
    assert st == 403
    st, body = await http.post("api/product_bind.dspy", admin, json={"product_id": pid, "resource_type": "service",
                                                                     "resource_ref_id": "svc-1"})
    assert st == 200, body
    bid = body["product_resource_id"]
    st, body = await http.get("api/product_bindings.dspy", cust, product_id=pid)
    assert (st, body["total"]) == (200, 1)
    st, body = await http.post("api/product_supplier_add.dspy", admin, json={
        "product_resource_id": bid, "supplier_org_id": "sup-1", "unit_cost": "0.1", "priority": 1})
    assert st == 200 and body["unit_cost"] == "0.10000000", body
    sid = body["supplier_id"]
    st, body = await http.post("api/product_supplier_update.dspy", admin, json={"supplier_id": sid, "weight": 3})
    assert (st, body["weight"]) == (200, 3)
    st, body = await http.get("api/product_suppliers.dspy", admin, product_id=pid)
    assert st == 200 and body["route"]["supplier_org_id"] == "sup-1"
    st, _ = await http.get("api/product_suppliers.dspy", cust, product_id=pid)
    assert st == 403
    # subscriptions: a customer key for itself only, and only at the product's plan
    st, body = await http.post("api/product_subscribe.dspy", other, json={"customer_id": "c1", "product_id": pid,
                                                                          "request_id": "s1"})
    assert st == 403
    st, body = await http.post("api/product_subscribe.dspy", cust, json={"product_id": pid, "request_id": "s1",
                                                                         "package_price": "0"})
    assert st == 403
    st, body = await http.post("api/product_subscribe.dspy", cust, json={"product_id": pid, "request_id": "s1"})
    assert st == 200 and body["customer_id"] == "c1" and body["remaining"] == "10", body
    sub_id = body["subscription_id"]
    st, body = await http.get("api/product_quota.dspy", cust, product_id=pid)
    assert (st, body["remaining"], body["overage_price"]) == (200, "10", "0.500000")
    st, body = await http.post("api/product_use.dspy", cust, json={
        "product_id": pid, "user_id": "u1", "amount": "12", "source_ref_table": "task", "source_ref_id": "t1"})
    assert st == 200 and (body["included_amount"], body["sell_price"]) == ("10", "1.000000"), body
    assert "total_cost" not in body and "supplier_org_id" not in body
    st, body = await http.post("api/product_use.dspy", cust, json={
        "product_id": pid, "user_id": "u1", "amount": "-1", "source_ref_table": "task", "source_ref_id": "t2"})
    assert (st, body["code"]) == (400, "invalid_param")
    st, body = await http.post("api/product_use.dspy", admin, json={
        "customer_id": "c1", "product_id": pid, "user_id": "u1", "amount": 1, "source_ref_table": "task",
        "source_ref_id": "t3"})
    assert st == 200 and (body["supplier_org_id"], body["total_cost"]) == ("sup-1", "0.100000"), body
    st, body = await http.get("api/product_usage_list.dspy", cust)
    assert st == 200 and body["total"] == 2 and all("unit_cost" not in r for r in body["rows"])
    st, body = await http.get("api/product_usage_list.dspy", other, customer_id="c1")
    assert st == 403
    st, body = await http.get("api/product_overage.dspy", cust, product_id=pid)
    assert (st, body["total_charged"], body["price"]["overage_price"]) == (200, "1.500000", "0.500000")
    st, body = await http.get("api/product_stats.dspy", admin, group_by="supplier")
    assert st == 200 and body["rows"][0]["key"] == "sup-1" and body["rows"][0]["cost"] == "1.300000", body
    assert body["rows"][0]["revenue"] == "1.500000" and body["rows"][0]["margin"] == "0.200000"
    st, _ = await http.get("api/product_stats.dspy", cust)
    assert st == 403
    st, body = await http.get("api/product_subscriptions.dspy", cust)
    assert (st, body["total"]) == (200, 1)
    st, body = await http.post("api/product_subscription_cancel.dspy", other, json={"subscription_id": sub_id})
    assert st == 403
    st, body = await http.post("api/product_subscription_cancel.dspy", cust, json={"subscription_id": sub_id})
    assert (st, body["status"]) == (200, "cancelled")
    st, body = await http.post("api/product_supplier_disable.dspy", admin, json={"supplier_id": sid})
    assert (st, body["enabled"]) == (200, "0")
    st, body = await http.post("api/product_unbind.dspy", admin, json={"product_resource_id": bid})
    assert (st, body["enabled"]) == (200, "0")
    st, body = await http.get("api/product_use.dspy", cust)
    assert st == 405
    assert await balance(core, "c1") == "5.500000"      # 10 - 3 - 2 x 0.5 - 0.5
    await books_clean(core)
