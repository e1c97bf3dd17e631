"""Two module instances on two nodes of a MariaDB Galera cluster (issue 16).

Runs when BILLING_TEST_GALERA names the nodes (``python tests/galera.py run -- python -m pytest
tests/test_galera.py``); the node-kill test also needs BILLING_TEST_GALERA_DIR (set by ``run``)
to kill and restart a node. The failover tests without a cluster run on every backend list."""
import asyncio
import os
import socket
import time

import pytest

from billing_module.core import BillingCore
from billing_module.db.database import Database, mysql_desc
from billing_module.errors import DatabaseUnavailable, InsufficientBalance
from tests.conftest import GALERA_NODES, make_config
from tests.galera import GaleraCluster
from tests.helpers import UsageLoad, seed_pricing, units, usage

CLUSTER_DIR = os.environ.get("BILLING_TEST_GALERA_DIR", "")
needs_cluster = pytest.mark.skipif(not GALERA_NODES, reason="BILLING_TEST_GALERA names no Galera cluster")
REJOIN_SECONDS = 5.0


def node_desc(db, first):
    """The test database through all nodes, starting at node ``first``."""
    hosts = db["hosts"][first:] + db["hosts"][:first]
    return mysql_desc(db["host"], db["port"], db["user"], db["password"], db["name"], hosts)


@pytest.fixture
async def pair(tmp_path, galera_database):
    """Two cores on one schema, the first on node 1, the second on node 2."""
    if galera_database is None:
        pytest.skip("BILLING_TEST_GALERA names no Galera cluster")
    from tests.conftest import _empty_mysql_tables, _mysql_schema_ready
    if galera_database["name"] in _mysql_schema_ready:
        _empty_mysql_tables(galera_database)
    config = make_config(tmp_path)
    cores = [BillingCore(config=config, db_desc=node_desc(galera_database, i), data_dir=str(tmp_path),
                         instance_id=f"instance-{i + 1}") for i in range(2)]
    await cores[0].create_schema()
    _mysql_schema_ready.add(galera_database["name"])
    await seed_pricing(cores[0])
    yield cores
    try:
        for c in cores:
            assert (await c.ledger.reconcile())["mismatches"] == []
    finally:
        for c in cores:
            await c.close()


def test_a_commit_refused_outside_the_primary_component_is_the_nodes_failure():
    """What a node that lost the primary component answers a COMMIT (seen on this project's
    3-node cluster) is the node's failure (``Database.transaction`` makes it CommitUnknown: run
    again when idempotent, else 503), not an internal error; any other error during COMMIT is the
    statement's."""
    import pymysql

    from billing_module.db import dialect
    outside = pymysql.err.OperationalError(
        1180, "Error while appending streaming replication fragment(provider status: Not connected to Primary Component)")
    disk_full = pymysql.err.OperationalError(1180, "Got error 28 \"No space left on device\" during COMMIT")
    assert dialect.is_node_unavailable(outside)
    assert not dialect.is_node_unavailable(disk_full)
    assert dialect.is_node_unavailable(pymysql.err.OperationalError(1047, "WSREP has not yet prepared node"))


def closed_ports(count):
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def test_no_node_answering_is_database_unavailable_not_an_error(tmp_path):
    """Every listed node refuses: the caller gets DatabaseUnavailable (503, Retry-After), not a
    driver error that the API would answer 500."""
    hosts = [f"127.0.0.1:{p}" for p in closed_ports(2)]
    db = Database(mysql_desc("127.0.0.1", 1, "root", "", "billing", hosts))
    db.failover_seconds = 1
    try:
        with pytest.raises(DatabaseUnavailable) as err:
            await db.run(lambda tx: tx.scalar("select 1"), write=False)
    finally:
        await db.close()
    assert err.value.status == 503 and err.value.code == "database_unavailable"
    assert int(err.value.headers["Retry-After"]) > 0


