"""Budgets on both databases, in a time zone that is not UTC (America/New_York: UTC-4 in summer,
UTC-5 in winter): limits per organisation, user and key and per day / week / month, the period
reset as the clock crosses local midnights, refusals (402 ``budget_exceeded``) that change
nothing, holds, the queued path, product use, alerts at 80 % and 100 %, the HTTP API and 50
concurrent posts that never overspend."""
import asyncio
import datetime
from decimal import Decimal

import pytest

from billing_module.budgets import BudgetExceeded, Spender, period_bounds
from billing_module.config import load_config
from billing_module.errors import Forbidden, InvalidParam, NotFound
from tests.helpers import seed_pricing, units, usage

TZ = "America/New_York"


@pytest.fixture
def config(tmp_path):
    return load_config(environ={}, overrides={"server": {"data_dir": str(tmp_path), "log_file": ""},
                                              "accounting": {"background": False}, "timezone": TZ})


def flat(request_id, customer="c1", **kw):
    """An event that prices at exactly 1.000000 (model flat-1)."""
    return usage(request_id, customer=customer, model="flat-1", **kw)


async def setup(core, balance="100"):
    await seed_pricing(core)
    await core.ledger.recharge("c1", units(balance), "r-c1")


async def books(core):
    """(balance, held, ledger entries, accounting records) of c1: what a refusal must not change."""
    b = await core.ledger.balance("c1")
    async with core.db.read() as tx:
        entries = int(await tx.scalar("select count(*) as n from ledger_entry"))
        records = int(await tx.scalar("select count(*) as n from accounting_records"))
    return b["balance"], b["held"], entries, records


async def spent(core, customer="c1", scope=None):
    return {(r["scope"], r["subject_id"], r["period"]): r["spent"]
            for r in (await core.budgets.list_budgets(customer, scope))["rows"]}


def at(fixed_clock, text):
    fixed_clock.now = datetime.datetime.fromisoformat(text)


# --- periods ------------------------------------------------------------------------------------------
def test_periods_are_local_calendar_periods_as_utc():
    sunday_noon = datetime.datetime(2026, 11, 22, 12, 0)     # 07:00 in New York (EST, UTC-5)
    assert period_bounds("day", sunday_noon, TZ) == ("2026-11-22 05:00:00", "2026-11-23 05:00:00")
    # the ISO week starts on Monday
    assert period_bounds("week", sunday_noon, TZ) == ("2026-11-16 05:00:00", "2026-11-23 05:00:00")
    # November began in summer time (EDT, UTC-4): the month is an hour longer than 30 days
    assert period_bounds("month", sunday_noon, TZ) == ("2026-11-01 04:00:00", "2026-12-01 05:00:00")
    # 03:00 UTC on the 1st is still the 31st in New York
    assert period_bounds("day", datetime.datetime(2026, 11, 1, 3, 0), TZ)[0] == "2026-10-31 04:00:00"
    assert period_bounds("month", datetime.datetime(2026, 12, 31, 23, 0), TZ) == (
        "2026-12-01 05:00:00", "2027-01-01 05:00:00")
    with pytest.raises(InvalidParam):
        period_bounds("year", sunday_noon, TZ)


# --- limits and refusals --------------------------------------------------------------------------------
async def test_an_org_budget_refuses_the_charge_past_its_limit_and_changes_nothing(core, fixed_clock):
    await setup(core)
    b = await core.budgets.set_budget("c1", "org", "c1", "day", units("2.5"))
    assert (b["limit"], b["spent"], b["remaining"]) == ("2.500000", "0.000000", "2.500000")
    assert (b["period_start"], b["period_end"]) == ("2026-11-22 05:00:00", "2026-11-23 05:00:00")
    await core.accounting.post_usage(flat("e1"))
    await core.accounting.post_usage(flat("e2"))
    before = await books(core)
    with pytest.raises(BudgetExceeded) as refused:
        await core.accounting.post_usage(flat("e3"))
    e = refused.value
    assert (e.status, e.code) == (402, "budget_exceeded")
    assert {k: e.details["budget"][k] for k in ("scope", "subject_id", "period", "limit", "spent", "remaining")} == {
        "scope": "org", "subject_id": "c1", "period": "day", "limit": "2.500000", "spent": "2.000000",
        "remaining": "0.500000"}
    assert e.details["budget"]["budget_id"] == b["budget_id"]
    assert await books(core) == before == ("98.000000", "0.000000", 3, 2)
    assert await spent(core) == {("org", "c1", "day"): "2.000000"}
    # the same request again is refused again (nothing was stored); a replay of an accounted one is not
    with pytest.raises(BudgetExceeded):
        await core.accounting.post_usage(flat("e3"))
    assert (await core.accounting.post_usage(flat("e1")))["duplicate"] is True
    # raising the limit lets it through; a zero limit removes the budget
    await core.budgets.set_budget("c1", "org", "c1", "day", units("3"))
    assert (await core.accounting.post_usage(flat("e3")))["amount"] == "1.000000"
    assert await spent(core) == {("org", "c1", "day"): "3.000000"}
    assert (await core.budgets.set_budget("c1", "org", "c1", "day", 0))["removed"] is True
    await core.accounting.post_usage(flat("e4"))
    assert await spent(core) == {}
    with pytest.raises(NotFound):
        await core.budgets.set_budget("c1", "org", "c1", "day", None)


