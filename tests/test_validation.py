"""The module's input rules (billing_module/validation.py), each tested once here, and the doors
that must reach them (Params at the API, accounting's event parser, the products services).
Then the rules at work on a database: a date bound from the year 0999 and the product reports'
parameter names, on SQLite and MariaDB; and the size of the modules that replaced products.py."""
import datetime
import pathlib

import pytest

from billing_module import validation
from billing_module.accounting import parse_event
from billing_module.api.params import Params
from billing_module.errors import InvalidParam
from tests.helpers import units

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "billing_module"


def refused(call, *args, **kwargs):
    with pytest.raises(InvalidParam) as e:
        call(*args, **kwargs)
    return str(e.value)


# --- ids -------------------------------------------------------------------------------------------------
def test_an_id_is_letters_digits_and_five_marks_only():
    assert validation.ident("Org_1.a:b@c-d", "customer_id") == "Org_1.a:b@c-d"
    assert validation.ident(42, "customer_id") == "42"                 # a JSON number is its text
    assert validation.ident(None, "customer_id") is None and validation.ident("", "customer_id") is None
    assert validation.ident("", "customer_id", default="x") == "x"
    for bad in ("id\n", "\nid", "a b", "a/b", "ä", "a;drop", " id", "id\r\n"):
        assert "only letters" in refused(validation.ident, bad, "customer_id"), repr(bad)
    assert "NUL" in refused(validation.ident, "id\x00", "customer_id")
    for bad in (True, 1.5, ["a"], {"a": 1}):
        assert "expected a string" in refused(validation.ident, bad, "customer_id")
    assert refused(validation.ident, "", "customer_id", required=True) == "customer_id: required"
    assert validation.ident("x" * 32, "customer_id") == "x" * 32
    assert "at most 32" in refused(validation.ident, "x" * 33, "customer_id")
    assert validation.ident("x" * 64, "request_id", max_len=64) == "x" * 64


async def test_every_door_uses_the_one_id_rule(core):
    """The API's Params, accounting's events and the products services refuse the same id."""
    assert "only letters" in refused(Params({"customer_id": "c1\n"}).ident, "customer_id")
    event = {"request_id": "r1", "customer_id": "c1\n", "model_name": "m", "input_tokens": 1}
    assert "customer_id: only letters" in refused(parse_event, event)
    pm = core.products
    with pytest.raises(InvalidParam, match="product_id: only letters"):
        await pm.product_use("c1", "u1", "p1\n", 1, source_ref_table="task", source_ref_id="t1")
    with pytest.raises(InvalidParam, match="customer_id: only letters"):
        await pm.usage_list(customer_id="c1\n")
    with pytest.raises(InvalidParam, match="customer_id: only letters"):
        await core.apikeys.create("customer", customer_id="c1\n")


# --- text, whole numbers, money ---------------------------------------------------------------------------
def test_text_and_its_choices():
    assert validation.text(7, "note") == "7"
    assert validation.text("", "note", default="d") == "d"
    assert "NUL" in refused(validation.text, "a\x00b", "note")
    assert "at most 3" in refused(validation.text, "abcd", "note", max_len=3)
    assert "must be one of a, b" in refused(validation.text, "c", "kind", choices=("a", "b"))
    assert "expected a string" in refused(validation.text, False, "note")


def test_yes_no_flags():
    assert [validation.flag(v, "f") for v in (True, False, 1, 0, "1", "0", " TRUE ", "no", "yes")] == \
        ["1", "0", "1", "0", "1", "0", "1", "0", "1"]
    assert validation.flag("", "f") is None and validation.flag(None, "f", default="1") == "1"
    for bad in ("2", "maybe", 2, "y"):
        assert refused(validation.flag, bad, "f") == "f: expected 0 or 1"


def test_whole_numbers():
    assert [validation.integer(v, "n") for v in ("5", " 7 ", 5.0, -3, "-0")] == [5, 7, 5, -3, 0]
    for bad in ("٣", "1e3", "1.5", 1.5, True, "", "x", float("inf"), "1" * 19):
        if bad == "":
            assert validation.integer(bad, "n") is None
            continue
        assert "expected an integer" in refused(validation.integer, bad, "n"), repr(bad)
    assert "at least 1" in refused(validation.integer, "0", "n", minimum=1)
    assert "at most 9" in refused(validation.integer, 10, "n", maximum=9)
    assert refused(validation.integer, None, "n", required=True) == "n: required"


def test_money_amounts():
    assert validation.amount("1.5") == 1_500_000 and validation.amount(2) == 2_000_000
    assert validation.amount("-0.000001") == -1
    assert validation.amount("", required=False) is None
    assert refused(validation.amount, "") == "amount: required"
    assert "floating-point" in refused(validation.amount, 1.5)
    assert "decimal places" in refused(validation.amount, "0.0000001")
    assert "must not be negative" in refused(validation.amount, "-1", "list_price", non_negative=True)
    assert validation.amount("0", "list_price", non_negative=True) == 0


# --- times and date bounds --------------------------------------------------------------------------------
def test_a_time_is_utc_text_with_a_four_digit_year():
    assert validation.time_text("2026-01-31T12:00:00+08:00", "t") == "2026-01-31 04:00:00"
    assert validation.time_text("0999-12-31 10:00:00", "t") == "0999-12-31 10:00:00"
    assert validation.time_text("0999-12-31", "t") < validation.time_text("2026-01-01", "t")
    for bad in ("", "   ", "yesterday", "2026-02-30", "2026-13-01", "x" * 41, 20260131):
        refused(validation.time_text, bad, "t")