async def test_the_api_answers_503_with_retry_after_when_no_node_answers(tmp_path):
    """Over real HTTP: the endpoint's database is gone; the answer is 503 database_unavailable
    with Retry-After, not 500."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from billing_module.api import handle
    hosts = [f"127.0.0.1:{p}" for p in closed_ports(2)]
    config = make_config(tmp_path, auth={"require_api_key": False, "trust_host_session": False})
    core = BillingCore(config=config, db_desc=mysql_desc("127.0.0.1", 1, "root", "", "billing", hosts),
                       data_dir=str(tmp_path))
    app = web.Application()
    app.router.add_get("/api/{name}", lambda r: handle(core, r, dict(r.query), r.match_info["name"]))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        r = await client.get("/api/balance", params={"customer_id": "c1"})
        body = await r.json()
    finally:
        await client.close()
        await core.close()
    assert (r.status, body["code"]) == (503, "database_unavailable"), body
    assert int(r.headers["Retry-After"]) > 0


@needs_cluster
async def test_the_pool_moves_to_the_next_node_that_answers(galera_database):
    dead = f"127.0.0.1:{closed_ports(1)[0]}"
    db = Database(dict(node_desc(galera_database, 0), hosts=[dead] + galera_database["hosts"]))
    try:
        assert await db.run(lambda tx: tx.scalar("select 7 as n"), write=False) == 7
        assert db.node == galera_database["hosts"][0]
    finally:
        await db.close()


@needs_cluster
async def test_a_certification_conflict_is_retried_like_a_deadlock(pair):
    """Both nodes add to one row at once: Galera aborts the loser at COMMIT (1213); run()
    starts it again, and not one increment is lost."""
    a, b = pair
    await a.ledger.recharge("c1", units("1"), "r0")
    before = await _conflicts(pair)

    async def bump(core, i):
        return await core.ledger.recharge("c1", units("0.01"), f"r{i}")
    await asyncio.gather(*[bump(pair[i % 2], i) for i in range(1, 41)])
    assert (await _balance(b, "c1"))["balance"] == "1.400000"
    assert await _conflicts(pair) > before, "no certification conflict happened: the test proved nothing"


async def _balance(core, customer_id):
    """The balance read causally: a COMMIT on another node returns once certified, and this
    node may not have applied it yet (a plain read here lagged one recharge behind once)."""
    from billing_module.ledger import balance_view
    async with core.db.read(latest=True) as tx:
        return balance_view(await tx.one("select * from customer_balance where id = ${c}$", {"c": customer_id}))


async def _conflicts(cores):
    """Transactions Galera aborted on the cores' nodes: failed certification at COMMIT, or
    aborted while running by a replicated transaction that won (brute-force abort)."""
    total = 0
    for core in cores:
        async with core.db.read() as tx:
            rows = await tx.select("show global status where variable_name in "
                                   "('wsrep_local_cert_failures', 'wsrep_local_bf_aborts')")
        total += sum(int(r["value"]) for r in rows)
    return total


@needs_cluster
async def test_overdraft_race_across_two_nodes(pair):
    """50 workers x 4 events on two instances against a balance worth 10 events: exactly 10
    are charged, the others are refused, the balance never goes below zero."""
    a, b = pair
    await a.ledger.recharge("cust-1", units("0.06"), "r1")    # 10 x 0.006

    async def worker(w):
        out = []
        for k in range(4):
            try:
                out.append(await pair[w % 2].accounting.post_usage(usage(f"w{w}-{k}")))
            except InsufficientBalance as e:
                out.append(e)
        return out
    results = [r for rs in await asyncio.gather(*[worker(w) for w in range(50)]) for r in rs]
    charged = [r for r in results if isinstance(r, dict)]
    assert len(charged) == 10, len(charged)
    assert all(isinstance(r, InsufficientBalance) for r in results if not isinstance(r, dict))
    for c in pair:
        bal = await _balance(c, "cust-1")
        assert bal["balance"] == "0.000000", bal


@needs_cluster
async def test_one_request_id_sent_to_both_nodes_at_once_is_charged_once(pair):
    a, b = pair
    await a.ledger.recharge("cust-1", units("1"), "r1")
    for n in range(5):
        results = await asyncio.gather(*[pair[i % 2].accounting.post_usage(usage(f"dup{n}")) for i in range(8)])
        assert sorted(r["duplicate"] for r in results).count(False) == 1, results
    async with b.db.read(latest=True) as tx:
        assert await tx.scalar("select count(*) as n from ledger_entry where entry_type = 'usage'") == 5
    assert (await _balance(b, "cust-1"))["balance"] == "0.970000"


@needs_cluster
async def test_background_claims_on_two_nodes_at_once_do_each_job_once(pair, fixed_clock):
    """Failed-event retries and hold expiry run by both instances at the same moment: row locks
    do not cross nodes, so the claims' conditional updates (certified at COMMIT) decide."""
    a, b = pair
    await a.ledger.recharge("cust-1", units("0.001"), "r1")
    for i in range(12):
        with pytest.raises(InsufficientBalance):
            await pair[i % 2].accounting.post_usage(usage(f"poor{i}"))
    await b.ledger.recharge("cust-1", units("1"), "r2")
    holds = [await pair[i % 2].ledger.hold("cust-1", units("0.01"), f"h{i}", ttl_seconds=60) for i in range(10)]
    fixed_clock.advance(a.failures.backoff_seconds(0) + 61)
    retried = await asyncio.gather(a.retries.retry_due(), b.retries.retry_due())
    expired = await asyncio.gather(a.ledger.expire_holds(), b.ledger.expire_holds())
    assert sum(retried) == 12 and sum(expired) == len(holds), (retried, expired)
    async with b.db.read(latest=True) as tx:
        assert await tx.scalar("select count(*) as n from ledger_entry where entry_type = 'usage'") == 12
    bal = await _balance(a, "cust-1")
    assert (bal["balance"], bal["held"]) == ("0.929000", "0.000000"), bal


