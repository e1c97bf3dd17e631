"""Failed accounting that recovers (issue 10), on both databases, in-process and over HTTP.

The matrix: for every failure a caller or an admin can fix from outside (``CAUSES``) and every
way of naming the model (``NAMINGS``), an event fails, is retried before its cause is fixed (which
changes only the retry bookkeeping), the cause is fixed, then the automatic retry and an admin
retry each account one copy of the event: charged exactly once, with the amount, lines and price
version a fresh post of the same event gets at that moment; the failed rows are resolved; the
books reconcile (checked by the fixtures after every test).
"""
import datetime
import json

import pytest

from billing_module.accounting import record_view
from billing_module.demo import seed_demo
from billing_module.errors import BillingError
from billing_module.money import to_micro
from tests.helpers import units

# --- the pricing the matrix uses: one model reached by id or by name, one reached as a product --
PROGRAM = {
    "id": "pp-rec", "name": "recovery", "currency": "CNY",
    "versions": [{
        "id": "ppt-rec-1", "enabled_date": "2026-01-01", "expired_date": "9999-12-31",
        "pricing_data": {"pricings": [
            {"price_factors": "input_tokens", "unit_prices": "2.0", "cost_prices": "1.0", "unit": "M",
             "filters": [{"model": "chat-r"}]},
            {"price_factors": "output_tokens", "unit_prices": "8.0", "cost_prices": "4.0", "unit": "M",
             "filters": [{"model": "chat-r"}]},
            {"price_factors": "input_tokens", "unit_prices": "3.0", "cost_prices": "1.0", "unit": "M",
             "filters": [{"model": "prod-r"}]},
            {"price_factors": "output_tokens", "unit_prices": "9.0", "cost_prices": "4.0", "unit": "M",
             "filters": [{"model": "prod-r"}]},
        ]},
    }],
}
MODELS = [{"id": "llm-r", "name": "chat-r", "ppid": "pp-rec", "ownerid": "0", "providerid": "prov-r"},
          # a product is priced like a model whose name is the product id
          {"id": "llm-prod-r", "name": "prod-r", "ppid": "pp-rec", "ownerid": "0", "providerid": "prov-r"}]
CUSTOMER = "rec-cust"

# every way an event can name what it used
NAMINGS = {
    "llmid": {"llmid": "llm-r"},
    "model_name": {"model_name": "chat-r"},
    "both": {"llmid": "llm-r", "model_name": "chat-r"},
    "product_id": {"product_id": "prod-r"},
}


async def _pricing(env):
    await env.core.catalog.put("pricing", [PROGRAM])
    await env.core.catalog.put("llmage", MODELS)


async def _no_customer(env):
    await _pricing(env)


async def _poor_customer(env):
    await _pricing(env)
    await env.recharge("0.001", "rc-poor")


async def _no_pricing_yet(env):
    await env.recharge("10", "rc-rich")       # neither the model nor its program is synced yet


async def _top_up(env):
    await env.recharge("10", "rc-fix")


# failure code -> (what breaks it, what fixes it). A new fixable code is one more row.
CAUSES = {
    "unknown_customer": (_no_customer, _top_up),
    "insufficient_balance": (_poor_customer, _top_up),
    "no_pricing": (_no_pricing_yet, _pricing),
}


def event(request_id, naming, **kw):
    ev = {"request_id": request_id, "customer_id": CUSTOMER, "user_id": "u-rec", "input_tokens": 1000,
          "output_tokens": 500}
    ev.update(NAMINGS[naming])
    ev.update(kw)
    return ev


# --- one interface over the two ways in ------------------------------------------------------------
class InProcess:
    """Calls the core directly; a refusal comes back as (status, code) like over HTTP."""

    def __init__(self, core):
        self.core = core

    async def post(self, ev):
        try:
            return 200, await self.core.accounting.post_usage(ev)
        except BillingError as e:
            return e.status, {"code": e.code, "message": e.message}

    async def recharge(self, amount, request_id):
        await self.core.ledger.recharge(CUSTOMER, to_micro(amount), request_id)

    async def admin_retry(self, failed_id):
        try:
            return 200, await self.core.retries.retry(failed_id)
        except BillingError as e:
            return e.status, {"code": e.code, "message": e.message}

    async def failed(self):
        return (await self.core.failures.search(customer_id=CUSTOMER, rows=100))["rows"]


