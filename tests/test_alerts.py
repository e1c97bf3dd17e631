"""Alerts: written with the change that raises them, delivered as signed webhooks to a real HTTP
receiver on 127.0.0.1, once per crossing, retried with backoff, claimed by one instance."""
import asyncio
import hashlib
import hmac
import json

import pytest
from aiohttp import web

from billing_module.core import BillingCore
from billing_module.errors import BillingError
from billing_module.money import to_micro
from tests.conftest import make_config
from tests.helpers import seed_pricing, usage

SECRET = "deployment-secret-0123456789"


class Receiver:
    """A webhook receiver: answers 500 to the first ``fail_first`` requests, then 200; keeps
    every request (headers and the raw body)."""

    def __init__(self, fail_first=0, delay=0.0):
        self.fail_first, self.delay = fail_first, delay
        self.requests, self.accepted = [], []

    async def handle(self, request):
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.delay:
            await asyncio.sleep(self.delay)
        if len(self.requests) <= self.fail_first:
            return web.Response(status=500, text="not now")
        self.accepted.append((dict(request.headers), body))
        return web.Response(status=204)

    def ids(self):
        return [json.loads(b)["id"] for _, b in self.accepted]


@pytest.fixture
async def receiver():
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    app.router.add_post("/customer-hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    rec.base = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


def verified(headers, body, secret=SECRET):
    """What docs/webhooks.md tells a receiver to check."""
    ts = headers["X-Billing-Timestamp"]
    expected = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["X-Billing-Signature"])


@pytest.fixture
def config(tmp_path, receiver):
    """The conftest ``core`` of this module: the receiver is the deployment's webhook."""
    return make_config(tmp_path, alerts={"webhook_url": receiver.url, "webhook_secret": SECRET,
                                         "low_balance_amount": "100", "retry_base_seconds": 10, "max_attempts": 2},
                       accounting={"max_retries": 1})


@pytest.fixture
async def acore(core):
    """The core with no alerts yet: a MySQL database is emptied only after a ``core`` fixture has
    marked it, and the crash test's server (tests/test_alerts_crash.py) leaves its alert behind."""
    async with core.db.transaction() as tx:
        for table in ("alert_delivery", "alert_outbox", "alert_webhook"):
            await tx.execute(f"delete from {table}")
    return core


async def alerts_of(core, **filters):
    return (await core.alerts.search(rows=100, **filters))["rows"]


async def test_low_balance_once_per_crossing_delivered_after_a_500_with_a_valid_signature(acore, receiver, fixed_clock):
    core = acore
    receiver.fail_first = 1
    await core.ledger.recharge("c1", to_micro("150"), "r1")
    await core.ledger.adjust("c1", to_micro("-30"), "a1", "use")      # 120: above the line
    assert await alerts_of(core) == []
    await core.ledger.adjust("c1", to_micro("-30"), "a2", "use")      # 90: crosses
    await core.ledger.adjust("c1", to_micro("-10"), "a3", "use")      # 80: still below, no new alert
    [alert] = await alerts_of(core)
    assert alert["type"] == "low_balance" and alert["customer_id"] == "c1"
    assert alert["data"]["balance"] == "90.000000" and alert["data"]["threshold"] == "100.000000"

    assert await core.alerts.deliver_due() == 0                        # the receiver answers 500
    [d] = (await alerts_of(core))[0]["deliveries"]
    assert d["status"] == "pending" and d["attempts"] == 1 and d["last_status"] == 500
    assert await core.alerts.deliver_due() == 0                        # not due yet: backoff
    assert len(receiver.requests) == 1
    fixed_clock.advance(11)
    assert await core.alerts.deliver_due() == 1
    assert await core.alerts.deliver_due() == 0
    assert receiver.ids() == [alert["id"]]
    headers, body = receiver.accepted[0]
    assert verified(headers, body)
    assert not verified(headers, body + b" ")
    sent = json.loads(body)
    assert list(sent)[:4] == ["id", "type", "customer_id", "created_at"]
    assert sent["type"] == "low_balance" and sent["balance"] == "90.000000"
    assert receiver.requests[0][1] == body                             # the retry sends the same alert
    assert (await alerts_of(core, status="delivered"))[0]["id"] == alert["id"]

    # a recharge above the line, then below again: a new crossing, a new alert
    await core.ledger.recharge("c1", to_micro("100"), "r2")            # 180
    await core.ledger.adjust("c1", to_micro("-100"), "a4", "use")      # 80
    assert len(await alerts_of(core, customer_id="c1", type="low_balance")) == 2
    assert await core.alerts.deliver_due() == 1
    assert len(set(receiver.ids())) == 2


