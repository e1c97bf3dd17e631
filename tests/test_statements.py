"""Issue 18: monthly statements cut from the ledger. Usage across month ends, a late event after the
close (prior-period usage on the next statement, the closed one unchanged), refunds, adjustments,
open holds, a time zone, several closers at once, and reconcile catching a change inside a closed
period. Every closed statement must equal the ledger at its cut-off."""
import asyncio
import datetime
import subprocess
import sys

import pytest

from billing_module.config import load_config
from billing_module.core import BillingCore
from billing_module.errors import Conflict
from billing_module.money import from_micro
from billing_module.statements import Statements, month_bounds
from tests.helpers import seed_pricing, usage

PRICE = 6000          # micro-units of one chat-a usage (helpers.CHAT_A_PRICE)


def at(clock, text):
    clock.now = datetime.datetime.fromisoformat(text)


async def ledger_sum_before(core, customer, cutoff):
    async with core.db.read() as tx:
        return int(await tx.scalar("select coalesce(sum(amount), 0) as t from ledger_entry "
                                   "where customer_id = ${c}$ and created_at < ${t}$", {"c": customer, "t": cutoff}))


def figures(st):
    return {k: st[k] for k in ("opening", "recharges", "charges", "prior_period_charges", "refunds", "adjustments",
                               "closing", "held_at_close")}


async def _october_and_november(core, fixed_clock):
    at(fixed_clock, "2026-10-10 09:00:00")
    await seed_pricing(core)
    await core.ledger.recharge("c1", 10_000_000, "r1")
    await core.ledger.recharge("c2", 1_000_000, "r2")
    await core.accounting.post_usage(usage("u1", customer="c1", use_time="2026-10-10 08:59:00"))
    await core.accounting.post_usage(usage("u2", customer="c1", model="flat-1", use_time="2026-10-10 08:59:00"))
    await core.ledger.hold("c1", 500_000, "h-open")                  # still open at the cut-off
    at(fixed_clock, "2026-10-31 23:59:59")
    await core.accounting.post_usage(usage("u3", customer="c1", use_time="2026-10-31 23:59:00"))
    at(fixed_clock, "2026-11-01 00:00:00")                          # the first second of November
    await core.accounting.post_usage(usage("u4", customer="c1", use_time="2026-10-31 23:59:30"))


async def test_statements_across_a_month_end_with_a_late_event_refund_and_adjustment(core, fixed_clock):
    await _october_and_november(core, fixed_clock)
    book = Statements(core.db, core.config)
    with pytest.raises(Conflict):
        await book.close("c1", "2026-11")                            # November has not ended
    at(fixed_clock, "2026-11-01 00:03:00")
    assert await book.close_due() == 0                               # within the grace period: nothing yet
    at(fixed_clock, "2026-11-01 00:06:00")
    assert await book.close_due() == 2                               # c1 and c2
    assert await book.close_due() == 0                               # idempotent
    october = await book.find("c1", "2026-10")
    assert october["status"] == "closed" and october["number"].startswith("ST-2026-")
    assert figures(october) == {"opening": "0.000000", "recharges": "10.000000", "charges": "1.012000",
                                "prior_period_charges": "0.000000", "refunds": "0.000000",
                                "adjustments": "0.000000", "closing": "8.988000", "held_at_close": "0.500000"}
    by_name = {(ln["kind"], ln["name"]): ln for ln in october["lines"]}
    assert by_name[("model", "chat-a")]["amount"] == "0.012000" and by_name[("model", "chat-a")]["count"] == 2
    assert by_name[("model", "flat-1")]["amount"] == "1.000000"
    assert [h["request_id"] for h in october["holds"]] == ["h-open"]
    # late: used in October, accounted after the close; a refund and an adjustment in November
    at(fixed_clock, "2026-11-02 10:00:00")
    await core.accounting.post_usage(usage("u5", customer="c1", use_time="2026-10-31 23:59:50"))
    await core.ledger.refund("c1", 1_000_000, "rf1", reason="goodwill")
    await core.ledger.adjust("c1", -250_000, "adj1", reason="correction")
    assert await book.find("c1", "2026-10") == october                # the closed one never changes
    live = await book.statement("c1", "2026-11")
    assert live["status"] == "open" and live["number"] is None
    at(fixed_clock, "2026-12-01 00:10:00")
    await book.close_due()
    november = await book.find("c1", "2026-11")
    assert figures(november) == {"opening": "8.988000", "recharges": "0.000000", "charges": "0.012000",
                                 "prior_period_charges": "0.012000", "refunds": "1.000000",
                                 "adjustments": "-0.250000", "closing": "9.726000", "held_at_close": "0.500000"}
    # every closed statement is the ledger at its cut-off; the numbers are unique and in order
    for st in (october, november, await book.find("c2", "2026-10"), await book.find("c2", "2026-11")):
        assert st["closing"] == from_micro(await ledger_sum_before(core, st["customer_id"], st["period_end"]))
    numbers = [s["number"] for s in (await book.closed("c1", 1, 10))["rows"]]
    assert numbers == sorted(numbers, reverse=True) and len(set(numbers)) == 2
    assert await book.reconcile() == []


