"""Usage reports on both databases: the list and its totals, the streamed CSV export (round trip,
TOTAL row = sum of its rows, formula cells neutralised, chunking), grouped statistics, and clear
400s for bad filters."""
import csv
import io
from decimal import Decimal

import pytest

from billing_module.errors import NoPricing
from billing_module.reports import Reports, UsageFilter, safe_cell
from tests.helpers import seed_pricing, units, usage

DAY1, DAY2 = "2026-11-20 09:00:00", "2026-11-21 15:30:00"


async def _seed(core):
    """Accounted usage of two customers on two days, one failed event whose model name is a
    formula, and product usage rows (one with formula-like text)."""
    await seed_pricing(core)
    await core.catalog.put("users", [{"id": "cust-1", "kind": "org", "name": "Acme"},
                                     {"id": "cust-2", "kind": "org", "name": "Globex"}])
    await core.ledger.recharge("cust-1", units("10"), "r1")
    await core.ledger.recharge("cust-2", units("10"), "r2")
    events = [usage("a1", use_time=DAY1, user_id="-2"), usage("a2", use_time=DAY1, input_tokens=3000),
              usage("a3", use_time=DAY2, user_id="@evil"), usage("b1", customer="cust-2", use_time=DAY2),
              usage("f1", model="flat-1", use_time=DAY2)]
    for ev in events:
        await core.accounting.post_usage(ev)
    with pytest.raises(NoPricing):
        await core.accounting.post_usage(usage("x1", model="=1+2", use_time=DAY2))   # no pricing -> failed
    async with core.db.transaction() as tx:
        for i, (mode, sell, cost, ref) in enumerate([("1", 0, 0, "m-1"), ("2", 1500000, 700000, "=cmd|' /C calc'!A0"),
                                                     ("3", 2500001, 1000000, "+x")]):
            await tx.insert("product_usage_log", {
                "id": f"pul-{i}", "product_id": "prod-1", "user_id": "u-1", "user_org_id": "cust-1",
                "resource_type": "llm", "resource_ref_id": ref, "supplier_org_id": "sup-1", "used_amount": "12.5",
                "used_unit": "token", "unit_cost": 0, "total_cost": cost, "sell_price": sell, "billing_mode": mode,
                "use_time": DAY1 if i == 0 else DAY2, "created_at": DAY2, "idempotency_key": f"k-{i}", "currency": "CNY"})


def _d(s):
    return Decimal(s or "0")   # an unpriced (failed) record has no cost: an empty cell


async def test_usage_list_totals_cover_every_matching_row_not_just_the_page(core):
    await _seed(core)
    r = Reports(core.db)
    page1 = await r.usage(UsageFilter(), page=1, rows=2)
    assert page1["total"] == 5 and len(page1["rows"]) == 2
    everything = await r.usage(UsageFilter(), page=1, rows=100)
    t = page1["totals"]
    assert t == everything["totals"]
    assert t["records"] == 5
    assert _d(t["amount"]) == sum(_d(x["amount"]) for x in everything["rows"])
    assert _d(t["cost"]) == sum(_d(x["cost"]) for x in everything["rows"])
    assert _d(t["margin"]) == _d(t["amount"]) - _d(t["cost"])
    assert t["input_tokens"] == sum(x["input_tokens"] for x in everything["rows"])
    # newest first, money as 6-place strings, customer names joined
    assert everything["rows"][0]["use_time"] >= everything["rows"][-1]["use_time"]
    assert all(len(x["amount"].split(".")[1]) == 6 for x in everything["rows"])
    assert {x["customer_name"] for x in everything["rows"]} == {"Acme", "Globex"}
    # filters: customer, model, days (the end day is inclusive), status
    assert (await r.usage(UsageFilter(customer_id="cust-2")))["totals"]["records"] == 1
    assert (await r.usage(UsageFilter(model="flat-1")))["totals"]["amount"] == "1.000000"
    day1 = await r.usage(UsageFilter(start="2026-11-20 00:00:00", end="2026-11-21 00:00:00"))
    assert day1["total"] == 2
    failed = await r.usage(UsageFilter(status="failed"))
    assert failed["total"] == 1 and failed["rows"][0]["model_name"] == "=1+2"
    assert (await r.usage(UsageFilter(status=None)))["total"] == 6


async def test_product_source_and_its_totals(core):
    await _seed(core)
    res = await Reports(core.db).usage(UsageFilter(source="product"), rows=10)
    assert res["total"] == 3
    assert res["totals"] == dict(res["totals"], records=3, amount="4.000001", cost="1.700000", margin="2.300001")
    assert {x["used_amount"] for x in res["rows"]} == {"12.5"}
    only = await Reports(core.db).usage(UsageFilter(source="product", billing_mode="2"))
    assert only["total"] == 1 and only["rows"][0]["amount"] == "1.500000"


