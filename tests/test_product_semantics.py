"""Issue 13: product semantics a reseller can trust, one test (or more) per numbered item, on both
databases, with the clock moved across period ends (``fixed_clock``), never sleeping."""
import datetime

import pytest

from billing_module.errors import Conflict, InvalidParam
from tests.helpers import units
from tests.test_products import balance, books_clean, count, make_product, use, wire


@pytest.fixture
def pm(core):
    return wire(core)


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
    st, _ = await http.post("api/product_subscription_resume.dspy", other, json={"subscription_id": sub["subscription_id"]})
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
