"""A database node that stops answering: the statement timeout fails it like a broken connection.

A stopped process or a network that drops packets breaks no connection, so without a bound a
caller would wait for its reply forever. The MariaDB tests put two frozen-able TCP proxies
(tests/tcp_proxy.py) in front of the one server named by BILLING_TEST_MYSQL, which the module
takes for two nodes; tests/test_galera.py stops a real Galera node with SIGSTOP."""
import asyncio

import pymysql
import pytest

from billing_module.config import load_config
from billing_module.core import BillingCore
from billing_module.db.database import CommitUnknown, Database, NodeTimeout, mysql_desc, sqlite_desc
from billing_module.errors import ConfigError, DatabaseUnavailable
from tests.conftest import MYSQL_URL, _mysql_schema_ready, make_config
from tests.helpers import UsageLoad, seed_pricing, units
from tests.tcp_proxy import TcpProxy

needs_mysql = pytest.mark.skipif(not MYSQL_URL, reason="BILLING_TEST_MYSQL names no MariaDB")
TIMEOUT_SECONDS = 1.0
# a call that has not ended by then hangs (without the statement timeout it would never end);
# generous: failover_seconds (8) + connects and timeouts on the way + a group commit queued ahead
HANG_SECONDS = 60


@pytest.fixture
async def proxies(mysql_database):
    if mysql_database is None:
        pytest.skip("BILLING_TEST_MYSQL names no MariaDB")
    pair = [await TcpProxy(mysql_database["host"], mysql_database["port"]).start() for _ in range(2)]
    yield pair
    for p in pair:
        await p.close()


def proxied_desc(db, proxies):
    return mysql_desc(db["host"], db["port"], db["user"], db["password"], db["name"], [p.address for p in proxies])


@pytest.fixture
async def probe_db(mysql_database, proxies):
    """A Database on both proxies (proxy 0 first) with a short statement timeout, and a table."""
    on_server(mysql_database, "create table if not exists timeout_probe (id varchar(40) primary key, n int not null)")
    on_server(mysql_database, "delete from timeout_probe")
    desc = proxied_desc(mysql_database, proxies)
    desc["kwargs"]["connect_timeout"] = TIMEOUT_SECONDS     # bounds the handshake too
    db = Database(desc, statement_timeout_seconds=TIMEOUT_SECONDS)
    yield db
    await db.close()


def on_server(db, sql, args=()):
    """Run ``sql`` directly on the server, not through a proxy; its rows."""
    conn = pymysql.connect(host=db["host"], port=db["port"], user=db["user"], password=db["password"],
                           database=db["name"])
    try:
        with conn.cursor() as c:
            c.execute(sql, args)
            rows = c.fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def rows_on_server(db, key):
    """``n`` of the probe rows with ``key``."""
    return [r[0] for r in on_server(db, "select n from timeout_probe where id = %s", (key,))]


def test_the_statement_timeout_comes_from_the_environment_and_reaches_the_pool(tmp_path):
    cfg = load_config(environ={"BILLING_DATABASE_DRIVER": "mysql", "BILLING_DATABASE_STATEMENT_TIMEOUT_SECONDS": "2.5"})
    assert cfg.database.statement_timeout_seconds == 2.5
    assert load_config(environ={}).database.statement_timeout_seconds == 30
    core = BillingCore(config=cfg, data_dir=str(tmp_path))
    assert core.db.statement_timeout_seconds == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="database.statement_timeout_seconds"):
            load_config(environ={"BILLING_DATABASE_STATEMENT_TIMEOUT_SECONDS": bad})


async def test_sqlite_has_no_statement_timeout_and_still_waits_on_a_writer(tmp_path):
    """SQLite waits on another writer up to its busy timeout by design; a statement timeout
    shorter than that wait does not cut it off."""
    path = str(tmp_path / "t.db")
    first, second = (Database(sqlite_desc(path), statement_timeout_seconds=0.05) for _ in range(2))
    assert first.statement_timeout_seconds is None
    try:
        async with first.transaction() as tx:
            await tx.execute("create table t (id integer primary key, n integer not null)")
        holding = asyncio.Event()

        async def hold_the_write_lock():
            async with first.transaction() as tx:
                await tx.execute("insert into t (id, n) values (1, 1)")
                holding.set()
                await asyncio.sleep(0.5)        # ten statement timeouts
        holder = asyncio.create_task(hold_the_write_lock())
        await holding.wait()
        await second.run(lambda tx: tx.execute("insert into t (id, n) values (2, 2)"))
        await holder
        assert await second.run(lambda tx: tx.scalar("select count(*) from t"), write=False) == 2
    finally:
        await first.close()
        await second.close()


@needs_mysql
async def test_a_statement_without_an_answer_fails_the_node_and_runs_again_on_the_next(probe_db, proxies,
                                                                                       mysql_database):
    """The node stops answering before COMMIT (the statement is held): NodeTimeout, the pool
    moves on, run() runs the work again on the next node; the row is written once."""
    db = probe_db
    assert db.node == proxies[0].address
    proxies[0].freeze()
    await asyncio.wait_for(db.run(lambda tx: tx.execute("insert into timeout_probe (id, n) values ('a', 1)")),
                           HANG_SECONDS)
    assert db.node == proxies[1].address
    proxies[0].thaw()
    assert rows_on_server(mysql_database, "a") == [1]


