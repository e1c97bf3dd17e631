"""The native routes (``/billing_module/fast/<name>``) answer exactly what the ``.dspy`` paths
answer, for a table of requests, on both databases; the request guard applies to them too."""
import pytest

from billing_module.api.native import FAST_ENDPOINTS
from tests.helpers import seed_pricing, usage

# what two requests that differ only in their path still differ in: generated ids and times
VOLATILE = {"record_id", "hold_id", "ledger_entry_id", "id", "entry_id", "created_at", "updated_at",
            "expires_at", "accounted_at", "settled_at", "released_at", "use_time",
            "balance_after"}   # the two paths' writes interleave: each sees the other's before it


def _normal(value, suffix):
    if isinstance(value, dict):
        return {k: ("<volatile>" if k in VOLATILE else _normal(v, suffix)) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v, suffix) for v in value]
    if isinstance(value, str):
        return value.replace(suffix, "<rid>")
    return value


# (method, endpoint, how the parameters are sent, parameters, key); "{s}" is the request id
# suffix that keeps the two paths' requests apart
TABLE = [
    ("POST", "accounting", "json", usage("acc{s}"), "admin"),
    ("POST", "accounting", "json", usage("acc{s}"), "admin"),                          # replay
    ("POST", "accounting", "json", usage("acc{s}", output_tokens=7), "admin"),         # conflict
    ("POST", "accounting", "form", usage("form{s}"), "admin"),
    ("POST", "accounting", "json", usage("neg{s}", input_tokens="-5"), "admin"),
    ("POST", "accounting", "json", usage("nop{s}", model_name="unknown-model"), "admin"),
    ("POST", "accounting", "json", usage("gho{s}", customer="ghost"), "admin"),
    ("POST", "accounting", "json", usage("big{s}", input_tokens=10**9), "admin"),
    ("POST", "accounting", "json", usage("cus{s}"), "customer"),
    ("POST", "accounting", "json", usage("oth{s}", customer="cust-2"), "customer"),
    ("POST", "accounting", "json", usage("nok{s}"), None),
    ("POST", "accounting", "json", [usage("arr{s}")], "admin"),                        # not an object
    ("POST", "accounting", "raw", "not json", "admin"),
    ("GET", "accounting", "query", usage("get{s}"), "admin"),                          # a write: 405
    ("PUT", "accounting", "json", usage("put{s}"), "admin"),
    ("POST", "accounting_batch", "json", {"events": [usage("b1{s}"), usage("b2{s}", customer="ghost")]}, "admin"),
    ("POST", "accounting_batch", "json", {"events": [usage("b3{s}")], "mode": "queue"}, "customer"),
    ("POST", "authorize", "json", {"customer_id": "cust-1", "amount": "0.5", "request_id": "h1{s}"}, "admin"),
    ("POST", "authorize", "json", {"customer_id": "cust-1", "amount": "0.5", "request_id": "h1{s}"}, "admin"),
    ("POST", "authorize", "json", usage("h2{s}"), "customer"),
    ("POST", "authorize", "json", {"customer_id": "cust-1", "amount": "500", "request_id": "h3{s}"}, "admin"),
    ("POST", "settle", "json", {"request_id": "h1{s}", "amount": "0.25"}, "admin"),
    ("POST", "settle", "json", {"request_id": "h1{s}", "amount": "0.25"}, "admin"),
    ("POST", "settle", "json", {"amount": "0.25"}, "admin"),
    ("POST", "release", "json", {"request_id": "h2@cust-1{s}"}, "admin"),
    ("POST", "release", "json", {"request_id": "nothing{s}"}, "admin"),
    ("GET", "balance", "query", {"customer_id": "cust-1"}, "admin"),
    ("GET", "balance", "query", {"customer_id": "cust-2"}, "customer"),
    ("GET", "balance", "query", {}, "admin"),
    ("GET", "quote", "query", usage("q{s}"), "customer"),
    ("POST", "quote", "json", usage("q{s}", model_name="unknown-model"), "admin"),
]


async def _send(http, key, method, path, how, params, suffix):
    if how == "raw":
        body = params
    else:
        body = _normal_in(params, suffix)
    kw = {"headers": {"Authorization": f"Bearer {key}"} if key else {}}
    if how == "json":
        kw["json"] = body
    elif how == "form":
        kw["data"] = {k: str(v) for k, v in body.items()}
    elif how == "query":
        kw["params"] = {k: str(v) for k, v in body.items()}
    else:
        kw["data"] = body
    r = await http.client.request(method, path, **kw)
    return r.status, await r.json(content_type=None)


def _normal_in(value, suffix):
    if isinstance(value, dict):
        return {k: _normal_in(v, suffix) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal_in(v, suffix) for v in value]
    return value.replace("{s}", suffix) if isinstance(value, str) else value


async def test_native_routes_answer_as_the_dspy_paths(http):
    await seed_pricing(http.core)
    status, _ = await http.post("api/recharge.dspy", http.admin_key,
                                json={"customer_id": "cust-1", "amount": "10", "request_id": "top"})
    assert status == 200
    keys = {"admin": http.admin_key, None: None}
    keys["customer"], _ = await http.core.apikeys.create("customer", customer_id="cust-1")
    covered = set()
    for method, name, how, params, who in TABLE:
        dspy = await _send(http, keys[who], method, f"/billing_module/api/{name}.dspy", how, params, "-d")
        fast = await _send(http, keys[who], method, f"/billing_module/fast/{name}", how, params, "-f")
        assert fast[0] == dspy[0] and _normal(fast[1], "-f") == _normal(dspy[1], "-d"), (method, name, dspy, fast)
        covered.add(name)
    assert covered == set(FAST_ENDPOINTS)
    # each path stored the same: as many records, ledger entries and holds under its own ids
    async with http.core.db.read() as tx:
        for table in ("accounting_records", "ledger_entry", "billing_hold"):
            n = {s: await tx.scalar(f"select count(*) as n from {table} where request_id like '%{s}%'")
                 for s in ("-d", "-f")}
            assert n["-d"] == n["-f"] > 0, (table, n)


@pytest.mark.parametrize("name", ["accounting", "settle"])
async def test_the_guard_applies_to_native_routes(http, name):
    # a cross-site write with a session-less browser request is refused before any handler
    r = await http.client.post(f"/billing_module/fast/{name}", json={}, headers={"Origin": "http://evil.example"})
    assert r.status == 403 and (await r.json())["code"] == "forbidden"
    http.core.config.server.max_body_bytes = 1024
    r = await http.client.post(f"/billing_module/fast/{name}", json={"x": "y" * 2000},
                               headers={"Authorization": f"Bearer {http.admin_key}"})
    assert r.status == 413 and (await r.json())["code"] == "payload_too_large"


async def test_an_unknown_native_name_is_not_found(http):
    r = await http.client.post("/billing_module/fast/recharge", json={},
                               headers={"Authorization": f"Bearer {http.admin_key}"})
    assert r.status == 404 and (await r.json(content_type=None))["code"] == "not_found"
