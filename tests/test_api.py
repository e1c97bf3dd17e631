"""The accounting API over real HTTP (standalone host, API keys), on both databases."""
import pytest

from tests.helpers import CHAT_A_PRICE, seed_pricing, usage


async def _setup(http, balance="1"):
    await seed_pricing(http.core)
    await http.core.catalog.put("users", [{"id": "cust-1", "kind": "org", "name": "Acme"},
                                          {"id": "u-1", "kind": "user", "name": "alice", "org_id": "cust-1"}])
    if balance:
        status, body = await http.post("api/recharge.dspy", http.admin_key,
                                       json={"customer_id": "cust-1", "amount": balance, "request_id": "top-1"})
        assert status == 200 and body["success"], body


async def test_recharge_balance_and_transactions(http):
    await _setup(http, balance="12.5")
    status, body = await http.get("api/balance.dspy", http.admin_key, customer_id="cust-1")
    assert status == 200 and body["balance"] == "12.500000" and body["available"] == "12.500000"
    assert body["currency"] == "CNY" and body["status"] == "active" and body["credit_limit"] == "0.000000"
    # form-encoded works as well as JSON; the replay says duplicate
    status, body = await http.post("api/recharge.dspy", http.admin_key,
                                   data={"customer_id": "cust-1", "amount": "12.5", "request_id": "top-1"})
    assert status == 200 and body["duplicate"] is True
    status, body = await http.get("api/transactions.dspy", http.admin_key, customer_id="cust-1", page=1, rows=10)
    assert status == 200 and body["total"] == 1 and body["rows"][0]["amount"] == "12.500000"


async def test_accounting_over_http_and_replays(http):
    await _setup(http)
    status, body = await http.post("api/accounting.dspy", http.admin_key, json=usage("h1", user_id="u-1"))
    assert status == 200 and body["success"] and body["amount"] == CHAT_A_PRICE and body["duplicate"] is False
    status, again = await http.post("api/accounting.dspy", http.admin_key, json=usage("h1", user_id="u-1"))
    assert status == 200 and again["duplicate"] is True and again["record_id"] == body["record_id"]
    status, body = await http.post("api/accounting.dspy", http.admin_key, json=usage("h1", output_tokens=7))
    assert status == 409 and body["code"] == "conflict"
    status, body = await http.get("api/balance.dspy", http.admin_key, customer_id="cust-1")
    assert body["balance"] == "0.994000"


@pytest.mark.parametrize("payload,status,code", [
    ({"customer_id": "cust-1", "model_name": "chat-a"}, 400, "invalid_param"),                 # no request_id
    (usage("b1", input_tokens="-5"), 400, "invalid_param"),
    (usage("b2", input_tokens=1.5), 400, "invalid_param"),
    (usage("b3", model_name="unknown-model"), 404, "no_pricing"),
    (usage("b4", customer="ghost"), 404, "unknown_customer"),
    (usage("b5", input_tokens=10**9), 402, "insufficient_balance"),
])
async def test_accounting_errors_have_codes(http, payload, status, code):
    await _setup(http)
    got, body = await http.post("api/accounting.dspy", http.admin_key, json=payload)
    assert (got, body["success"], body["code"]) == (status, False, code), body
    assert body["message"]
    _, bal = await http.get("api/balance.dspy", http.admin_key, customer_id="cust-1")
    assert bal["balance"] == "1.000000"


async def test_money_input_is_exact_or_refused(http):
    await _setup(http, balance=None)
    for amount in (1.5, "1e3", "0.0000001", "NaN", "-1", "", True):
        status, body = await http.post("api/recharge.dspy", http.admin_key,
                                       json={"customer_id": "cust-1", "amount": amount, "request_id": f"bad-{amount}"})
        assert status == 400 and body["code"] == "invalid_param", (amount, body)
    async with http.core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from ledger_entry") == 0


async def test_customer_key_is_limited_to_its_customer(http):
    await _setup(http)
    key, _ = await http.core.apikeys.create("customer", customer_id="cust-1")
    status, body = await http.get("api/balance.dspy", key, customer_id="cust-1")
    assert status == 200 and body["balance"] == "1.000000"
    status, body = await http.get("api/balance.dspy", key, customer_id="cust-2")
    assert status == 403 and body["code"] == "forbidden"
    status, body = await http.post("api/recharge.dspy", key, json={"customer_id": "cust-1", "amount": "5", "request_id": "x"})
    assert status == 403 and body["code"] == "forbidden"
    status, body = await http.get("api/failed_accounting_list.dspy", key)
    assert status == 403
    status, body = await http.post("api/accounting.dspy", key, json=usage("own-1"))
    assert status == 200 and body["amount"] == CHAT_A_PRICE
    status, body = await http.post("api/accounting.dspy", key, json=usage("other-1", customer="cust-2"))
    assert status == 403


