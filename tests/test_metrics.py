"""/billing_module/metrics: Prometheus text read back with prometheus_client's own parser; who
may read it; the same totals from every worker of ``serve --workers 2``."""
import json
import os
import signal
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing_module.errors import NoPricing
from tests.conftest import make_config
from tests.helpers import seed_pricing, units, usage
from tests.test_standalone import _get, start_demo_workers

TOKEN = "scrape-token-0123456789"


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path, metrics={"scrape_token": TOKEN})


def samples(text):
    """{(sample name, frozenset of labels): value} for every sample of the scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed, name, **labels):
    return parsed.get((name, frozenset(labels.items())), 0.0)


async def scrape(http, path="metrics", key=None):
    r = await http.client.get(f"/billing_module/{path}", headers={"Authorization": f"Bearer {key or TOKEN}"})
    return r.status, r.headers.get("Content-Type", ""), await r.text()


async def test_scrape_counts_events_queue_backlog_and_sync_age(http):
    core = http.core
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    before = samples((await scrape(http))[2])
    await core.accounting.post_usage(usage("m1"))
    await core.accounting.post_usage(usage("m1"))        # a replay: not a second event
    with pytest.raises(NoPricing):
        await core.accounting.post_usage(usage("m2", model="no-such-model"))
    await core.accounting.submit_usage(usage("m3"))
    async with core.db.transaction() as tx:
        await tx.insert("sync_state", {"id": "s1", "entity_type": "pricing", "entity_id": "all",
                                       "last_sync_time": "2020-01-01 00:00:00", "sync_version": "0",
                                       "sync_status": "success", "retry_count": 0, "items_synced": 0,
                                       "created_at": "2020-01-01 00:00:00", "updated_at": "2020-01-01 00:00:00"})
    status, ctype, text = await scrape(http)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    after = samples(text)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert delta("billing_events_accounted_total", path="post") == 1
    assert delta("billing_events_failed_total", path="post", code="no_pricing") == 1
    assert delta("billing_accounting_seconds_count", path="post") == 3
    assert value(after, "billing_accountant_queue_depth") == 1
    assert value(after, "billing_accountant_lag_seconds") >= 0
    assert value(after, "billing_failed_accounting_backlog", code="no_pricing", retry_state="waiting") == 1
    assert value(after, "billing_sync_age_seconds", entity="pricing") > 86400 * 365
    assert delta("billing_cache_requests_total", cache="llmage:name", result="hit") + \
        delta("billing_cache_requests_total", cache="llmage:name", result="miss") > 0

    await core.accounting.account_pending()
    accounted = samples((await scrape(http, "api/metrics.dspy"))[2])
    assert value(accounted, "billing_events_accounted_total", path="accountant") - \
        value(after, "billing_events_accounted_total", path="accountant") == 1
    assert value(accounted, "billing_accountant_queue_depth") == 0


async def test_only_admin_keys_and_the_scrape_token_may_read_it(http):
    customer_key, _ = await http.core.apikeys.create("customer", customer_id="cust-1", name="c")
    assert (await scrape(http, key=http.admin_key))[0] == 200
    assert (await scrape(http, "api/metrics.dspy", key=TOKEN))[0] == 200
    assert (await scrape(http, key="wrong-token"))[0] == 401
    assert (await scrape(http, key=customer_key))[0] == 403
    r = await http.client.get("/billing_module/metrics")
    assert r.status == 401


def test_workers_share_their_counters(tmp_path):
    """Two worker processes: whichever answers the scrape, it reports every worker's events."""
    proc, base, key = start_demo_workers(tmp_path)
    try:
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for i in range(30):     # new connections: the kernel spreads them over both workers
            status, body = _get(f"{base}/api/accounting.dspy", auth, json.dumps(
                {"request_id": f"mw-{i}", "customer_id": "demo-acme", "model_name": "demo-chat",
                 "input_tokens": 10, "output_tokens": 5}).encode())
            assert status == 200, body
        seen = set()
        for _ in range(10):
            req = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                parsed = samples(r.read().decode())
            assert value(parsed, "billing_events_accounted_total", path="post") == 30
            seen.add(value(parsed, "billing_accounting_seconds_count", path="post"))
        assert seen == {30}
        # cache lookups are counted in each worker and moved into the shared counters in batches:
        # at the latest by a worker's periodic flush (cache.FLUSH_SECONDS), then every scrape agrees
        lookups = []
        for _ in range(40):
            req = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                parsed = samples(r.read().decode())
            lookups.append(sum(value(parsed, "billing_cache_requests_total", cache="quote:priced", result=result)
                               for result in ("hit", "miss")))
            if len(lookups) > 3 and lookups[-1] >= 30 and len(set(lookups[-3:])) == 1:
                break
            time.sleep(0.5)
        assert lookups[-1] >= 30 and len(set(lookups[-3:])) == 1, lookups   # a lookup per event at least
        assert os.listdir(tmp_path / "prometheus-multiproc")   # the workers' files
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    # every worker started and stopped cleanly (workers once raced on the host's files at start)
    assert proc.returncode == 0, err[-3000:]


async def test_batch_events_are_counted_by_outcome(http):
    await seed_pricing(http.core)
    await http.core.ledger.recharge("cust-1", units("1"), "r1")
    before = samples((await scrape(http))[2])
    results = await http.core.accounting.post_usage_batch(
        [usage("b1"), usage("b2"), usage("b1"), usage("b3", model="no-such-model")])
    assert [r["outcome"] for r in results] == ["accounted", "accounted", "duplicate", "refused"]
    after = samples((await scrape(http))[2])
    assert value(after, "billing_events_accounted_total", path="batch") - \
        value(before, "billing_events_accounted_total", path="batch") == 2
    assert value(after, "billing_events_failed_total", path="batch", code="no_pricing") - \
        value(before, "billing_events_failed_total", path="batch", code="no_pricing") == 1
