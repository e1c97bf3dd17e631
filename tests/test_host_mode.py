"""The module inside a host the platform's way: load_billing_module() from the host's init(),
before ahserver builds DBPools; the database comes from the host's get_module_dbname."""
import json
import os

import aiohttp
from aiohttp import CookieJar
from aiohttp.test_utils import TestClient, TestServer

from billing_module.resources import resource_dir
from billing_module.server import reset_host_singletons

WWWROOT = str(resource_dir("wwwroot"))


async def test_load_from_host_init_uses_the_hosts_database(tmp_path, db_desc, caplog):
    from ahserver.configuredServer import ConfiguredServer, cleanupctx_coros
    from ahserver.serverenv import ServerEnv
    from sqlor.dbpools import DBPools

    from billing_module import load_billing_module
    from billing_module.db.schema import create_schema

    workdir = tmp_path / "sage"
    (workdir / "conf").mkdir(parents=True)
    (workdir / "wwwroot").mkdir()
    os.symlink(WWWROOT, workdir / "wwwroot" / "billing_module")     # the module mount rule
    # stands in for the host's (rbac) login page
    (workdir / "wwwroot" / "host_login.dspy").write_text(
        "await remember_user('op-1', username='operator', userorgid='0')\nreturn {'ok': True}\n")
    (workdir / "conf" / "config.json").write_text(json.dumps({
        "password_key": "k" * 16,
        "databases": {"sage": dict(db_desc, dbname="sage")},
        "website": {"paths": [[str(workdir / "wwwroot"), ""]], "port": 0,
                    "processors": [[".dspy", "dspy"], [".ui", "bui"]]},
    }))
    reset_host_singletons()
    before = len(cleanupctx_coros)
    try:
        # the host's init(): nothing may touch DBPools yet
        ServerEnv().get_module_dbname = lambda module: "sage"
        core = load_billing_module()
        assert DBPools.instance is None
        assert len(cleanupctx_coros) == before + 1          # background jobs start with the app
        server = ConfiguredServer(workdir=str(workdir))    # builds DBPools(config.databases)
        server.configPath(server.config)
        app = await server.build_app()
        env = ServerEnv()
        assert env.billing_core is core and callable(env.billing_post_usage) and callable(env.billing_api)
        assert core.db.desc.kwargs == db_desc["kwargs"]     # the host's database for this module
        await create_schema(core.db)
        await env.billing_recharge("org-1", 5_000_000, "host-r1")
        assert (await env.billing_balance("org-1"))["balance"] == "5.000000"
        # the host keeps ahserver's default (port-derived) session secret: detected at start-up,
        # and its sessions are never trusted, whatever the user's roles
        env.get_user_roles = _rbac_roles({"op-1": ["owner.superuser"]})
        test_server = TestServer(app, host="127.0.0.1")
        await test_server.start_server()
        assert core.host_sessions_trusted is False
        assert any(r.levelname == "ERROR" and "default (port-derived) secret" in r.getMessage() for r in caplog.records)
        # the session cookie is Secure: let the jar send it over plain http to this test server
        jar = CookieJar(unsafe=True, treat_as_secure_origin=str(test_server.make_url("/")))
        client = TestClient(test_server, cookie_jar=jar)
        await client.start_server()
        try:
            r = await client.get("/billing_module/api/balance.dspy", params={"customer_id": "org-1"})
            assert r.status == 401
            assert (await client.get("/host_login.dspy")).status == 200
            r = await client.get("/billing_module/api/balance.dspy", params={"customer_id": "org-1"})
            assert r.status == 401 and "cannot be trusted" in (await r.json(content_type=None))["message"]
        finally:
            await client.close()
            await core.close()
    finally:
        del cleanupctx_coros[before:]
        reset_host_singletons()


def _rbac_roles(table):
    """Stands in for rbac's ``get_user_roles`` (async, roles as 'orgtype.name')."""
    async def get_user_roles(userid):
        return ["any", "logined"] + table.get(userid, [])
    return get_user_roles


