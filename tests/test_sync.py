"""The sync against a real central HTTP server on 127.0.0.1 (tests/central_server.py), the
export side (this module as the centre, over the standalone host), the CLI and the admin
endpoints; every database test on SQLite and MariaDB."""
import argparse
import io
import json

import pytest

from billing_module.core import BillingCore
from billing_module.db.database import sqlite_desc
from billing_module.errors import InvalidParam, NoPricing
from billing_module.pricing import Usage
from billing_module.sync import SyncBusy, SyncNotConfigured
from billing_module.sync import cli as sync_cli
from billing_module.sync.export import export_page, stamp_unversioned
from tests.central_server import CentralServer
from tests.conftest import make_config
from tests.helpers import CHAT_A_PRICE, MODELS, PROGRAM

APP_KEY = "ak_0badc0de_" + "1" * 24
SECRET = "the-edge-secret-0123456789abcdef"

USERS = [
    {"id": "org-1", "kind": "org", "name": "Acme", "org_type": "customer", "status": "active", "discount": "0.9"},
    {"id": "u-1", "kind": "user", "name": "alice", "org_id": "org-1", "status": "active"},
    {"id": "u-2", "kind": "user", "name": "bob", "org_id": "org-1", "status": "active"},
]
UAPI = [{"id": "ua-1", "name": "chat", "upappid": "up-1", "path": "/v1/chat", "httpmethod": "POST", "stream": "stream"}]
ENTITY_TABLES = {"users": "users_cache", "pricing": "pricing_cache", "llmage": "llmage_cache", "uapi": "uapi_cache"}


def program(pid="pp-chat", input_price="2.0"):
    p = json.loads(json.dumps(PROGRAM))
    p["id"] = pid
    p["versions"][0]["pricing_data"]["pricings"][0]["unit_prices"] = input_price
    return p


def sync_settings(url, **extra):
    s = {"central_url": url, "app_key": APP_KEY, "app_secret": SECRET, "page_size": 2, "timeout_seconds": 2,
         "retries": 2, "retry_base_seconds": 0.01, "retry_max_seconds": 0.02}
    s.update(extra)
    return s


@pytest.fixture
async def centre():
    c = CentralServer(APP_KEY, SECRET)
    await c.start()
    yield c
    await c.stop()


@pytest.fixture
def config(tmp_path, centre):
    # overrides conftest's: the core (and the standalone host) talk to the test centre
    return make_config(tmp_path, sync=sync_settings(centre.url))


def wire(core):
    return core.sync


def seed_centre(c):
    c.put("users", USERS)
    c.put("pricing", [PROGRAM])
    c.put("llmage", MODELS[:2])
    c.put("uapi", UAPI)


async def ids(core, entity):
    async with core.db.read() as tx:
        return [r.id for r in await tx.select(f"select id from {ENTITY_TABLES[entity]} order by id")]


async def quote(core, customer=None):
    price, _ = await core.catalog.quote(Usage("chat-a", input_tokens=1000, output_tokens=500), customer_id=customer)
    return price.to_dict()["amount"]


# --- the client against the test centre -----------------------------------------------------------
async def test_sync_of_every_entity_feeds_pricing_and_records_state(core, centre, fixed_clock):
    sync = wire(core)
    seed_centre(centre)
    results = await sync.sync()
    assert [(r["entity"], r["status"]) for r in results] == [
        ("users", "success"), ("pricing", "success"), ("llmage", "success"), ("uapi", "success")]
    assert await ids(core, "users") == ["org-1", "u-1", "u-2"]
    assert await quote(core) == CHAT_A_PRICE
    assert await quote(core, "org-1") == "0.005400"       # the synced 0.9 discount
    for entity in ENTITY_TABLES:
        st = await sync.store.get(entity)
        assert st.sync_status == "success" and st.sync_version == str(centre.versions[entity])
        assert st.retry_count == 0 and st.error_msg is None and st.last_sync_time == "2026-11-22 12:00:00"
        assert st.next_sync_at == "2026-11-22 12:05:00"    # sync.interval_seconds = 300
    status = {s["entity"]: s for s in await sync.status()}
    assert status["pricing"]["sync_status"] == "success" and status["uapi"]["items_synced"] == 1
    # the synced rows keep the centre's versions: this deployment can be a centre in turn
    async with core.db.read() as tx:
        assert await tx.scalar("select version from users_cache where id = 'u-1'") == "1"