@needs_cluster
@pytest.mark.skipif(not CLUSTER_DIR, reason="BILLING_TEST_GALERA_DIR (set by tests/galera.py run) is needed")
async def test_a_node_killed_under_load(tmp_path, galera_database):
    """SIGKILL of the node one instance uses, under 16 concurrent clients: the instance answers
    again within REJOIN_SECONDS through another node; every answer is a success, a caller's 4xx
    or a 503; every acknowledged event is charged exactly once; the node rejoins; the books
    reconcile from every node."""
    cluster = GaleraCluster.attach(CLUSTER_DIR)
    victim = len(cluster.nodes) - 1          # instance A starts on the last node, B on node 1
    config = make_config(tmp_path)
    a, b = await _two_instances(config, galera_database, victim, tmp_path)
    load = UsageLoad((b, a), "k")
    try:
        load.start(16)
        await asyncio.sleep(2)
        assert (await a.health())["db_node"] == cluster.nodes[victim].address
        cluster.kill(victim)
        killed_at = time.monotonic()
        recovered_after = await _answers_again(a, deadline_seconds=REJOIN_SECONDS)
        await asyncio.sleep(2)
        await load.finish()
        health = await a.health()
        assert health["db"] == "ok" and health["db_node"] != cluster.nodes[victim].address, health
        print(f"\nnode kill: instance A answered again {recovered_after:.2f} s after the kill; {load.summary()}")
        cluster.restart(victim)
        print(f"node kill: the killed node rejoined (Synced) {time.monotonic() - killed_at:.1f} s after the kill")
        await _assert_each_acknowledged_event_charged_once(b, load.acknowledged)
        await _reconcile_from_every_node(cluster, config, galera_database, tmp_path)
    finally:
        load.cancel()
        await a.close()
        await b.close()
        if cluster.nodes[victim].process is None or cluster.nodes[victim].process.poll() is not None:
            cluster.restart(victim)     # leave the cluster whole for the tests that follow


async def _answers_again(core, deadline_seconds):
    """Seconds until ``core`` runs a write again after its node died or stopped; fails past the
    deadline, a probe that hangs included."""
    started = time.monotonic()
    while (left := deadline_seconds - (time.monotonic() - started)) > 0:
        try:
            await asyncio.wait_for(core.accounting.post_usage(usage(f"probe-{time.monotonic_ns()}")), left)
            return time.monotonic() - started
        except DatabaseUnavailable:
            await asyncio.sleep(0.1)
        except asyncio.TimeoutError:
            break
    pytest.fail(f"the instance on the failed node did not answer within {deadline_seconds} s")


async def _assert_each_acknowledged_event_charged_once(core, acknowledged):
    async with core.db.read(latest=True) as tx:
        rows = await tx.select("select r.request_id, r.status, count(e.id) as entries from accounting_records r "
                               "left join ledger_entry e on e.request_id = r.request_id and e.entry_type = 'usage' "
                               "group by r.request_id, r.status")
    by_request = {r.request_id: r for r in rows}
    missing = [rid for rid in acknowledged if rid not in by_request]
    assert not missing, missing[:10]
    wrong = {rid: (by_request[rid].status, int(by_request[rid].entries)) for rid in acknowledged
             if by_request[rid].status != "accounted" or int(by_request[rid].entries) != 1}
    assert not wrong, sorted(wrong.items())[:10]
    assert all(int(r.entries) == (1 if r.status == "accounted" else 0) for r in rows)


async def _empty_tables(core):
    from billing_module.db.schema import load_models
    async with core.db.transaction() as tx:
        for table in load_models():
            await tx.execute(f"delete from {table}")


async def _reconcile_from_every_node(cluster, config, galera_database, tmp_path):
    for i in range(len(cluster.nodes)):
        checker = BillingCore(config=config, db_desc=node_desc(galera_database, i)
                              | {"hosts": [cluster.nodes[i].address]}, data_dir=str(tmp_path))
        try:
            assert (await checker.ledger.reconcile())["mismatches"] == [], i
        finally:
            await checker.close()


