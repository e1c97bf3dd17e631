"""Issue 13: product semantics a reseller can trust, one test (or more) per numbered item, on both
databases, with the clock moved across period ends (``fixed_clock``), never sleeping."""
import asyncio
import datetime

import pytest

from billing_module.config import load_config
from billing_module.core import BillingCore
from billing_module.errors import ConfigError, Conflict, InvalidParam, NotFound
from tests.helpers import CHAT_A_PRICE, seed_pricing, units, usage
from tests.test_products import balance, books_clean, count, make_product, use, wire


@pytest.fixture
def pm(core):
    return wire(core)


async def chat_plan(core, pm, included, list_price="0", overage=None, unit_cost="0.000001", **kw):
    """A token plan on the model llm-a (chat-a) with one supplier, at 2026-11-22 09:00 (the test
    events are used at 10:00)."""
    await seed_pricing(core)
    p = await make_product(pm, "chat", unit="token", included=included, list_price=list_price, overage=overage, **kw)
    binding = await pm.bind(p["product_id"], "llm", "llm-a", "chat-a")
    supplier = await pm.add_supplier(binding["product_resource_id"], "sup-1", unit_cost)
    return p, supplier


# --- item 10: cancel is idempotent; a cancel at the period end can be undone -----------------------------
async def test_a_repeated_cancel_is_a_duplicate_and_keeps_the_first_reason(core, pm, fixed_clock):
    p = await make_product(pm, list_price="1")
    await core.ledger.recharge("c1", units("10"), "r1")
    sub = await pm.subscribe("c1", p["product_id"], "s1")
    first = await pm.cancel(sub["subscription_id"], at_period_end=True, reason="too dear")
    again = await pm.cancel(sub["subscription_id"], at_period_end=True, reason="changed my mind")
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert again["status_reason"] == "too dear" and again["cancelled_at"] == first["cancelled_at"]
    now = await pm.cancel(sub["subscription_id"], reason="now please")
    assert (now["status"], now["duplicate"], now["status_reason"]) == ("cancelled", False, "too dear")
    repeat = await pm.cancel(sub["subscription_id"], reason="other")
    assert (repeat["duplicate"], repeat["status_reason"]) == (True, "too dear")


async def test_a_cancel_at_the_period_end_is_resumed_before_the_period_ends(core, pm, fixed_clock):
    p = await make_product(pm, list_price="1")
    await core.ledger.recharge("c1", units("10"), "r1")
    sub = await pm.subscribe("c1", p["product_id"], "s1")
    sid = sub["subscription_id"]
    await pm.cancel(sid, at_period_end=True)
    resumed = await pm.resume(sid)
    assert (resumed["auto_renew"], resumed["cancelled_at"], resumed["duplicate"]) == ("1", None, False)
    assert (await pm.resume(sid))["duplicate"] is True
    fixed_clock.advance(31 * 86400)
    assert (await pm.renew_due())["renewed"] == 1          # resumed: it renews
    assert await balance(core, "c1") == "8.000000"
    await pm.cancel(sid, at_period_end=True)
    fixed_clock.advance(31 * 86400)                         # the period ended: too late to resume
    with pytest.raises(Conflict) as e:
        await pm.resume(sid)
    assert e.value.code == "subscription_closed"
    await books_clean(core)


async def test_resume_over_http_is_limited_to_the_callers_subscriptions(http):
    core = http.core
    pm = wire(core)
    cust, _ = await core.apikeys.create("customer", customer_id="c1", name="c1 key")
    other, _ = await core.apikeys.create("customer", customer_id="c2", name="c2 key")
    p = await make_product(pm, list_price="0")
    sub = await pm.subscribe("c1", p["product_id"], "s1")
    st, body = await http.post("api/product_subscription_cancel.dspy", cust,
                               json={"subscription_id": sub["subscription_id"], "at_period_end": "1"})
    assert (st, body["auto_renew"]) == (200, "0"), body
    st, _ = await http.post("api/product_subscription_resume.dspy", other,
                            json={"subscription_id": sub["subscription_id"]})
    assert st == 403
    st, body = await http.post("api/product_subscription_resume.dspy", cust,
                               json={"subscription_id": sub["subscription_id"]})
    assert (st, body["auto_renew"], body["duplicate"]) == (200, "1", False), body