async def test_a_time_zone_moves_the_cut_off(core, fixed_clock, tmp_path, db_desc):
    """In Asia/Shanghai November begins at 2026-10-31 16:00 UTC: a charge at 17:00 UTC is November's."""
    assert month_bounds("2026-11", "Asia/Shanghai") == ("2026-10-31 16:00:00", "2026-11-30 16:00:00")
    cfg = load_config(environ={}, overrides={"server": {"data_dir": str(tmp_path), "log_file": ""},
                                             "timezone": "Asia/Shanghai"})
    at(fixed_clock, "2026-10-31 15:00:00")
    await seed_pricing(core)
    await core.ledger.recharge("c1", 1_000_000, "r1")
    at(fixed_clock, "2026-10-31 17:00:00")
    await core.accounting.post_usage(usage("u1", customer="c1", use_time="2026-10-31 16:30:00"))
    at(fixed_clock, "2026-12-01 00:00:00")
    shanghai, utc = Statements(core.db, cfg), Statements(core.db, core.config)
    assert (await shanghai.statement("c1", "2026-10"))["charges"] == "0.000000"
    assert (await shanghai.statement("c1", "2026-11"))["charges"] == "0.006000"
    assert (await utc.statement("c1", "2026-10"))["charges"] == "0.006000"
    closed = await shanghai.close("c1", "2026-11")
    assert closed["time_zone"] == "Asia/Shanghai" and closed["period_start"] == "2026-10-31 16:00:00"
    assert await shanghai.reconcile() == []


async def test_several_closers_at_once_close_each_statement_once_with_distinct_numbers(core, fixed_clock, config,
                                                                                        db_desc, tmp_path):
    at(fixed_clock, "2026-10-05 00:00:00")
    customers = [f"c{i}" for i in range(12)]
    for c in customers:
        await core.ledger.recharge(c, 1_000_000, f"r-{c}")
    at(fixed_clock, "2026-11-02 00:00:00")
    others = [BillingCore(config=config, db_desc=db_desc, data_dir=str(tmp_path)) for _ in range(2)]
    try:
        books = [Statements(c.db, c.config) for c in [core] + others]
        await asyncio.gather(*(b.close_month("2026-10") for b in books))
    finally:
        for o in others:
            await o.close()
    async with core.db.read() as tx:
        rows = await tx.select("select customer_id, number_seq from statement where month = '2026-10'")
    assert sorted(r.customer_id for r in rows) == sorted(customers)
    assert sorted(int(r.number_seq) for r in rows) == list(range(1, 13))


