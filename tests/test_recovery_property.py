"""Property (issue 10): events fail for random fixable reasons, the causes are fixed in random
order, retries (automatic, admin, the queued accountant) interleave with new events and with a
second instance on the same database retrying at the same time; in the end every event is
charged exactly once, at the price a fresh quote gives it, and the books reconcile.

Examples come from a fixed seed (the same ones every run) and few, to fit a 2-core machine;
BILLING_RECOVERY_EXAMPLES raises the count for a longer run.
"""
import asyncio
import datetime
import itertools
import os

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from billing_module.core import BillingCore
from billing_module.errors import BillingError
from billing_module.money import to_micro

EXAMPLES = int(os.environ.get("BILLING_RECOVERY_EXAMPLES", "30"))
_namespaces = itertools.count()

# an event's customer and model decide how it fails: a model not synced yet -> no_pricing, else a
# customer without an account -> unknown_customer, a poor one -> insufficient_balance, else it is
# charged at once
CUSTOMERS = ("unknown", "poor", "rich")
MODELS = ("synced", "late")
NAMINGS = ("llmid", "model_name", "both", "product_id")
FIXES = ("sync_late_model", "open_unknown", "top_up_poor")

EVENT = st.tuples(st.sampled_from(CUSTOMERS), st.sampled_from(MODELS), st.sampled_from(NAMINGS),
                  st.sampled_from(("post", "submit")), st.integers(1, 5000), st.integers(0, 2000))
STEP = st.one_of(
    st.tuples(st.just("event"), EVENT),
    st.tuples(st.just("event"), EVENT),                         # events twice as likely as each retry kind
    st.tuples(st.just("auto_both"), st.integers(0, 3600)),      # both instances' schedulers, clock moved
    st.tuples(st.just("admin_vs_auto"), st.integers(0, 50)),    # an admin retries while instance 2 does too
    st.tuples(st.just("accountant_both"), st.just(0)),
)
# the steps, the order of the fixes, and where each fix lands (percent of the way through the steps)
SCENARIO = st.tuples(st.lists(STEP, min_size=6, max_size=16), st.permutations(FIXES),
                     st.lists(st.integers(10, 100), min_size=3, max_size=3))


class World:
    """One example's own customers, models and prices, so examples share a database safely."""

    def __init__(self, core):
        self.core = core
        self.ns = f"p{next(_namespaces)}"
        self.events = []

    def customer(self, kind):
        return f"{self.ns}-{kind}"

    def model(self, kind):
        return {"id": f"{self.ns}-llm-{kind}", "name": f"{self.ns}-{kind}", "ppid": f"{self.ns}-pp-{kind}"}

    def program(self, kind):
        name = self.model(kind)["name"]
        return {"id": f"{self.ns}-pp-{kind}", "name": name, "currency": "CNY", "versions": [{
            "id": f"{self.ns}-v-{kind}", "enabled_date": "2026-01-01", "expired_date": "9999-12-31",
            "pricing_data": {"pricings": [
                {"price_factors": "input_tokens", "unit_prices": "2.5", "unit": "M", "filters": [{"model": name}]},
                {"price_factors": "output_tokens", "unit_prices": "7.5", "unit": "M", "filters": [{"model": name}]},
            ]}}]}

    async def sync(self, kind):
        await self.core.catalog.put("pricing", [self.program(kind)])
        await self.core.catalog.put("llmage", [self.model(kind)])

    def event(self, spec):
        customer, model, naming, _, input_tokens, output_tokens = spec
        m = self.model(model)
        ev = {"request_id": f"{self.ns}-e{len(self.events)}", "customer_id": self.customer(customer),
              "input_tokens": input_tokens, "output_tokens": output_tokens}
        ev.update({"llmid": {"llmid": m["id"]}, "model_name": {"model_name": m["name"]},
                   "both": {"llmid": m["id"], "model_name": m["name"]},
                   "product_id": {"product_id": m["name"]}}[naming])
        self.events.append(ev)
        return ev


async def _quietly(coro):
    """A refusal is an expected outcome of a retry here; anything else fails the test."""
    try:
        return await coro
    except BillingError as e:
        return e.code