# --- item 6: product_save changes only the fields sent; clearing is explicit --------------------------------
async def test_saving_only_the_status_keeps_every_other_field(core, pm):
    p = await make_product(pm, included="10", list_price="3", overage="0.5", description="ten calls")
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("10"), "r1")
    await pm.subscribe("c1", pid, "s1")
    saved = await pm.save_product(product_id=pid, status="disabled")
    assert {k: saved[k] for k in ("status", "overage_price", "list_price", "included_quantity", "description",
                                  "code", "quantity_unit")} == {
        "status": "disabled", "overage_price": "0.500000", "list_price": "3.000000", "included_quantity": "10",
        "description": "ten calls", "code": "pack", "quantity_unit": "call"}
    await use(pm, "t1", 10, product=pid)
    past = await use(pm, "t2", 1, product=pid)      # a subscriber past quota still pays the overage price
    assert (past["billing_mode"], past["sell_price"]) == ("2", "0.500000")
    cleared = await pm.save_product(product_id=pid, clear="overage_price, description")
    assert (cleared["overage_price"], cleared["description"], cleared["list_price"]) == (None, None, "3.000000")
    with pytest.raises(InvalidParam):
        await pm.save_product(product_id=pid, clear="list_price")     # not a nullable field
    assert (await pm.product(pid))["list_price"] == "3.000000"


async def test_product_save_over_http_sends_one_field(http):
    core = http.core
    pm = wire(core)
    p = await make_product(pm, included="10", list_price="3", overage="0.5")
    st, body = await http.post("api/product_save.dspy", http.admin_key,
                               json={"product_id": p["product_id"], "status": "disabled"})
    assert (st, body["status"], body["overage_price"], body["included_quantity"]) == \
        (200, "disabled", "0.500000", "10"), body
    st, body = await http.post("api/product_save.dspy", http.admin_key,
                               json={"product_id": p["product_id"], "clear": "overage_price"})
    assert (st, body["overage_price"]) == (200, None), body
    st, body = await http.post("api/product_save.dspy", http.admin_key, json={"product_name": "No code"})
    assert (st, body["code"]) == (400, "invalid_param")


# --- item 1: no gap at the period end: a use (or a quota check) at period_end renews first --------------------
async def test_a_use_at_the_period_end_renews_in_the_same_transaction(core, pm, fixed_clock):
    p = await make_product(pm)                      # 10 calls for 3.00 a month, 0.50 per call beyond
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("10"), "r1")
    sub = await pm.subscribe("c1", pid, "s1")
    await use(pm, "t1", 10, product=pid)
    fixed_clock.now = datetime.datetime(2026, 12, 22, 12, 0, 0)       # exactly period_end; no sweep ran
    quota = await pm.check_quota("c1", pid)
    assert (quota["subscribed"], quota["remaining"], quota["period_start"]) == (True, "10", "2026-12-22 12:00:00")
    fixed_clock.advance(1)
    used = await use(pm, "t2", 4, product=pid)
    assert (used["billing_mode"], used["included_amount"], used["sell_price"]) == ("1", "4", "0.000000")
    assert await pm.renew_due() == {"renewed": 0, "expired": 0}      # the sweep finds nothing left to do
    assert await balance(core, "c1") == "4.000000"                     # 10 - 3 - 3, no pay-as-you-go
    after = await pm.subscription(sub["subscription_id"])
    assert (after["renewals"], after["used"], after["period_end"]) == (1, "4", "2027-01-22 12:00:00")
    await books_clean(core)


async def test_concurrent_uses_at_the_period_end_renew_once_and_both_use_the_new_quota(core, pm, fixed_clock):
    p = await make_product(pm)
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("10"), "r1")
    await pm.subscribe("c1", pid, "s1")
    await use(pm, "t0", 10, product=pid)
    fixed_clock.now = datetime.datetime(2026, 12, 22, 12, 0, 0)
    results = await asyncio.gather(*[use(pm, f"t{i}", 1, product=pid) for i in range(1, 5)])
    assert sorted(r["billing_mode"] for r in results) == ["1"] * 4
    assert await count(core, "select count(*) from ledger_entry where entry_type = 'subscription'") == 2
    assert await balance(core, "c1") == "4.000000"
    await books_clean(core)


