"""The usage factors beyond input/output/cached tokens (issue 17): cache writes (5-minute and
1-hour), reasoning, audio in/out, image input, characters, calls, web-search calls.

Every expected amount is worked out by hand in a comment (currency units -> micro-units)."""
import datetime
import json
from decimal import Decimal

import pytest

from billing_module.errors import InvalidParam, NoPricing, UnpricedFactor
from billing_module.pricing import Program, Usage, price_usage
from tests.helpers import PROGRAM, seed_pricing, units, usage

DAY = datetime.date(2026, 3, 1)

# A Sonnet-class price list in USD per million tokens: input 3, output 15, cache read 0.30,
# cache write 5-minute 3.75 (1.25x), 1-hour 6 (2x); reasoning 20 (priced apart, as some do),
# audio in 40, audio out 80, image in 5; 0.0005 per 10k characters; 0.002 per call; 0.01 per search.
FULL = [
    {"price_factors": "input_tokens", "unit_prices": "3", "cost_prices": "2", "unit": "M"},
    {"price_factors": "output_tokens", "unit_prices": "15", "unit": "M",
     "tiers": [{"above_input_tokens": 200000, "unit_prices": "22.5"}]},
    {"price_factors": "cached_tokens", "unit_prices": "0.30", "unit": "M"},
    {"price_factors": "cache_write_tokens", "unit_prices": "3.75", "unit": "M",
     "tiers": [{"above_input_tokens": 200000, "unit_prices": "7.5"}]},
    {"price_factors": "cache_write_1h_tokens", "unit_prices": "6", "cost_prices": "4", "unit": "M"},
    {"price_factors": "reasoning_tokens", "unit_prices": "20", "unit": "M"},
    {"price_factors": "audio_input_tokens", "unit_prices": "40", "unit": "M"},
    {"price_factors": "audio_output_tokens", "unit_prices": "80", "unit": "M"},
    {"price_factors": "image_input_tokens", "unit_prices": "5", "unit": "M"},
    {"price_factors": "characters", "unit_prices": "0.0005", "unit": "万字"},
    {"price_factors": "calls", "unit_prices": "0.002"},
    {"price_factors": "web_search_calls", "unit_prices": "0.01", "unit": "call"},
]


def program(pricings):
    return Program.from_payload({"id": "pp", "currency": "USD", "versions": [
        {"id": "v1", "enabled_date": "2026-01-01", "pricing_data": {"pricings": pricings}}]})


def lines(result):
    return {ln.factor: (ln.quantity, ln.amount) for ln in result.lines}


def price(pricings, **counts):
    return price_usage(program(pricings), Usage.from_event({"model_name": "m", **counts}), DAY)


def test_every_factor_priced_on_its_own_line_to_the_micro_unit():
    r = price(FULL, input_tokens=100_000, cached_tokens=20_000, cache_write_tokens=20_000,
              cache_write_1h_tokens=10_000, audio_input_tokens=3_000, image_input_tokens=1_234,
              output_tokens=5_000, reasoning_tokens=2_000, audio_output_tokens=1_001,
              characters=12_350, calls=3, web_search_calls=2)
    assert lines(r) == {
        # input left: 100000 - 20000 - 20000 - 10000 - 3000 - 1234 = 45766 x 3 / 1e6 = 0.137298
        "input_tokens": ("45766", 137_298),
        # output left: 5000 - 2000 - 1001 = 1999 x 15 / 1e6 = 0.029985
        "output_tokens": ("1999", 29_985),
        "cached_tokens": ("20000", 6_000),            # 20000 x 0.30 / 1e6 = 0.006
        "cache_write_tokens": ("20000", 75_000),      # 20000 x 3.75 / 1e6 = 0.075
        "cache_write_1h_tokens": ("10000", 60_000),   # 10000 x 6 / 1e6 = 0.06
        "audio_input_tokens": ("3000", 120_000),      # 3000 x 40 / 1e6 = 0.12
        "image_input_tokens": ("1234", 6_170),        # 1234 x 5 / 1e6 = 0.00617
        "reasoning_tokens": ("2000", 40_000),         # 2000 x 20 / 1e6 = 0.04
        "audio_output_tokens": ("1001", 80_080),      # 1001 x 80 / 1e6 = 0.08008
        "characters": ("12350", 618),                 # 12350 x 0.0005 / 1e4 = 0.0006175 -> half-up 0.000618
        "calls": ("3", 6_000),                        # 3 x 0.002
        "web_search_calls": ("2", 20_000),            # 2 x 0.01
    }
    assert r.amount == sum(a for _, a in lines(r).values()) == 581_151
    # cost: input 45766 x 2 / 1e6 = 0.091532; 1h writes 10000 x 4 / 1e6 = 0.04
    assert r.cost == 91_532 + 40_000
    assert r.unpriced == ()
    assert [ln.factor for ln in r.lines][:3] == ["input_tokens", "output_tokens", "cached_tokens"]


def test_cache_write_20k_on_sonnet_class_model_is_the_issue_figure():
    # the issue: 20,000 write tokens billed as input were $0.015 (5m) or $0.060 (1h) too little
    plain = 20_000 * 3          # micro-units: 20000 x 3 / 1e6 = 0.06
    five = price(FULL, input_tokens=20_000, cache_write_tokens=20_000)
    one_hour = price(FULL, input_tokens=20_000, cache_write_1h_tokens=20_000)
    assert five.amount - plain == 15_000      # 0.075 - 0.06
    assert one_hour.amount - plain == 60_000  # 0.12 - 0.06