async def test_usage_batch_below_the_line_makes_one_alert(acore, receiver):
    core = acore
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", to_micro("100.01"), "r1")
    # each event costs 0.006: the batch takes the balance from 100.01 to 99.98
    results = await core.accounting.post_usage_batch([usage(f"u{i}") for i in range(5)])
    assert all(r["outcome"] == "accounted" for r in results), results
    await core.accounting.post_usage(usage("u-next"))
    assert len(await alerts_of(core)) == 1


async def test_no_alert_when_the_transaction_rolls_back(acore, receiver):
    core = acore
    await core.ledger.recharge("c1", to_micro("150"), "r1")

    class Boom(Exception):
        pass
    with pytest.raises(Boom):
        async with core.db.transaction() as tx:
            await core.ledger.post(tx, "c1", -to_micro("100"), "adjust", "x1", "h", reason="crossing")
            await core.alerts.emit(tx, "budget_80", "c1", {"budget": "b1"})
            raise Boom()
    assert await alerts_of(core) == []
    assert await core.alerts.deliver_due() == 0 and receiver.requests == []
    assert (await core.ledger.balance("c1"))["balance"] == "150.000000"


async def test_two_instances_racing_deliver_each_alert_once(acore, receiver, tmp_path, db_desc):
    core = acore
    receiver.delay = 0.2      # both instances are inside deliver_due at the same time
    other = BillingCore(config=core.config, db_desc=db_desc, data_dir=str(tmp_path))
    try:
        for i in range(4):
            await core.ledger.recharge(f"c{i}", to_micro("150"), f"r{i}")
            await core.ledger.adjust(f"c{i}", to_micro("-100"), f"a{i}", "use")
        counts = await asyncio.gather(core.alerts.deliver_due(), other.alerts.deliver_due(),
                                      core.alerts.deliver_due())
        assert sum(counts) == 4
        assert sorted(receiver.ids()) == sorted(a["id"] for a in await alerts_of(core))
        assert len(receiver.requests) == 4
    finally:
        await other.close()


async def test_without_a_deployment_threshold_only_a_customers_own_one_alerts_on_every_instance(
        acore, receiver, tmp_path, db_desc):
    """The ledger asks the watch only about customers whose balance row says they have their own
    threshold: set on one instance, it applies at once to debits on another (no cached copy), on
    the single and the batch path, and once removed no debit is watched any more."""
    cfg = make_config(tmp_path, alerts={"webhook_url": receiver.url, "webhook_secret": SECRET})
    plain = BillingCore(config=cfg, db_desc=db_desc, data_dir=str(tmp_path))
    other = BillingCore(config=cfg, db_desc=db_desc, data_dir=str(tmp_path))
    try:
        await seed_pricing(plain)
        await plain.ledger.recharge("c1", to_micro("150"), "r1")
        await plain.ledger.adjust("c1", to_micro("-100"), "a1", "use")          # 50: nothing to cross
        assert await alerts_of(plain) == []
        await other.alerts.set_webhook("c1", {"low_balance_amount": to_micro("40")}, "admin")
        await plain.ledger.adjust("c1", to_micro("-20"), "a2", "use")           # 30: below 40
        assert [a["data"]["threshold"] for a in await alerts_of(plain)] == ["40.000000"]
        await plain.ledger.recharge("c1", to_micro("20"), "r2")                  # 50: armed again
        await other.alerts.set_webhook("c1", {"low_balance_amount": to_micro("49.995")}, "admin")
        # each event costs 0.006: the batch takes the balance from 50 to 49.988
        results = await plain.accounting.post_usage_batch([usage(f"u{i}", customer="c1") for i in range(2)])
        assert all(r["outcome"] == "accounted" for r in results), results
        await other.alerts.set_webhook("c1", {"low_balance_amount": to_micro("49.985")}, "admin")
        await plain.accounting.post_usage(usage("u-single", customer="c1"))      # 49.988 -> 49.982
        assert sorted(a["data"]["threshold"] for a in await alerts_of(plain)) == ["40.000000", "49.985000", "49.995000"]
        await other.alerts.set_webhook("c1", {"low_balance_amount": None}, "admin")
        await plain.ledger.recharge("c1", to_micro("100"), "r3")
        await plain.ledger.adjust("c1", to_micro("-140"), "a3", "use")          # no threshold any more
        assert len(await alerts_of(plain, type="low_balance")) == 3
    finally:
        await plain.close()
        await other.close()