class OverHttp(InProcess):
    """The same through the standalone host's API with an admin key."""

    def __init__(self, http):
        super().__init__(http.core)
        self.http = http

    async def post(self, ev):
        return await self.http.post("api/accounting.dspy", self.http.admin_key, json=ev)

    async def recharge(self, amount, request_id):
        status, body = await self.http.post("api/recharge.dspy", self.http.admin_key,
                                            json={"customer_id": CUSTOMER, "amount": amount, "request_id": request_id})
        assert status == 200, body

    async def admin_retry(self, failed_id):
        return await self.http.post("api/failed_accounting_retry.dspy", self.http.admin_key, json={"id": failed_id})

    async def failed(self):
        status, body = await self.http.get("api/failed_accounting_list.dspy", self.http.admin_key,
                                           customer_id=CUSTOMER, rows=100)
        assert status == 200, body
        return body["rows"]


@pytest.fixture(params=["in_process", "http"])
def env(request, db_desc, fixed_clock):
    if request.param == "in_process":
        return InProcess(request.getfixturevalue("core"))
    return OverHttp(request.getfixturevalue("http"))


# --- what a retry may change ---------------------------------------------------------------------
# a retry that fails again counts itself (retry_count, attempts), says when it runs next and when
# it last failed; anything else changing is a bug
RETRY_BOOKKEEPING = {"llmusage_accounting_failed": {"retry_count", "next_retry_at", "failed_time"},
                     "accounting_records": {"attempts", "updated_at"},
                     "customer_balance": set(), "ledger_entry": set(), "billing_hold": set()}


async def snapshot(core):
    state = {}
    async with core.db.read() as tx:
        for table, bookkeeping in RETRY_BOOKKEEPING.items():
            rows = await tx.select(f"select * from {table} order by id")
            state[table] = [{k: v for k, v in dict(r).items() if k not in bookkeeping} for r in rows]
    return state


async def usage_entries(core, request_id):
    async with core.db.read() as tx:
        return [int(r.amount) for r in await tx.select(
            "select amount from ledger_entry where entry_type = 'usage' and request_id = ${r}$", {"r": request_id})]


def charged_view(body):
    return body["amount"], body["lines"], body["price_version"], body["pricing_id"]


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("code", CAUSES)
async def test_fixed_failures_are_charged_once_by_either_retry(env, fixed_clock, code, naming):
    core = env.core
    cause, fix = CAUSES[code]
    await cause(env)
    for request_id in ("ev-auto", "ev-admin"):       # a second apart: one is due before the other
        status, body = await env.post(event(request_id, naming))
        assert status >= 400 and body["code"] == code, body
        fixed_clock.advance(1)
    rows = {r["request_id"]: r for r in await env.failed()}
    assert set(rows) == {"ev-auto", "ev-admin"}
    assert all(r["failure_code"] == code and r["retry_state"] == "waiting" for r in rows.values())

    # retries before the fix: the automatic one when due, then the admin's
    before = await snapshot(core)
    first_due = rows["ev-auto"]["next_retry_at"]
    fixed_clock.now = datetime.datetime.fromisoformat(first_due)
    assert await core.retries.retry_due() == 0
    status, body = await env.admin_retry(rows["ev-admin"]["id"])
    assert status >= 400 and body["code"] == code, body
    assert await snapshot(core) == before
    again = {r["request_id"]: r for r in await env.failed()}
    assert [again[k]["retry_count"] for k in ("ev-auto", "ev-admin")] == [1, 1]
    assert again["ev-auto"]["next_retry_at"] > first_due
    assert again["ev-admin"]["next_retry_at"] > rows["ev-admin"]["next_retry_at"]

    await fix(env)
    # (b) the admin retries one; (a) the automatic retry takes the other when it is due
    status, by_admin = await env.admin_retry(rows["ev-admin"]["id"])
    assert status == 200 and by_admin["status"] == "accounted", by_admin
    fixed_clock.now = datetime.datetime.fromisoformat(again["ev-auto"]["next_retry_at"])
    assert await core.retries.retry_due() == 1
    by_auto = record_view(await core.accounting.record(request_id="ev-auto"))

    status, fresh = await env.post(event("ev-fresh", naming))
    assert status == 200, fresh
    assert to_micro(fresh["amount"]) > 0
    assert charged_view(by_admin) == charged_view(fresh)
    assert charged_view(by_auto) == charged_view(fresh)
    for request_id in ("ev-auto", "ev-admin", "ev-fresh"):
        assert await usage_entries(core, request_id) == [-to_micro(fresh["amount"])]
    resolved = {r["request_id"]: r for r in await env.failed()}
    assert all(r["retry_state"] == "resolved" and r["handled"] == "1" for r in resolved.values())

    # nothing more happens: another admin retry replays, the scheduler finds nothing due
    status, replay = await env.admin_retry(rows["ev-admin"]["id"])
    assert status == 200 and replay["duplicate"] is True
    fixed_clock.advance(10 ** 6)
    assert await core.retries.retry_due() == 0
    for request_id in ("ev-auto", "ev-admin"):
        assert len(await usage_entries(core, request_id)) == 1
    assert (await core.ledger.reconcile())["mismatches"] == []