async def test_incremental_sync_applies_changes_deletions_and_drops_caches(core, centre):
    sync = wire(core)
    seed_centre(centre)
    await sync.sync()
    assert await quote(core, "org-1") == "0.005400"
    assert await quote(core, "org-1") == "0.005400"
    assert core.caches.stats()["quote:priced"]["hits"] >= 1      # the second quote: from memory
    v_users = centre.versions["users"]
    centre.put("users", [dict(USERS[0], discount="0.5")])
    centre.delete("users", ["u-2"])
    centre.put("pricing", [program(input_price="4.0")])
    centre.requests.clear()
    results = await sync.sync()
    assert all(r["status"] == "success" for r in results)
    users_req = [r for r in centre.requests if r["entity"] == "users"]
    assert users_req[0]["since"] == v_users
    assert results[0]["items"] == 1 and results[0]["deleted"] == 1
    assert await ids(core, "users") == ["org-1", "u-1"]
    # the caches were dropped: the new discount and the new price are used at once
    assert await quote(core, "org-1") == "0.004000"       # (1,000 x 4.0/M + 500 x 8.0/M) x 0.5
    stats = core.caches.stats()
    assert stats["users:discount"]["misses"] >= 2 and stats["pricing"]["size"] == 1
    # nothing new: one request per entity, nothing applied
    centre.requests.clear()
    results = await sync.sync()
    assert [r["items"] for r in results] == [0, 0, 0, 0] and len(centre.requests) == 4


async def test_pages_are_applied_one_by_one_with_progress(core, centre):
    sync = wire(core)
    for i in range(7):
        centre.put("users", [{"id": f"org-{i}", "kind": "org", "name": f"org {i}"}])
    lines = []
    [result] = await sync.sync("users", progress=lambda e, info: lines.append((e, info["page"], info["version"])))
    assert result["status"] == "success" and result["pages"] == 4 and result["items"] == 7
    assert [r["since"] for r in centre.requests] == [0, 2, 4, 6]
    assert lines == [("users", 1, 2), ("users", 2, 4), ("users", 3, 6), ("users", 4, 7)]


async def test_a_version_is_never_split_over_pages(core, centre):
    sync = wire(core)
    centre.put("users", [{"id": f"org-{i}", "kind": "org", "name": "x"} for i in range(5)])
    centre.put("users", [{"id": "org-late", "kind": "org", "name": "y"}])
    [result] = await sync.sync("users")
    assert result["status"] == "success" and result["pages"] == 2 and result["items"] == 6


async def test_failure_mid_sync_keeps_applied_pages_and_the_next_run_resumes(core, centre, fixed_clock):
    sync = wire(core)
    for i in range(7):
        centre.put("users", [{"id": f"org-{i}", "kind": "org", "name": f"org {i}"}])
    centre.fail_after_pages = 2
    [result] = await sync.sync("users")
    assert result["status"] == "failed" and result["pages"] == 2
    assert "answered 500" in result["error"] and "tried 3 times" in result["error"]
    assert "page after version 4" in result["error"]
    st = await sync.store.get("users")
    assert (st.sync_status, st.sync_version, st.retry_count, st.items_synced) == ("failed", "4", 1, 4)
    assert st.error_msg == result["error"]
    assert st.next_sync_at == "2026-11-22 12:00:30"      # failure_backoff_seconds
    assert await ids(core, "users") == [f"org-{i}" for i in range(4)]
    # the centre is back: the run starts after the last applied version
    centre.fail_after_pages = None
    centre.requests.clear()
    [result] = await sync.sync("users")
    assert result["status"] == "success" and centre.requests[0]["since"] == 4
    st = await sync.store.get("users")
    assert (st.sync_status, st.sync_version, st.retry_count, st.error_msg) == ("success", "7", 0, None)
    assert len(await ids(core, "users")) == 7