def test_date_bounds():
    assert validation.bound(None, "start_date") is None and validation.bound("", "end_date", end=True) is None
    assert validation.bound("2026-01-31", "start_date") == "2026-01-31 00:00:00"
    assert validation.bound("2026-01-31", "end_date", end=True) == "2026-02-01 00:00:00"   # the whole day
    assert validation.bound(" 2026-12-31 ", "end_date", end=True) == "2027-01-01 00:00:00"
    assert validation.bound("2026-01-31 10:00:00", "end_date", end=True) == "2026-01-31 10:00:00"
    assert validation.bound("0999-01-01", "start_date") == "0999-01-01 00:00:00"
    assert "before 9999-12-31" in refused(validation.bound, "9999-12-31", "end_date", end=True)
    assert validation.bounds("2026-01-31", "2026-01-31") == ("2026-01-31 00:00:00", "2026-02-01 00:00:00")
    assert validation.bounds("2026-01-30", "2026-01-31", end_day_inclusive=False) == \
        ("2026-01-30 00:00:00", "2026-01-31 00:00:00")                                     # "before" that day
    assert "start_date: must be before end_date" in refused(validation.bounds, "2026-02-01", "2026-01-31")
    assert "start: must be before end" in refused(validation.bounds, "2026-01-31 10:00:00", "2026-01-31 10:00:00",
                                                  "start", "end")
    assert validation.bounds(None, "2026-01-31") == (None, "2026-02-01 00:00:00")


# --- paging -----------------------------------------------------------------------------------------------
def test_paging():
    assert validation.page() == (1, 20) and validation.page("3", "50") == (3, 50)
    assert validation.page(None, None, default_rows=100) == (1, 100)
    assert "page: must be at least 1" in refused(validation.page, 0, 10)
    assert "rows: must be at most 500" in refused(validation.page, 1, 501)
    assert "page_size: must be at least 1" in refused(validation.page, 1, 0, rows_name="page_size")
    assert Params({"page_size": "7"}).page() == (1, 7)
    assert Params({"rows": "5", "page_size": "7"}).page() == (1, 5)
    assert "page_size" in refused(Params({"page_size": "x"}).page)


# --- on a database ----------------------------------------------------------------------------------------
async def _one_use(core, fixed_clock):
    fixed_clock.now = datetime.datetime(2026, 11, 22, 8, 0, 0)
    pm = core.products
    p = await pm.save_product(code="pack", product_name="Pack", quantity_unit="call", included_quantity="0",
                              list_price="0", overage_price="0.5")
    await core.ledger.recharge("c1", units("10"), "r1")
    await pm.product_use("c1", "u1", p["product_id"], 2, source_ref_table="task", source_ref_id="t1")
    return pm


async def test_a_bound_in_the_year_0999_compares_as_a_time(core, fixed_clock):
    """'%Y' writes the year 999 as '999', which sorts after '2026': the whole history vanished
    from a report asked for "from 0999-01-01" and came back for "to 0999-01-01"."""
    pm = await _one_use(core, fixed_clock)
    assert (await pm.usage_list(start="0999-01-01"))["total"] == 1
    assert (await pm.usage_list(end="0999-01-01"))["total"] == 0
    assert (await pm.stats("customer", start="0999-01-01"))["totals"]["uses"] == 1


async def test_product_reports_speak_the_usage_reports_parameter_names(http, fixed_clock):
    pm = await _one_use(http.core, fixed_clock)
    admin = http.admin_key
    for path in ("product_usage_list", "product_overage", "product_stats", "usage_list"):
        extra = {"source": "product"} if path == "usage_list" else {}
        st, body = await http.get(f"api/{path}.dspy", admin, start_date="2026-11-22", end_date="2026-11-22", **extra)
        assert st == 200 and len(body["rows"]) == 1, (path, body)
        st, body = await http.get(f"api/{path}.dspy", admin, start_date="2026-11-23", **extra)
        assert st == 200 and not body["rows"], (path, body)
        st, body = await http.get(f"api/{path}.dspy", admin, start_date="2026-11-23", end_date="2026-11-22", **extra)
        assert (st, body["code"], body["message"]) == (400, "invalid_param", "start_date: must be before end_date")
    # the product endpoints' earlier names still work, and one filter cannot be given twice
    st, body = await http.get("api/product_usage_list.dspy", admin, start="2026-11-23")
    assert st == 200 and body["total"] == 0
    st, body = await http.get("api/product_usage_list.dspy", admin, end="2026-11-22")
    assert st == 200 and body["total"] == 1
    st, body = await http.get("api/product_stats.dspy", admin, start="2026-11-22", start_date="2026-11-22")
    assert (st, body["code"]) == (400, "invalid_param")
    assert (await pm.stats("day"))["rows"][0]["key"] == "2026-11-22"


# --- the size of what replaced products.py ------------------------------------------------------------------
def test_products_is_a_package_of_modules_under_400_lines_each():
    assert not (PACKAGE / "products.py").exists()
    modules = sorted((PACKAGE / "products").glob("*.py"))
    assert len(modules) >= 5, modules
    sizes = {m.name: len(m.read_text(encoding="utf-8").splitlines()) for m in modules}
    assert all(n < 400 for n in sizes.values()), sizes