async def test_an_accounted_event_after_the_period_end_renews_and_spends_the_new_quota(core, pm, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)
    p, _ = await chat_plan(core, pm, "3000", list_price="1")
    await core.ledger.recharge("cust-1", units("5"), "r1")
    await pm.subscribe("cust-1", p["product_id"], "s1")
    assert (await core.accounting.post_usage(usage("e1", output_tokens=2000)))["amount"] == "0.000000"
    fixed_clock.now = datetime.datetime(2026, 12, 22, 9, 0, 5)
    r = await core.accounting.post_usage(usage("e2", use_time="2026-12-22 09:00:01"))
    assert (r["amount"], r["included_quantity"]) == ("0.000000", "1500")
    assert await balance(core, "cust-1") == "3.000000"                # two package fees, no usage charge
    await books_clean(core)


# --- item 2: a late renewal charges the current period only; the passed ones are skipped and shown ----------
async def test_a_renewal_after_an_outage_charges_one_period_and_shows_the_skipped_ones(core, pm, fixed_clock):
    p = await make_product(pm)
    pid = p["product_id"]
    await core.ledger.recharge("c1", units("20"), "r1")
    sub = await pm.subscribe("c1", pid, "s1")
    fixed_clock.now = datetime.datetime(2027, 3, 1, 0, 0, 0)           # three period ends without a sweep
    assert await pm.renew_due() == {"renewed": 1, "expired": 0}
    assert await pm.renew_due() == {"renewed": 0, "expired": 0}
    after = await pm.subscription(sub["subscription_id"])
    assert (after["period_start"], after["period_end"], after["renewals"], after["skipped_periods"]) == \
        ("2027-02-22 12:00:00", "2027-03-22 12:00:00", 3, 2)
    assert await balance(core, "c1") == "14.000000"                     # 20 - 3 - 3: one renewal fee
    assert await count(core, "select count(*) from ledger_entry where entry_type = 'subscription'") == 2
    async with core.db.read() as tx:
        reason = await tx.scalar("select reason from ledger_entry where entry_type = 'subscription' "
                                 "and request_id like 'renew:%'", {})
    assert "2 passed period(s) skipped" in reason
    await books_clean(core)


# --- item 3: no supplier, no sale ---------------------------------------------------------------------------
async def test_a_product_whose_suppliers_are_all_disabled_sells_nothing(core, pm):
    p = await make_product(pm, included="0", list_price="0", overage="0.5")
    pid = p["product_id"]
    binding = await pm.bind(pid, "service", "svc-1")
    supplier = await pm.add_supplier(binding["product_resource_id"], "sup-1", "0.1")
    await core.ledger.recharge("c1", units("10"), "r1")
    assert (await use(pm, "t1", 1, product=pid))["supplier_org_id"] == "sup-1"
    await pm.disable_supplier(supplier["supplier_id"])
    entries = await count(core, "select count(*) from ledger_entry")
    with pytest.raises(Conflict) as e:
        await use(pm, "t2", 1, product=pid)
    assert (e.value.code, e.value.status) == ("no_supplier", 409)
    assert await count(core, "select count(*) from ledger_entry") == entries
    assert await count(core, "select count(*) from product_usage_log") == 1
    stats = await pm.stats("supplier")
    assert [r["key"] for r in stats["rows"]] == ["sup-1"]          # no sale under supplier ""
    assert await balance(core, "c1") == "9.500000"


async def test_an_accounted_event_through_a_product_without_supplier_is_stored_as_failed(core, pm, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)
    p, supplier = await chat_plan(core, pm, "3000")
    await core.ledger.recharge("cust-1", units("5"), "r1")
    await pm.subscribe("cust-1", p["product_id"], "s1")
    await pm.disable_supplier(supplier["supplier_id"])
    with pytest.raises(Conflict) as e:
        await core.accounting.post_usage(usage("e1"))
    assert e.value.code == "no_supplier"
    await core.accounting.submit_usage(usage("e2"))
    assert await core.accounting.account_pending() == 0
    async with core.db.read() as tx:
        failed = await tx.select("select request_id, failure_code from llmusage_accounting_failed "
                                 "order by request_id", {})
    assert [(f.request_id, f.failure_code) for f in failed] == [("e1", "no_supplier"), ("e2", "no_supplier")]
    assert await balance(core, "cust-1") == "5.000000"
    assert (await pm.check_quota("cust-1", p["product_id"]))["used"] == "0"