async def test_backoff_doubles_with_each_failure(core, centre, fixed_clock):
    sync = wire(core)
    centre.fail_after_pages = 0
    core.config.sync.retries = 0
    for expected in ("12:00:30", "12:01:00", "12:02:00", "12:04:00", "12:05:00"):   # capped by the interval
        [r] = await sync.sync("uapi")
        assert r["status"] == "failed"
        assert (await sync.store.get("uapi")).next_sync_at == f"2026-11-22 {expected}"
    assert (await sync.store.get("uapi")).retry_count == 5


async def test_transient_errors_are_retried_within_a_run(core, centre):
    sync = wire(core)
    seed_centre(centre)
    centre.fail_next = [500, 503]
    [result] = await sync.sync("users")
    assert result["status"] == "success"
    assert [r["status"] for r in centre.requests] == [500, 503, 200]


async def test_timeout_fails_the_run_clearly(core, centre):
    sync = wire(core)
    seed_centre(centre)
    core.config.sync.timeout_seconds = 0.2
    core.config.sync.retries = 1
    centre.delay = 0.4
    [result] = await sync.sync("users")
    assert result["status"] == "failed"
    assert "no answer within 0.2s (tried 2 times)" in result["error"]
    assert await ids(core, "users") == []
    assert (await sync.store.get("users")).sync_status == "failed"


@pytest.mark.parametrize("fault,message", [
    ("malformed", "reply is not valid JSON"),
    ("wrong_reply_signature", "bad reply signature"),
    ("unsigned_replies", "reply is not signed"),
])
async def test_unusable_replies_are_refused_without_retry(core, centre, fault, message):
    sync = wire(core)
    seed_centre(centre)
    setattr(centre, fault, True)
    [result] = await sync.sync("pricing")
    assert result["status"] == "failed" and message in result["error"]
    assert len(centre.requests) == 1                       # not worth retrying
    assert await ids(core, "pricing") == []
    st = await sync.store.get("pricing")
    assert st.sync_status == "failed" and message in st.error_msg and st.sync_version == "0"


async def test_centre_rejecting_our_signature(core, centre):
    sync = wire(core)
    seed_centre(centre)
    core.config.sync.app_secret = "not-what-the-centre-knows"
    [result] = await sync.sync("users")
    assert result["status"] == "failed" and "answered 401" in result["error"] and "bad signature" in result["error"]
    assert len(centre.requests) == 1 and await ids(core, "users") == []


async def test_bad_pricing_program_fails_its_page_and_changes_nothing(core, centre):
    sync = wire(core)
    seed_centre(centre)
    await sync.sync()
    version = centre.versions["pricing"]
    bad = program("pp-bad")
    bad["versions"] = []
    centre.put("pricing", [program(input_price="4.0"), bad])      # one page: a good change and a bad program
    [result] = await sync.sync("pricing")
    assert result["status"] == "failed"
    assert "pricing program pp-bad: versions must be a non-empty list" in result["error"]
    st = await sync.store.get("pricing")
    assert st.sync_status == "failed" and "pp-bad" in st.error_msg and st.sync_version == str(version)
    assert await ids(core, "pricing") == ["pp-chat"]
    core.catalog.invalidate()
    assert await quote(core) == CHAT_A_PRICE                       # the old price still applies


async def test_program_in_another_currency_is_refused(core, centre):
    sync = wire(core)
    centre.put("pricing", [dict(program("pp-usd"), currency="USD")])
    [result] = await sync.sync("pricing")
    assert result["status"] == "failed" and "priced in USD, but this deployment bills in CNY" in result["error"]
    assert await ids(core, "pricing") == []