async def test_a_delivery_gives_up_after_max_attempts_and_an_admin_redelivers(acore, receiver, fixed_clock):
    from billing_module import metrics
    core = acore
    gave_up = metrics.WEBHOOK_FAILURES.labels("deployment", "gave_up")._value.get()
    receiver.fail_first = 2
    await core.ledger.recharge("c1", to_micro("150"), "r1")
    await core.ledger.adjust("c1", to_micro("-100"), "a1", "use")
    await core.alerts.deliver_due()
    fixed_clock.advance(3600)
    await core.alerts.deliver_due()
    [alert] = await alerts_of(core, status="failed")
    [d] = alert["deliveries"]
    assert d["status"] == "failed" and d["attempts"] == 2 and d["next_attempt_at"] is None
    assert metrics.WEBHOOK_FAILURES.labels("deployment", "gave_up")._value.get() == gave_up + 1
    fixed_clock.advance(3600)
    assert await core.alerts.deliver_due() == 0                    # failed stays failed
    assert (await core.alerts.redeliver(delivery_id=d["delivery_id"]))["status"] == "pending"
    assert await core.alerts.deliver_due() == 1
    assert receiver.ids() == [alert["id"]]
    with pytest.raises(BillingError):
        await core.alerts.redeliver(delivery_id="no-such-delivery")
    assert (await core.alerts.redeliver(alert_id=alert["id"]))["deliveries"][0]["status"] == "pending"


async def test_a_customer_webhook_gets_its_alerts_signed_with_its_own_secret(acore, receiver):
    core = acore
    secret = "customer-secret-abcdefghij"
    view = await core.alerts.set_webhook("c1", {"url": receiver.base + "/customer-hook", "secret": secret,
                                                "low_balance_percent": 50}, "admin")
    assert view["secret_hint"] == "cust…" and secret not in json.dumps(view)
    await core.ledger.recharge("c1", to_micro("400"), "r1")           # threshold: 50 % of 400 = 200
    await core.ledger.adjust("c1", to_micro("-150"), "a1", "use")      # 250
    assert await alerts_of(core) == []
    await core.ledger.adjust("c1", to_micro("-100"), "a2", "use")      # 150: below 200
    [alert] = await alerts_of(core)
    assert alert["data"]["threshold"] == "200.000000"
    assert sorted(d["target"] for d in alert["deliveries"]) == ["customer", "deployment"]
    assert await core.alerts.deliver_due() == 2
    by_path = {}
    for headers, body in receiver.accepted:
        by_path[headers.get("X-Billing-Alert-Id"), verified(headers, body, secret)] = body
    assert (alert["id"], True) in by_path and (alert["id"], False) in by_path   # one per secret
    with pytest.raises(BillingError):
        await core.alerts.set_webhook("c2", {"url": receiver.url}, "admin")   # a url needs a secret


