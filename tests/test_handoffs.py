"""Fewer waits for the database (hand-offs to SQLite's thread, round trips to MySQL), on both
databases: a statement written ``later`` fails its
transaction where it is sent (the next statement, or the COMMIT) and leaves nothing behind;
multi-row inserts split into cached power-of-two chunks insert every row; the group writer's
rows are built before its transaction and stay as built when the group is run again; a batch
gives the event loop turns while it works through its events."""
import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_module import accounting
from billing_module.db import dialect as dialects
from billing_module.ids import new_id
from tests.helpers import runs_again, seed_pricing, units, usage


def _nonce(nonce, app_key="k"):
    return {"id": new_id(), "nonce": nonce, "app_key": app_key, "seen_at": "2026-12-01 00:00:00"}


async def _nonces(core):
    async with core.db.read() as tx:
        return await tx.scalar("select count(*) from api_nonce")


async def test_a_later_insert_that_fails_fails_its_transaction_at_commit_and_leaves_nothing(core):
    await core.ledger.recharge("cust-1", units("1"), "r1")
    reached = []

    async def work(tx):
        await tx.execute("update customer_balance set balance = balance + 1 where id = ${c}$", {"c": "cust-1"})
        await tx.insert("api_nonce", _nonce("n1"), later=True)
        await tx.insert("api_nonce", _nonce("n1"), later=True)     # the same (app_key, nonce)
        reached.append(True)      # nothing has failed yet: the two are sent with the COMMIT
    with pytest.raises(Exception) as raised:
        await core.db.run(work)
    assert dialects.is_unique_violation(raised.value)
    assert reached == [True]
    assert await _nonces(core) == 0
    assert (await core.ledger.balance("cust-1"))["balance"] == "1.000000"   # the update rolled back too
    # the connection is not left inside a transaction: the next one writes and commits
    await core.db.run(lambda tx: tx.insert("api_nonce", _nonce("n2"), later=True))
    assert await _nonces(core) == 1


async def test_a_later_insert_fails_at_the_next_statement_and_the_transaction_can_go_on(core):
    """Sent with the next statement: its error is raised there, in order; a savepoint around it
    (what the group writer does per request) keeps the rest of the transaction."""
    async def work(tx):
        await tx.insert("api_nonce", _nonce("a"), later=True)
        await tx.savepoint("t1")
        await tx.insert("api_nonce", _nonce("a"), later=True)
        await tx.insert("api_nonce", _nonce("c"), later=True)     # behind the failing one: never runs
        with pytest.raises(Exception) as raised:
            await tx.flush()
        assert dialects.is_unique_violation(raised.value)
        await tx.rollback_to("t1")
        await tx.insert("api_nonce", _nonce("b"), later=True)
        return await tx.scalar("select count(*) from api_nonce")   # sees the writes before it
    assert await core.db.run(work) == 2
    assert await _nonces(core) == 2


async def test_a_savepoint_not_sent_yet_is_rolled_back_by_dropping_what_follows_it(core):
    async def work(tx):
        await tx.insert("api_nonce", _nonce("kept"), later=True)
        await tx.savepoint("t1")
        await tx.insert("api_nonce", _nonce("dropped"), later=True)
        await tx.rollback_to("t1")
        return [r.nonce for r in await tx.select("select nonce from api_nonce")]
    assert await core.db.run(work) == ["kept"]
    assert await _nonces(core) == 1


async def test_later_writes_past_the_send_size_go_in_several_texts_and_all_arrive(core, monkeypatch):
    from billing_module.db import database
    monkeypatch.setattr(database, "_MYSQL_SEND_BYTES", 300)
    rows = [_nonce(f"big-{i}") for i in range(40)]

    async def work(tx):
        await tx.insert_many("api_nonce", rows[:20], later=True)
        for row in rows[20:]:
            await tx.insert("api_nonce", row, later=True)
    await core.db.run(work)
    async with core.db.read() as tx:
        stored = await tx.select("select nonce from api_nonce")
    assert sorted(r.nonce for r in stored) == sorted(r["nonce"] for r in rows)


