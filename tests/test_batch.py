"""Batch ingestion (``accounting_batch``) over real HTTP and in-process, on both databases: a
result per event in order, each the single endpoint's reply; idempotent per event; one bad event
fails no other; the caller's scope applied per event; its own body limit."""
from tests.helpers import CHAT_A_PRICE, seed_pricing, usage

BATCH = "api/accounting_batch.dspy"
PER_EVENT = ("outcome", "index", "success", "duplicate", "use_time")


async def _setup(http, balance="1"):
    await seed_pricing(http.core)
    for customer in ("cust-1", "cust-2"):
        status, body = await http.post("api/recharge.dspy", http.admin_key,
                                       json={"customer_id": customer, "amount": balance, "request_id": f"top-{customer}"})
        assert status == 200, body


def _same(batch_result, single_reply):
    """Equal but for what says how it was answered (and the defaulted use_time)."""
    strip = lambda d: {k: v for k, v in d.items() if k not in PER_EVENT}   # noqa: E731
    assert strip(batch_result) == strip(single_reply), (batch_result, single_reply)


async def _balance(http, customer="cust-1"):
    _, body = await http.get("api/balance.dspy", http.admin_key, customer_id=customer)
    return body["balance"]


MIXED = [
    usage("m1"),
    usage("m2", input_tokens="-5"),                 # invalid_param: refused, nothing stored
    usage("m3", model_name="unknown-model"),        # no_pricing: refused, stored as failed
    usage("m4", customer="cust-2", output_tokens=1000),
    usage("m5", customer="ghost"),                  # unknown_customer
    usage("m1"),                                    # the same event again in the batch: a duplicate
    usage("m1", output_tokens=7),                   # the same id, another payload: conflict
    usage("m6", input_tokens=10**9),                # insufficient_balance: refused alone
]


async def test_batch_results_in_order_and_each_is_the_single_endpoints_reply(http):
    await _setup(http)
    status, body = await http.post(BATCH, http.admin_key, json={"events": MIXED})
    assert status == 200, body
    assert body["success"] and body["mode"] == "now" and body["total"] == len(MIXED)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(MIXED)))
    assert [r["outcome"] for r in results] == ["accounted", "refused", "refused", "accounted", "refused",
                                               "duplicate", "refused", "refused"]
    assert [r.get("code") for r in results] == [None, "invalid_param", "no_pricing", None, "unknown_customer",
                                                None, "conflict", "insufficient_balance"]
    assert body["counts"] == {"accounted": 2, "duplicate": 1, "queued": 0, "refused": 5}
    assert results[0]["amount"] == CHAT_A_PRICE and results[5]["record_id"] == results[0]["record_id"]
    assert await _balance(http) == "0.994000" and await _balance(http, "cust-2") == "0.990000"
    # each event sent alone now gets what the batch said: a replay of the same record, or the
    # same refusal (code and message)
    for event, result in zip(MIXED, results, strict=False):
        got, single = await http.post("api/accounting.dspy", http.admin_key, json=event)
        if result["outcome"] == "refused":
            assert (single["code"], single["message"]) == (result["code"], result["message"])
        else:
            assert got == 200 and single["duplicate"] is True
            _same(result, single)
    assert await _balance(http) == "0.994000"
    # the no_pricing event is stored as failed, as the single endpoint stores it
    async with http.core.db.read() as tx:
        assert await tx.scalar("select status from accounting_records where request_id = 'm3'") == "failed"
        assert await tx.scalar("select count(*) as n from accounting_records where request_id = 'm2'") == 0


async def test_the_same_batch_twice_charges_once(http):
    await _setup(http, balance="10")
    events = [usage(f"twice-{i}", customer=f"cust-{1 + i % 2}") for i in range(40)]
    status, first = await http.post(BATCH, http.admin_key, json={"events": events})
    assert status == 200 and first["counts"]["accounted"] == 40
    status, second = await http.post(BATCH, http.admin_key, json={"events": events})
    assert status == 200 and second["counts"] == {"accounted": 0, "duplicate": 40, "queued": 0, "refused": 0}
    for a, b in zip(first["results"], second["results"], strict=False):
        assert b["duplicate"] is True
        _same(a, b)
    assert await _balance(http) == "9.880000" and await _balance(http, "cust-2") == "9.880000"
    async with http.core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from ledger_entry where entry_type = 'usage'") == 40


async def test_queue_mode_stores_pending_for_the_accountant(http):
    await _setup(http)
    events = [usage("q1"), usage("q2", model_name="chat-a", llmid="llm-flat"), usage("q3")]
    status, body = await http.post(BATCH, http.admin_key, json={"events": events, "mode": "queue"})
    assert status == 200 and [r["outcome"] for r in body["results"]] == ["queued", "refused", "queued"]
    assert body["results"][1]["code"] == "model_mismatch"
    got, single = await http.post("api/accounting_submit.dspy", http.admin_key, json=usage("q1"))
    assert got == 200 and single["duplicate"] is True and single["status"] == "pending"
    assert single["record_id"] == body["results"][0]["record_id"]
    assert await http.core.accounting.account_pending() == 2
    assert await _balance(http) == "0.988000"
    status, again = await http.post(BATCH, http.admin_key, json={"events": events, "mode": "queue"})
    assert [r["outcome"] for r in again["results"]] == ["duplicate", "refused", "duplicate"]
    assert again["results"][0]["status"] == "accounted"