async def test_stats_by_day_model_customer_and_total_agree_with_the_totals(core):
    await _seed(core)
    r = Reports(core.db)
    totals = (await r.usage(UsageFilter()))["totals"]
    for group in ("day", "model", "customer"):
        st = await r.stats(UsageFilter(), group)
        assert sum(_d(x["amount"]) for x in st["rows"]) == _d(totals["amount"]), group
        assert sum(x["records"] for x in st["rows"]) == totals["records"], group
        assert max(x["amount_pct"] for x in st["rows"]) == 100
    days = await r.stats(UsageFilter(), "day")
    assert [x["key"] for x in days["rows"]] == ["2026-11-20", "2026-11-21"]
    assert days["rows"][0]["records"] == 2
    customers = await r.stats(UsageFilter(), "customer")
    assert customers["rows"][0]["key"] == "cust-1" and customers["rows"][0]["label"] == "Acme"
    total = await r.stats(UsageFilter(), "total")
    assert total["total"] == 1 and {k: total["rows"][0][k] for k in totals} == totals
    prod = await r.stats(UsageFilter(source="product"), "supplier")
    assert prod["rows"][0]["key"] == "sup-1" and prod["rows"][0]["amount"] == "4.000001"


def test_safe_cell_neutralises_formula_leads():
    for text in ("=1+2", "+cmd", "-2", "@SUM(A1)", "\tx", "\rx"):
        assert safe_cell(text) == "'" + text
    assert safe_cell("chat-a") == "chat-a" and safe_cell(None) == "" and safe_cell(5) == "5"
    assert safe_cell("x;=1+1") == "x;'=1+1" and safe_cell("a,@b") == "a,'@b"


def _parse(body):
    assert body.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(body[1:])))
    return rows[0], rows[1:-1], rows[-1]


async def _login(http):
    r = await http.client.post("/billing_module/login.dspy",
                               data={"username": "admin", "password": http.core.admin_password})
    assert r.status == 200, await r.text()


