"""Direct, deterministic tests for the money bugs a planted-bug campaign showed the suite missed
(issue 10; the campaign and its runner: docs/proof.md, tests/mutation/run_mutants.py). Each test
names the mutant it kills. Both databases, no sleeps, no timing."""
import datetime

import pytest

from billing_module.accounting import parse_event
from billing_module.errors import Conflict, InsufficientBalance
from tests.helpers import seed_pricing, units, usage


async def _usage_balances_after(core, customer_id):
    async with core.db.read() as tx:
        rows = await tx.select("select balance_after from ledger_entry where customer_id = ${c}$ "
                               "and entry_type = 'usage'", {"c": customer_id})
    return sorted(int(r.balance_after) for r in rows)


# --- failures.py ---------------------------------------------------------------------------------
async def test_retry_backoff_grows_retry_by_retry(core, fixed_clock):
    """Kills: backoff that never grows. The expected times are written out from the configuration
    (base 30 s, doubling, capped at 200 s), not computed with backoff_seconds."""
    acc = core.config.accounting
    acc.retry_base_seconds, acc.retry_max_seconds, acc.max_retries = 30, 200, 6
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("0.001"), "r1")
    fixed_clock.now = datetime.datetime(2026, 11, 22, 12, 0, 0)
    with pytest.raises(InsufficientBalance):
        await core.accounting.post_usage(usage("poor"))
    expected = ["2026-11-22 12:00:30",     # first failure + 30 s
                "2026-11-22 12:01:30",     # retried at 12:00:30, + 60 s
                "2026-11-22 12:03:30",     # retried at 12:01:30, + 120 s
                "2026-11-22 12:06:50",     # retried at 12:03:30, + 200 s (240 s capped)
                "2026-11-22 12:10:10"]     # retried at 12:06:50, + 200 s
    seen = []
    for retries in range(len(expected)):
        row = (await core.failures.search(customer_id="cust-1"))["rows"][0]
        assert row["retry_count"] == retries
        seen.append(row["next_retry_at"])
        fixed_clock.now = datetime.datetime.fromisoformat(row["next_retry_at"]) - datetime.timedelta(seconds=1)
        assert await core.retries.retry_due() == 0              # not due a second early
        fixed_clock.advance(1)
        assert await core.retries.retry_due() == 0              # due: retried, still too poor
    assert seen == expected
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.001000"


async def test_recording_a_failure_never_turns_an_accounted_event_back(core):
    """Kills: failures.record turning an accounted record back into failed (a late failure of a
    concurrent attempt arriving after another attempt accounted the event)."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    done = await core.accounting.post_usage(usage("ok-1"))
    late = await core.failures.record(parse_event(usage("ok-1")), InsufficientBalance("late refusal"))
    assert late is None
    rec = await core.accounting.record(request_id="ok-1")
    assert (rec.status, rec.error_code, int(rec.amount)) == ("accounted", None, units(done["amount"]))
    assert (await core.failures.search())["total"] == 0
    assert (await core.accounting.post_usage(usage("ok-1")))["duplicate"] is True


# --- accounting.py -------------------------------------------------------------------------------
async def test_submit_refuses_a_reused_request_id_with_another_payload(core):
    """Kills: submit_usage replaying a reused request_id without the payload-hash check."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    first = await core.accounting.submit_usage(usage("sub-1"))
    assert first["status"] == "pending"
    with pytest.raises(Conflict):
        await core.accounting.submit_usage(usage("sub-1", output_tokens=7))
    assert (await core.accounting.submit_usage(usage("sub-1")))["duplicate"] is True
    assert await core.accounting.account_pending() == 1
    with pytest.raises(Conflict):       # also once it is accounted
        await core.accounting.submit_usage(usage("sub-1", output_tokens=7))
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.994000"


async def test_submit_over_http_answers_409_for_a_reused_request_id(http):
    await seed_pricing(http.core)
    status, body = await http.post("api/accounting_submit.dspy", http.admin_key, json=usage("sub-h"))
    assert status == 202 and body["status"] == "pending", body
    status, body = await http.post("api/accounting_submit.dspy", http.admin_key, json=usage("sub-h", input_tokens=9))
    assert status == 409 and body["code"] == "conflict", body
    rec = await http.core.accounting.record(request_id="sub-h")
    assert rec.input_tokens == 1000


# --- ledger.py -----------------------------------------------------------------------------------
async def test_batched_entries_carry_their_running_balance(core):
    """Kills: post_many writing the balance before each entry as its balance_after (the batched
    accountant's path); reconcile's running-balance check catches it as well."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("10"), "r1")
    for i in range(3):
        await core.accounting.submit_usage(usage(f"b-{i}"))
    assert await core.accounting.account_pending() == 3
    assert await _usage_balances_after(core, "cust-1") == [units("9.982"), units("9.988"), units("9.994")]
    assert (await core.ledger.reconcile())["mismatches"] == []


async def test_a_settled_hold_cannot_be_released(core):
    """Kills: release allowed after settle (it answered "released" for a charged hold)."""
    await core.ledger.recharge("c1", units("10"), "r1")
    hold = await core.ledger.hold("c1", units("4"), "h1")
    await core.ledger.settle(units("1.25"), hold_id=hold["hold_id"])
    with pytest.raises(Conflict) as refused:
        await core.ledger.release(hold_id=hold["hold_id"])
    assert refused.value.code == "hold_closed"
    async with core.db.read() as tx:
        row = await tx.one("select status from billing_hold where id = ${h}$", {"h": hold["hold_id"]})
    assert row.status == "settled"
    bal = await core.ledger.balance("c1")
    assert (bal["balance"], bal["held"]) == ("8.750000", "0.000000")


async def test_an_expiry_racing_a_settle_releases_nothing_twice(core, fixed_clock):
    """Kills: _close_hold without its status = 'open' condition. The expiry reads the due hold,
    a settle closes it, then the expiry's update runs: it must change nothing."""
    await core.ledger.recharge("c1", units("10"), "r1")
    hold = await core.ledger.hold("c1", units("4"), "h1", ttl_seconds=60)
    fixed_clock.advance(61)
    due = await core.ledger.due_holds()
    assert [h.id for h in due] == [hold["hold_id"]]
    await core.ledger.settle(units("1"), hold_id=hold["hold_id"])       # an expired hold may still settle
    assert await core.ledger.expire_hold(due[0]) == 0
    async with core.db.read() as tx:
        row = await tx.one("select status, settled_amount from billing_hold where id = ${h}$", {"h": hold["hold_id"]})
    assert (row.status, int(row.settled_amount)) == ("settled", units("1"))
    bal = await core.ledger.balance("c1")
    assert (bal["balance"], bal["held"]) == ("9.000000", "0.000000")
    assert await core.ledger.expire_holds() == 0


