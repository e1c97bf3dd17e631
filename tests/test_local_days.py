"""Issue 13 item 11: a report's days and months are the configured time zone's, daylight saving
included, and a day filter means that zone's day. Over real HTTP, on both databases, in
Europe/Berlin (UTC+1, UTC+2 from 2026-03-29 01:00 UTC)."""
import datetime

import pytest

from billing_module import clock
from billing_module.config import load_config
from tests.helpers import seed_pricing, units, usage
from tests.test_products import make_product, use, wire

# (UTC use_time, the Berlin day it belongs to)
EVENTS = (
    ("2026-02-28 22:30:00", "2026-02-28"),   # 23:30 CET
    ("2026-02-28 23:30:00", "2026-03-01"),   # 00:30 CET: March in Berlin, February in UTC
    ("2026-03-28 22:30:00", "2026-03-28"),   # 23:30 CET
    ("2026-03-28 23:30:00", "2026-03-29"),   # 00:30 CET
    ("2026-03-29 21:30:00", "2026-03-29"),   # 23:30 CEST (the offset changed at 01:00 UTC)
    ("2026-03-29 22:30:00", "2026-03-30"),   # 00:30 CEST
)


@pytest.fixture
def config(tmp_path):
    return load_config(environ={}, overrides={"server": {"data_dir": str(tmp_path), "log_file": ""},
                                              "accounting": {"background": False}, "timezone": "Europe/Berlin"})


async def _seed(http, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 4, 2, 12, 0, 0)
    await seed_pricing(http.core)
    await http.core.ledger.recharge("c1", units("100"), "top")
    for i, (at, _) in enumerate(EVENTS):
        st, reply = await http.post("api/accounting.dspy", http.admin_key, json=usage(f"e{i}", "c1", use_time=at))
        assert st == 200, reply


def _expected_days():
    days: dict[str, int] = {}
    for _, day in EVENTS:
        days[day] = days.get(day, 0) + 1
    return days


async def test_usage_stats_group_by_local_day_and_month(http, fixed_clock):
    await _seed(http, fixed_clock)
    st, reply = await http.get("api/usage_stats.dspy", http.admin_key, group_by="day")
    assert st == 200, reply
    assert {r["key"]: r["records"] for r in reply["rows"]} == _expected_days()
    assert [r["key"] for r in reply["rows"]] == sorted(_expected_days())
    st, reply = await http.get("api/usage_stats.dspy", http.admin_key, group_by="month")
    assert st == 200, reply
    assert [(r["key"], r["records"]) for r in reply["rows"]] == [("2026-02", 1), ("2026-03", 5)]
    assert reply["totals"]["records"] == len(EVENTS)


async def test_a_day_filter_is_the_local_day(http, fixed_clock):
    await _seed(http, fixed_clock)
    params = {"start_date": "2026-03-29", "end_date": "2026-03-29"}
    st, listed = await http.get("api/usage_list.dspy", http.admin_key, **params)
    assert st == 200, listed
    assert sorted(r["use_time"] for r in listed["rows"]) == ["2026-03-28 23:30:00", "2026-03-29 21:30:00"]
    st, stats = await http.get("api/usage_stats.dspy", http.admin_key, group_by="day", **params)
    assert [(r["key"], r["records"]) for r in stats["rows"]] == [("2026-03-29", 2)]
    assert stats["totals"]["amount"] == listed["totals"]["amount"]
    # a time with its own offset is taken as sent; a naive time is Berlin's wall time
    st, listed = await http.get("api/usage_list.dspy", http.admin_key, start_date="2026-03-29T21:00:00Z",
                                end_date="2026-03-30 00:00:00")
    assert [r["use_time"] for r in listed["rows"]] == ["2026-03-29 21:30:00"]
    st, reply = await http.get("api/usage_list.dspy", http.admin_key, start_date="2026-03-30", end_date="2026-03-29")
    assert (st, reply["code"]) == (400, "invalid_param"), reply


async def test_product_stats_by_local_day_include_the_subscription_fee(http, fixed_clock):
    core = http.core
    pm = wire(core)
    fixed_clock.now = datetime.datetime(2026, 3, 28, 23, 30, 0)    # 00:30 on the 29th in Berlin
    await core.ledger.recharge("c1", units("100"), "top")
    p = await make_product(pm, included="0", list_price="2", overage="0.5")
    await pm.subscribe("c1", p["product_id"], "s1")
    await use(pm, "t1", 1, product=p["product_id"])
    fixed_clock.now = datetime.datetime(2026, 3, 29, 22, 30, 0)    # 00:30 on the 30th (CEST)
    await use(pm, "t2", 2, product=p["product_id"])
    st, reply = await http.get("api/product_stats.dspy", http.admin_key, group_by="day")
    assert st == 200, reply
    assert [(r["key"], r["uses"]) for r in reply["rows"]] == [("2026-03-29", 1), ("2026-03-30", 1)]
    by_day = {r["key"]: r for r in reply["rows"]}
    assert by_day["2026-03-29"]["subscription_fees"] == "2.000000"
    assert by_day["2026-03-30"]["subscription_fees"] == "0.000000"
    st, reply = await http.get("api/product_usage_list.dspy", http.admin_key, start_date="2026-03-30",
                               end_date="2026-03-30")
    assert st == 200, reply
    assert [r["source_ref_id"] for r in reply["rows"]] == ["t2"]


def test_offset_segments_follow_daylight_saving():
    berlin = clock.zone("Europe/Berlin")
    segments = clock.offset_segments(berlin, datetime.datetime(2026, 1, 1), datetime.datetime(2027, 1, 1))
    assert segments == (("2026-03-29 01:00:00", 60), ("2026-10-25 01:00:00", 120), (None, 60))
    assert clock.offset_segments(clock.zone("Asia/Kolkata"), datetime.datetime(2000, 1, 1),
                                 datetime.datetime(2030, 1, 1)) == ((None, 330),)


def test_today_on_a_page_is_the_zones_day(fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 3, 28, 23, 30, 0)
    assert clock.local_today("Europe/Berlin") == datetime.date(2026, 3, 29)
    assert clock.local_today("UTC") == datetime.date(2026, 3, 28)