async def test_a_hardened_host_scopes_sessions_by_role_and_organisation(tmp_path, db_desc):
    """The host-side fix (harden_host_sessions in the host's init): a random secret kept 0600;
    then a platform role (owner.*, reseller.*, provider.admin) reaches every customer, a customer
    role only the organisation rbac's login put in the session (userorgid), no billing role
    nothing."""
    from ahserver.auth_api import AuthAPI
    from ahserver.configuredServer import ConfiguredServer, cleanupctx_coros
    from ahserver.serverenv import ServerEnv

    from billing_module import load_billing_module
    from billing_module.db.schema import create_schema
    from billing_module.sessions import harden_host_sessions

    workdir = tmp_path / "sage"
    (workdir / "conf").mkdir(parents=True)
    (workdir / "wwwroot").mkdir()
    os.symlink(WWWROOT, workdir / "wwwroot" / "billing_module")
    (workdir / "wwwroot" / "host_login.dspy").write_text(
        "await remember_user(params_kw.user, username=params_kw.user, userorgid=params_kw.org)\n"
        "return {'ok': True}\n")
    (workdir / "conf" / "config.json").write_text(json.dumps({
        "password_key": "k" * 16, "databases": {"sage": dict(db_desc, dbname="sage")},
        "website": {"paths": [[str(workdir / "wwwroot"), ""]], "port": 0,
                    "processors": [[".dspy", "dspy"], [".ui", "bui"]]}}))
    reset_host_singletons()
    before = len(cleanupctx_coros)
    original_setup = AuthAPI.setupAuth
    try:
        ServerEnv().get_module_dbname = lambda module: "sage"
        harden_host_sessions(str(workdir / "conf" / "session.key"))
        assert oct(os.stat(workdir / "conf" / "session.key").st_mode & 0o777) == "0o600"
        core = load_billing_module()
        server = ConfiguredServer(workdir=str(workdir))
        server.configPath(server.config)
        app = await server.build_app()
        ServerEnv().get_user_roles = _rbac_roles({"boss": ["owner.superuser"], "seller": ["reseller.operator"],
                                                  "prov": ["provider.admin"], "cust": ["customer.admin"],
                                                  "clerk": ["customer.user"], "dev": ["provider.developer"]})
        await create_schema(core.db)
        await ServerEnv().billing_recharge("org-1", 5_000_000, "host-r1")
        test_server = TestServer(app, host="127.0.0.1")
        await test_server.start_server()
        assert core.host_sessions_trusted is True
        try:
            cases = (("boss", "org-9", 200), ("seller", "org-9", 200), ("prov", "org-9", 200),
                     ("cust", "org-2", 403), ("cust", "org-1", 200), ("clerk", "org-2", 403),
                     ("clerk", "org-1", 200), ("cust", "", 403), ("dev", "org-1", 403), ("nobody", "org-1", 403))
            for user, org, status in cases:
                async with aiohttp.ClientSession(cookie_jar=CookieJar(unsafe=True)) as client:
                    r = await client.get(test_server.make_url("/host_login.dspy"), params={"user": user, "org": org})
                    assert r.status == 200
                    r = await client.get(test_server.make_url("/billing_module/api/balance.dspy"),
                                         params={"customer_id": "org-1"})
                    assert r.status == status, (user, org, await r.text())
                    if status == 200 and org == "org-1":   # a customer's own list: its rows only
                        r = await client.get(test_server.make_url("/billing_module/api/transactions.dspy"))
                        rows = (await r.json(content_type=None))["rows"]
                        assert r.status == 200 and rows and {x["customer_id"] for x in rows} == {"org-1"}
        finally:
            await test_server.close()
            await core.close()
    finally:
        AuthAPI.setupAuth = original_setup
        del cleanupctx_coros[before:]
        reset_host_singletons()


async def test_a_session_write_from_another_site_is_refused(http):
    """The admin login's cookie rides along on cross-site requests: writes must come from the
    server's own pages (Origin / Referer), or carry an API key."""
    r = await http.client.post("/billing_module/login.dspy",
                               data={"username": "admin", "password": http.core.admin_password})
    assert r.status == 200
    body = {"customer_id": "c1", "amount": "5", "request_id": "csrf-1"}
    r = await http.client.post("/billing_module/api/recharge.dspy", json=body,
                               headers={"Origin": "https://evil.example"})
    assert r.status == 403 and (await r.json(content_type=None))["code"] == "forbidden"
    r = await http.client.post("/billing_module/api/recharge.dspy", json=body,
                               headers={"Referer": "https://evil.example/page.html"})
    assert r.status == 403
    async with http.core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from ledger_entry") == 0
    own = str(http.client.make_url("/billing_module/balances.ui"))
    r = await http.client.post("/billing_module/api/recharge.dspy", json=body, headers={"Referer": own})
    assert r.status == 200, await r.text()
    status, _ = await http.get("api/balance.dspy", customer_id="c1")    # reads need no origin
    assert status == 200