async def test_failed_accounting_exhausted_raises_one_alert(acore, receiver):
    core = acore
    await seed_pricing(core)
    # no account: the event fails (unknown customer), is retried once and is then exhausted
    with pytest.raises(BillingError):
        await core.accounting.post_usage(usage("u1", customer="nobody"))
    assert await alerts_of(core) == []
    [failed] = (await core.failures.search())["rows"]
    with pytest.raises(BillingError):
        await core.retries.retry(failed["id"])
    [alert] = await alerts_of(core, type="failed_exhausted")
    assert alert["customer_id"] == "nobody" and alert["data"]["failed_id"] == failed["id"]
    assert await core.alerts.deliver_due() == 1


async def test_sync_failing_once_per_streak(acore, receiver, fixed_clock):
    core = acore
    store, interval = core.sync.store, 300
    await store.claim("users", 900)
    await store.failed("users", "centre down", 30, interval)
    assert await alerts_of(core) == []                                 # failing for less than the interval
    fixed_clock.advance(interval + 1)
    await store.failed("users", "centre down", 30, interval)
    fixed_clock.advance(60)
    await store.failed("users", "still down", 30, interval)
    [alert] = await alerts_of(core, type="sync_failing")
    assert alert["customer_id"] is None and alert["data"]["entity"] == "users"
    # a success ends the streak; failing again for longer than the interval is a new one
    async with core.db.transaction() as tx:
        await store.page_applied(tx, "users", 5, 1, True, interval)
    fixed_clock.advance(interval + 10)
    await store.failed("users", "down again", 30, interval)
    assert len(await alerts_of(core, type="sync_failing")) == 1
    fixed_clock.advance(interval)
    await store.failed("users", "down again", 30, interval)
    assert len(await alerts_of(core, type="sync_failing")) == 2


async def test_alert_apis_validate_scope_and_never_return_the_secret(http, receiver):
    core = http.core
    key = http.admin_key
    secret = "api-customer-secret-0123456789"
    bad = [({"customer_id": "c1", "url": "ftp://127.0.0.1/x", "secret": secret}, "url"),
           ({"customer_id": "c1", "url": "http://", "secret": secret}, "url"),
           ({"customer_id": "c1", "url": "javascript:alert(1)", "secret": secret}, "url"),
           ({"customer_id": "c1", "url": receiver.url, "secret": "short"}, "secret"),
           ({"customer_id": "c1", "url": receiver.url}, "secret"),
           ({"customer_id": "c1", "low_balance_percent": "0"}, "low_balance_percent"),
           ({"customer_id": "c1", "low_balance_percent": "101"}, "low_balance_percent"),
           ({"customer_id": "c1", "low_balance_amount": "-5"}, "low_balance_amount"),
           ({"customer_id": "c1", "low_balance_amount": "1.5", "low_balance_percent": "10"}, "low_balance"),
           ({"customer_id": "c1"}, "nothing to change")]
    for params, word in bad:
        status, body = await http.post("api/alert_webhook_set.dspy", key, json=params)
        assert status == 400 and word in body["message"], (params, status, body)
    status, body = await http.get("api/alert_webhook.dspy", key, customer_id="c1")
    assert status == 200 and body["url"] is None and body["secret_set"] is False   # nothing was written

    status, body = await http.post("api/alert_webhook_set.dspy", key, json={
        "customer_id": "c1", "url": receiver.base + "/customer-hook", "secret": secret, "low_balance_amount": "20"})
    assert status == 200 and body["secret_hint"] == "api-…" and secret not in json.dumps(body)
    status, body = await http.get("api/alert_webhook.dspy", key, customer_id="c1")
    assert body["low_balance_amount"] == "20.000000" and secret not in json.dumps(body)
    status, body = await http.post("api/alert_webhook_set.dspy", key, json={"customer_id": "c1",
                                                                            "low_balance_percent": "25"})
    assert body["low_balance_percent"] == 25 and body["low_balance_amount"] is None and body["secret_set"]

    for customer in ("c1", "c2"):
        await core.ledger.recharge(customer, to_micro("150"), f"r-{customer}")
        await core.ledger.adjust(customer, to_micro("-120"), f"a-{customer}", "use")   # 30: below 100 / below 37.5
    status, body = await http.get("api/alerts.dspy", key)
    assert status == 200 and body["total"] == 2
    status, body = await http.get("api/alerts.dspy", key, customer_id="c1", type="low_balance", status="pending")
    assert body["total"] == 1 and body["rows"][0]["data"]["threshold"] == "37.500000"
    status, body = await http.get("api/alerts.dspy", key, status="bogus")
    assert status == 400

    customer_key, _ = await core.apikeys.create("customer", customer_id="c2")
    status, body = await http.get("api/alerts.dspy", customer_key)
    assert status == 200 and [r["customer_id"] for r in body["rows"]] == ["c2"]
    status, body = await http.get("api/alerts.dspy", customer_key, customer_id="c1")
    assert status == 403
    status, body = await http.post("api/alert_webhook_set.dspy", customer_key,
                                   json={"customer_id": "c2", "low_balance_amount": "1"})
    assert status == 403
    status, body = await http.post("api/alert_redeliver.dspy", key, json={"delivery_id": "missing"})
    assert status == 404

    status, body = await http.post("api/alert_webhook_set.dspy", key, json={"customer_id": "c1", "remove": "all"})
    assert body["url"] is None and body["secret_set"] is False and body["low_balance_percent"] is None