async def test_user_and_key_budgets_apply_to_their_own_events_only(core, fixed_clock):
    await setup(core)
    await core.budgets.set_budget("c1", "user", "u1", "week", units("1"))
    await core.budgets.set_budget("c1", "key", "k1", "month", units("1.5"))
    await core.budgets.set_budget("c1", "org", "c1", "month", units("10"))
    await core.accounting.post_usage(flat("u1-a", user_id="u1"))
    with pytest.raises(BudgetExceeded) as refused:
        await core.accounting.post_usage(flat("u1-b", user_id="u1"))
    assert refused.value.details["budget"]["scope"] == "user"
    await core.accounting.post_usage(flat("u2-a", user_id="u2"))        # another user: the org's budget only
    await core.accounting.post_usage(flat("k1-a", user_id="u2", key_id="k1"))
    with pytest.raises(BudgetExceeded) as refused:
        await core.accounting.post_usage(flat("k1-b", user_id="u2", key_id="k1"))
    assert refused.value.details["budget"]["scope"] == "key"
    await core.accounting.post_usage(flat("k2-a", key_id="k2"))
    assert await spent(core) == {("org", "c1", "month"): "4.000000", ("user", "u1", "week"): "1.000000",
                                 ("key", "k1", "month"): "1.000000"}
    # every applicable budget is spent: u1 through k1 is refused by u1's budget, and k1's stays as it was
    with pytest.raises(BudgetExceeded):
        await core.accounting.post_usage(flat("u1-k3", user_id="u1", key_id="k3"))
    assert (await spent(core, scope="key")) == {("key", "k1", "month"): "1.000000"}
    # a budget in another customer does not apply
    with pytest.raises(InvalidParam):
        await core.budgets.set_budget("c1", "team", "c1", "day", units("1"))
    with pytest.raises(InvalidParam):
        await core.budgets.set_budget("c1", "org", "c2", "day", units("1"))
    with pytest.raises(InvalidParam):
        await core.budgets.set_budget("c1", "user", "u 1", "day", units("1"))


@pytest.mark.parametrize("period, last_second, next_period", [
    # Sunday 2026-11-22 12:00 UTC is 07:00 in New York; each period ends at a local midnight
    ("day", "2026-11-23 04:59:59", "2026-11-23 05:00:00"),
    ("week", "2026-11-23 04:59:59", "2026-11-23 05:00:00"),     # Monday 00:00 local
    ("month", "2026-12-01 04:59:59", "2026-12-01 05:00:00"),
])
async def test_a_new_period_starts_at_zero_without_a_reset_job(core, fixed_clock, period, last_second, next_period):
    await setup(core)
    await core.budgets.set_budget("c1", "org", "c1", period, units("1"))
    await core.accounting.post_usage(flat("p1"))
    at(fixed_clock, last_second)
    with pytest.raises(BudgetExceeded):
        await core.accounting.post_usage(flat("p2"))
    at(fixed_clock, next_period)
    assert (await core.budgets.list_budgets("c1"))["rows"][0]["spent"] == "0.000000"
    await core.accounting.post_usage(flat("p2"))
    row = (await core.budgets.list_budgets("c1"))["rows"][0]
    assert (row["spent"], row["period_start"]) == ("1.000000", next_period)
    with pytest.raises(BudgetExceeded):
        await core.accounting.post_usage(flat("p3"))
    # the old period keeps what it spent
    async with core.db.read() as tx:
        assert sorted(int(r.spent) for r in await tx.select("select spent from billing_budget_spend")) == [
            units("1"), units("1")]


