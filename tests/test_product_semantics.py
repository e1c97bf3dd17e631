"""Issue 13: product semantics a reseller can trust, one test (or more) per numbered item, on both
databases, with the clock moved across period ends (``fixed_clock``), never sleeping."""
import datetime

import pytest

from billing_module.errors import Conflict
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