@pytest.mark.parametrize("n", [1, 255, 256, 1000])
async def test_insert_many_writes_every_row_in_chunks(core, n):
    rows = [_nonce(f"m-{i}") for i in range(n)]
    assert await core.db.run(lambda tx: tx.insert_many("api_nonce", rows)) == n
    later = [_nonce(f"l-{i}") for i in range(n)]
    assert await core.db.run(lambda tx: tx.insert_many("api_nonce", later, later=True)) is None
    async with core.db.read() as tx:
        stored = await tx.select("select id, nonce from api_nonce")
    assert {(r.id, r.nonce) for r in stored} == {(r["id"], r["nonce"]) for r in rows + later}


@pytest.mark.parametrize("n", [1, 300])
async def test_update_many_sets_every_row_and_keeps_what_it_is_told(core, n):
    rows = [_nonce(f"u-{i}") for i in range(n)]
    await core.db.run(lambda tx: tx.insert_many("api_nonce", rows))
    changed = [dict(r, seen_at=f"2026-12-02 10:{i % 60:02d}:00", app_key="other") for i, r in enumerate(rows)]
    await core.db.run(lambda tx: tx.update_many("api_nonce", changed, keep=("nonce", "app_key")))
    async with core.db.read() as tx:
        stored = {r.id: r for r in await tx.select("select id, nonce, app_key, seen_at from api_nonce")}
    assert {i: (r.nonce, r.app_key, r.seen_at) for i, r in stored.items()} == {
        r["id"]: (r["nonce"], "k", r["seen_at"]) for r in changed}


@given(st.integers(min_value=1, max_value=5000), st.integers(min_value=1, max_value=400))
def test_row_chunks_are_powers_of_two_within_the_parameter_limit(rows, columns):
    sizes = dialects.row_chunks(dialects.SQLITE, rows, columns)
    assert sum(sizes) == rows
    assert all(size & (size - 1) == 0 for size in sizes)                  # powers of two: few texts
    assert all(size * columns <= max(columns, dialects._SQLITE_MAX_PARAMS) for size in sizes)
    assert sizes == sorted(sizes, reverse=True)
    assert dialects.row_chunks(dialects.MYSQL, rows, columns) is None   # pymysql batches itself


async def test_a_group_run_again_the_careful_way_writes_the_rows_as_built(core):
    """The batch fills in ledger entry ids, then falls back (one event is short of balance):
    each record then written carries the entry that charged it, none from the rolled-back try."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("0.012"), "r1")      # two charges of 0.006, not three
    results = await core.accounting.post_usage_batch([usage(f"g-{i}") for i in range(3)])
    assert [r["outcome"] for r in results] == ["accounted", "accounted", "refused"]
    async with core.db.read() as tx:
        records = await tx.select("select id, request_id, ledger_entry_id from accounting_records "
                                  "where status = 'accounted' order by request_id")
        entries = await tx.select("select id, ref_id, request_id from ledger_entry where entry_type = 'usage'")
    assert [r.request_id for r in records] == ["g-0", "g-1"]
    assert {(r.ledger_entry_id, r.id) for r in records} == {(e.id, e.ref_id) for e in entries}
    assert {r["ledger_entry_id"] for r in results[:2]} == {e.id for e in entries}


@pytest.mark.parametrize("size", [1, 3])
async def test_the_group_writer_leaves_its_rows_as_built(core, size):
    """A transaction run again (a deadlock, the careful way after a refusal) starts from the row
    as built before it: no run writes into it (a quota taken, an entry id of a rolled-back try)."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    items = []
    for i in range(size):
        ev = await core.accounting._prepare(usage(f"b-{i}"))
        price, model = await core.catalog.quote(ev.usage, ev.llmid, ev.payload["model_name"], ev.customer_id, ev.day)
        items.append(core.accounting._charge_item(ev, price, model, "2026-12-01 00:00:00"))
    built = [dict(item[3]) for item in items]
    outcomes = await core.accounting.group.write(items)
    assert [error for _, error in outcomes] == [None] * size
    assert all(written["ledger_entry_id"] for written, _ in outcomes)
    assert [item[3] for item in items] == built and all(b.get("ledger_entry_id") is None for b in built)


