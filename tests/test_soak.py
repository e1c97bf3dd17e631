"""A short, bounded soak (issue 7, item 4) against the standalone host in-process, on SQLite and on
MariaDB: ``billing_module.tools.proof.soak`` drives it over real HTTP with concurrent clients (recharges,
holds, settles, releases, usage accounted now and queued, duplicates sent later and at once,
retries after client-side timeouts, conflicting payloads), then proves the books from the
outside. The server runs its background jobs (the accountant charges the queued usage).

The soak's checks are tested too: a charge the books agree with but no client asked for, and a
charge of the wrong amount, are both found. No assertion here is about time or rates: the run
is bounded by time, the assertions are about what it did and what the books say."""
import asyncio
import logging

import pytest

from billing_module.tools.proof import Soak, format_report, soak
from tests.helpers import seed_pricing

SECONDS, CLIENTS = 8, 8


@pytest.fixture
async def server(http):
    """The standalone host with its background jobs running (as ``billing-module serve``)."""
    await seed_pricing(http.core)
    # the soak settles some holds above their amount (delivered more than estimated): let an admin
    http.core.config.holds.max_settle_over_hold_ratio = 1000.0
    await http.core.start_background()
    try:
        yield http
    finally:
        await http.core.stop_background()


def base_url(http):
    return str(http.client.make_url("/")).rstrip("/")


class ServerErrors(logging.Handler):
    """The 500s ``api.handle`` logs, also those whose client had already gone (it never saw them)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.getMessage()}: {record.exc_info[1]!r}" if record.exc_info else record.getMessage())


async def test_soak_proves_the_books(server):
    errors = ServerErrors()
    api_log = logging.getLogger("billing_module.api")
    api_log.addHandler(errors)
    try:
        report = await soak(base_url(server), server.admin_key, SECONDS, CLIENTS, seed=7,
                            reconcile=server.core.ledger.reconcile, drain_seconds=30)
    finally:
        api_log.removeHandler(errors)
    print(format_report(report))
    assert report["problems"] == [], format_report(report)
    assert report["ok"] and report["server_errors"] == 0
    # (on MariaDB: see test_a_transaction_cancelled_mid_statement_stays_cancelled)
    assert errors.messages == [], f"{len(errors.messages)} requests failed with a 500 on the server: " \
                                  f"{sorted(set(errors.messages))[:5]}"
    assert report["reconcile"] == {"customers": report["reconcile"]["customers"], "mismatches": 0}
    # it did what it is for: every kind of request was acknowledged, duplicates and probes were sent
    for kind in ("recharge", "accounting", "accounting_submit", "authorize", "settle", "release"):
        assert report["acknowledged"].get(kind, 0) > 0, (kind, report["acknowledged"])
    for what in ("duplicates_sent", "concurrent_duplicate_groups", "conflict_probes", "balance_checks"):
        assert report["stats"].get(what, 0) > 0, (what, report["stats"])
    assert set(report["requests"]) >= {"recharge", "accounting", "accounting_submit", "authorize", "settle",
                                       "release", "balance", "transactions", "quote", "pricing"}
    # the ledger of every soak customer was compared entry by entry
    assert set(report["ledger"]) == set(report["customers"])
    assert all(s["ledger_sum"] == s["expected"] == s["balance"] for s in report["ledger"].values()), report["ledger"]


async def _move(core, customer, amount, sql, ns):
    """Change the ledger by ``sql`` and the balance by ``amount`` together: the books still reconcile."""
    async with core.db.transaction() as tx:
        await tx.execute(sql, ns)
        await tx.execute("update customer_balance set balance = balance + ${a}$ where id = ${c}$",
                         {"a": amount, "c": customer})


async def test_the_soak_finds_charges_reconcile_cannot_see(server):
    """A charge no client asked for and a charge of the wrong amount, each with its balance moved
    along (so the sums reconcile): the client's record finds both."""
    from billing_module.ids import new_id
    run = Soak(base_url(server), server.admin_key, seconds=2, clients=3, seed=11, drain_seconds=30)
    await run.run()       # whatever it found (test_soak_proves_the_books judges the server)
    async with run_session(run):
        found_before = set(run.verify(await run.read_books()))
    c0, c1 = run.customers[0], run.customers[1]
    charged = next(k for k in run.expected if k[0] == c1 and k[1] in ("usage", "settle"))
    ghost = {"i": new_id(), "c": c0, "r": f"{run.prefix}-ghost"}
    # the ghost ends the running balance where the moved balance is, so reconcile's chain holds
    await _move(server.core, c0, -1000, "insert into ledger_entry (id, customer_id, entry_type, amount, balance_after, "
                "currency, request_id, payload_hash, created_at) select ${i}$, ${c}$, 'usage', -1000, balance - 1000, "
                "'CNY', ${r}$, 'x', '2026-01-01 00:00:00' from customer_balance where id = ${c}$", ghost)
    wrong = {"c": c1, "t": charged[1], "r": charged[2]}
    await _move(server.core, c1, -1, "update ledger_entry set amount = amount - 1 where customer_id = ${c}$ "
                "and entry_type = ${t}$ and request_id = ${r}$", wrong)
    try:
        # the books alone: the ghost is invisible; the wrong amount breaks only c1's running balance
        mismatches = (await server.core.ledger.reconcile())["mismatches"]
        assert [(m["customer_id"], "running_balance" in m) for m in mismatches] == [(c1, True)], mismatches
        async with run_session(run):
            problems = set(run.verify(await run.read_books())) - found_before
        assert any(ghost["r"] in p and "matches no request" in p for p in problems), problems
        assert any(charged[2] in p and "expected" in p for p in problems), problems
        assert any(c0 in p and "the client expects" in p for p in problems), problems
    finally:
        await _move(server.core, c0, 1000, "delete from ledger_entry where id = ${i}$", ghost)
        await _move(server.core, c1, 1, "update ledger_entry set amount = amount + 1 where customer_id = ${c}$ "
                    "and entry_type = ${t}$ and request_id = ${r}$", wrong)