@pytest.fixture
async def second(core, config, db_desc, tmp_path):
    other = BillingCore(config=config, db_desc=db_desc, data_dir=str(tmp_path), instance_id="instance-2")
    yield other
    await other.close()


@seed(20261202)      # the same examples every run; a fixed seed gives a more varied set than derandomize
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=SCENARIO)
async def test_every_event_is_charged_exactly_once_in_the_end(core, second, fixed_clock, scenario):
    steps, fix_order, fix_at = scenario
    w = World(core)
    await w.sync("synced")
    await core.ledger.recharge(w.customer("poor"), to_micro("0.000001"), f"{w.ns}-rc-poor")
    await core.ledger.recharge(w.customer("rich"), to_micro("100"), f"{w.ns}-rc-rich")
    fixes = {"sync_late_model": lambda: w.sync("late"),
             "open_unknown": lambda: core.ledger.recharge(w.customer("unknown"), to_micro("100"), f"{w.ns}-rc-u"),
             "top_up_poor": lambda: core.ledger.recharge(w.customer("poor"), to_micro("100"), f"{w.ns}-rc-p")}
    pending_fixes = sorted((pct * len(steps) // 100, fix) for pct, fix in zip(fix_at, fix_order, strict=False))

    for n, (kind, arg) in enumerate(steps):
        while pending_fixes and pending_fixes[0][0] <= n:
            await fixes[pending_fixes.pop(0)[1]]()
        if kind == "event":
            ev = w.event(arg)
            entry = core.accounting.post_usage if arg[3] == "post" else core.accounting.submit_usage
            await _quietly(entry(ev))
        elif kind == "auto_both":
            fixed_clock.advance(arg)
            await asyncio.gather(_quietly(core.retries.retry_due()), _quietly(second.retries.retry_due()))
        elif kind == "admin_vs_auto":
            fixed_clock.advance(arg)
            failed = (await core.failures.search(customer_id=None, retry_state="waiting", rows=100))["rows"]
            mine = [f["id"] for f in failed if f["request_id"].startswith(f"{w.ns}-")]
            await asyncio.gather(*[_quietly(core.retries.retry(i)) for i in mine[:3]],
                                 _quietly(second.retries.retry_due()))
        else:
            await asyncio.gather(_quietly(core.accounting.account_pending()),
                                 _quietly(second.accounting.account_pending()))
    for _, fix in pending_fixes:
        await fixes[fix]()

    # the end: the queue drains, the schedulers run until nothing is due, an admin retries what
    # ran out of automatic retries
    while await core.accounting.account_pending():
        pass
    for _ in range(core.config.accounting.max_retries + 1):
        fixed_clock.advance(core.config.accounting.retry_max_seconds + 1)
        await asyncio.gather(core.retries.retry_due(), second.retries.retry_due())
    open_rows = [f for f in (await core.failures.search(rows=100))["rows"]
                 if f["request_id"].startswith(f"{w.ns}-") and f["retry_state"] != "resolved"]
    for f in open_rows:
        await core.retries.retry(f["id"])

    for ev in w.events:
        quote = await core.accounting.quote(ev)
        rec = await core.accounting.record(request_id=ev["request_id"])
        assert rec.status == "accounted", (ev, rec.status, rec.error_code)
        assert int(rec.amount) == to_micro(quote["amount"]) > 0, ev
        assert rec.price_version == quote["version_id"], (ev, rec.model_name, rec.llmid, rec.pricing_id)
        async with core.db.read() as tx:
            charged = [int(r.amount) for r in await tx.select(
                "select amount from ledger_entry where entry_type = 'usage' and request_id = ${r}$",
                {"r": ev["request_id"]})]
        assert charged == [-int(rec.amount)], ev
    failed = [f for f in (await core.failures.search(rows=100))["rows"] if f["request_id"].startswith(f"{w.ns}-")]
    assert all(f["retry_state"] == "resolved" for f in failed), failed
    assert (await core.ledger.reconcile())["mismatches"] == []
    fixed_clock.now += datetime.timedelta(days=1)      # the next example starts on a fresh day