@pytest.mark.parametrize("entity,item,message", [
    ("uapi", dict(UAPI[0], httpmethod="FETCH"), "httpmethod 'FETCH' is not one of"),
    ("uapi", dict(UAPI[0], stream="sometimes"), "stream 'sometimes' is not one of"),
    ("users", {"id": "u-9", "kind": "user", "name": "nobody"}, "a user needs org_id"),
    ("users", {"id": "o-9", "kind": "org", "discount": "12"}, "discount must be in (0, 10]"),
    ("users", {"id": "x" * 40, "kind": "org"}, "item id must be a string of 1-32 characters"),
])
async def test_items_an_entity_cannot_take_fail_the_page(core, centre, entity, item, message):
    sync = wire(core)
    centre.put(entity, [item])
    [result] = await sync.sync(entity)
    assert result["status"] == "failed" and message in result["error"], result["error"]
    assert await ids(core, entity) == []


async def test_models_without_a_program_are_taken_with_a_warning(core, centre):
    sync = wire(core)
    centre.put("pricing", [PROGRAM])
    centre.put("llmage", MODELS)
    results = await sync.sync()
    llmage = results[2]
    assert llmage["status"] == "success" and llmage["items"] == 3
    assert llmage["warnings"] == ["model llm-noprice: pricing program pp-missing is not in the pricing cache "
                                  "(its quotes fail until the program is synced)"]


async def test_a_very_large_page(core, centre):
    sync = wire(core)
    centre.ignore_limit = True
    centre.put("users", [{"id": f"org-{i:05d}", "kind": "org", "name": f"org {i}", "status": "active"}
                         for i in range(20000)])
    [result] = await sync.sync("users")
    assert result["status"] == "success" and result["pages"] == 1 and result["items"] == 20000
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from users_cache") == 20000
    # above sync.max_page_bytes the page is refused, not half-read
    centre.put("users", [{"id": "org-00001", "kind": "org", "name": "renamed"}])
    core.config.sync.max_page_bytes = 50
    [result] = await sync.sync("users", full=True)
    assert result["status"] == "failed" and "exceeds the limit of 50" in result["error"]
    async with core.db.read() as tx:
        assert await tx.scalar("select name from users_cache where id = 'org-00001'") == "org 1"


async def test_while_the_centre_is_down_pricing_and_auth_answer_locally(core, centre):
    sync = wire(core)
    seed_centre(centre)
    await sync.sync()
    key, _ = await core.apikeys.create("customer", customer_id="org-1")
    await centre.stop()
    results = await sync.sync()
    assert all(r["status"] == "failed" for r in results)
    assert "ClientConnectorError" in results[0]["error"] and "tried 3 times" in results[0]["error"]
    assert await quote(core, "org-1") == "0.005400"
    core.catalog.invalidate()                      # not even the in-memory copies are needed
    assert await quote(core, "org-1") == "0.005400"
    assert (await core.apikeys.verify(key)).customer_id == "org-1"
    assert (await core.catalog.org("org-1")).name == "Acme"


async def test_full_resync_deletes_rows_the_centre_does_not_have(core, centre):
    sync = wire(core)
    seed_centre(centre)
    await sync.sync("users")
    await core.catalog.put("users", [{"id": "org-local", "kind": "org", "name": "only here"}])
    [r] = await sync.sync("users")
    assert r["items"] == 0 and "org-local" in await ids(core, "users")   # incremental keeps it
    centre.requests.clear()
    [r] = await sync.sync("users", full=True)
    assert r["status"] == "success" and r["full"] and r["deleted"] == 1 and r["items"] == 3
    assert centre.requests[0]["since"] == 0
    assert await ids(core, "users") == ["org-1", "u-1", "u-2"]


async def test_a_centre_whose_version_went_back_needs_a_full_sync(core, centre):
    sync = wire(core)
    for user in USERS:
        centre.put("users", [user])
    await sync.sync("users")
    centre.rows.clear()
    centre.versions.clear()                    # the centre was rebuilt
    centre.put("users", [USERS[0]])
    [r] = await sync.sync("users")
    assert r["status"] == "failed" and "version went back from 3 to 1" in r["error"]
    assert (await sync.store.get("users")).sync_version == "3"
    [r] = await sync.sync("users", full=True)
    assert r["status"] == "success" and r["deleted"] == 2 and await ids(core, "users") == ["org-1"]