# --- holds, the queue, product use ------------------------------------------------------------------------
async def test_holds_reserve_settle_moves_to_the_actual_amount_release_and_expiry_give_back(core, fixed_clock):
    await setup(core)
    await core.budgets.set_budget("c1", "org", "c1", "day", units("5"))
    await core.budgets.set_budget("c1", "user", "u1", "day", units("4"))
    h1 = await core.ledger.hold("c1", units("3"), "h1", user_id="u1")
    assert await spent(core) == {("org", "c1", "day"): "3.000000", ("user", "u1", "day"): "3.000000"}
    before = await books(core)
    with pytest.raises(BudgetExceeded):
        await core.ledger.hold("c1", units("1.5"), "h2", user_id="u1")
    assert await books(core) == before
    await core.ledger.settle(units("1"), hold_id=h1["hold_id"])
    assert await spent(core) == {("org", "c1", "day"): "1.000000", ("user", "u1", "day"): "1.000000"}
    h2 = await core.ledger.hold("c1", units("3"), "h2", user_id="u1")
    await core.ledger.release(hold_id=h2["hold_id"])
    await core.ledger.release(hold_id=h2["hold_id"])       # again: nothing more given back
    assert await spent(core) == {("org", "c1", "day"): "1.000000", ("user", "u1", "day"): "1.000000"}
    h3 = await core.ledger.hold("c1", units("4"), "h3", ttl_seconds=60)
    assert (await spent(core))[("org", "c1", "day")] == "5.000000"
    fixed_clock.advance(61)
    assert await core.ledger.expire_holds() == 1
    assert (await spent(core))[("org", "c1", "day")] == "1.000000"
    # usage delivered under an expired hold is still charged, to the budget too
    await core.ledger.settle(units("2"), hold_id=h3["hold_id"])
    assert (await spent(core))[("org", "c1", "day")] == "3.000000"
    assert (await core.ledger.balance("c1"))["balance"] == "97.000000"


async def test_the_accountant_stores_an_event_over_budget_as_failed_and_a_retry_charges_it(core, fixed_clock):
    await setup(core)
    await core.budgets.set_budget("c1", "key", "k1", "day", units("2"))
    for i in range(3):
        await core.accounting.submit_usage(flat(f"q{i}", key_id="k1"))
    assert await core.accounting.account_pending() == 2
    async with core.db.read() as tx:
        failed = await tx.select("select id, request_id, error_code, status from accounting_records "
                                 "where status = 'failed'")
        assert int(await tx.scalar("select count(*) as n from llmusage_accounting_failed")) == 1
    # the accountant takes them in (created_at, id) order: which one is left over is not fixed
    assert [r.error_code for r in failed] == ["budget_exceeded"] and failed[0].request_id in ("q0", "q1", "q2")
    assert (await core.ledger.balance("c1"))["balance"] == "98.000000"
    with pytest.raises(BudgetExceeded):       # still over budget: the failure stays
        await core.accounting.account_record(failed[0].id)
    at(fixed_clock, "2026-11-23 05:00:00")    # the next day in New York
    assert (await core.accounting.account_record(failed[0].id))["status"] == "accounted"
    assert (await spent(core))[("key", "k1", "day")] == "1.000000"
    assert (await core.ledger.balance("c1"))["balance"] == "97.000000"


async def test_the_accountant_gives_the_budget_back_when_the_balance_refuses(core, fixed_clock):
    await setup(core, balance="1.5")
    await core.budgets.set_budget("c1", "org", "c1", "day", units("10"))
    for i in range(3):
        await core.accounting.submit_usage(flat(f"q{i}"))
    assert await core.accounting.account_pending() == 1
    assert (await spent(core))[("org", "c1", "day")] == "1.000000"


async def test_the_accountant_keeps_no_part_of_a_spend_one_budget_refused(core, fixed_clock):
    await setup(core)
    await core.budgets.set_budget("c1", "org", "c1", "day", units("10"))
    await core.budgets.set_budget("c1", "user", "u1", "day", units("1"))
    await core.accounting.submit_usage(flat("m1", user_id="u1"))
    await core.accounting.submit_usage(flat("m2", user_id="u1"))
    assert await core.accounting.account_pending() == 1
    # the refused event's org spend was given back in the batch that committed
    assert await spent(core) == {("org", "c1", "day"): "1.000000", ("user", "u1", "day"): "1.000000"}