# --- item 4: unbind is refused while subscribers use the resource (force to override) --------------------------
async def test_unbind_is_refused_while_a_subscription_is_active(core, pm):
    await seed_pricing(core)
    p = await make_product(pm, list_price="0")
    binding = await pm.bind(p["product_id"], "llm", "llm-a", "chat-a")
    sub = await pm.subscribe("c1", p["product_id"], "s1")
    with pytest.raises(Conflict) as e:
        await pm.unbind(binding["product_resource_id"])
    assert e.value.code == "binding_in_use"
    assert (await pm.bindings(p["product_id"]))["total"] == 1
    assert (await pm.unbind(binding["product_resource_id"], force=True))["enabled"] == "0"
    await pm.bind(p["product_id"], "llm", "llm-a")
    await pm.cancel(sub["subscription_id"])
    assert (await pm.unbind(binding["product_resource_id"]))["enabled"] == "0"


# --- item 7: one overage price: the quota reply, the charge and the ledger show the same number --------------------
async def test_accounted_usage_past_quota_is_charged_at_the_plans_overage_price(core, pm, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)
    # 1,000 tokens included, 3.00 per 1M tokens beyond (the model's own price would be 0.006 per 1,500 tokens)
    p, _ = await chat_plan(core, pm, "1000", overage="3.00", price_per=1_000_000)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await pm.subscribe("cust-1", p["product_id"], "s1")
    quota = await pm.check_quota("cust-1", p["product_id"])
    assert (quota["overage_price"], quota["price_per"], quota["model_usage_past_quota"]) == \
        ("3.000000", "1000000", "overage_price")
    r = await core.accounting.post_usage(usage("e1"))      # 1,500 tokens: 500 past quota x 3.00 / 1M = 0.0015
    assert (r["amount"], r["included_quantity"]) == ("0.001500", "1000")
    async with core.db.read() as tx:
        entry = await tx.scalar("select amount from ledger_entry where entry_type = 'usage'", {})
        sell = await tx.scalar("select sell_price from product_usage_log", {})
    assert (int(entry), int(sell)) == (-1500, 1500)
    assert await balance(core, "cust-1") == "0.998500"
    # a plan without an overage price says that model usage past its quota is at the model's price
    p2 = await make_product(pm, "chat2", unit="call", included="0", list_price="0", overage=None)
    assert (await pm.check_quota("cust-1", p2["product_id"]))["model_usage_past_quota"] == "model_price"
    await books_clean(core)


# --- item 12: reads of the catalogue; bind checks the resource; a customer's user_id is its own --------------------
async def test_products_list_and_read_with_the_plan_a_customer_chooses_by(http):
    core = http.core
    pm = wire(core)
    await seed_pricing(core)
    cust, _ = await core.apikeys.create("customer", customer_id="c1", name="c1 key")
    chat = await make_product(pm, "chat", unit="token", included="1000000", list_price="99", overage="3.00",
                              price_per=1_000_000)
    off = await make_product(pm, "old", status="disabled")
    await pm.bind(chat["product_id"], "llm", "llm-a")
    st, body = await http.get("api/products.dspy", cust)
    assert (st, body["total"], [r["code"] for r in body["rows"]]) == (200, 1, ["chat"]), body
    plan = body["rows"][0]
    assert {k: plan[k] for k in ("list_price", "period_months", "included_quantity", "quantity_unit",
                                 "overage_price", "price_per", "currency")} == {
        "list_price": "99.000000", "period_months": 1, "included_quantity": "1000000", "quantity_unit": "token",
        "overage_price": "3.000000", "price_per": "1000000", "currency": "CNY"}
    st, body = await http.get("api/products.dspy", http.admin_key, status="disabled")
    assert [r["code"] for r in body["rows"]] == ["old"]
    st, body = await http.get("api/products.dspy", http.admin_key, resource_type="llm", resource_ref_id="llm-a")
    assert [r["code"] for r in body["rows"]] == ["chat"]
    st, body = await http.get("api/products.dspy", http.admin_key, rows=1, page=2)
    assert (st, body["total"], len(body["rows"])) == (200, 2, 1)
    st, body = await http.get("api/product.dspy", cust, product_id=chat["product_id"])
    assert (st, body["overage_price"]) == (200, "3.000000")
    st, body = await http.get("api/product.dspy", cust, product_id=off["product_id"])
    assert (st, body["code"]) == (404, "not_found")
    st, body = await http.get("api/product.dspy", http.admin_key, product_id=off["product_id"])
    assert (st, body["status"]) == (200, "disabled")