async def test_a_batch_gives_the_event_loop_a_turn_every_few_events(core, monkeypatch):
    """Another request's transaction waiting for its next statement is not held up by a whole
    batch's parsing, pricing or replies: between two turns of the loop at most TURN_EVENTS events
    are read (seen by a task that runs at every turn): 32, about a millisecond of work."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("100"), "r1")
    read = [0]
    prepare = core.accounting._prepare

    async def counted(raw):
        read[0] += 1
        return await prepare(raw)
    monkeypatch.setattr(core.accounting, "_prepare", counted)
    seen, done = [], False

    async def every_turn():
        while not done:
            seen.append(read[0])
            await asyncio.sleep(0)
    watcher = asyncio.create_task(every_turn())
    await asyncio.sleep(0)
    results = await core.accounting.post_usage_batch([usage(f"t-{i}") for i in range(500)])
    done = True
    await watcher
    assert [r["outcome"] for r in results] == ["accounted"] * 500
    steps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert read[0] == 500 and max(steps) <= 32 == accounting.TURN_EVENTS


def _count_trips(core, monkeypatch):
    """How many times a transaction waits for the database: hand-offs to SQLite's thread, round
    trips to MySQL (a statement or a COMMIT)."""
    trips = [0]
    if core.db.dialect == dialects.SQLITE:
        from billing_module.db.sqlite_driver import BillingSQLiteor
        call = BillingSQLiteor.call

        async def counted_call(self, fn):
            trips[0] += 1
            return await call(self, fn)
        monkeypatch.setattr(BillingSQLiteor, "call", counted_call)
    else:
        import aiomysql
        execute, commit = aiomysql.Cursor.execute, aiomysql.Connection.commit

        async def counted_execute(self, *args, **kw):
            trips[0] += 1
            return await execute(self, *args, **kw)

        async def counted_commit(self):
            trips[0] += 1
            return await commit(self)
        monkeypatch.setattr(aiomysql.Cursor, "execute", counted_execute)
        monkeypatch.setattr(aiomysql.Connection, "commit", counted_commit)
    return trips


async def test_a_charge_waits_for_the_database_as_few_times_as_an_insert(core, monkeypatch):
    """The debit is assumed to pass (its count checked before the COMMIT): the BEGIN (SQLite;
    on MySQL the first statement opens the transaction), the debit, the ledger entry and the
    record go together, with the COMMIT on SQLite: one wait; two on MySQL, where a COMMIT
    travels alone, like a one-row insert's transaction. A transaction that sends nothing waits
    for nothing."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await core.accounting.post_usage(usage("warm"))          # the caches filled
    trips = _count_trips(core, monkeypatch)
    await core.accounting.post_usage(usage("counted"))
    charge, trips[0] = trips[0], 0
    await core.db.run(lambda tx: tx.insert("api_nonce", _nonce("n1")))
    insert, trips[0] = trips[0], 0
    await core.db.run(lambda tx: tx.one("select 1 as one from customer_balance where id = 'nobody'"))
    read, trips[0] = trips[0], 0
    await core.db.run(lambda tx: asyncio.sleep(0))        # a write transaction that writes nothing
    empty = trips[0]
    if core.db.dialect == dialects.SQLITE:
        assert (charge, insert, read, empty) == (1, 2, 2, 0)
    else:       # the COMMIT on its own (Tx.before_commit)
        assert (charge, insert, read, empty) == (2, 2, 2, 0)
    assert (await core.accounting.record(request_id="counted")).status == "accounted"