@pytest.mark.parametrize("version,message", [("v7", "version must be a string of 1-18 digits"),
                                             ("", "version must be a string"), (True, "version must be an integer")])
async def test_a_malformed_version_is_refused(core, centre, version, message):
    sync = wire(core)
    seed_centre(centre)
    centre.version_override = version
    [r] = await sync.sync("users")
    assert r["status"] == "failed" and message in r["error"] and await ids(core, "users") == []


async def test_one_run_per_entity(core, centre, fixed_clock):
    sync = wire(core)
    seed_centre(centre)
    await sync.store.claim("users", 900)           # another instance is running it
    with pytest.raises(SyncBusy, match="already running"):
        await sync.sync("users")
    fixed_clock.advance(901)                       # ... and died: its claim is stale
    [r] = await sync.sync("users")
    assert r["status"] == "success"


async def test_unknown_entity_and_missing_configuration_change_nothing(core, centre):
    sync = wire(core)
    with pytest.raises(InvalidParam, match="entity must be one of"):
        await sync.sync("orders")
    core.config.sync.central_url = ""
    with pytest.raises(SyncNotConfigured, match="sync.central_url"):
        await sync.sync("users")
    assert await sync.store.all() == [] and centre.requests == []


async def test_periodic_sync_runs_what_is_due(core, centre, fixed_clock):
    sync = wire(core)
    seed_centre(centre)
    core.config.sync.users_interval_seconds = 60
    assert sync.background_jobs() == []                       # sync.enabled is off
    core.config.sync.enabled = True
    [(name, job, tick)] = sync.background_jobs()
    assert name == "sync" and job == sync.run_due and tick == 30
    assert [r["entity"] for r in await sync.run_due()] == ["users", "pricing", "llmage", "uapi"]
    assert await sync.run_due() == []
    fixed_clock.advance(61)
    assert [r["entity"] for r in await sync.run_due()] == ["users"]
    centre.fail_after_pages = 0
    core.config.sync.retries = 0
    fixed_clock.advance(300)
    assert [(r["entity"], r["status"]) for r in await sync.run_due()] == [
        ("users", "failed"), ("pricing", "failed"), ("llmage", "failed"), ("uapi", "failed")]
    fixed_clock.advance(29)
    assert await sync.run_due() == []                          # backing off
    fixed_clock.advance(2)
    centre.fail_after_pages = None
    assert len(await sync.run_due()) == 4