async def test_product_use_spends_the_budget(core, fixed_clock):
    await core.ledger.recharge("c1", units("100"), "r-c1")
    p = await core.products.save_product(code="pay", product_name="pay as you go", quantity_unit="call",
                                         included_quantity="0", list_price="0", overage_price="0.5",
                                         fractional="0", period_anchor="second")
    await core.budgets.set_budget("c1", "user", "u1", "day", units("1"))
    pid = p["product_id"]
    await core.products.product_use("c1", "u1", pid, 2, source_ref_table="task", source_ref_id="t1")
    before = await books(core)
    with pytest.raises(BudgetExceeded):
        await core.products.product_use("c1", "u1", pid, 1, source_ref_table="task", source_ref_id="t2")
    assert await books(core) == before
    async with core.db.read() as tx:
        assert int(await tx.scalar("select count(*) as n from product_usage_log")) == 1
    await core.products.product_use("c1", "u2", pid, 1, source_ref_table="task", source_ref_id="t3")


# --- alerts: written to the alert outbox (alerts.py) by the wiring of services.build_services -------------
async def budget_alerts(core):
    """(type, customer, spent, scope, subject) of the budget alerts in the outbox, by spent
    (alerts of one second have no order of their own)."""
    rows = (await core.alerts.search(rows=100))["rows"]
    return sorted(((r["type"], r["customer_id"], r["data"]["spent"], r["data"]["scope"], r["data"]["subject"])
                   for r in rows if r["type"].startswith("budget_")), key=lambda a: (Decimal(a[2]), a[0]))


@pytest.fixture
async def no_alerts(core):
    async with core.db.transaction() as tx:     # a MariaDB database may hold an earlier test's alerts
        for table in ("alert_delivery", "alert_outbox"):
            await tx.execute(f"delete from {table}")
    return core


async def test_alerts_at_80_and_100_percent_once_per_crossing_and_period(no_alerts, fixed_clock):
    core = no_alerts
    budgets = core.budgets
    await budgets.set_budget("c1", "org", "c1", "day", units("10"))
    who = Spender("c1", "u1")

    async def spend(amount):
        return await core.db.run(lambda tx: budgets.spend(tx, who, units(amount)))
    for amount in ("5", "2.9", "0.1", "1", "0.5"):      # 5, 7.9, 8 (80 %), 9, 9.5
        await spend(amount)
    with pytest.raises(BudgetExceeded):
        await spend("1")
    await spend("0.5")                                  # 10 (100 %)
    assert await budget_alerts(core) == [("budget_80", "c1", "8.000000", "org", "c1"),
                                         ("budget_100", "c1", "10.000000", "org", "c1")]
    at(fixed_clock, "2026-11-23 05:00:00")
    await spend("9")                                    # a new period: 0 -> 90 % crosses 80 % again
    alerts = await budget_alerts(core)
    assert ("budget_80", "c1", "9.000000", "org", "c1") in alerts and len(alerts) == 3


async def test_a_refusal_alerts_budget_100_once_per_period_and_a_refused_charge_spends_nothing(no_alerts, fixed_clock):
    core = no_alerts
    budgets, accounting = core.budgets, core.accounting
    await setup(core, balance="2")
    await budgets.set_budget("c1", "org", "c1", "day", units("2.5"))
    await accounting.post_usage(flat("a1"))
    await accounting.post_usage(flat("a2"))                   # 80 %
    assert [a[0] for a in await budget_alerts(core)] == ["budget_80"]
    for request_id in ("a3", "a4"):
        with pytest.raises(BudgetExceeded):
            await accounting.post_usage(flat(request_id))
    assert [a[:3] for a in await budget_alerts(core)] == [("budget_100", "c1", "2.000000"),
                                                          ("budget_80", "c1", "2.000000")]
    # a charge its budgets took but the balance refused: the budget spend rolls back with it
    await budgets.set_budget("c1", "org", "c1", "day", 0)
    await budgets.set_budget("c1", "org", "c1", "week", units("5"))
    with pytest.raises(Exception) as refused:
        await accounting.post_usage(flat("a5"))
    assert refused.value.code == "insufficient_balance"
    assert [r["spent"] for r in (await budgets.list_budgets("c1"))["rows"]] == ["0.000000"]
    assert len(await budget_alerts(core)) == 2                # and no alert for it


