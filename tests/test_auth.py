"""uapi_sign / dapi_auth: the signature, secrets at rest, and signed requests over real HTTP
(standalone host) refused with clear codes and nothing changed; on SQLite and MariaDB."""
import hashlib
import hmac
import json
import os
import stat

import pytest

from billing_module import api, auth
from billing_module.apikeys import AppCredentials
from billing_module.auth import SecretBox, load_secret_key
from billing_module.errors import InvalidParam, Unauthorized
from tests.conftest import make_config

PATH = "/billing_module/sync/users.dspy"


# --- the signature --------------------------------------------------------------------------------
def test_signature_known_answer():
    text = "\n".join(["BILLING-HMAC-SHA256", "GET", PATH, "limit=500&since=0", hashlib.sha256(b"").hexdigest(),
                      "1700000000", "n" * 16, "ak_x"])
    expected = hmac.new(b"s3cret", text.encode(), hashlib.sha256).hexdigest()
    headers = auth.sign_request("ak_x", "s3cret", "get", PATH, [("since", "0"), ("limit", 500)], b"",
                                timestamp=1700000000, nonce="n" * 16)
    assert headers == {"X-Billing-AppKey": "ak_x", "X-Billing-Timestamp": "1700000000",
                       "X-Billing-Nonce": "n" * 16, "X-Billing-Signature": expected}


def test_canonical_forms():
    assert auth.canonical_query([("b", "2"), ("a", "x y"), ("a", "1"), ("ü", "/")]) == "a=1&a=x%20y&b=2&%C3%BC=%2F"
    a = auth.string_to_sign("POST", "/a b/c", [("x", "1")], b'{"k": 1}', 1, "n" * 16, "k")
    assert a.split("\n")[2] == "/a%20b/c" and a.split("\n")[4] == hashlib.sha256(b'{"k": 1}').hexdigest()
    # every part is covered
    base = dict(method="POST", path="/p", query_pairs=[("x", "1")], body=b"{}", timestamp=1, nonce="n" * 16,
                app_key="k")
    sig = auth.signature("s", auth.string_to_sign(**base))
    for field, other in [("method", "GET"), ("path", "/q"), ("query_pairs", [("x", "2")]), ("body", b"[]"),
                         ("timestamp", 2), ("nonce", "m" * 16), ("app_key", "j")]:
        assert auth.signature("s", auth.string_to_sign(**dict(base, **{field: other}))) != sig, field


def test_reply_signature_binds_status_nonce_and_body(fixed_clock):
    body, nonce = b'{"entity": "users"}', "a" * 32
    headers = auth.sign_reply("s", 200, nonce, body)
    assert auth.reply_problem("s", 200, headers, body, nonce, 300) is None
    assert auth.reply_problem("s", 200, headers, body + b" ", nonce, 300) == "bad reply signature"
    assert auth.reply_problem("s", 201, headers, body, nonce, 300) == "bad reply signature"
    assert auth.reply_problem("t", 200, headers, body, nonce, 300) == "bad reply signature"
    assert auth.reply_problem("s", 200, headers, body, "b" * 32, 300) == "reply is for another request (nonce differs)"
    assert auth.reply_problem("s", 200, {}, body, nonce, 300) == "reply is not signed"
    fixed_clock.advance(301)
    assert auth.reply_problem("s", 200, headers, body, nonce, 300) == "reply signature expired"


def test_secrets_at_rest(tmp_path):
    cfg = make_config(tmp_path)
    box = SecretBox(cfg, str(tmp_path / "data"))
    token = box.encrypt("my secret")
    assert "my secret" not in token and box.decrypt(token) == "my secret"
    path = tmp_path / "data" / ".secret_key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret_key(cfg, str(tmp_path / "data")) == path.read_text().strip()   # generated once
    other = make_config(tmp_path, auth={"secret_key": "configured elsewhere"})
    assert load_secret_key(other, str(tmp_path / "data")) == "configured elsewhere"
    with pytest.raises(ValueError, match="was auth.secret_key changed"):
        SecretBox(other, str(tmp_path / "data")).decrypt(token)