async def test_webhook_metrics_parse(http, receiver):
    from prometheus_client.parser import text_string_to_metric_families
    core = http.core
    receiver.fail_first = 1
    await core.ledger.recharge("c1", to_micro("150"), "r1")
    await core.ledger.adjust("c1", to_micro("-100"), "a1", "use")
    await core.alerts.deliver_due()
    r = await http.client.get("/billing_module/api/metrics.dspy",
                              headers={"Authorization": f"Bearer {http.admin_key}"})
    families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    failures = {(s.labels["target"], s.labels["outcome"]): s.value
                for s in families["billing_webhook_failures"].samples if s.name.endswith("_total")}
    assert failures.get(("deployment", "retry"), 0) >= 1, families["billing_webhook_failures"].samples
    undelivered = {(s.labels["target"], s.labels["status"]): s.value
                   for s in families["billing_webhook_undelivered"].samples}
    assert undelivered == {("deployment", "pending"): 1}
    assert "billing_webhook_deliveries" in families


def test_a_deployment_webhook_needs_a_secret_and_an_http_url():
    from billing_module.config import load_config
    from billing_module.errors import ConfigError
    env = {"BILLING_ALERTS_WEBHOOK_URL": "https://alerts.example.com/hook"}
    with pytest.raises(ConfigError, match="webhook_secret"):
        load_config(environ=env)
    with pytest.raises(ConfigError, match="http"):
        load_config(environ=dict(env, BILLING_ALERTS_WEBHOOK_URL="ftp://x/y", BILLING_ALERTS_WEBHOOK_SECRET=SECRET))
    with pytest.raises(ConfigError, match="low_balance_amount"):
        load_config(environ={"BILLING_ALERTS_LOW_BALANCE_AMOUNT": "ten"})
    cfg = load_config(environ=dict(env, BILLING_ALERTS_WEBHOOK_SECRET=SECRET, BILLING_ALERTS_LOW_BALANCE_AMOUNT="12.5"))
    assert cfg.alerts.webhook_url == env["BILLING_ALERTS_WEBHOOK_URL"] and cfg.alerts.low_balance_amount == "12.5"


async def test_a_removed_customer_webhook_gives_its_pending_delivery_up(acore, receiver):
    core = acore
    await core.alerts.set_webhook("c1", {"url": receiver.base + "/customer-hook", "secret": "s" * 20}, "admin")
    await core.ledger.recharge("c1", to_micro("150"), "r1")
    await core.ledger.adjust("c1", to_micro("-100"), "a1", "use")
    await core.alerts.set_webhook("c1", {"url": None}, "admin")
    assert await core.alerts.deliver_due() == 1                       # the deployment's
    [alert] = await alerts_of(core)
    customer = next(d for d in alert["deliveries"] if d["target"] == "customer")
    assert customer["status"] == "failed" and "no longer set" in customer["last_error"]
    assert len(receiver.accepted) == 1