async def test_a_budget_set_before_the_account_exists_applies_from_the_first_charge(core, fixed_clock):
    """A debit looks budgets up only when the balance row counts some: the count is taken when
    the account is created, and kept by every budget added or removed."""
    await seed_pricing(core)
    await core.budgets.set_budget("c1", "org", "c1", "day", units("1.5"))
    await core.ledger.recharge("c1", units("100"), "r-c1")
    await core.accounting.post_usage(flat("a1"))
    with pytest.raises(BudgetExceeded):
        await core.accounting.post_usage(flat("a2"))
    with pytest.raises(BudgetExceeded):
        await core.ledger.hold("c1", units("1"), "h1")
    await core.budgets.set_budget("c1", "org", "c1", "day", 0)
    await core.accounting.post_usage(flat("a2"))
    await core.ledger.hold("c1", units("1"), "h1")
    async with core.db.read() as tx:
        assert await tx.scalar("select budget_count from customer_balance where id = 'c1'") == 0


# --- concurrency -------------------------------------------------------------------------------------------
async def test_fifty_concurrent_posts_never_overspend_a_budget(core, fixed_clock):
    await setup(core)
    await core.budgets.set_budget("c1", "org", "c1", "day", units("10.5"))
    results = await asyncio.gather(*[core.accounting.post_usage(flat(f"c{i}")) for i in range(50)],
                                   return_exceptions=True)
    ok = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(ok) == 10 and len(refused) == 40, [r for r in results if not isinstance(r, (dict, BudgetExceeded))]
    assert await spent(core) == {("org", "c1", "day"): "10.000000"}
    assert (await core.ledger.balance("c1"))["balance"] == "90.000000"


async def test_fifty_concurrent_holds_and_batch_posts_never_overspend_a_budget(core, fixed_clock):
    await setup(core)
    await core.budgets.set_budget("c1", "user", "u1", "day", units("7"))
    holds = [core.ledger.hold("c1", units("1"), f"h{i}", user_id="u1") for i in range(25)]
    batch = [core.accounting.post_usage_batch([flat(f"b{i}-{j}", user_id="u1") for j in range(2)]) for i in range(25)]
    results = await asyncio.gather(*holds, *batch, return_exceptions=True)
    held = [r for r in results[:25] if isinstance(r, dict)]
    charged = [x for r in results[25:] for x in r if x["outcome"] == "accounted"]
    assert all(isinstance(r, (dict, list, BudgetExceeded)) for r in results), results
    assert len(held) + len(charged) == 7
    assert (await spent(core))[("user", "u1", "day")] == "7.000000"


async def test_the_accountant_alerts_only_for_the_spend_it_keeps(no_alerts, fixed_clock):
    """A queued event that would cross 80 % but that the balance refuses gives its spend back and
    alerts nothing; the spend the batch keeps alerts once."""
    core = no_alerts
    await setup(core, balance="1.5")
    await core.budgets.set_budget("c1", "org", "c1", "day", units("2.5"))
    for i in range(2):
        await core.accounting.submit_usage(flat(f"q{i}"))
    assert await core.accounting.account_pending() == 1          # 1.0 of 2.5 (40 %), the second refused
    assert (await spent(core))[("org", "c1", "day")] == "1.000000"
    assert await budget_alerts(core) == []
    await core.ledger.recharge("c1", units("10"), "r-more")
    await core.accounting.submit_usage(flat("q2"))
    assert await core.accounting.account_pending() == 1          # 2.0 of 2.5: 80 %
    assert [a[:3] for a in await budget_alerts(core)] == [("budget_80", "c1", "2.000000")]


async def test_concurrent_first_sets_of_one_budget_all_succeed_as_one_budget(core):
    limits = [units(str(i)) for i in range(1, 11)]
    results = await asyncio.gather(*[core.budgets.set_budget("c1", "user", "u9", "week", lim) for lim in limits],
                                   return_exceptions=True)
    assert all(isinstance(r, dict) for r in results), results
    rows = (await core.budgets.list_budgets("c1"))["rows"]
    assert len(rows) == 1 and units(rows[0]["limit"]) in limits