async def test_subscriptions_of_a_disabled_product_are_listed_with_its_status(core, pm):
    p = await make_product(pm, list_price="0")
    await pm.subscribe("c1", p["product_id"], "s1")
    await pm.save_product(product_id=p["product_id"], status="disabled")
    rows = (await pm.subscriptions("c1"))["rows"]
    assert [(r["product_id"], r["product_status"], r["status"]) for r in rows] == \
        [(p["product_id"], "disabled", "active")]


async def test_bind_refuses_an_unknown_model(core, pm):
    await seed_pricing(core)
    p = await make_product(pm)
    with pytest.raises(NotFound):
        await pm.bind(p["product_id"], "llm", "llm-nope")
    assert (await pm.bindings(p["product_id"], include_disabled=True))["total"] == 0
    assert (await pm.bind(p["product_id"], "llm", "llm-a"))["enabled"] == "1"


async def test_a_customer_key_uses_a_product_only_under_its_own_users(http):
    core = http.core
    pm = wire(core)
    await core.catalog.put("users", [{"id": "u-acme", "kind": "user", "name": "Ann", "org_id": "c1"},
                                     {"id": "u-other", "kind": "user", "name": "Bob", "org_id": "c2"}])
    cust, _ = await core.apikeys.create("customer", customer_id="c1", name="c1 key")
    await core.ledger.recharge("c1", units("10"), "r1")
    p = await make_product(pm, included="0", list_price="0", overage="0.5")
    body = {"product_id": p["product_id"], "amount": "1", "source_ref_table": "task"}
    st, reply = await http.post("api/product_use.dspy", cust, json=dict(body, user_id="u-other", source_ref_id="t1"))
    assert (st, reply["code"]) == (403, "forbidden"), reply
    st, reply = await http.post("api/product_use.dspy", cust, json=dict(body, user_id="u-acme", source_ref_id="t2"))
    assert st == 200, reply
    st, reply = await http.post("api/product_use.dspy", cust, json=dict(body, user_id="u-unknown", source_ref_id="t3"))
    assert st == 200, reply
    st, reply = await http.post("api/product_use.dspy", http.admin_key,
                                json=dict(body, customer_id="c1", user_id="u-other", source_ref_id="t4"))
    assert st == 200, reply
    assert await count(core, "select count(*) from product_usage_log") == 3