def test_tier_on_input_size_applies_to_the_new_factors():
    # 250000 input > 200000: cache writes at 7.5, output at 22.5
    r = price(FULL, input_tokens=250_000, cache_write_tokens=100_000, output_tokens=1_000)
    assert lines(r)["cache_write_tokens"] == ("100000", 750_000)   # 100000 x 7.5 / 1e6 = 0.75
    assert lines(r)["output_tokens"] == ("1000", 22_500)           # 1000 x 22.5 / 1e6
    assert lines(r)["input_tokens"] == ("150000", 450_000)         # 150000 x 3 / 1e6


BASIC = [FULL[0], FULL[1]]


def test_reasoning_without_a_rule_is_billed_as_output():
    r = price(BASIC, input_tokens=10, output_tokens=3_000, reasoning_tokens=2_000)
    assert lines(r) == {"input_tokens": ("10", 30), "output_tokens": ("3000", 45_000)}  # 3000 x 15 / 1e6
    assert r.unpriced == ()


@pytest.mark.parametrize("factor, whole, left", [
    ("cache_write_tokens", "input_tokens", ("600", 1_800)),
    ("cache_write_1h_tokens", "input_tokens", ("600", 1_800)),
    ("audio_input_tokens", "input_tokens", ("600", 1_800)),
    ("image_input_tokens", "input_tokens", ("600", 1_800)),
])
def test_input_part_without_a_rule_is_unpriced_not_billed_as_text(factor, whole, left):
    # 1000 input of which 400 are the part: the part has no rule -> unpriced, input billed on 600
    r = price(BASIC, input_tokens=1_000, **{factor: 400})
    assert r.unpriced == (factor,)
    assert lines(r) == {"input_tokens": left}   # 600 x 3 / 1e6 = 0.0018


def test_audio_output_without_a_rule_is_unpriced():
    r = price(BASIC, input_tokens=10, output_tokens=1_000, audio_output_tokens=1_000)
    assert r.unpriced == ("audio_output_tokens",)
    assert lines(r) == {"input_tokens": ("10", 30)}


@pytest.mark.parametrize("factor", ["characters", "calls", "web_search_calls"])
def test_count_without_a_rule_is_unpriced(factor):
    r = price(BASIC, input_tokens=10, **{factor: 5})
    assert r.unpriced == (factor,)


def test_only_an_unpriced_count_is_no_pricing():
    with pytest.raises(NoPricing):
        price([FULL[0]], web_search_calls=1)


def test_parts_must_fit_in_their_whole():
    with pytest.raises(InvalidParam, match="cached_tokens \\+ cache_write_tokens: must not exceed input_tokens"):
        Usage.from_event({"model_name": "m", "input_tokens": 100, "cached_tokens": 60, "cache_write_tokens": 41})
    with pytest.raises(InvalidParam, match="reasoning_tokens: must not exceed output_tokens"):
        Usage.from_event({"model_name": "m", "output_tokens": 1, "reasoning_tokens": 2})


@pytest.mark.parametrize("bad", [-1, 1.5, "x", True])
def test_new_counts_are_validated(bad):
    with pytest.raises(InvalidParam, match="web_search_calls"):
        Usage.from_event({"model_name": "m", "web_search_calls": bad})


def test_describe_lists_the_new_factors_with_their_base_units():
    described = program(FULL).version_on(DAY).describe("m")
    units = {d["factor"]: d["unit"] for d in described}
    assert units["calls"] == "call" and units["characters"] == "万字" and units["reasoning_tokens"] == "M"
    assert Decimal(described[3]["tiers"][0]["unit_price"]) == Decimal("7.5")


# ------------------------------------------------------------ accounting ----


WRITES = {"price_factors": "cache_write_tokens", "unit_prices": "2.5", "unit": "M", "filters": [{"model": "chat-a"}]}


async def _with_rule(core, extra):
    program = json_copy(PROGRAM)
    program["versions"][0]["pricing_data"]["pricings"].append(extra)
    await core.catalog.put("pricing", [program])


def json_copy(value):
    return json.loads(json.dumps(value))


async def test_cache_writes_unpriced_then_priced_through_the_accountant(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    event = usage("cw1", input_tokens=3_000, cache_write_tokens=2_000)
    with pytest.raises(UnpricedFactor):
        await core.accounting.post_usage(event)
    assert (await core.ledger.balance("cust-1"))["balance"] == "1.000000"
    await _with_rule(core, WRITES)
    # the queued path rebuilds the event from its payload: the cache writes must survive it
    await core.accounting.submit_usage(usage("cw2", input_tokens=3_000, cache_write_tokens=2_000))
    await core.accounting.account_pending()
    rec = await core.accounting.record(request_id="cw2")
    # input 1000 x 2.0 / 1e6 = 0.002; writes 2000 x 2.5 / 1e6 = 0.005; output 500 x 8.0 / 1e6 = 0.004
    assert rec["status"] == "accounted" and int(rec["amount"]) == 11_000
    assert [ln["factor"] for ln in json.loads(rec["price_lines"])] == ["input_tokens", "output_tokens",
                                                                       "cache_write_tokens"]
    posted = await core.accounting.post_usage(event)
    assert posted["amount"] == "0.011000"


async def test_an_event_without_the_new_factors_keeps_its_payload(core):
    from billing_module.accounting import parse_event
    ev = parse_event(usage("p1"))
    assert "cache_write_tokens" not in ev.payload and "web_search_calls" not in ev.payload
    assert parse_event(usage("p1", web_search_calls=2)).payload["web_search_calls"] == 2