class run_session:
    """Re-open the soak's HTTP session after its run (read_books needs one)."""

    def __init__(self, run):
        self.run = run

    async def __aenter__(self):
        import aiohttp
        self.run.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.run.admin_key}"})
        self.run.ledger_summary = {}
        return self.run

    async def __aexit__(self, *exc):
        await self.run.session.close()


# --- what the soak found, pinned ------------------------------------------------------------------------
async def test_a_transaction_cancelled_mid_statement_stays_cancelled(core):
    """Found by the soak on MariaDB: a client that gives up cancels its request's handler in the
    middle of a statement. aiomysql then closes the connection ("Cancelled during execution"), the
    rollback fails, and ``Database.transaction`` raises ConnectionError("rollback failed") in place
    of the CancelledError: the cancellation is swallowed, and ``api.handle`` logs "API <name>
    failed" and answers 500 internal_error. The cancellation must propagate (the database rolls
    the transaction back when its connection closes), and the database stays usable."""
    slow = ("select sleep(2) as s" if core.db.dialect == "mysql" else
            "with recursive c(x) as (select 1 union all select x + 1 from c where x < 3000000) "
            "select count(*) as n from c")
    started = asyncio.Event()

    async def work(tx):
        started.set()
        return await tx.scalar(slow)

    task = asyncio.create_task(core.db.run(work))
    await started.wait()
    await asyncio.sleep(0.05)      # inside the statement
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from customer_balance") == 0


async def test_the_same_hold_sent_twice_at_once_is_one_hold(core):
    """Found by the soak on MariaDB (holds left open after every hold was closed): a retried
    authorize (same request_id, same amount) that overlaps its first attempt is answered 402
    insufficient_balance when the first attempt took the money: ``Ledger.hold`` looks for the
    request_id before its conditional UPDATE, waits there on the balance row the first attempt
    locked, and then finds the balance short. The client is told "refused" for a hold that exists,
    so it never settles or releases it. Both answers must be the hold (one a duplicate)."""
    from tests.helpers import units
    for i in range(8):
        customer, request_id = f"dup-{i}", f"hold-{i}"
        await core.ledger.recharge(customer, units("1"), f"top-{i}")
        results = await asyncio.gather(*(core.ledger.hold(customer, units("0.8"), request_id) for _ in range(2)),
                                       return_exceptions=True)
        assert all(isinstance(r, dict) for r in results), (i, results)
        assert sorted(r["duplicate"] for r in results) == [False, True], (i, results)
        assert (await core.ledger.balance(customer))["held"] == "0.800000"