@pytest.mark.tampers
async def test_reconcile_catches_an_entry_written_into_a_closed_period(core, fixed_clock):
    at(fixed_clock, "2026-10-05 00:00:00")
    await core.ledger.recharge("c1", 1_000_000, "r1")
    at(fixed_clock, "2026-11-02 00:00:00")
    book = Statements(core.db, core.config)
    await book.close_month("2026-10")
    assert await book.reconcile() == []
    async with core.db.transaction() as tx:
        await tx.execute("update ledger_entry set created_at = '2026-11-01 12:00:00' where request_id = 'r1'")
    found = {(m["figure"], m["stored"], m["ledger"]) for m in await book.reconcile()}
    assert ("recharges", 1_000_000, 0) in found and ("closing", 1_000_000, 0) in found


async def test_statement_apis_scope_and_exports(http, fixed_clock):
    core = http.core
    at(fixed_clock, "2026-10-05 00:00:00")
    await seed_pricing(core)
    await core.ledger.recharge("c1", 1_000_000, "r1")
    await core.ledger.recharge("c2", 1_000_000, "r2")
    await core.accounting.post_usage(usage("u1", customer="c1", model="chat-a", use_time="2026-10-05 00:00:00"))
    at(fixed_clock, "2026-11-02 00:00:00")
    await Statements(core.db, core.config).close_month("2026-10")
    key, _ = await core.apikeys.create("customer", customer_id="c1")
    status, st = await http.get("api/statements.dspy", key, month="2026-10")
    assert status == 200 and st["customer_id"] == "c1" and st["status"] == "closed"
    assert (st["opening"], st["recharges"], st["charges"], st["refunds"], st["adjustments"], st["closing"]) == (
        "0.000000", "1.000000", "0.006000", "0.000000", "0.000000", "0.994000")
    status, other = await http.get("api/statements.dspy", key, customer_id="c2", month="2026-10")
    assert status == 403
    status, c2 = await http.get("api/statements.dspy", http.admin_key, customer_id="c2", month="2026-10")
    assert status == 200 and c2["closing"] == "1.000000"
    status, body = await http.get("api/statement_export.dspy", key, id=c2["id"])
    assert status == 403                                            # another customer's statement
    status, body = await http.get("api/statements.dspy", key, month="2026-13")
    assert status == 400 and body["code"] == "invalid_param"
    r = await http.client.get("/billing_module/api/statement_export.dspy", params={"id": st["id"], "format": "csv"},
                              headers={"Authorization": f"Bearer {key}"})
    text = await r.text()
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
    assert "Closing balance,0.994000" in text and "chat-a" in text
    r = await http.client.get("/billing_module/api/statement_export.dspy", params={"id": st["id"], "format": "html"},
                              headers={"Authorization": f"Bearer {key}"})
    assert r.status == 200 and "<td>0.994000</td>" in await r.text()
    pytest.importorskip("weasyprint")
    r = await http.client.get("/billing_module/api/statement_export.dspy", params={"id": st["id"], "format": "pdf"},
                              headers={"Authorization": f"Bearer {key}"})
    assert r.status == 200 and (await r.read()).startswith(b"%PDF")


def test_statements_close_command(tmp_path):
    env_args = ["--data-dir", str(tmp_path)]
    run = [sys.executable, "-m", "billing_module.cli"]
    subprocess.run(run + ["initdb"] + env_args, check=True, capture_output=True, timeout=60)
    bad = subprocess.run(run + ["statements", "close", "--month", "2026-13"] + env_args, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "month" in bad.stderr
    ok = subprocess.run(run + ["statements", "close", "--month", "2000-01"] + env_args, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "closed 0 statements for 2000-01" in ok.stdout
    rec = subprocess.run(run + ["reconcile"] + env_args, capture_output=True, text=True, timeout=60)
    assert rec.returncode == 0 and "closed statements against the ledger: 0 mismatches" in rec.stdout