# --- keys -----------------------------------------------------------------------------------------
async def test_signed_keys_are_shown_once_and_stored_encrypted(core):
    creds, row = await core.apikeys.create("app", signed=True, name="edge-1", allowed_ips="127.0.0.1")
    assert isinstance(creds, AppCredentials) and creds.app_key.startswith("ak_") and len(creds.secret) >= 40
    assert "secret_enc" not in row and row["app_id"] == creds.app_key
    async with core.db.read() as tx:
        stored = await tx.one("select * from api_key where id = ${i}$", {"i": row["id"]})
    assert creds.secret not in stored.secret_enc and core.auth.secret_box.decrypt(stored.secret_enc) == creds.secret
    assert stored.key_hash == hashlib.sha256(creds.app_key.encode()).hexdigest()
    listed = [r for r in await core.apikeys.list() if r.id == row["id"]][0]
    assert listed.app_id == creds.app_key and "secret_enc" not in listed
    with pytest.raises(Unauthorized, match="not a Bearer key"):
        await core.apikeys.verify(creds.app_key)
    with pytest.raises(InvalidParam, match="signed=True"):
        await core.apikeys.create("app")


async def test_old_nonces_are_purged(core, fixed_clock):
    async with core.db.transaction() as tx:
        for i, seen in enumerate(["2026-11-22 11:49:59", "2026-11-22 11:50:01", "2026-11-22 12:00:00"]):
            await tx.insert("api_nonce", {"id": f"n{i}", "nonce": f"{i:016d}", "app_key": "ak", "seen_at": seen})
    assert await core.auth.purge_nonces() == 1          # older than 2 x 300 s
    assert core.auth.background_jobs()[0][0] == "nonce-purge"
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from api_nonce") == 2


# --- over HTTP ------------------------------------------------------------------------------------
@pytest.fixture
def signed_http(request, monkeypatch, db_desc):
    """The standalone host wired as the lead will: signed requests accepted by the API's
    authenticate(), the sync pages open to signed callers."""
    import billing_module.server as server
    make = server.make_auth_class

    def make_auth_class():
        cls = make()
        check = cls.checkUserPermission

        async def permitted(self, req, user, path):
            return path.startswith("/billing_module/sync/") or await check(self, req, user, path)
        cls.checkUserPermission = permitted
        return cls
    monkeypatch.setattr(server, "make_auth_class", make_auth_class)
    plain = api.authenticate

    async def authenticate(core, req):
        if auth.is_signed(req):
            return await api.signed_caller(core, req)
        return await plain(core, req)
    monkeypatch.setattr(api, "authenticate", authenticate)
    http = request.getfixturevalue("http")
    return http


async def send(http, creds, method="GET", path=PATH, params=None, json_body=None, secret=None, sent_params=None,
               **sign):
    body = json.dumps(json_body).encode() if json_body is not None else b""
    headers = auth.sign_request(creds.app_key, secret or creds.secret, method, path, list((params or {}).items()),
                                body, **sign)
    if body:
        headers["Content-Type"] = "application/json"
    r = await http.client.request(method, path, params=sent_params or params, data=body or None, headers=headers)
    return r.status, await r.json(content_type=None)


async def nonce_count(core):
    async with core.db.read() as tx:
        return await tx.scalar("select count(*) as n from api_nonce")


async def test_signed_export_request_and_its_signed_reply(signed_http):
    http = signed_http
    await http.core.catalog.put("users", [{"id": "org-1", "kind": "org", "name": "Acme"}])
    creds, _ = await http.core.apikeys.create("app", signed=True, allowed_ips="127.0.0.1, 10.0.0.1")
    headers = auth.sign_request(creds.app_key, creds.secret, "GET", PATH, [("since", "0")])
    r = await http.client.get(PATH, params={"since": "0"}, headers=headers)
    body = await r.read()
    assert r.status == 200, body
    assert auth.reply_problem(creds.secret, 200, r.headers, body, headers["X-Billing-Nonce"], 300) is None
    page = json.loads(body)
    assert page["entity"] == "users" and [i["id"] for i in page["items"]] == ["org-1"] and page["version"] == "1"
    assert await nonce_count(http.core) == 1