async def _two_instances(config, galera_database, victim, tmp_path):
    """Instance A on node ``victim``, B on node 0, over an empty schema with prices and a
    customer holding 1,000."""
    a = BillingCore(config=config, db_desc=node_desc(galera_database, victim), data_dir=str(tmp_path),
                    instance_id="instance-a")
    b = BillingCore(config=config, db_desc=node_desc(galera_database, 0), data_dir=str(tmp_path),
                    instance_id="instance-b")
    await b.create_schema()
    await _empty_tables(b)
    await seed_pricing(b)
    await b.ledger.recharge("cust-1", units("1000"), "r1")
    async with a.db.read(latest=True) as tx:
        # A's node has applied the seed before A reads it: a plain read may lag, and a model
        # A looked up too early would stay a known miss in its cache
        assert await tx.scalar("select count(*) as n from llmage_cache") > 0
    return a, b


@needs_cluster
async def test_every_table_has_a_primary_key_and_no_code_locks_tables(pair):
    """Galera replicates only InnoDB tables with a primary key, and LOCK TABLES does not
    replicate at all."""
    async with pair[0].db.read() as tx:
        without = await tx.select(
            "select t.table_name from information_schema.tables t where t.table_schema = database() "
            "and not exists (select 1 from information_schema.table_constraints c where c.table_schema = "
            "t.table_schema and c.table_name = t.table_name and c.constraint_type = 'PRIMARY KEY')")
    assert without == []
    import pathlib

    import billing_module
    sources = pathlib.Path(billing_module.__file__).parent.rglob("*.py")
    assert not [p for p in sources if "lock tables" in p.read_text().lower()]


def test_database_hosts_come_from_the_environment_and_reach_the_pool(tmp_path):
    from billing_module.config import load_config
    from billing_module.db.database import desc_from_config
    from billing_module.errors import ConfigError
    cfg = load_config(environ={"BILLING_DATABASE_DRIVER": "mysql",
                               "BILLING_DATABASE_HOSTS": "10.0.0.1:3306, db2:3307,"})
    assert cfg.database.hosts == ["10.0.0.1:3306", "db2:3307"]
    db = Database(desc_from_config(cfg, str(tmp_path)))
    assert db.nodes == [("10.0.0.1", 3306), ("db2", 3307)] and db.node == "10.0.0.1:3306"
    assert Database(mysql_desc("h", 3306, "u", "", "n")).node == "h:3306"
    for bad in ("db1", "db1:0", ":3306", "db1:port"):
        with pytest.raises(ConfigError, match="database.hosts"):
            load_config(environ={"BILLING_DATABASE_HOSTS": bad})


def _serve_env(db, hosts):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(BILLING_DATABASE_DRIVER="mysql", BILLING_DATABASE_HOSTS=",".join(hosts), BILLING_DATABASE_USER="root",
               BILLING_DATABASE_NAME=db["name"], BILLING_ACCOUNTING_INTERVAL_SECONDS="0.05",
               BILLING_SERVER_LOG_FILE="server.log")
    return env


