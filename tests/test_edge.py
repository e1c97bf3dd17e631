"""Issue 12, the edges: each test sends what an attacker sent (items 0, 2, 4, 5, 8, 10, 12) to the
real server, the standalone host over HTTP (in-process on SQLite and MariaDB, or the real
``billing-module serve`` process)."""
import base64
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from aiohttp import ClientSession, CookieJar
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet
from ticket_auth import TicketFactory

from tests.test_standalone import _free_port, _get, _wait_until_serving

MIB = 1024 * 1024


# --- item 0: a session cookie minted with ahserver's port-derived key ------------------------------
def mint_ahserver_cookie(port, userid="admin", client_ip="127.0.0.1"):
    """An outsider's AIOHTTP_SESSION cookie: ahserver 1.2.0's secret is str(port) padded with a
    constant to 32 bytes, for the Fernet cookie and for the auth ticket inside it."""
    b = str(port).encode()
    secret = b + b"iqwertyuiopasdfghjklzxcvbnm12345"[:32 - len(b)]
    ticket = TicketFactory(secret).new(f"{userid}:{userid}:", valid_until=int(time.time()) + 3600,
                                       client_ip=client_ip)
    data = {"created": int(time.time()), "session": {"AUTH_TKT": ticket}}
    return Fernet(base64.urlsafe_b64encode(secret)).encrypt(json.dumps(data).encode()).decode()


async def test_the_minted_cookie_is_what_ahserver_defaults_accept(tmp_path):
    """The attack works on a host that keeps ahserver's defaults (so the refusals below refuse a
    real forgery, not a malformed cookie)."""
    from ahserver.configuredServer import ConfiguredServer

    from billing_module.server import reset_host_singletons
    (tmp_path / "conf").mkdir()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "whoami.dspy").write_text("return {'user': await get_user()}\n")
    port = _free_port()
    (tmp_path / "conf" / "config.json").write_text(json.dumps({
        "password_key": "k" * 16, "website": {"paths": [[str(tmp_path / "www"), ""]], "port": port,
                                              "processors": [[".dspy", "dspy"]]}}))
    reset_host_singletons()
    try:
        server = ConfiguredServer(workdir=str(tmp_path))
        server.configPath(server.config)
        app = await server.build_app()
        test_server = TestServer(app, host="127.0.0.1", port=port)
        await test_server.start_server()
        try:
            async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as s:
                r = await s.get(test_server.make_url("/whoami.dspy"),
                                headers={"Cookie": f"AIOHTTP_SESSION={mint_ahserver_cookie(port)}"})
                assert (await r.json(content_type=None)) == {"user": "admin"}
        finally:
            await test_server.close()
    finally:
        reset_host_singletons()