# --- HTTP -------------------------------------------------------------------------------------------------
async def test_the_http_api_sets_lists_and_refuses_with_402(http, fixed_clock):
    core = http.core
    await setup(core)
    admin = http.admin_key
    key, row = await core.apikeys.create("customer", customer_id="c1")
    other, _ = await core.apikeys.create("customer", customer_id="c2")
    prefix = row["key_prefix"]
    status, body = await http.post("api/budget_set.dspy", admin, json={
        "scope": "key", "customer_id": "c1", "key_id": prefix, "period": "day", "limit": "1.5"})
    assert status == 200 and body["limit"] == "1.500000" and body["subject_id"] == prefix, body
    status, body = await http.post("api/budget_set.dspy", admin, json={
        "scope": "org", "customer_id": "c1", "period": "month", "limit": "50"})
    assert status == 200
    for bad in ({"scope": "team", "customer_id": "c1", "period": "day", "limit": "1"},
                {"scope": "user", "customer_id": "c1", "period": "day", "limit": "1"},
                {"scope": "org", "customer_id": "c1", "period": "year", "limit": "1"},
                {"scope": "org", "customer_id": "c1", "period": "day", "limit": "-1"},
                {"scope": "org", "customer_id": "c1", "period": "day", "limit": "0.0000001"},
                {"scope": "org", "customer_id": "c 1", "period": "day", "limit": "1"}):
        status, body = await http.post("api/budget_set.dspy", admin, json=bad)
        assert status == 400 and body["code"] == "invalid_param", (bad, body)
    status, body = await http.post("api/budget_set.dspy", key, json={
        "scope": "org", "customer_id": "c1", "period": "day", "limit": "100"})
    assert status == 403
    # the customer key is charged (and limited) by default
    status, body = await http.post("api/accounting.dspy", key, json=flat("h1"))
    assert status == 200, body
    status, body = await http.post("api/accounting.dspy", key, json=flat("h2", key_id="someone-else"))
    assert status == 403 and body["code"] == "forbidden"
    before = await books(core)
    status, body = await http.post("api/accounting.dspy", key, json=flat("h2"))
    assert status == 402 and body["code"] == "budget_exceeded", body
    assert body["budget"]["scope"] == "key" and body["budget"]["subject_id"] == prefix
    assert body["budget"]["limit"] == "1.500000" and body["budget"]["spent"] == "1.000000"
    status, body = await http.post("api/authorize.dspy", key, json={"customer_id": "c1", "amount": "1",
                                                                   "request_id": "a1"})
    assert status == 402 and body["code"] == "budget_exceeded"
    assert await books(core) == before
    # the platform's own calls name the key, or none
    status, body = await http.post("api/accounting.dspy", admin, json=flat("h3"))
    assert status == 200
    status, body = await http.post("api/accounting.dspy", admin, json=flat("h4", key_id=prefix))
    assert status == 402
    # listing: the admin sees all (filters), a customer its own organisation's only
    status, body = await http.get("api/budgets.dspy", admin, customer_id="c1", scope="key")
    assert status == 200 and [(r["scope"], r["spent"], r["remaining"]) for r in body["rows"]] == [
        ("key", "1.000000", "0.500000")]
    assert body["rows"][0]["period_end"] == "2026-11-23 05:00:00"
    status, body = await http.get("api/budgets.dspy", key)
    assert status == 200 and {r["scope"] for r in body["rows"]} == {"org", "key"}
    org = next(r for r in body["rows"] if r["scope"] == "org")
    assert org["spent"] == "2.000000"
    status, body = await http.get("api/budgets.dspy", other)
    assert status == 200 and body["rows"] == []
    status, body = await http.get("api/budgets.dspy", other, customer_id="c1")
    assert status == 403
    status, body = await http.post("api/budget_set.dspy", admin, json={
        "scope": "key", "customer_id": "c1", "key_id": prefix, "period": "day", "limit": ""})
    assert status == 200 and body["removed"] is True
    status, body = await http.post("api/accounting.dspy", key, json=flat("h2"))
    assert status == 200


async def test_a_customer_caller_may_not_name_a_key(core):
    from billing_module.api.handlers import _key_of
    from billing_module.api.params import Params
    from billing_module.api.registry import Caller
    session = Caller("customer", customer_id="c1", user="alice")
    with pytest.raises(Forbidden):
        _key_of(Params({"key_id": "k1"}), session)
    assert _key_of(Params({}), session) is None
    assert _key_of(Params({}), Caller("customer", customer_id="c1", key_id="k9")) == "k9"
    assert _key_of(Params({"key_id": "k1"}), Caller("admin")) == "k1"