async def test_usage_debits_respect_held_money(core):
    """Kills: held left out of the covered-debit condition. 10 on the balance, 8 held: a usage of
    2.004 is refused, by post_usage and by the batched accountant alike."""
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("10"), "r1")
    await core.ledger.hold("cust-1", units("8"), "h1")
    with pytest.raises(InsufficientBalance):
        await core.accounting.post_usage(usage("big-1", input_tokens=1000000))       # 2.004
    await core.accounting.submit_usage(usage("big-2", input_tokens=1000000))
    assert await core.accounting.account_pending() == 0
    assert (await core.accounting.record(request_id="big-2")).error_code == "insufficient_balance"
    ok = await core.accounting.post_usage(usage("small", input_tokens=990000))      # 1.984 fits
    assert ok["amount"] == "1.984000"
    bal = await core.ledger.balance("cust-1")
    assert (bal["balance"], bal["held"], bal["available"]) == ("8.016000", "8.000000", "0.016000")


async def test_a_customer_key_cannot_settle_another_customers_hold(http):
    """Kills: settling or releasing without the hold's customer check. The hold is the customer's
    own (placed with its key); another customer's key names it by hold_id (403) or by the
    request_id (404: request ids are per customer, so another tenant's id is not even found)."""
    await http.core.ledger.recharge("cust-1", units("10"), "r1")
    owner, _ = await http.core.apikeys.create("customer", customer_id="cust-1")
    status, hold = await http.post("api/authorize.dspy", owner, json={"amount": "4", "request_id": "auth-1"})
    assert status == 200
    other, _ = await http.core.apikeys.create("customer", customer_id="cust-2")
    for ref, code in (({"hold_id": hold["hold_id"]}, (403, "forbidden")), ({"request_id": "auth-1"}, (404, "not_found"))):
        status, body = await http.post("api/settle.dspy", other, json=dict(ref, amount="3"))
        assert (status, body["code"]) == code, body
        status, body = await http.post("api/release.dspy", other, json=ref)
        assert (status, body["code"]) == code, body
    bal = await http.core.ledger.balance("cust-1")
    assert (bal["balance"], bal["held"]) == ("10.000000", "4.000000")
    status, body = await http.post("api/settle.dspy", owner, json={"hold_id": hold["hold_id"], "amount": "3"})
    assert status == 200 and body["status"] == "settled"


# --- reconcile -----------------------------------------------------------------------------------
async def test_reconcile_accepts_repeated_balances_and_zero_amounts(core):
    """The running-balance check is order-free: repeated balance_after values and zero-amount
    entries (a settle for 0) chain like any other."""
    await core.ledger.recharge("c1", units("10"), "r1")
    hold = await core.ledger.hold("c1", units("5"), "h1")
    await core.ledger.settle(0, hold_id=hold["hold_id"])                  # amount 0, balance stays 10
    await core.ledger.adjust("c1", -units("5"), "a1", reason="fix")       # 5
    await core.ledger.recharge("c1", units("5"), "r2")                    # 10 again
    await core.ledger.adjust("c1", -units("5"), "a2", reason="fix")       # 5 again
    assert (await core.ledger.reconcile())["mismatches"] == []


@pytest.mark.tampers
async def test_reconcile_reports_a_broken_running_balance_per_customer(core):
    """The sums still agree, but one entry's balance_after is off: reported for that customer."""
    await core.ledger.recharge("c1", units("10"), "r1")
    await core.ledger.recharge("c1", units("5"), "r2")
    await core.ledger.recharge("c2", units("3"), "r3")
    async with core.db.transaction() as tx:
        await tx.execute("update ledger_entry set balance_after = balance_after + 1 where request_id = 'r1'")
    report = await core.ledger.reconcile()
    assert [m["customer_id"] for m in report["mismatches"]] == ["c1"]
    problem = report["mismatches"][0]
    assert problem["balance"] == problem["ledger_total"] == "15.000000"
    assert "running_balance" in problem


def test_every_planted_bug_still_matches_the_code():
    """A mutant whose snippet moved away is reported ``stale`` by the campaign and tests nothing:
    each snippet must occur exactly once in its file, and each killing test must exist."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("run_mutants", root / "tests" / "mutation" / "run_mutants.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    for m in runner.MUTANTS:
        assert (root / m.path).read_text(encoding="utf-8").count(m.original) == 1, m.name
        for test in m.tests:
            path, name = test.split("::")
            assert f"def {name}(" in (root / path).read_text(encoding="utf-8"), (m.name, test)