def _serve(tmp_path, port, *extra, env=None):
    env = dict(os.environ if env is None else env)
    env.pop("BILLING_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "billing_module.cli", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_forged_session_cookie_is_refused_by_the_standalone_server(tmp_path):
    port = _free_port()
    proc = _serve(tmp_path, port, "--demo")
    base = f"http://127.0.0.1:{port}/billing_module"
    try:
        _wait_until_serving(base, proc)
        forged = {"Cookie": f"AIOHTTP_SESSION={mint_ahserver_cookie(port)}"}
        status, body = _get(f"{base}/api/balances.dspy", forged)
        assert status == 401 and body["code"] == "unauthorized"
        req = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        req.request("GET", "/billing_module/index.ui", headers=forged)
        assert req.getresponse().status == 401
        req.close()
    finally:
        _stop(proc)
    # its own secret: random, at least 32 bytes, kept 0600 in the data dir
    secret_file = tmp_path / ".session_secret"
    assert len(secret_file.read_text().strip()) >= 32
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


# --- item 2: body size ------------------------------------------------------------------------------
def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _post_big(port, path, size, chunked):
    """Send ``size`` bytes without credentials; the reply's status and JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/json")
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
    else:
        conn.putheader("Content-Length", str(size))
    conn.endheaders()
    block, sent = b"x" * MIB, 0
    try:
        while sent < size:
            conn.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            sent += len(block)
        if chunked:
            conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass    # the server answered and closed before the whole body was sent
    r = conn.getresponse()
    try:
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_a_50_mb_body_without_credentials_is_413_and_never_buffered(tmp_path):
    port = _free_port()
    proc = _serve(tmp_path, port)
    base = f"http://127.0.0.1:{port}/billing_module"
    try:
        _wait_until_serving(base, proc)
        rss_before = _rss_kib(proc.pid)
        for chunked in (False, True):
            status, body = _post_big(port, "/billing_module/api/recharge.dspy", 50 * MIB, chunked)
            assert status == 413 and body["code"] == "payload_too_large", (chunked, body)
        grown_mib = (_rss_kib(proc.pid) - rss_before) / 1024
        assert grown_mib < 16, f"the server grew by {grown_mib:.0f} MiB for two refused 50 MiB bodies"
        # a body under the limit still reaches authentication
        status, body = _get(f"{base}/api/recharge.dspy", data=b"{}", headers={"Content-Type": "application/json"})
        assert status == 401
    finally:
        _stop(proc)


@pytest.fixture
def big_batch_config(tmp_path):
    from tests.conftest import make_config
    return make_config(tmp_path, server={"max_body_bytes": 4096,
                                         "max_body_bytes_by_path": {"/billing_module/api/recharge.dspy": 2 * MIB}})


async def test_the_body_limit_has_per_path_exceptions(big_batch_config, db_desc, tmp_path, mysql_database):
    async with _standalone(big_batch_config, db_desc, tmp_path, mysql_database) as h:
        body = json.dumps({"customer_id": "c1", "amount": "1", "request_id": "r", "pad": "x" * MIB})
        r = await h.client.post("/billing_module/api/refund.dspy", data=body)
        assert r.status == 413 and (await r.json(content_type=None))["code"] == "payload_too_large"
        r = await h.client.post("/billing_module/api/recharge.dspy", data=body)
        assert r.status == 401     # within its own limit: on to authentication


class _standalone:
    """The standalone host in-process (like conftest's ``http`` fixture, for a given config)."""

    def __init__(self, config, db_desc, tmp_path, mysql_database):
        self.args = config, db_desc, tmp_path, mysql_database

    async def __aenter__(self):
        from billing_module.server import build_app
        from tests.conftest import Http, _mark_ready
        config, db_desc, tmp_path, mysql_database = self.args
        app, core = await build_app(config, str(tmp_path / "host"), db_desc=db_desc, background=False)
        _mark_ready(db_desc, mysql_database)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        from aiohttp.test_utils import TestClient
        client = TestClient(self.server, cookie_jar=CookieJar(unsafe=True))
        self.h = Http(client, core, app)
        self.h.admin_key, _ = await core.apikeys.create("admin", name="test admin")
        return self.h

    async def __aexit__(self, *exc):
        from billing_module.server import close_host_pools, reset_host_singletons
        await self.h.client.close()
        await close_host_pools()
        reset_host_singletons()


# --- item 4: CSRF on every state-changing path -----------------------------------------------------------
def origin(http):
    return str(http.client.make_url("/")).rstrip("/")


def own(http, path="/billing_module/index.ui"):
    return str(http.client.make_url(path))


async def login(http, headers=None):
    r = await http.client.post("/billing_module/login.dspy", headers=headers or {"Origin": origin(http)},
                               data={"username": "admin", "password": http.core.admin_password})
    assert r.status == 200, await r.text()
    return r


async def appcodes_ids(http):
    async with http.core.db.read() as tx:
        return {r.id for r in await tx.select("select id from appcodes")}


async def test_generated_crud_is_post_only_and_same_origin_only(http):
    await login(http)
    async with http.core.db.transaction() as tx:
        await tx.insert("appcodes", {"id": "victim", "name": "victim", "hierarchy_flg": "0"})
    before = await appcodes_ids(http)
    crud = "/billing_module/appcodes/"
    evil = {"Referer": "https://evil.example/page.html"}
    # GET never writes
    for name in ("delete_appcodes.dspy?id=victim", "update_appcodes.dspy?id=victim&name=x",
                 "add_appcodes.dspy?id=new1&name=x"):
        r = await http.client.get(crud + name, headers=evil)
        assert r.status == 405, (name, await r.text())
    # a cross-site POST, a POST from an opaque origin and a session POST with no origin at all
    for headers in (evil, {"Origin": "https://evil.example"}, {"Origin": "null"}, {}):
        r = await http.client.post(crud + "delete_appcodes.dspy", data={"id": "victim"}, headers=headers)
        assert r.status == 403, (headers, await r.text())
        r = await http.client.post(crud + "add_appcodes.dspy", data={"id": "new1", "name": "x"}, headers=headers)
        assert r.status == 403
    assert await appcodes_ids(http) == before
    # the server's own page may
    r = await http.client.post(crud + "delete_appcodes.dspy", data={"id": "victim"},
                               headers={"Referer": own(http, crud + "index.ui")})
    assert r.status == 200 and "victim" not in await appcodes_ids(http)


async def test_api_writes_and_logout_need_post_and_x_forwarded_host_counts_only_behind_a_proxy(http):
    await login(http)
    body = {"customer_id": "c1", "amount": "5", "request_id": "fwd-1"}
    spoofed = {"Origin": "https://evil.example", "X-Forwarded-Host": "evil.example"}
    r = await http.client.post("/billing_module/api/recharge.dspy", json=body, headers=spoofed)
    assert r.status == 403
    r = await http.client.get("/billing_module/api/recharge.dspy", params=body, headers={"Referer": own(http)})
    assert r.status == 405
    r = await http.client.get("/billing_module/logout.dspy")
    assert r.status == 405
    async with http.core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from ledger_entry") == 0
    http.core.config.server["behind_proxy"] = True
    try:
        r = await http.client.post("/billing_module/api/recharge.dspy", json=body, headers=spoofed)
        assert r.status == 200, await r.text()
    finally:
        http.core.config.server["behind_proxy"] = False


# --- item 5: logout ends the session on the server ---------------------------------------------------
async def test_logout_ends_the_session_on_the_server(http):
    r = await login(http)
    cookie = r.cookies["AIOHTTP_SESSION"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and not cookie["secure"]
    assert int(cookie["max-age"]) == http.core.config.server.session_lifetime_seconds
    old = cookie.value
    status, _ = await http.get("api/balances.dspy")
    assert status == 200
    r = await http.client.post("/billing_module/logout.dspy", headers={"Origin": origin(http)})
    assert r.status == 200
    # the old cookie, replayed by whoever kept it, names no session any more
    async with ClientSession() as s:
        r = await s.get(http.client.make_url("/billing_module/api/balances.dspy"),
                        headers={"Cookie": f"AIOHTTP_SESSION={old}"})
        assert r.status == 401
        r = await s.get(http.client.make_url("/billing_module/index.ui"), headers={"Cookie": f"AIOHTTP_SESSION={old}"})
        assert r.status == 401
    async with http.core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from web_session") == 0


async def test_a_session_ends_on_the_server_after_its_lifetime(http, fixed_clock):
    await login(http)
    status, _ = await http.get("api/balances.dspy")
    assert status == 200
    fixed_clock.advance(http.core.config.server.session_lifetime_seconds + 1)
    status, _ = await http.get("api/balances.dspy")
    assert status == 401


async def test_the_session_cookie_is_secure_under_https_behind_a_proxy(http):
    http.core.config.server["behind_proxy"] = True
    try:
        r = await login(http, headers={"X-Forwarded-Proto": "https", "Origin": origin(http)})
        assert r.cookies["AIOHTTP_SESSION"]["secure"]
    finally:
        http.core.config.server["behind_proxy"] = False


# --- item 8: secrets on disk ----------------------------------------------------------------------------
def test_secret_files_are_0600_and_the_database_password_is_not_in_clear(tmp_path):
    from appPublic.aes import aes_decode_b64

    from billing_module.db.database import mysql_desc
    from billing_module.server import write_host_workdir
    from tests.conftest import make_config
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.json").write_text("{}")
    (tmp_path / ".password_key").write_text("an-older-key-left-readable\n")
    for name in ("conf/config.json", ".password_key"):
        os.chmod(tmp_path / name, 0o644)             # as an older version left them
    written = write_host_workdir(make_config(tmp_path), str(tmp_path),
                                 mysql_desc("db.example", 3306, "billing", "Sup3r-Secret", "billing"))
    text = (conf / "config.json").read_text()
    assert "Sup3r-Secret" not in text and "plain_password" not in text
    kwargs = json.loads(text)["databases"]["billing"]["kwargs"]
    assert aes_decode_b64(written["password_key"], kwargs["password"]) == "Sup3r-Secret"   # what sqlor does
    for name in ("conf/config.json", ".password_key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


async def test_every_secret_file_of_a_running_host_is_0600(http):
    data_dir = http.core.data_dir
    for name in ("conf/config.json", ".password_key", ".session_secret", ".secret_key", ".admin_password"):
        assert stat.S_IMODE(os.stat(os.path.join(data_dir, name)).st_mode) == 0o600, name


# --- item 10: login throttling and origin ------------------------------------------------------------------
async def _try_login(http, user, password, same_site=True):
    headers = {"Origin": origin(http) if same_site else "https://evil.example"}
    r = await http.client.post("/billing_module/login.dspy", data={"username": user, "password": password},
                               headers=headers)
    return r.status, await r.json(content_type=None), r.headers


async def test_login_is_throttled_per_user_and_per_address(http):
    limit = http.core.config.server.login_max_failures
    for _ in range(limit):
        status, body, _ = await _try_login(http, "admin", "wrong")
        assert status == 401
    status, body, headers = await _try_login(http, "admin", "wrong")
    assert status == 429 and body["code"] == "too_many_attempts"
    assert int(headers["Retry-After"]) >= http.core.config.server.login_backoff_seconds - 1
    # locked: the right password does not get through either
    status, body, _ = await _try_login(http, "admin", http.core.admin_password)
    assert status == 429
    # the address is locked too, whatever user name it tries next
    status, _, _ = await _try_login(http, "someone-else", "x")
    assert status == 429


async def test_the_backoff_doubles(http, monkeypatch):
    import billing_module.throttle as throttle
    now = [1000.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    t = throttle.LoginThrottle(http.core.config.server)
    keys = t.keys("admin", "10.0.0.1")
    base = http.core.config.server.login_backoff_seconds
    for _ in range(http.core.config.server.login_max_failures):
        t.failed(keys)
    waits = []
    for _ in range(3):
        with pytest.raises(Exception) as e:
            t.check(keys)
        waits.append(e.value.details["retry_after_seconds"])
        now[0] += waits[-1]
        t.check(keys)                 # the lock is over
        t.failed(keys)                # and the next failure locks twice as long
    assert waits == [base, 2 * base, 4 * base]


async def test_login_from_a_foreign_origin_is_refused(http):
    status, body, _ = await _try_login(http, "admin", http.core.admin_password, same_site=False)
    assert status == 403 and body["code"] == "forbidden"


# --- item 12: database unavailable, and no plain-text 500 ------------------------------------------------------
def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]        # nothing listens there once the socket is closed


async def test_database_unavailable_is_503_with_retry_after(http, tmp_path):
    from billing_module.db.database import mysql_desc, sqlite_desc
    core = http.core
    await login(http)
    kept_desc = core._db_desc
    unreachable = (sqlite_desc(str(tmp_path / "no-such-dir" / "billing.db")) if core.db.dialect == "sqlite"
                   else mysql_desc("127.0.0.1", _closed_port(), "root", "", "billing"))
    await core.close()
    core._db_desc = unreachable
    assert core.db.desc == unreachable           # the services are built again on it
    try:
        status, body = await http.get("api/balance.dspy", key=http.admin_key, customer_id="c1")
        assert status == 503 and body["code"] == "database_unavailable", body
        r = await http.client.get("/billing_module/api/balance.dspy", params={"customer_id": "c1"},
                                  headers={"Authorization": f"Bearer {http.admin_key}"})
        assert int(r.headers["Retry-After"]) > 0
    finally:
        await core.close()
        core._db_desc = kept_desc
        assert core.db.desc == kept_desc


@pytest.mark.parametrize("path, status, kind", [
    ("/billing_module/sync/nope.dspy", 404, "json"),
    ("/billing_module/nope.dspy", 404, "json"),
    ("/billing_module/login_nope.dspy", 404, "json"),
    ("/billing_module/loginx", 404, "html"),
    ("/billing_module/missing.css", 404, "html"),
    ("/billing_module/appcodes/missing.js", 404, "html"),
    ("/billing_module/appcodes/", 200, "html"),     # a page: without bricks, the page saying how to set it up
])
async def test_unknown_paths_answer_404_not_a_plain_500(http, path, status, kind):
    await login(http)
    r = await http.client.get(path)
    text = await r.text()
    assert r.status == status, text
    if kind == "json":
        assert json.loads(text)["code"] == "not_found"
    else:
        assert r.headers["Content-Type"].startswith("text/html") and "<html>" in text


async def test_crud_delete_without_id_is_400_and_pages_never_500(http):
    await login(http)
    r = await http.client.post("/billing_module/appcodes/delete_appcodes.dspy", data={},
                               headers={"Origin": origin(http)})
    assert r.status == 400, await r.text()
    # a full-page .ui request (no _webbricks_): bricks templates may be missing, never a 500
    r = await http.client.get("/billing_module/index.ui")
    assert r.status in (200, 404) and r.headers["Content-Type"].startswith("text/html"), await r.text()


async def test_a_multipart_login_still_works_after_the_body_check(http):
    """The guard reads the body to bound it and hands it on: ahserver's multipart reader (the
    bricks client posts forms as multipart) still sees every field."""
    import aiohttp
    with aiohttp.MultipartWriter("form-data") as mp:
        for name, value in (("username", "admin"), ("password", http.core.admin_password)):
            mp.append(value).set_content_disposition("form-data", name=name)
    r = await http.client.post("/billing_module/login.dspy", data=mp, headers={"Origin": origin(http)})
    assert r.status == 200, await r.text()
    status, _ = await http.get("api/balances.dspy")
    assert status == 200
