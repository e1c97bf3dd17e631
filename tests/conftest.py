"""Test harness: every database test runs on SQLite, and on MariaDB/MySQL too when
BILLING_TEST_MYSQL names a server (mysql://user[:password]@host[:port]/anything). A database
is created for the run and dropped at its end, so parallel runs do not collide.

BILLING_TEST_GALERA=h1:p1,h2:p2,h3:p3 (the nodes of a Galera cluster, user root without a
password: ``python tests/galera.py run -- python -m pytest ...`` starts one) adds the backend
``galera``: the module connects with ``database.hosts`` listing every node, and ``tests.helpers.other_node``
gives a second instance the same list starting at the next node."""
import os
import secrets
import urllib.parse

import pymysql
import pytest
from aiohttp import CookieJar
from aiohttp.test_utils import TestClient, TestServer

from billing_module import clock
from billing_module.config import load_config
from billing_module.core import BillingCore
from billing_module.db.database import mysql_desc, sqlite_desc
from billing_module.db.schema import load_models
from tests.galera import wait_whole

MYSQL_URL = os.environ.get("BILLING_TEST_MYSQL", "").strip()
GALERA_NODES = [h.strip() for h in os.environ.get("BILLING_TEST_GALERA", "").split(",") if h.strip()]


def _mysql_params():
    u = urllib.parse.urlparse(MYSQL_URL)
    return dict(host=u.hostname or "127.0.0.1", port=u.port or 3306, user=urllib.parse.unquote(u.username or "root"),
                password=urllib.parse.unquote(u.password or ""))


@pytest.fixture(scope="session")
def mysql_database():
    """A fresh database for this test run; None when no MySQL is named."""
    if not MYSQL_URL:
        yield None
        return
    params = _mysql_params()
    name = f"billing_test_{os.getpid()}_{secrets.token_hex(3)}"
    conn = pymysql.connect(**params)   # fails the run (not skips) when the server is unreachable
    try:
        with conn.cursor() as c:
            c.execute(f"create database {name} character set utf8mb4 collate utf8mb4_unicode_ci")
        conn.commit()
        yield dict(params, name=name)
    finally:
        with conn.cursor() as c:
            c.execute(f"drop database if exists {name}")
        conn.commit()
        conn.close()


@pytest.fixture(scope="session")
def galera_database():
    """A fresh database on the Galera cluster for this run (created on one node, replicated to
    all); None when no cluster is named."""
    if not GALERA_NODES:
        yield None
        return
    host, _, port = GALERA_NODES[0].rpartition(":")
    params = dict(host=host, port=int(port), user="root", password="")
    name = f"billing_galera_{os.getpid()}_{secrets.token_hex(3)}"
    conn = pymysql.connect(**params)
    try:
        with conn.cursor() as c:
            c.execute(f"create database {name} character set utf8mb4 collate utf8mb4_unicode_ci")
        yield dict(params, name=name, hosts=list(GALERA_NODES))
    finally:
        conn.close()
        conn = pymysql.connect(**params)   # a new connection: the first one may have timed out
        with conn.cursor() as c:
            c.execute(f"drop database if exists {name}")
        conn.close()


BACKENDS = ["sqlite"] + (["mysql"] if MYSQL_URL else []) + (["galera"] if GALERA_NODES else [])
_mysql_schema_ready = set()


def _empty_mysql_tables(db):
    """Every table of the module that exists in the run's database, emptied: whatever the test
    before did (some build their own core or host without the ``core`` fixture)."""
    conn = pymysql.connect(host=db["host"], port=db["port"], user=db["user"], password=db["password"], database=db["name"])
    try:
        with conn.cursor() as c:
            c.execute("select table_name from information_schema.tables where table_schema = %s", (db["name"],))
            existing = {row[0] for row in c.fetchall()}
            for table in load_models():
                if table in existing:
                    c.execute(f"delete from {table}")
        conn.commit()
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def _whole_galera_cluster(request):
    """A test on the Galera cluster starts on a whole one: a failover test before it may have
    left the nodes re-forming their primary component (``tests.galera.wait_whole``)."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("db_desc") if callspec else None
    if GALERA_NODES and "galera_database" in request.fixturenames and backend in (None, "galera"):
        wait_whole(GALERA_NODES)


@pytest.fixture(params=BACKENDS)
def db_desc(request, tmp_path, mysql_database, galera_database):
    """A sqlor database description for an empty schema on one backend."""
    if request.param == "sqlite":
        return sqlite_desc(str(tmp_path / "billing.db"))
    db = galera_database if request.param == "galera" else mysql_database
    _empty_mysql_tables(db)
    return mysql_desc(db["host"], db["port"], db["user"], db["password"], db["name"], db.get("hosts"))


def _mark_ready(db_desc, mysql_database=None):
    if db_desc["driver"] != "billing_sqlite":
        _mysql_schema_ready.add(db_desc["kwargs"]["db"])


def make_config(tmp_path, **overrides):
    base = {"server": {"data_dir": str(tmp_path), "log_file": ""}, "accounting": {"background": False}}
    for k, v in overrides.items():
        base.setdefault(k, {}).update(v)
    return load_config(environ={}, overrides=base)


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path)


@pytest.fixture
async def core(request, config, db_desc, tmp_path, mysql_database):
    c = BillingCore(config=config, db_desc=db_desc, data_dir=str(tmp_path))
    await c.create_schema()
    _mark_ready(db_desc, mysql_database)
    yield c
    try:
        if not request.node.get_closest_marker("tampers"):
            # every test leaves books that reconcile: balance = sum of ledger, held = open holds
            assert (await c.ledger.reconcile())["mismatches"] == []
    finally:
        await c.close()


@pytest.fixture
def fixed_clock():
    """A settable clock: ``fixed_clock.now = datetime(...)``; restored after the test."""
    import datetime

    class Clock:
        now = datetime.datetime(2026, 11, 22, 12, 0, 0)

        def advance(self, seconds):
            self.now += datetime.timedelta(seconds=seconds)

    c = Clock()
    clock.set_clock(lambda: c.now)
    yield c
    clock.set_clock(None)


class Http:
    """The standalone host in-process, over real HTTP on 127.0.0.1."""

    def __init__(self, client, core, app):
        self.client, self.core, self.app = client, core, app
        self.admin_key = None

    def _headers(self, key):
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def get(self, path, key=None, **params):
        r = await self.client.get(f"/billing_module/{path}", params=params, headers=self._headers(key))
        return r.status, await r.json(content_type=None)

    async def post(self, path, key=None, json=None, data=None):
        r = await self.client.post(f"/billing_module/{path}", json=json, data=data, headers=self._headers(key))
        return r.status, await r.json(content_type=None)


@pytest.fixture
async def http(config, db_desc, tmp_path, mysql_database):
    from billing_module.server import build_app, close_host_pools, reset_host_singletons
    app, core = await build_app(config, str(tmp_path / "host"), db_desc=db_desc, background=False)
    _mark_ready(db_desc, mysql_database)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    # the session cookie is Secure: let the jar send it over plain http to this test server
    client = TestClient(server, cookie_jar=CookieJar(unsafe=True, treat_as_secure_origin=str(server.make_url("/"))))
    h = Http(client, core, app)
    h.admin_key, _ = await core.apikeys.create("admin", name="test admin")
    try:
        yield h
        assert (await core.ledger.reconcile())["mismatches"] == []
    finally:
        await client.close()
        await close_host_pools()
        reset_host_singletons()