# --- the reproduction from the issue, over HTTP on the demo data --------------------------------
async def test_issue_reproduction_llmid_only_event_is_recovered_and_charged_once(http):
    await seed_demo(http.core)
    key = http.admin_key
    ev = {"request_id": "rt-1", "customer_id": "rt-cust", "user_id": "u1", "llmid": "demo-llm-chat",
          "input_tokens": 1000, "output_tokens": 100}
    status, body = await http.post("api/accounting.dspy", key, json=ev)
    assert (status, body["code"]) == (404, "unknown_customer")
    status, body = await http.post("api/recharge.dspy", key, json={"customer_id": "rt-cust", "amount": "10",
                                                                  "request_id": "rt-rc"})
    assert status == 200, body
    _, failed = await http.get("api/failed_accounting_list.dspy", key, customer_id="rt-cust")
    assert failed["total"] == 1
    # the event named only the id: the failed row names the model as the catalogue does
    assert (failed["rows"][0]["llmid"], failed["rows"][0]["model_name"]) == ("demo-llm-chat", "demo-chat")
    status, body = await http.post("api/failed_accounting_retry.dspy", key, json={"id": failed["rows"][0]["id"]})
    assert status == 200 and body["status"] == "accounted" and body["amount"] == "0.002940", body
    assert body["price_version"] == "demo-ppt-1" and body["pricing_id"] == "demo-pp-chat"
    status, again = await http.post("api/failed_accounting_retry.dspy", key, json={"id": failed["rows"][0]["id"]})
    assert status == 200 and again["duplicate"] is True
    status, replay = await http.post("api/accounting.dspy", key, json=ev)
    assert status == 200 and replay["duplicate"] is True
    _, bal = await http.get("api/balance.dspy", key, customer_id="rt-cust")
    assert bal["balance"] == "9.997060"
    assert await usage_entries(http.core, "rt-1") == [-units("0.002940")]


# --- the queued accountant rebuilds from the payload too ------------------------------------------
async def test_submitted_llmid_only_event_is_accounted_after_its_model_arrives(core):
    await core.ledger.recharge(CUSTOMER, units("10"), "rc")
    await core.accounting.submit_usage(event("q-1", "llmid"))
    assert await core.accounting.account_pending() == 0          # the model is not synced yet
    rec = await core.accounting.record(request_id="q-1")
    assert rec.status == "failed" and rec.error_code == "no_pricing"
    assert json.loads(rec.payload)["model_name"] is None         # the payload stays as sent
    await _pricing(InProcess(core))
    failed = (await core.failures.search(customer_id=CUSTOMER))["rows"][0]
    done = await core.retries.retry(failed["id"])
    assert done["amount"] == "0.006000" and done["price_version"] == "ppt-rec-1"
    # and an event queued once the model is known is priced under the model's name
    await core.accounting.submit_usage(event("q-2", "llmid"))
    assert await core.accounting.account_pending() == 1
    assert (await core.accounting.record(request_id="q-2")).amount == units("0.006000")
    assert (await core.ledger.balance(CUSTOMER))["balance"] == "9.988000"