@needs_mysql
async def test_a_commit_without_an_answer_is_commit_unknown(probe_db, proxies, mysql_database):
    """The COMMIT reaches the server, its answer never comes back: the outcome is unknown to the
    caller (and here the row did commit). Not idempotent: CommitUnknown (503) to the caller;
    idempotent by its key: run again on the next node, where the key shows it is done."""
    db = probe_db
    await db.run(lambda tx: tx.scalar("select 1"), write=False)    # connected: the next COMMIT is the work's
    proxies[0].freeze_after(b"\x03COMMIT")
    with pytest.raises(CommitUnknown):
        await asyncio.wait_for(db.run(lambda tx: tx.execute("insert into timeout_probe (id, n) values ('b', 1)")),
                               HANG_SECONDS)
    assert rows_on_server(mysql_database, "b") == [1]
    assert db.node == proxies[1].address
    proxies[0].thaw()

    again = Database(proxied_desc(mysql_database, proxies), statement_timeout_seconds=TIMEOUT_SECONDS)
    await again.run(lambda tx: tx.scalar("select 1"), write=False)
    proxies[0].freeze_after(b"\x03COMMIT")
    try:
        written, existing = await asyncio.wait_for(again.run_or_existing(
            lambda tx: tx.execute("insert into timeout_probe (id, n) values ('c', 1)"),
            lambda tx: tx.one("select * from timeout_probe where id = 'c'")), HANG_SECONDS)
    finally:
        await again.close()
    assert written is None and existing.n == 1
    assert rows_on_server(mysql_database, "c") == [1]


@needs_mysql
async def test_no_node_answering_is_database_unavailable_in_bounded_time(probe_db, proxies):
    """Both nodes stop answering: the caller gets DatabaseUnavailable, new connections included
    (their handshake would wait forever: aiomysql's connect_timeout covers the TCP connect only)."""
    db = probe_db
    db.failover_seconds = 2
    for p in proxies:
        p.freeze()
    with pytest.raises(DatabaseUnavailable) as err:
        await asyncio.wait_for(db.run(lambda tx: tx.scalar("select 1"), write=False), HANG_SECONDS)
    assert isinstance(err.value.__cause__, NodeTimeout), repr(err.value.__cause__)
    assert not db._idle                            # no connection of unknown state went back to the pool


@needs_mysql
async def test_a_lock_wait_longer_than_the_statement_timeout_is_not_a_node_failure(probe_db, proxies,
                                                                                   mysql_database):
    """Another transaction holds the row for three statement timeouts: the server answers the
    waiting statement 1205 (its lock wait is set below the timeout), run() retries, the work is
    done once the lock is released, and the pool stays on its node."""
    db = probe_db
    async with db.transaction() as tx:
        await tx.execute("insert into timeout_probe (id, n) values ('d', 0)")
    holder = Database(mysql_desc(mysql_database["host"], mysql_database["port"], mysql_database["user"],
                                 mysql_database["password"], mysql_database["name"]))
    locked = asyncio.Event()

    async def hold():
        async with holder.transaction() as tx:
            await tx.execute("update timeout_probe set n = n + 1 where id = 'd'")
            locked.set()
            await asyncio.sleep(3 * TIMEOUT_SECONDS)
    task = asyncio.create_task(hold())
    try:
        await locked.wait()
        await asyncio.wait_for(db.run(lambda tx: tx.execute("update timeout_probe set n = n + 10 where id = 'd'")),
                               HANG_SECONDS)
        await task
    finally:
        await holder.close()
    assert rows_on_server(mysql_database, "d") == [11]
    assert db.node == proxies[0].address


@needs_mysql
async def test_a_frozen_node_under_load(tmp_path, mysql_database, proxies):
    """The node one instance uses stops answering under 12 concurrent clients (statement timeout
    1 s): no post hangs; each ends charged or with DatabaseUnavailable (and is sent again); the
    instance moves to the other node; every request_id is charged at most once and every
    acknowledged one exactly once; the books reconcile."""
    if mysql_database["name"] in _mysql_schema_ready:
        from tests.conftest import _empty_mysql_tables
        _empty_mysql_tables(mysql_database)
    config = make_config(tmp_path, database={"statement_timeout_seconds": TIMEOUT_SECONDS})
    core = BillingCore(config=config, db_desc=proxied_desc(mysql_database, proxies), data_dir=str(tmp_path))
    await core.create_schema()
    _mysql_schema_ready.add(mysql_database["name"])
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1000"), "r1")
    load = UsageLoad((core,), "f", hang_seconds=HANG_SECONDS)
    try:
        load.start(12)
        await asyncio.sleep(1)
        assert core.db.node == proxies[0].address and load.answers["ok"] > 0
        proxies[0].freeze()
        before = load.answers["ok"]

        async def answered_again():
            while load.answers["ok"] == before:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(answered_again(), HANG_SECONDS)
        await asyncio.sleep(1)
        await load.finish()
        assert (await core.health())["db_node"] == proxies[1].address
        proxies[0].thaw()
        print(f"\nfrozen node: {load.summary()}")
        async with core.db.read() as tx:
            rows = await tx.select(
                "select r.request_id, r.status, count(e.id) as entries from accounting_records r "
                "left join ledger_entry e on e.request_id = r.request_id and e.entry_type = 'usage' "
                "group by r.request_id, r.status")
        by_request = {r.request_id: r for r in rows}
        assert not [rid for rid in load.acknowledged if rid not in by_request]
        assert all(by_request[rid].status == "accounted" and int(by_request[rid].entries) == 1
                   for rid in load.acknowledged)
        assert all(int(r.entries) == (1 if r.status == "accounted" else 0) for r in rows)
        assert (await core.ledger.reconcile())["mismatches"] == []
    finally:
        load.cancel()
        await core.close()