async def test_a_refuted_assumption_leaves_nothing_and_the_work_runs_again_without_it(core):
    """A statement written later with an expected count that it does not meet (here: an update
    of no row) fails the transaction before its COMMIT: nothing of it remains, on MySQL not even
    the statements the server ran behind it, and ``Database.run`` runs the work again, this time
    in a transaction that does not assume; the metric of transactions run again counts it."""
    from billing_module.db.database import AssumptionRefuted
    before = runs_again("assumption")
    attempts = []

    async def work(tx):
        attempts.append(tx.assumes)
        await tx.insert("api_nonce", _nonce(f"try-{len(attempts)}"), later=True)
        if tx.assumes:
            await tx.execute("update customer_balance set balance = balance + 1 where id = ${c}$",
                             {"c": "nobody"}, later=True, expect=1)
            await tx.insert("api_nonce", _nonce("behind"), later=True)
        return "done"
    assert await core.db.run(work) == "done"
    assert attempts == [True, False]
    assert runs_again("assumption") == before + 1
    async with core.db.read() as tx:
        assert [r.nonce for r in await tx.select("select nonce from api_nonce")] == ["try-2"]
    with pytest.raises(AssertionError):       # a transaction opened directly is not run again: no assuming
        async with core.db.transaction() as tx:
            await tx.execute("update customer_balance set balance = 1 where id = 'nobody'", later=True, expect=1)
    with pytest.raises(AssumptionRefuted):       # checked where it is sent: here, with a read
        async with core.db.transaction(assumes=True) as tx:
            await tx.execute("update customer_balance set balance = 1 where id = 'nobody'", later=True, expect=1)
            await tx.scalar("select count(*) from api_nonce")
    assert await _nonces(core) == 1


async def test_a_refuted_count_is_the_answer_even_when_a_statement_behind_it_fails(core):
    """SQLite checks each statement's count before the next runs; MySQL runs the text on until a
    statement fails. Either way the refuted assumption is what the transaction answers (the
    careful run then gives the real one), not the duplicate key behind it."""
    from billing_module.db.database import AssumptionRefuted
    await core.db.run(lambda tx: tx.insert("api_nonce", _nonce("taken")))
    with pytest.raises(AssumptionRefuted):
        async with core.db.transaction(assumes=True) as tx:
            await tx.execute("update customer_balance set balance = 1 where id = 'nobody'", later=True, expect=1)
            await tx.insert("api_nonce", _nonce("taken"), later=True)      # a duplicate key behind it
    assert await _nonces(core) == 1


async def test_a_customer_whose_debits_need_more_is_not_assumed_to_pass_until_one_passes_plainly(core, monkeypatch):
    """A budget (a flag on the balance row) refutes the first charge's assumption: it is charged
    the careful way, its budget spent, and the customer's next charges are made that way from
    the start (fewer waits than an assumption refuted first). Once the budget is gone, the next
    careful charge passes plainly and the one after it is assumed again. A charge refused for
    want of balance writes nothing, whichever way it went."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await core.accounting.post_usage(usage("warm"))
    trips = _count_trips(core, monkeypatch)

    async def charge(request_id):
        trips[0] = 0
        await core.accounting.post_usage(usage(request_id))
        return trips[0]
    assumed = await charge("plain")
    await core.budgets.set_budget("cust-1", "org", "cust-1", "day", units("0.5"))
    refuted = await charge("budget-1")
    careful = await charge("budget-2")
    assert assumed < careful < refuted
    assert "cust-1" in core.ledger._not_plain
    spent = (await core.budgets.list_budgets("cust-1", "org"))["rows"][0]
    assert units(spent["spent"]) == units("0.012")
    await core.budgets.set_budget("cust-1", "org", "cust-1", "day", 0)       # removed
    assert assumed < await charge("after-1") < careful and "cust-1" not in core.ledger._not_plain
    assert await charge("after-2") == assumed
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.964000"    # six charges of 0.006
    await core.ledger.adjust("cust-1", -units("0.964"), "drain", "test")
    with pytest.raises(Exception) as refused:
        await core.accounting.post_usage(usage("short"))
    assert getattr(refused.value, "code", None) == "insufficient_balance"
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.000000"
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) from ledger_entry where request_id = 'short'") == 0


_SPECIALS = "\0\\\n\r\x1a'\"%"
_VALUES = st.lists(st.one_of(
    st.text(alphabet=st.sampled_from(_SPECIALS) | st.characters(exclude_categories=("Cs",)), max_size=12),
    st.integers(min_value=-2**63, max_value=2**63 - 1), st.none(), st.booleans(),
    st.decimals(allow_nan=False, allow_infinity=False, places=4), st.floats(allow_nan=False, allow_infinity=False),
    st.datetimes()), min_size=1, max_size=8)


@pytest.fixture(scope="module")
def mysql_conn(mysql_database):
    """A pymysql connection to the run's MySQL, or a skip when the run names none."""
    import pymysql
    if mysql_database is None:
        pytest.skip("no MySQL named (BILLING_TEST_MYSQL)")
    conn = pymysql.connect(**{k: v for k, v in mysql_database.items() if k != "name"}, charset="utf8mb4")
    yield conn
    conn.close()