@pytest.mark.parametrize("case,status,message", [
    ("no headers", 401, "missing signature headers: X-Billing-AppKey"),
    ("unknown key", 401, "unknown app key"),
    ("expired key", 401, "app key expired"),
    ("revoked key", 401, "app key revoked"),
    ("wrong secret", 401, "bad signature"),
    ("query changed after signing", 401, "bad signature"),
    ("old timestamp", 401, "signature expired: timestamp is 30"),
    ("future timestamp", 401, "signature expired"),
    ("short nonce", 401, "X-Billing-Nonce must be 16-64 characters"),
    ("ip not allowed", 403, "app key not allowed from 127.0.0.1"),
    ("customer key", 403, "the sync export needs an app or admin key"),
])
async def test_refused_signed_requests_change_nothing(signed_http, case, status, message):
    http = signed_http
    keys = http.core.apikeys
    creds, row = await keys.create("app", signed=True)
    kw = {}
    if case == "no headers":
        r = await http.client.get(PATH)
        got, body = r.status, await r.json(content_type=None)
    else:
        if case == "unknown key":
            creds = AppCredentials("ak_ffffffff_" + "0" * 24, creds.secret)
        elif case == "expired key":
            creds, _ = await keys.create("app", signed=True, expires_at="2020-01-01 00:00:00")
        elif case == "revoked key":
            await keys.revoke(row["id"])
        elif case == "wrong secret":
            kw["secret"] = "not-the-secret"
        elif case == "query changed after signing":
            kw["sent_params"] = {"since": "5"}
        elif case == "old timestamp":
            kw["timestamp"] = auth.unix_now() - 301
        elif case == "future timestamp":
            kw["timestamp"] = auth.unix_now() + 400
        elif case == "short nonce":
            kw["nonce"] = "abc"
        elif case == "ip not allowed":
            creds, _ = await keys.create("app", signed=True, allowed_ips="10.9.8.7")
        elif case == "customer key":
            creds, _ = await keys.create("customer", customer_id="org-1", signed=True)
        before = await nonce_count(http.core)
        got, body = await send(http, creds, params={"since": "0"}, **kw)
        if case != "customer key":      # a refused key never gets as far as using its nonce
            assert await nonce_count(http.core) == before
    assert got == status and body["success"] is False, body
    assert body["code"] == ("unauthorized" if status == 401 else "forbidden")
    assert message in body["message"], body


async def test_replayed_nonce(signed_http):
    http = signed_http
    creds, _ = await http.core.apikeys.create("app", signed=True)
    sign = {"timestamp": auth.unix_now(), "nonce": "Replay-Me-0123456789"}
    assert (await send(http, creds, params={"since": "0"}, **sign))[0] == 200
    got, body = await send(http, creds, params={"since": "0"}, **sign)
    assert (got, body["code"], body["message"]) == (401, "unauthorized", "nonce replayed")
    # nonces compare case-insensitively (the same on both databases)
    got, body = await send(http, creds, params={"since": "0"}, timestamp=sign["timestamp"],
                           nonce=sign["nonce"].upper())
    assert (got, body["message"]) == (401, "nonce replayed")
    assert await nonce_count(http.core) == 1


async def test_signed_api_calls_and_nothing_changed_when_refused(signed_http):
    http = signed_http
    admin, _ = await http.core.apikeys.create("admin", signed=True)
    customer, _ = await http.core.apikeys.create("customer", customer_id="cust-1", signed=True)
    top_up = {"customer_id": "cust-1", "amount": "5", "request_id": "signed-1"}
    got, body = await send(http, admin, "POST", "/billing_module/api/recharge.dspy", json_body=top_up)
    assert got == 200 and body["success"], body
    # a body changed after signing, a customer key on an admin endpoint: refused, balance unchanged
    got, body = await send(http, admin, "POST", "/billing_module/api/recharge.dspy",
                           json_body=dict(top_up, request_id="signed-2"), secret="wrong")
    assert (got, body["code"], body["message"]) == (401, "unauthorized", "bad signature")
    got, body = await send(http, customer, "POST", "/billing_module/api/recharge.dspy",
                           json_body=dict(top_up, request_id="signed-3"))
    assert (got, body["code"]) == (403, "forbidden")
    got, body = await send(http, customer, "GET", "/billing_module/api/balance.dspy", params={"customer_id": "cust-1"})
    assert got == 200 and body["balance"] == "5.000000"
    got, body = await send(http, customer, "GET", "/billing_module/api/balance.dspy", params={"customer_id": "other"})
    assert got == 403
    # Bearer keys keep working beside signatures
    status, body = await http.get("api/balance.dspy", http.admin_key, customer_id="cust-1")
    assert status == 200 and body["balance"] == "5.000000"