async def test_authorize_settle_release(http):
    await _setup(http, balance="10")
    status, hold = await http.post("api/authorize.dspy", http.admin_key,
                                   json={"customer_id": "cust-1", "amount": "4", "request_id": "auth-1"})
    assert status == 200 and hold["status"] == "open"
    # an estimate priced from usage fields
    status, est = await http.post("api/authorize.dspy", http.admin_key, json=usage("auth-2", input_tokens=1000000))
    assert status == 200 and est["amount"] == "2.004000"     # 1e6 x 2.0/1e6 + 500 x 8.0/1e6
    status, body = await http.post("api/authorize.dspy", http.admin_key,
                                   json={"customer_id": "cust-1", "amount": "4", "request_id": "auth-3"})   # 3.996 left
    assert status == 402 and body["code"] == "insufficient_balance"
    status, body = await http.post("api/settle.dspy", http.admin_key, json={"hold_id": hold["hold_id"], "amount": "1.25"})
    assert status == 200 and body["status"] == "settled" and body["entry"]["amount"] == "-1.250000"
    status, body = await http.post("api/release.dspy", http.admin_key, json={"request_id": "auth-2"})
    assert status == 200 and body["status"] == "released"
    _, bal = await http.get("api/balance.dspy", http.admin_key, customer_id="cust-1")
    assert bal["balance"] == "8.750000" and bal["held"] == "0.000000"
    status, body = await http.post("api/settle.dspy", http.admin_key, json={"request_id": "auth-2", "amount": "1"})
    assert status == 409


async def test_quote_pricing_users(http):
    await _setup(http)
    status, body = await http.get("api/quote.dspy", http.admin_key, **{k: str(v) for k, v in usage("q").items()})
    assert status == 200 and body["amount"] == CHAT_A_PRICE and body["version_id"] == "ppt-2026"
    assert len(body["lines"]) == 2
    status, body = await http.get("api/pricing.dspy", http.admin_key)
    assert status == 200 and {r["llmid"] for r in body["rows"]} == {"llm-a", "llm-flat", "llm-noprice"}
    chat = next(r for r in body["rows"] if r["llmid"] == "llm-a")
    assert chat["model_name"] == "chat-a" and chat["prices"]
    status, body = await http.get("api/users.dspy", http.admin_key, kind="org")
    assert status == 200 and body["total"] == 1 and body["rows"][0]["name"] == "Acme"


async def test_failed_accounting_endpoints(http):
    await _setup(http)
    status, _ = await http.post("api/accounting.dspy", http.admin_key, json=usage("f1", model_name="later-model"))
    assert status == 404
    status, body = await http.get("api/failed_accounting_list.dspy", http.admin_key, customer_id="cust-1",
                                  handled="0", start_date="2026-01-01", page=1, rows=5)
    assert status == 200 and body["total"] == 1
    row = body["rows"][0]
    assert row["failure_code"] == "no_pricing" and row["userorgid_text"] == "Acme"
    status, body = await http.post("api/failed_accounting_retry.dspy", http.admin_key, json={"id": row["id"]})
    assert status == 404 and body["code"] == "no_pricing"
    status, body = await http.post("api/failed_accounting_handle.dspy", http.admin_key, json={"id": row["id"]})
    assert status == 400
    status, body = await http.post("api/failed_accounting_handle.dspy", http.admin_key,
                                   json={"id": row["id"], "note": "model retired"})
    assert status == 200 and body["handled"] == "1" and body["handled_note"] == "model retired"
    status, body = await http.get("api/failed_accounting_list.dspy", http.admin_key, handled="1")
    assert body["total"] == 1
    status, body = await http.get("api/failed_accounting_list.dspy", http.admin_key, handled="maybe")
    assert status == 400


async def test_wrong_method_and_unknown_params_do_not_500(http):
    await _setup(http)
    r = await http.client.get("/billing_module/api/recharge.dspy", headers={"Authorization": f"Bearer {http.admin_key}"})
    assert r.status == 405 and (await r.json(content_type=None))["code"] == "method_not_allowed"
    status, body = await http.get("api/balance.dspy", http.admin_key, customer_id="x' or 1=1 --")
    assert status == 400
    status, body = await http.get("api/transactions.dspy", http.admin_key, page="abc")
    assert status == 400 and body["code"] == "invalid_param"