@given(_VALUES)
def test_statements_are_written_exactly_as_pymysql_writes_them(mysql_conn, values):
    """The module writes a statement's literals itself (escaping is most of the driver's cost per
    row): the text must be the one pymysql's own mogrify gives, for every kind of value, and a
    string must come back from the server as it was."""
    from billing_module.db.database import _mogrifier
    marked = "select " + ", ".join(["%s"] * len(values))
    text = _mogrifier(mysql_conn)(marked, tuple(values))
    assert text == mysql_conn.cursor().mogrify(marked, tuple(values))
    strings = [v for v in values if isinstance(v, str)]
    if strings:
        with mysql_conn.cursor() as cur:
            cur.execute(_mogrifier(mysql_conn)("select " + ", ".join(["%s"] * len(strings)), tuple(strings)))
            assert list(cur.fetchone()) == strings


def test_a_server_without_backslash_escapes_gets_pymysqls_own_escaping(mysql_conn):
    from billing_module.db.database import _mogrifier
    with mysql_conn.cursor() as cur:
        cur.execute("set session sql_mode = concat(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        try:
            value = "it's a \\ back\\slash"
            text = _mogrifier(mysql_conn)("select %s", (value,))
            assert text == "select 'it''s a \\ back\\slash'"
            cur.execute(text)
            assert cur.fetchone()[0] == value
        finally:
            cur.execute("set session sql_mode = replace(@@sql_mode, 'NO_BACKSLASH_ESCAPES', '')")


async def test_a_commit_never_travels_with_other_statements(core, monkeypatch):
    """On a Galera node, a transaction aborted by a conflicting replicated one can let the
    statements behind the failing one run on in a new transaction: a COMMIT in the same text
    would commit them (records without their ledger entries, seen with a node killed under load).
    Every text the module sends holds no COMMIT beside another statement."""
    if core.db.dialect == dialects.SQLITE:
        pytest.skip("SQLite is sent no statement text: Tx.commit runs the statements one by one")
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    import aiomysql
    sent, execute = [], aiomysql.Cursor.execute

    async def recorded(self, query, args=None):
        sent.append(query)
        return await execute(self, query, args)
    monkeypatch.setattr(aiomysql.Cursor, "execute", recorded)
    await core.accounting.post_usage(usage("alone"))
    await asyncio.gather(*[core.accounting.post_usage(usage(f"together-{i}")) for i in range(6)])
    texts = [[s.strip().lower() for s in q.split(";\n")] for q in sent]
    assert any(len(t) > 1 for t in texts)                   # statements did travel together
    assert not [t for t in texts if len(t) > 1 and "commit" in t]