async def test_csv_export_round_trips_with_a_total_row_and_safe_cells(http):
    await _seed(http.core)
    r = await http.client.get("/billing_module/api/usage_export.dspy", params={"status": "all"},
                              headers={"Authorization": f"Bearer {http.admin_key}"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in r.headers["Content-Disposition"]
    header, rows, total = _parse(await r.text())
    col = {h: i for i, h in enumerate(header)}
    listed = await Reports(http.core.db).usage(UsageFilter(status=None), rows=100)
    assert len(rows) == listed["total"] == 6
    # the same rows as the list, oldest first, amounts exact
    assert sorted(x[col["request_id"]] for x in rows) == sorted(x["request_id"] for x in listed["rows"])
    assert [x[col["use_time"]] for x in rows] == sorted(x[col["use_time"]] for x in rows)
    by_id = {x["request_id"]: x for x in listed["rows"]}
    for x in rows:
        assert x[col["amount"]] == by_id[x[col["request_id"]]]["amount"]
    # TOTAL row = the sum of the rows above it
    assert total[col["use_time"]] == "TOTAL" and total[1] == "6 records"
    assert _d(total[col["amount"]]) == sum(_d(x[col["amount"]]) for x in rows)
    assert _d(total[col["cost"]]) == sum(_d(x[col["cost"]]) for x in rows)
    assert int(total[col["input_tokens"]]) == sum(int(x[col["input_tokens"]]) for x in rows)
    # formula-like text is quoted; numbers are left numbers
    cells = [c for x in rows for c in x]
    assert "'=1+2" in cells and "'-2" in cells and "'@evil" in cells
    assert not any(c[:1] in ("=", "+", "-", "@") for c in cells)


async def test_product_export_and_session_login(http):
    await _seed(http.core)
    await _login(http)   # the admin pages' session is an admin caller of the API
    r = await http.client.get("/billing_module/api/usage_export.dspy", params={"source": "product"})
    assert r.status == 200
    header, rows, total = _parse(await r.text())
    col = {h: i for i, h in enumerate(header)}
    assert len(rows) == 3 and total[col["amount"]] == "4.000001" and total[col["cost"]] == "1.700000"
    assert {x[col["resource_ref_id"]] for x in rows} == {"m-1", "'=cmd|' /C calc'!A0", "'+x"}


async def test_export_in_small_chunks_equals_one_chunk(core):
    await _seed(core)
    f = UsageFilter(status=None)
    small = [c async for c in Reports(core.db).export_chunks(f, chunk_rows=2)]
    big = [c async for c in Reports(core.db).export_chunks(f, chunk_rows=1000)]
    assert len(small) == 1 + 3 + 1 and len(big) == 1 + 1 + 1    # header, row chunks, TOTAL
    assert "".join(small) == "".join(big)


async def test_endpoints_answer_lists_stats_and_clear_400s(http):
    await _seed(http.core)
    key = http.admin_key
    status, body = await http.get("api/usage_list.dspy", key, page=1, rows=2)
    assert status == 200 and body["total"] == 5 and len(body["rows"]) == 2 and body["totals"]["records"] == 5
    status, body = await http.get("api/usage_list.dspy", key, start_date="2026-11-21", end_date="2026-11-21")
    assert status == 200 and body["total"] == 3
    status, body = await http.get("api/usage_stats.dspy", key, group_by="day")
    assert status == 200 and body["total"] == 2 and body["rows"][1]["key"] == "2026-11-21"
    status, body = await http.get("api/usage_stats.dspy", key, source="product", group_by="product")
    assert status == 200 and body["rows"][0]["key"] == "prod-1"
    for params in ({"source": "nope"}, {"start_date": "yesterday"}, {"status": "maybe"},
                   {"start_date": "2026-11-22", "end_date": "2026-11-21"},
                   {"source": "product", "billing_mode": "9"}, {"customer_id": "x' or 1=1"}):
        status, body = await http.get("api/usage_list.dspy", key, **params)
        assert (status, body["code"]) == (400, "invalid_param"), (params, body)
        status, body = await http.get("api/usage_export.dspy", key, **params)
        assert (status, body["code"]) == (400, "invalid_param"), (params, body)
    status, body = await http.get("api/usage_list.dspy", key, rows="0")
    assert (status, body["code"]) == (400, "invalid_param")
    status, body = await http.get("api/usage_stats.dspy", key, group_by="supplier")   # product-only grouping
    assert (status, body["code"]) == (400, "invalid_param")
    # a customer caller: its own LLM usage without cost and margin; not another's, not the product source
    customer_key, _ = await http.core.apikeys.create("customer", customer_id="cust-1")
    status, body = await http.get("api/usage_list.dspy", customer_key)
    assert status == 200 and body["rows"] and {r["customer_id"] for r in body["rows"]} == {"cust-1"}
    assert not [k for r in body["rows"] + [body["totals"]] for k in r if k in ("cost", "margin", "margin_rate")]
    status, body = await http.get("api/usage_stats.dspy", customer_key, group_by="user")
    assert status == 200 and "cost" not in body["totals"] and "cost" not in body["rows"][0]
    r = await http.client.get("/billing_module/api/usage_export.dspy", headers={"Authorization": f"Bearer {customer_key}"})
    header, rows, _ = _parse(await r.text())
    assert r.status == 200 and "cost" not in header and rows
    assert {x[header.index("customer_id")] for x in rows} == {"cust-1"}
    assert (await http.get("api/usage_list.dspy", customer_key, customer_id="cust-2"))[0] == 403
    assert (await http.get("api/usage_stats.dspy", customer_key, source="product"))[0] == 403
    r = await http.client.post("/billing_module/api/usage_export.dspy", headers={"Authorization": f"Bearer {key}"})
    assert r.status == 405


async def test_csv_cells_with_a_separator_are_quoted_for_comma_and_semicolon_spreadsheets(http):
    """Issue 12 item 14: a spreadsheet that splits on ';' saw ``x;=1+1`` as a text cell and a
    formula; every cell holding , ; a quote or a line break is quoted, and no cell either way
    starts a formula."""
    await _seed(http.core)
    await http.core.catalog.put("users", [{"id": "cust-3", "kind": "org", "name": "x;=1+1"},
                                          {"id": "cust-4", "kind": "org", "name": 'q"u,o\nte'}])
    for rid, customer in (("semi-1", "cust-3"), ("semi-2", "cust-4")):
        await http.core.ledger.recharge(customer, 10_000_000, f"r-{rid}")
        await http.core.accounting.post_usage(usage(rid, customer=customer, use_time=DAY2))
    r = await http.client.get("/billing_module/api/usage_export.dspy", params={"status": "all"},
                              headers={"Authorization": f"Bearer {http.admin_key}"})
    assert r.status == 200
    body = (await r.text())[1:]
    assert '"x;\'=1+1"' in body and '"q""u,o\nte"' in body
    for delimiter in (",", ";"):
        cells = [c for row in csv.reader(io.StringIO(body), delimiter=delimiter) for c in row]
        assert not any(c[:1] in ("=", "+", "@") for c in cells), delimiter
    header, rows, _ = _parse("\ufeff" + body)
    assert "x;'=1+1" in [x[header.index("customer_name")] for x in rows]
