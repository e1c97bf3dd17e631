"""List APIs are lenient about the empty filters a browser page sends (issue 14): "", "undefined"
(a select never touched), "null" and JSON null mean "no filter"; a filter that does not apply to
the chosen source is ignored; a wrong value is still a 400. The rule lives in ``Params``."""
import pytest

from billing_module.api.params import Params
from billing_module.errors import InvalidParam
from tests.test_reports import _seed

EMPTY = ("", "undefined", "null", None)


@pytest.mark.parametrize("empty", EMPTY)
def test_every_reader_takes_an_empty_marker_for_absent(empty):
    p = Params({"s": empty, "i": empty, "n": empty, "f": empty, "a": empty})
    assert p.str("s") is None and p.ident("i") is None and p.int("n", default=7) == 7
    assert p.flag("f") is None and p.amount("a", required=False) is None
    assert p.value("s") is None and not p.present("s")
    with pytest.raises(InvalidParam, match="s: required"):
        p.str("s", required=True)


def test_wrong_values_are_still_refused():
    p = Params({"n": "undefinedx", "i": "a b", "f": "maybe", "s": "nulll"})
    with pytest.raises(InvalidParam):
        p.int("n")
    with pytest.raises(InvalidParam):
        p.ident("i")
    with pytest.raises(InvalidParam):
        p.flag("f")
    assert p.str("s") == "nulll" and p.present("s")


async def _same(http, path, key, **params):
    """The reply to ``params`` equals the reply without the empty ones."""
    status, body = await http.get(path, key, **params)
    assert status == 200, body
    plain = {k: v for k, v in params.items() if v not in ("", "undefined", "null")}
    status, expected = await http.get(path, key, **plain)
    assert status == 200 and body["total"] == expected["total"] and body["rows"] == expected["rows"]
    return body


async def test_list_endpoints_ignore_empty_filters(http):
    await _seed(http.core)
    key = http.admin_key
    body = await _same(http, "api/usage_list.dspy", key, customer_id="undefined", user_id="", model="null",
                       start_date="undefined", end_date="", status="", product_id="null")
    assert body["total"] == 5
    await _same(http, "api/usage_stats.dspy", key, group_by="day", customer_id="undefined", status="null")
    body = await _same(http, "api/balances.dspy", key, customer_id="", status="undefined")
    assert body["total"] == 2
    await _same(http, "api/failed_accounting_list.dspy", key, handled="undefined", retry_state="", customer_id="null")
    r = await http.client.get("/billing_module/api/usage_export.dspy", params={"customer_id": "undefined"},
                              headers={"Authorization": f"Bearer {key}"})
    assert r.status == 200 and (await r.text()).count("\n") > 5


async def test_a_filter_of_the_other_source_is_ignored(http):
    await _seed(http.core)
    key = http.admin_key
    status, body = await http.get("api/usage_list.dspy", key, source="product", model="x", status="failed")
    assert status == 200 and body["total"] == 3
    status, body = await http.get("api/usage_list.dspy", key, source="accounting", supplier_org_id="sup-9",
                                  billing_mode="2")
    assert status == 200 and body["total"] == 5
    # a wrong value of a filter that applies is still refused
    for params in ({"source": "product", "billing_mode": "9"}, {"status": "maybe"}, {"customer_id": "a b"}):
        status, body = await http.get("api/usage_list.dspy", key, **params)
        assert (status, body["code"]) == (400, "invalid_param"), params