async def test_now_mode_accounts_a_queued_event(http):
    await _setup(http)
    status, body = await http.post(BATCH, http.admin_key, json={"events": [usage("p1")], "mode": "queue"})
    assert body["results"][0]["outcome"] == "queued"
    status, body = await http.post(BATCH, http.admin_key, json={"events": [usage("p1"), usage("p2")]})
    assert [r["outcome"] for r in body["results"]] == ["accounted", "accounted"]
    assert await _balance(http) == "0.988000"


async def test_a_customer_key_is_scoped_per_event(http):
    await _setup(http)
    key, _ = await http.core.apikeys.create("customer", customer_id="cust-1")
    own = {k: v for k, v in usage("c1").items() if k != "customer_id"}    # the key's customer is forced
    events = [own, usage("c2", customer="cust-2"), usage("bad@id"), usage("c3")]
    status, body = await http.post(BATCH, key, json={"events": events})
    assert status == 200, body
    assert [r["outcome"] for r in body["results"]] == ["accounted", "refused", "refused", "accounted"]
    assert [r.get("code") for r in body["results"]] == [None, "forbidden", "invalid_param", None]
    assert body["results"][0]["request_id"] == "c1" and body["results"][0]["customer_id"] == "cust-1"
    # the platform's own "c1" is another request: the customer's is stored as c1@cust-1
    status, admin = await http.post(BATCH, http.admin_key, json={"events": [usage("c1")]})
    assert admin["results"][0]["outcome"] == "accounted"
    async with http.core.db.read() as tx:
        ids = {r.request_id for r in await tx.select("select request_id from accounting_records")}
    assert {"c1@cust-1", "c3@cust-1", "c1"} <= ids
    # the customer's replay is a duplicate of its own record, unscoped in the reply
    status, again = await http.post(BATCH, key, json={"events": [own]})
    assert again["results"][0]["outcome"] == "duplicate" and again["results"][0]["request_id"] == "c1"


async def test_auth_and_bad_requests(http):
    await _setup(http)
    status, body = await http.post(BATCH, None, json={"events": [usage("a1")]})
    assert status == 401 and body["code"] == "unauthorized"
    status, body = await http.get(BATCH, http.admin_key)
    assert status == 405
    for payload in ({}, {"events": []}, {"events": "x"}, {"events": {"a": 1}}, {"events": [usage("a2")], "mode": "later"}):
        status, body = await http.post(BATCH, http.admin_key, json=payload)
        assert status == 400 and body["code"] == "invalid_param", (payload, body)
    status, body = await http.post(BATCH, http.admin_key, json={"events": [usage("a3"), "nope", [1]]})
    assert [r["outcome"] for r in body["results"]] == ["accounted", "refused", "refused"]
    http.core.config.accounting.batch_max_events = 2
    status, body = await http.post(BATCH, http.admin_key, json={"events": [usage(f"lim-{i}") for i in range(3)]})
    assert status == 400 and "1 to 2" in body["message"]
    async with http.core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from accounting_records where request_id like 'lim-%'") == 0


async def test_the_batch_path_has_its_own_body_limit(http):
    await _setup(http)
    events = [usage(f"big-{i}") for i in range(1000)]    # ~170 KB
    http.core.config.server.max_body_bytes = 64 * 1024   # the cap of every other path
    status, body = await http.post("api/accounting.dspy", http.admin_key, json=dict(usage("pad"), note="x" * 70000))
    assert status == 413
    status, body = await http.post(BATCH, http.admin_key, json={"events": events})
    assert status == 200 and body["total"] == 1000        # the batch path's own (default) limit
    http.core.config.server.max_body_bytes_by_path["/billing_module/api/accounting_batch.dspy"] = 32 * 1024
    status, body = await http.post(BATCH, http.admin_key, json={"events": [usage(f"big2-{i}") for i in range(1000)]})
    assert status == 413 and body["code"] == "payload_too_large"
    async with http.core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from accounting_records where request_id like 'big2-%'") == 0


async def test_in_process_batch(http):
    from ahserver.serverenv import ServerEnv
    await _setup(http)
    results = await ServerEnv().billing_post_usage_batch([usage("i1"), usage("i2", customer="ghost")])
    assert [r["outcome"] for r in results] == ["accounted", "refused"]
    assert results[0]["amount"] == CHAT_A_PRICE and results[1]["code"] == "unknown_customer"