@needs_cluster
@pytest.mark.skipif(not CLUSTER_DIR, reason="BILLING_TEST_GALERA_DIR (set by tests/galera.py run) is needed")
async def test_two_servers_a_node_killed_under_load(tmp_path, galera_database):
    """Two ``billing-module serve`` processes on two nodes under 16 HTTP clients; the node of
    server A is SIGKILLed: A answers a charge again within REJOIN_SECONDS, no reply is a 5xx other
    than 503, every acknowledged event is charged exactly once, and the books reconcile from
    every node once the node has rejoined."""
    import random

    import aiohttp

    from billing_module.config import load_config
    from billing_module.tools import crashtest
    cluster = GaleraCluster.attach(CLUSTER_DIR)
    victim, hosts = len(cluster.nodes) - 1, galera_database["hosts"]
    envs = [_serve_env(galera_database, hosts[victim:] + hosts[:victim]), _serve_env(galera_database, hosts)]
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    cfg = load_config(environ=envs[1], overrides={"server": {"data_dir": dirs[1]}})
    for d in dirs:
        os.makedirs(d)
    keys = [await crashtest._prepare(cfg, dirs[1], f"galera-{n}-{os.getpid()}") for n in "ab"]
    loads = [crashtest.Clients(key, random.Random(n), f"galera-{'ab'[n]}-{os.getpid()}", submit_share=0.2)
             for n, key in enumerate(keys)]
    servers = [crashtest.Server(d, env) for d, env in zip(dirs, envs, strict=False)]
    sessions = [aiohttp.ClientSession(headers={"Authorization": f"Bearer {k}"}) for k in keys]
    try:
        for server, session in zip(servers, sessions, strict=False):
            await server.start(session)
        stop = asyncio.Event()
        workers = [asyncio.create_task(loads[n % 2].run(sessions[n % 2], servers[n % 2].url, stop)) for n in range(16)]
        await asyncio.sleep(2)
        acked_before = len(loads[0].acked)
        cluster.kill(victim)
        killed_at = time.monotonic()
        while len(loads[0].acked) == acked_before:        # server A's next acknowledged charge
            assert time.monotonic() - killed_at < REJOIN_SECONDS, f"server A silent for {REJOIN_SECONDS} s"
            await asyncio.sleep(0.05)
        recovered_after = time.monotonic() - killed_at
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*workers)
        for load, server, session in zip(loads, servers, sessions, strict=False):
            while load.retry:                               # resend what was not acknowledged
                await load.run(session, server.url, asyncio.Event(), allow_new=False)
            await crashtest._wait_drained(cfg, dirs[1], load.customer)
        print(f"\ntwo servers, node kill: server A charged again {recovered_after:.2f} s after the kill; "
              f"statuses A {loads[0].statuses}, B {loads[1].statuses}")
    finally:
        for server, session in zip(servers, sessions, strict=False):
            if server.proc is not None and server.proc.poll() is None:
                server.stop()
            await session.close()
        if cluster.nodes[victim].process is None or cluster.nodes[victim].process.poll() is not None:
            cluster.restart(victim)
    for load in loads:
        assert not [s for s in load.statuses if s >= 500 and s != 503], load.statuses
        for node in cluster.nodes:                          # the books, read through every node
            node_cfg = load_config(environ=dict(envs[1], BILLING_DATABASE_HOSTS=node.address),
                                   overrides={"server": {"data_dir": dirs[1]}})
            report = await crashtest.verify(node_cfg, dirs[1], load)
            assert report["problems"] == [] and report["acknowledged"] > 0, (node.address, report)


STOPPED_TIMEOUT_SECONDS = 2.0
# a post that has not ended by then hangs (without the statement timeout it never ends): generous,
# failover_seconds (8) + handshakes and timeouts on the way + a group commit queued ahead of it
HANG_SECONDS = 60


@needs_cluster
@pytest.mark.skipif(not CLUSTER_DIR, reason="BILLING_TEST_GALERA_DIR (set by tests/galera.py run) is needed")
async def test_a_stopped_node_under_load(tmp_path, galera_database):
    """SIGSTOP of the node one instance uses, under 16 clients, statement timeout 2 s: the node
    answers nothing and breaks no connection (as a hung process or a partition that drops
    packets). No post hangs: each is charged (on another node) or ends with DatabaseUnavailable
    (and is sent again); the instance leaves the node; every request_id is charged at most once
    and every acknowledged one exactly once; after SIGCONT the node rejoins, and the books
    reconcile from every node."""
    cluster = GaleraCluster.attach(CLUSTER_DIR)
    victim = len(cluster.nodes) - 1          # instance A starts on the last node, B on node 1
    config = make_config(tmp_path, database={"statement_timeout_seconds": STOPPED_TIMEOUT_SECONDS})
    a, b = await _two_instances(config, galera_database, victim, tmp_path)
    load = UsageLoad((b, a), "s", hang_seconds=HANG_SECONDS)
    paused = False
    try:
        load.start(16)
        await asyncio.sleep(2)
        assert (await a.health())["db_node"] == cluster.nodes[victim].address
        cluster.pause(victim)
        paused, stopped_at = True, time.monotonic()
        recovered_after = await _answers_again(a, deadline_seconds=HANG_SECONDS)
        await asyncio.sleep(2)
        await load.finish(HANG_SECONDS)
        health = await a.health()
        assert health["db"] == "ok" and health["db_node"] != cluster.nodes[victim].address, health
        print(f"\nstopped node: instance A charged again {recovered_after:.2f} s after SIGSTOP; {load.summary()}")
        cluster.resume(victim)
        paused = False
        print(f"stopped node: the node rejoined (Synced) {time.monotonic() - stopped_at:.1f} s after SIGSTOP")
        await _assert_each_acknowledged_event_charged_once(b, load.acknowledged)
        await _reconcile_from_every_node(cluster, config, galera_database, tmp_path)
    finally:
        load.cancel()
        if paused:
            cluster.resume(victim)      # leave the cluster whole for the tests that follow
        await a.close()
        await b.close()