async def test_a_customer_key_accounts_usage_only_under_its_own_users(http):
    """Item 12 on the accounting endpoints: single, submit, batch and authorize by estimate."""
    core = http.core
    await seed_pricing(core)
    await core.catalog.put("users", [{"id": "u-acme", "kind": "user", "name": "Ann", "org_id": "c1"},
                                     {"id": "u-other", "kind": "user", "name": "Bob", "org_id": "c2"}])
    cust, _ = await core.apikeys.create("customer", customer_id="c1", name="c1 key")
    await core.ledger.recharge("c1", units("10"), "r1")
    before = await balance(core, "c1")
    for path, body in (("api/accounting.dspy", usage("e1", "c1", user_id="u-other")),
                       ("api/accounting_submit.dspy", usage("e2", "c1", user_id="u-other")),
                       ("api/authorize.dspy", usage("h1", "c1", user_id="u-other")),
                       ("native:accounting", usage("e3", "c1", user_id="u-other"))):
        url = "fast/accounting" if path.startswith("native:") else path
        st, reply = await http.post(url, cust, json=body)
        assert (st, reply.get("code")) == (403, "forbidden"), (path, reply)
        assert "u-other" in reply["message"]
    st, reply = await http.post("api/accounting_batch.dspy", cust, json={"events": [
        usage("b1", "c1", user_id="u-other"), usage("b2", "c1", user_id="u-acme"), usage("b3", "c1", user_id="u-new")]})
    assert st == 200, reply
    assert [r["outcome"] for r in reply["results"]] == ["refused", "accounted", "accounted"]
    assert reply["results"][0]["code"] == "forbidden"
    assert units(await balance(core, "c1")) == units(before) - 2 * units(CHAT_A_PRICE)
    assert await count(core, "select count(*) from accounting_records") == 2
    # the platform names any user of any organisation
    st, reply = await http.post("api/accounting.dspy", http.admin_key, json=usage("e4", "c1", user_id="u-other"))
    assert st == 200, reply


# --- item 5: margins include subscription fees, per product and per month, and add up with the ledger -----------
async def test_margins_include_the_subscription_fees_and_add_up_with_the_ledger(core, pm, fixed_clock):
    p = await make_product(pm, "plan", included="10", list_price="99", overage="0.1")
    pid = p["product_id"]
    b = await pm.bind(pid, "service", "svc-1")
    await pm.add_supplier(b["product_resource_id"], "sup-1", "0.15")
    await core.ledger.recharge("c1", units("300"), "r1")
    await pm.subscribe("c1", pid, "s1")                               # 99.00 in November
    await use(pm, "t1", 13, product=pid)                               # 3 past quota x 0.10; cost 13 x 0.15 = 1.95
    fixed_clock.now = datetime.datetime(2026, 12, 22, 12, 0, 0)
    await use(pm, "t2", 1, product=pid)                                # renews (99.00 in December); cost 0.15
    by_product = await pm.stats("product")
    row = by_product["rows"][0]
    assert {k: row[k] for k in ("subscription_fees", "usage_revenue", "revenue", "cost", "margin", "margin_rate")} == {
        "subscription_fees": "198.000000", "usage_revenue": "0.300000", "revenue": "198.300000",
        "cost": "2.100000", "margin": "196.200000", "margin_rate": "0.9894"}
    by_month = await pm.stats("month")
    assert [(r["key"], r["subscription_fees"], r["usage_revenue"], r["cost"]) for r in by_month["rows"]] == [
        ("2026-11", "99.000000", "0.300000", "1.950000"), ("2026-12", "99.000000", "0.000000", "0.150000")]
    async with core.db.read() as tx:
        charged = await tx.scalar("select sum(-amount) from ledger_entry where entry_type in "
                                  "('subscription', 'overage')", {})
    assert units(by_month["totals"]["revenue"]) == int(charged) == units("198.3")
    assert (await pm.stats("month", start="2026-12-01", end="2027-01-01"))["totals"]["subscription_fees"] == \
        "99.000000"


# --- item 8: whole units where the product says so; a charge that rounds to zero is still recorded -----------------
async def test_a_per_image_product_refuses_fractions_and_a_per_second_one_accepts_them(core, pm):
    await core.ledger.recharge("c1", units("10"), "r1")
    images = await pm.save_product(code="img", product_name="Images", quantity_unit="image", overage_price="0.2")
    seconds = await pm.save_product(code="sec", product_name="Seconds", quantity_unit="second", overage_price="0.01")
    assert (images["fractional"], seconds["fractional"]) == ("0", "1")
    with pytest.raises(InvalidParam):
        await use(pm, "i1", "2.5", product=images["product_id"])
    assert await count(core, "select count(*) from product_usage_log") == 0
    assert (await use(pm, "i2", 3, product=images["product_id"]))["sell_price"] == "0.600000"
    assert (await use(pm, "s1", "2.5", product=seconds["product_id"]))["sell_price"] == "0.025000"
    # a tiny overage rounds half-up to 0 and is still recorded with its quantity (no ledger entry for 0)
    tiny = await pm.save_product(code="tiny", product_name="Tiny", quantity_unit="char", overage_price="0.000001",
                                 price_per=10)
    t = await use(pm, "c1", "0.1", product=tiny["product_id"])
    assert (t["amount"], t["overage_amount"], t["sell_price"], t["ledger_entry_id"]) == ("0.1", "0.1", "0.000000", None)
    await books_clean(core)