async def test_cli_prints_progress_and_exit_codes(core, centre):
    wire(core)
    for i in range(3):
        centre.put("users", [{"id": f"org-{i}", "kind": "org", "name": f"org {i}"}])
    parser = argparse.ArgumentParser(prog="billing-module")
    sync_cli.add_parser(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    assert await sync_cli.run(core, parser.parse_args(["sync", "users"]), out, err) == 0
    text = out.getvalue()
    assert "users: page 1 -> version 2: 2 items, 0 deleted (2 items so far, more to come)" in text
    assert "users: page 2 -> version 3: 1 items" in text and "users: success at version 3 (3 items" in text
    args = parser.parse_args(["sync", "--full"])
    assert args.entity is None and args.full
    centre.fail_after_pages = 0
    core.config.sync.retries = 0
    out, err = io.StringIO(), io.StringIO()
    assert await sync_cli.run(core, args, out, err) == 1
    assert "users: FAILED: users: page after version 0: GET" in err.getvalue()
    core.config.sync.app_key = ""
    out, err = io.StringIO(), io.StringIO()
    assert await sync_cli.run(core, args, out, err) == 2
    assert "sync is not configured" in err.getvalue()
    with pytest.raises(SystemExit):
        parser.parse_args(["sync", "orders"])


# --- the export side: this module as the centre ---------------------------------------------------
@pytest.fixture
def centre_http(request, monkeypatch, db_desc):
    """The standalone host with its sync pages open to signed callers (the lead adds the prefix
    to the standalone host's open paths), wired."""
    import billing_module.server as server
    make = server.make_auth_class

    def make_auth_class():
        cls = make()
        check = cls.checkUserPermission

        async def permitted(self, request, user, path):
            return path.startswith("/billing_module/sync/") or await check(self, request, user, path)
        cls.checkUserPermission = permitted
        return cls
    monkeypatch.setattr(server, "make_auth_class", make_auth_class)
    http = request.getfixturevalue("http")
    wire(http.core)
    return http


@pytest.fixture
async def edge(tmp_path, centre_http):
    """A second deployment (SQLite) that pulls from the standalone host."""
    creds, _ = await centre_http.core.apikeys.create("app", signed=True, name="edge")
    url = str(centre_http.client.make_url("/")).rstrip("/")
    cfg = make_config(tmp_path / "edge", sync=sync_settings(url, app_key=creds.app_key, app_secret=creds.secret))
    e = BillingCore(config=cfg, db_desc=sqlite_desc(str(tmp_path / "edge.db")), data_dir=str(tmp_path / "edge"))
    await e.create_schema()
    wire(e)
    yield e
    await e.close()


async def test_this_module_as_the_centre(centre_http, edge):
    central = centre_http.core
    await central.catalog.put("users", USERS)
    await central.catalog.put("pricing", [PROGRAM])
    await central.catalog.put("llmage", MODELS[:2])
    await central.catalog.put("uapi", UAPI)
    results = await edge.sync.sync()
    assert [(r["status"], r["items"]) for r in results] == [("success", 3), ("success", 1), ("success", 2),
                                                             ("success", 1)], results
    assert await ids(edge, "users") == await ids(central, "users")
    assert await quote(edge, "org-1") == "0.005400"
    async with central.db.read() as tx:          # the centre stamped its unversioned rows
        assert {r.version for r in await tx.select("select version from users_cache")} == {"1"}
    # a change at the centre reaches the edge, alone
    await central.catalog.put("pricing", [program(input_price="4.0")])
    results = await edge.sync.sync()
    assert [r["items"] for r in results] == [0, 1, 0, 0]
    assert await quote(edge) == "0.008000"
    assert (await edge.sync.store.get("pricing")).sync_version == "2"


async def test_export_pages_by_numeric_version(centre_http, edge):
    central = centre_http.core
    await central.catalog.put("users", [{"id": f"org-{v}", "kind": "org", "version": str(v)} for v in (9, 10, 11)]
                              + [{"id": f"tie-{i}", "kind": "org", "version": "12"} for i in range(3)])
    page = await export_page(central.db, "users", 9, 1)
    assert [i["id"] for i in page["items"]] == ["org-10"] and page["version"] == "10" and page["has_more"]
    page = await export_page(central.db, "users", 11, 2)     # the tie at 12 is not split
    assert [i["id"] for i in page["items"]] == ["tie-0", "tie-1", "tie-2"] and not page["has_more"]
    page = await export_page(central.db, "users", 12, 2)
    assert page == {"entity": "users", "version": "12", "items": [], "deleted": [], "has_more": False}
    edge.config.sync.page_size = 1
    [r] = await edge.sync.sync("users")
    assert r["status"] == "success" and r["pages"] == 4 and r["items"] == 6 and r["version"] == 12
    # an edit through Catalog.put clears the version: it is stamped after the highest
    await central.catalog.put("users", [{"id": "org-9", "kind": "org", "name": "renamed"}])
    assert await stamp_unversioned(central.db, "users") == 1
    assert await stamp_unversioned(central.db, "users") == 0
    [r] = await edge.sync.sync("users")
    assert r["items"] == 1 and r["version"] == 13
    # deleting the highest rows never lowers the version the centre reports
    await central.catalog.put("users", deleted=["org-9"])
    assert (await export_page(central.db, "users", 13, 5))["version"] == "13"


async def test_export_needs_a_signed_app_or_admin_key(centre_http, edge):
    status, body = await centre_http.get("sync/users.dspy", centre_http.admin_key, since=0)
    assert status == 401 and body["code"] == "unauthorized" and "missing signature headers" in body["message"]
    creds, _ = await centre_http.core.apikeys.create("customer", customer_id="org-1", signed=True)
    edge.config.sync.app_key, edge.config.sync.app_secret = creds.app_key, creds.secret
    [r] = await edge.sync.sync("users")
    assert r["status"] == "failed" and "answered 403" in r["error"] and "app or admin key" in r["error"]
    resp = await centre_http.client.post("/billing_module/sync/users.dspy")
    assert resp.status == 405 and (await resp.json())["code"] == "method_not_allowed"
    edge.config.sync.page_size = 10 ** 6
    creds, _ = await centre_http.core.apikeys.create("app", signed=True)
    edge.config.sync.app_key, edge.config.sync.app_secret = creds.app_key, creds.secret
    [r] = await edge.sync.sync("users")
    assert r["status"] == "failed" and "answered 400" in r["error"] and "limit: must be at most 5000" in r["error"]


# --- the admin endpoints and health ----------------------------------------------------------------
async def test_sync_endpoints_and_health_counters(centre_http, centre):
    http = centre_http
    seed_centre(centre)
    status, body = await http.get("api/sync_status.dspy", http.admin_key)
    assert status == 200 and [e["sync_status"] for e in body["entities"]] == ["never"] * 4
    status, body = await http.post("api/sync_run.dspy", http.admin_key, json={"entity": "pricing"})
    assert status == 200 and body["results"][0]["status"] == "success", body
    status, body = await http.post("api/sync_run.dspy", http.admin_key, json={"entity": "orders"})
    assert status == 400 and body["code"] == "invalid_param"
    customer_key, _ = await http.core.apikeys.create("customer", customer_id="org-1")
    status, body = await http.post("api/sync_run.dspy", customer_key, json={})
    assert status == 403 and body["code"] == "forbidden"
    centre.fail_after_pages = 0
    http.core.config.sync.retries = 0
    status, body = await http.post("api/sync_run.dspy", http.admin_key, json={"entity": "users"})
    assert status == 502 and body["code"] == "sync_failed" and "answered 500" in body["message"]
    assert body["results"][0]["status"] == "failed"
    centre.fail_after_pages = None
    await http.post("api/sync_run.dspy", http.admin_key, json={})
    status, body = await http.get("api/sync_status.dspy", http.admin_key)
    assert [e["sync_status"] for e in body["entities"]] == ["success"] * 4
    await quote(http.core)
    await quote(http.core)
    status, body = await http.get("api/health.dspy")
    # the first quote loads the program (a miss); the second finds model and program in one lookup
    caches = body["caches"]
    assert status == 200 and caches["pricing"]["misses"] >= 1 and caches["quote:priced"]["misses"] >= 1
    assert caches["quote:priced"]["hits"] >= 1


async def test_a_new_discount_is_used_at_once_after_a_users_sync(core, centre):
    """Only the customer's discount changes at the centre: the quote memo that holds it goes
    with the users sync, and the next charge has the new discount."""
    sync = wire(core)
    seed_centre(centre)
    await sync.sync()
    assert await quote(core, "org-1") == "0.005400"
    assert await quote(core, "org-1") == "0.005400"      # warm
    centre.put("users", [dict(USERS[0], discount="0.5")])
    assert [r["status"] for r in await sync.sync("users")] == ["success"]     # that entity alone
    assert await quote(core, "org-1") == "0.003000"       # (1,000 x 2.0/M + 500 x 8.0/M) x 0.5


async def test_no_pricing_after_the_program_is_deleted_at_the_centre(core, centre):
    sync = wire(core)
    seed_centre(centre)
    await sync.sync()
    assert await quote(core)        # warm: the model and its program are held in memory
    centre.delete("pricing", ["pp-chat"])
    [r] = await sync.sync("pricing")
    assert r["deleted"] == 1
    with pytest.raises(NoPricing, match="not in the pricing cache"):
        await quote(core)