# --- item 9: a charged usage row carries its ledger entry; record and usage row state the same sell and cost ------
async def test_accounted_usage_rows_carry_the_ledger_entry_and_the_records_sell_and_cost(core, pm, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 9, 0, 0)
    # 1,500 tokens cost 0.003 at the supplier
    p, _ = await chat_plan(core, pm, "1000", overage="3.00", price_per=1_000_000, unit_cost="0.000002")
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await pm.subscribe("cust-1", p["product_id"], "s1")
    await core.accounting.post_usage(usage("e1"))                      # 500 past quota: 0.0015
    await core.accounting.submit_usage(usage("e2"))                    # batch: 1,500 past quota: 0.0045
    assert await core.accounting.account_pending() == 1
    async with core.db.read() as tx:
        pairs = await tx.select(
            "select a.request_id, a.amount, a.cost, a.ledger_entry_id as a_entry, u.sell_price, u.total_cost, "
            "u.ledger_entry_id as u_entry from accounting_records a join product_usage_log u "
            "on u.source_ref_id = a.id order by a.request_id", {})
    assert [(r.request_id, int(r.amount), int(r.cost)) for r in pairs] == [("e1", 1500, 3000), ("e2", 4500, 3000)]
    for r in pairs:
        assert r.a_entry is not None and r.u_entry == r.a_entry
        assert (int(r.sell_price), int(r.total_cost)) == (int(r.amount), int(r.cost))
    await books_clean(core)


# --- item 11 (periods): a configured time zone; periods start at local midnight and are labelled there ---------------
async def test_a_period_starts_at_midnight_of_the_subscription_day_in_the_configured_zone(core, db_desc, tmp_path,
                                                                                          fixed_clock):
    config = load_config(environ={}, overrides={"server": {"data_dir": str(tmp_path), "log_file": ""},
                                                "accounting": {"background": False}, "timezone": "Asia/Shanghai"})
    shanghai = BillingCore(config=config, db_desc=db_desc, data_dir=str(tmp_path), instance_id="instance-tz")
    try:
        pm = shanghai.products
        fixed_clock.now = datetime.datetime(2026, 11, 30, 17, 30, 0)      # 01:30 on Dec 1 in UTC+8
        await shanghai.ledger.recharge("c1", units("10"), "r1")
        p = await pm.save_product(code="month", product_name="Month", quantity_unit="call", included_quantity="10",
                                  list_price="3")
        assert p["period_anchor"] == "day"
        sub = await pm.subscribe("c1", p["product_id"], "s1")
        assert (sub["period_start"], sub["period_end"]) == ("2026-11-30 16:00:00", "2026-12-31 16:00:00")
        async with shanghai.db.read() as tx:
            reason = await tx.scalar("select reason from ledger_entry where entry_type = 'subscription'", {})
        assert reason == "subscribe month 2026-12-01..2027-01-01"
        fixed_clock.now = datetime.datetime(2026, 12, 31, 16, 0, 0)        # midnight of Jan 1 in UTC+8
        assert (await pm.renew_due())["renewed"] == 1
        after = await pm.subscription(sub["subscription_id"])
        assert (after["period_start"], after["period_end"]) == ("2026-12-31 16:00:00", "2027-01-31 16:00:00")
        second = await pm.save_product(code="sec", product_name="Sec", quantity_unit="call", period_anchor="second")
        fixed_clock.now = datetime.datetime(2027, 1, 5, 3, 4, 5)
        s2 = await pm.subscribe("c1", second["product_id"], "s2")
        assert s2["period_start"] == "2027-01-05 03:04:05"
    finally:
        await shanghai.close()


def test_a_timezone_that_is_not_an_iana_name_is_refused(tmp_path):
    with pytest.raises(ConfigError):
        load_config(environ={}, overrides={"timezone": "Mars/Olympus"})
