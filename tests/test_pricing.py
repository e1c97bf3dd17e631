"""Tests for billing_module.pricing.

Every expected amount is worked out by hand in a comment (currency units,
then micro-units); nothing is computed by calling the code under test.
"""

import dataclasses
import datetime
import decimal
from decimal import Decimal
from fractions import Fraction

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from billing_module import pricing
from billing_module.errors import InvalidParam, NoPricing
from billing_module.pricing import PriceLine, PriceResult, Program, Usage, price_usage

DAY = datetime.date(2026, 3, 1)

EXAMPLE_YAML = """
unit_values: {百万: 1000000, M: 1000000, K: 1000, 秒: 1, second: 1, image: 1, 万字: 10000, call: 1}
pricings:
  - {price_factors: input_tokens, unit_prices: "2.1", cost_prices: "1.5", unit: M, filters: [{model: model-a}]}
  - {price_factors: output_tokens, unit_prices: "8.4", unit: M, filters: [{model: model-a}],
     tiers: [{above_input_tokens: 128000, unit_prices: "16.8", cost_prices: "10"}]}
  - {price_factors: cached_tokens, unit_prices: "0.42", unit: M, filters: [{model: model-a}]}
  - {price_factors: quantity, unit_prices: "0.3", unit: 秒, quantity_unit: second, filters: [{model: video-x}, {size: 720P}]}
  - {price_factors: flat, unit_prices: "0.01", filters: [{model: model-a}]}
"""


def example_program():
    return Program.from_payload(
        {
            "id": "pp1",
            "name": "GPT-ish",
            "currency": "CNY",
            "versions": [
                {"id": "ppt1", "enabled_date": "2026-01-01", "expired_date": "9999-12-31", "pricing_data": EXAMPLE_YAML}
            ],
        }
    )


def make_program(pricings, unit_values=None, pid="pp1"):
    data = {"pricings": pricings}
    if unit_values is not None:
        data["unit_values"] = unit_values
    return Program.from_payload(
        {
            "id": pid,
            "name": "test",
            "currency": "CNY",
            "versions": [{"id": "v1", "enabled_date": "2026-01-01", "expired_date": "9999-12-31", "pricing_data": data}],
        }
    )


def rule(factor, price, **kw):
    return {"price_factors": factor, "unit_prices": price, **kw}


def amounts(result):
    return {line.factor: line.amount for line in result.lines}


# ------------------------------------------------------- worked example ----


def test_worked_example_from_docs():
    usage = Usage.from_event(
        {"model_name": "model-a", "input_tokens": 200000, "cached_tokens": 50000, "output_tokens": 1000}
    )
    result = price_usage(example_program(), usage, DAY, Decimal("0.9"))
    # input: (200000 - 50000) * 2.1 / 1e6 = 0.315 -> x0.9 = 0.2835 -> 283500; cost 150000 * 1.5 / 1e6 = 0.225
    # output: input 200000 > 128000 -> tier 16.8: 1000 * 16.8 / 1e6 = 0.0168 -> x0.9 = 0.01512; cost 1000*10/1e6 = 0.01
    # cached: 50000 * 0.42 / 1e6 = 0.021 -> x0.9 = 0.0189; no cost price -> 0
    # flat: 0.01 -> x0.9 = 0.009
    assert result.lines == [
        PriceLine("input_tokens", "150000", "M", "2.100000", 283_500, 225_000),
        PriceLine("output_tokens", "1000", "M", "16.800000", 15_120, 10_000),
        PriceLine("cached_tokens", "50000", "M", "0.420000", 18_900, 0),
        PriceLine("flat", "1", "call", "0.010000", 9_000, 0),
    ]
    # amount 283500 + 15120 + 18900 + 9000 = 326520; original 315000 + 16800 + 21000 + 10000 = 362800
    # cost 225000 + 10000 = 235000
    assert (result.amount, result.original_amount, result.cost) == (326_520, 362_800, 235_000)
    assert result.to_dict() == {
        "amount": "0.326520",
        "cost": "0.235000",
        "original_amount": "0.362800",
        "discount": "0.9",
        "currency": "CNY",
        "program_id": "pp1",
        "version_id": "ppt1",
        "lines": [
            {"factor": "input_tokens", "quantity": "150000", "unit": "M", "unit_price": "2.100000",
             "amount": "0.283500", "cost": "0.225000"},
            {"factor": "output_tokens", "quantity": "1000", "unit": "M", "unit_price": "16.800000",
             "amount": "0.015120", "cost": "0.010000"},
            {"factor": "cached_tokens", "quantity": "50000", "unit": "M", "unit_price": "0.420000",
             "amount": "0.018900", "cost": "0.000000"},
            {"factor": "flat", "quantity": "1", "unit": "call", "unit_price": "0.010000",
             "amount": "0.009000", "cost": "0.000000"},
        ],
        "unpriced": [],
    }


def test_program_payload_as_dict_pricing_data():
    program = make_program(yaml.safe_load(EXAMPLE_YAML)["pricings"], yaml.safe_load(EXAMPLE_YAML)["unit_values"])
    result = price_usage(program, Usage("model-a", input_tokens=1_000_000), DAY)
    # 1e6 * 2.1 / 1e6 = 2.1 -> 2_100_000; flat 0.01 -> 10_000
    assert amounts(result) == {"input_tokens": 2_100_000, "flat": 10_000}


def test_pricing_does_not_reparse_yaml(monkeypatch):
    program = example_program()

    def boom(*args, **kwargs):
        raise AssertionError("YAML parsed at pricing time")

    monkeypatch.setattr(yaml, "safe_load", boom)
    result = price_usage(program, Usage("model-a", output_tokens=1000), DAY)
    # 1000 * 8.4 / 1e6 = 0.0084 -> 8400, flat 10000
    assert result.amount == 18_400


def test_result_ignores_thread_decimal_context():
    program = make_program([rule("input_tokens", "1.234567", unit="M")])
    with decimal.localcontext() as ctx:
        ctx.prec = 3
        ctx.rounding = decimal.ROUND_DOWN
        result = price_usage(program, Usage("m", input_tokens=999_999_999_999), DAY)
    # 999999999999 * 1.234567 / 1e6 = 1234566.999998765433 -> half-up 1234566.999999 -> 1_234_566_999_999 micro
    assert result.amount == 1_234_566_999_999


# ----------------------------------------------------------------- tiers ----


TIERED = [
    rule("input_tokens", "1", unit="M"),
    rule("output_tokens", "8.4", unit="M", cost_prices="4", tiers=[{"above_input_tokens": 128000, "unit_prices": "16.8"}]),
]


@pytest.mark.parametrize(
    "input_tokens, output_amount, output_price, output_cost",
    [
        (127_999, 8_400_000, "8.400000", 4_000_000),  # below: 1e6 * 8.4 / 1e6 = 8.4; cost 1e6 * 4 / 1e6 = 4
        (128_000, 8_400_000, "8.400000", 4_000_000),  # at the threshold: not above -> base price
        (128_001, 16_800_000, "16.800000", 0),  # above: 1e6 * 16.8 / 1e6 = 16.8; the tier has no cost -> 0
    ],
)
def test_tier_threshold(input_tokens, output_amount, output_price, output_cost):
    result = price_usage(make_program(TIERED), Usage("m", input_tokens=input_tokens, output_tokens=1_000_000), DAY)
    line = result.lines[1]
    assert (line.factor, line.amount, line.unit_price, line.cost) == ("output_tokens", output_amount, output_price, output_cost)


def test_highest_matching_tier_wins_whatever_the_list_order():
    program = make_program(
        [
            rule(
                "input_tokens",
                "1",
                unit="M",
                tiers=[
                    {"above_input_tokens": 128000, "unit_prices": "3", "cost_prices": "2"},
                    {"above_input_tokens": 32000, "unit_prices": "2"},
                ],
            )
        ]
    )

    def input_line(n):
        return price_usage(program, Usage("m", input_tokens=n), DAY).lines[0]

    # 1000 tokens: no tier, 1000 * 1 / 1e6 = 0.001
    assert input_line(1000).amount == 1_000
    # 64000 > 32000 only: 64000 * 2 / 1e6 = 0.128
    assert input_line(64000).amount == 128_000
    # 200000 > 128000 (highest): 200000 * 3 / 1e6 = 0.6; cost 200000 * 2 / 1e6 = 0.4
    assert (input_line(200000).amount, input_line(200000).cost) == (600_000, 400_000)


# -------------------------------------------------------- cached tokens ----


CACHED = [
    rule("input_tokens", "3", unit="K", filters=[{"model": "m"}]),
    rule("cached_tokens", "1", unit="K", filters=[{"model": "m"}]),
    rule("input_tokens", "3", unit="K", filters=[{"model": "plain"}]),
    rule("cached_tokens", "1", unit="K", filters=[{"model": "other"}]),
]


def test_cached_tokens_split_from_input():
    result = price_usage(make_program(CACHED), Usage("m", input_tokens=1000, cached_tokens=400), DAY)
    # input billed on 1000 - 400 = 600: 600 * 3 / 1000 = 1.8; cached 400 * 1 / 1000 = 0.4
    assert [(ln.factor, ln.quantity, ln.amount) for ln in result.lines] == [
        ("input_tokens", "600", 1_800_000),
        ("cached_tokens", "400", 400_000),
    ]
    assert result.amount == 2_200_000  # 1.8 + 0.4


def test_no_cached_rule_bills_all_input_at_input_price():
    # "plain" has no cached rule of its own ("other"'s does not match it)
    result = price_usage(make_program(CACHED), Usage("plain", input_tokens=1000, cached_tokens=400), DAY)
    # 1000 * 3 / 1000 = 3
    assert [(ln.factor, ln.quantity, ln.amount) for ln in result.lines] == [("input_tokens", "1000", 3_000_000)]
    assert result.unpriced == ()


def test_all_input_cached():
    result = price_usage(make_program(CACHED), Usage("m", input_tokens=500, cached_tokens=500), DAY)
    # input 500 - 500 = 0 -> no line; cached 500 * 1 / 1000 = 0.5
    assert [(ln.factor, ln.amount) for ln in result.lines] == [("cached_tokens", 500_000)]


def test_cached_above_input_rejected():
    with pytest.raises(InvalidParam, match="cached_tokens: must not exceed input_tokens"):
        Usage.from_event({"model_name": "m", "input_tokens": 10, "cached_tokens": 11})
    with pytest.raises(InvalidParam, match="cached_tokens"):
        Usage("m", input_tokens=0, cached_tokens=1)


# -------------------------------------------------------------- discount ----


PER_TOKEN = [rule("input_tokens", "0.000005", cost_prices="0.000003"), rule("output_tokens", "0.000005")]


def test_discount_rounds_each_line():
    result = price_usage(make_program(PER_TOKEN), Usage("m", input_tokens=1, output_tokens=1), DAY, Decimal("0.7"))
    # each line: 1 * 0.000005 = 5 micro; x0.7 = 3.5 micro -> half-up 4 micro
    # per line: 4 + 4 = 8 (rounding the total 7.0 would give 7)
    assert [ln.amount for ln in result.lines] == [4, 4]
    assert result.amount == 8
    assert result.original_amount == 10  # 5 + 5, undiscounted
    assert result.cost == 3  # 1 * 0.000003, never discounted
    assert result.discount == "0.7"


@pytest.mark.parametrize("discount, text", [("0.90", "0.9"), (Decimal("0.9"), "0.9"), (1, "1"), ("10", "10"), (Decimal(1), "1")])
def test_discount_forms(discount, text):
    result = price_usage(make_program(PER_TOKEN), Usage("m", input_tokens=1000), DAY, discount)
    assert result.discount == text
    # 1000 * 0.000005 = 0.005 = 5000 micro, times the discount
    expected = {"0.9": 4_500, "1": 5_000, "10": 50_000}[text]
    assert result.amount == expected
    assert result.cost == 3_000  # 1000 * 0.000003, whatever the discount


@pytest.mark.parametrize("discount", [0, "0", "-0.5", "10.01", 0.9, True, "abc", Decimal("NaN"), None, [1]])
def test_discount_rejected(discount):
    with pytest.raises(InvalidParam, match="discount"):
        price_usage(make_program(PER_TOKEN), Usage("m", input_tokens=1), DAY, discount)


# ----------------------------------------------------------------- dates ----


def dated_program(versions_first_latest=False):
    versions = [
        {"id": "old", "enabled_date": "2026-01-01", "expired_date": "2026-07-01",
         "pricing_data": {"pricings": [rule("input_tokens", "1")]}},
        {"id": "new", "enabled_date": "2026-03-01", "expired_date": "9999-12-31",
         "pricing_data": {"pricings": [rule("input_tokens", "2")]}},
    ]
    if versions_first_latest:
        versions.reverse()
    return Program.from_payload({"id": "pp1", "currency": "CNY", "versions": versions})


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    "day, version_id",
    [
        (datetime.date(2026, 1, 1), "old"),  # the enabled day is included
        (datetime.date(2026, 2, 28), "old"),
        (datetime.date(2026, 3, 1), "new"),  # both valid: latest enabled_date wins
        (datetime.date(2026, 6, 30), "new"),
        (datetime.datetime(2026, 2, 1, 23, 59), "old"),  # a datetime counts as its date
    ],
)
def test_version_on(day, version_id, reverse):
    assert dated_program(reverse).version_on(day).id == version_id


def test_before_enabled_is_no_pricing():
    with pytest.raises(NoPricing) as info:
        dated_program().version_on(datetime.date(2025, 12, 31))
    assert info.value.message == "no price valid on 2025-12-31 for program pp1"
    assert info.value.status == 404 and info.value.code == "no_pricing"


def test_expired_day_is_not_valid():
    program = Program.from_payload(
        {"id": "pp2", "currency": "CNY", "versions": [
            {"id": "only", "enabled_date": "2026-01-01", "expired_date": "2026-07-01",
             "pricing_data": {"pricings": [rule("input_tokens", "1")]}}]}
    )
    assert program.version_on(datetime.date(2026, 6, 30)).id == "only"
    with pytest.raises(NoPricing, match="no price valid on 2026-07-01 for program pp2"):
        price_usage(program, Usage("m", input_tokens=1), datetime.date(2026, 7, 1))


def test_open_ended_version_and_yaml_dates():
    program = Program.from_payload(
        {"id": "pp3", "currency": "CNY", "versions": [
            {"id": "v", "enabled_date": datetime.date(2026, 1, 1),
             "pricing_data": "pricings: [{price_factors: input_tokens, unit_prices: 1}]"}]}
    )
    assert program.version_on(datetime.date(9999, 12, 31)).id == "v"


def test_price_uses_the_version_of_the_day():
    usage = Usage("m", input_tokens=1000)
    # old: 1000 * 1 = 1000 units; new: 1000 * 2 = 2000 units
    assert price_usage(dated_program(), usage, datetime.date(2026, 2, 1)).amount == 1_000_000_000
    assert price_usage(dated_program(), usage, datetime.date(2026, 3, 1)).amount == 2_000_000_000


# --------------------------------------------------------------- filters ----


SPECIFIC = [
    rule("input_tokens", "1", unit="K"),
    rule("input_tokens", "2", unit="K", filters=[{"model": "m"}]),
    rule("input_tokens", "3", unit="K", filters=[{"model": "m"}, {"region": "cn"}]),
    rule("input_tokens", "4", unit="K", filters=[{"model": "m"}, {"tier": "gold"}]),  # same count as the rule above
    rule("input_tokens", "5", unit="K", filters=[{"region": "eu"}]),
]


@pytest.mark.parametrize(
    "model, attributes, price",
    [
        ("m", {"region": "cn"}, "3.000000"),  # model + region (2 filters) beats model alone
        ("m", {"region": "us"}, "2.000000"),  # only the model rule matches
        ("m", {}, "2.000000"),
        ("x", {}, "1.000000"),  # generic rule
        ("m", {"region": "cn", "tier": "gold"}, "3.000000"),  # two 2-filter rules: the first listed wins
        ("m", {"tier": "gold"}, "4.000000"),
        ("x", {"region": "eu"}, "5.000000"),  # 1 filter beats 0
        ("m", {"region": "eu"}, "2.000000"),  # model rule listed first, same count
    ],
)
def test_filter_specificity(model, attributes, price):
    result = price_usage(make_program(SPECIFIC), Usage(model, input_tokens=1000, attributes=attributes), DAY)
    assert result.lines[0].unit_price == price


def test_filters_compare_as_strings():
    program = make_program(
        [
            rule("flat", "1", filters=[{"model": "m"}, {"size": 720}, {"stream": True}]),
            rule("flat", "2", filters=[{"model": "m"}]),
        ]
    )

    def flat_price(attributes):
        return price_usage(program, Usage("m", attributes=attributes), DAY).lines[0].unit_price

    assert flat_price({"size": "720", "stream": "true"}) == "1.000000"
    assert flat_price({"size": 720, "stream": True}) == "1.000000"
    assert flat_price({"size": "1080", "stream": True}) == "2.000000"
    assert flat_price({"size": 720}) == "2.000000"  # missing attribute: no match


def test_yaml_filter_values():
    program = make_program(yaml.safe_load("[{price_factors: flat, unit_prices: 1, filters: [{model: m}, {hd: true}]}]"))
    assert price_usage(program, Usage("m", attributes={"hd": True}), DAY).amount == 1_000_000  # 1 unit
    with pytest.raises(NoPricing):
        price_usage(program, Usage("m", attributes={"hd": False}), DAY)


# ------------------------------------------------------------------ flat ----


def test_flat_once_per_event():
    program = make_program([rule("flat", "0.01"), rule("input_tokens", "1", unit="M")])
    # any event: one flat line 0.01 = 10000 micro; 5e6 tokens * 1 / 1e6 = 5
    result = price_usage(program, Usage("m", input_tokens=5_000_000), DAY)
    assert [(ln.factor, ln.quantity, ln.unit, ln.amount) for ln in result.lines] == [
        ("input_tokens", "5000000", "M", 5_000_000),
        ("flat", "1", "call", 10_000),
    ]
    assert price_usage(program, Usage("m"), DAY).amount == 10_000  # no usage at all: still one call


# -------------------------------------------------------------- quantity ----


QUANTITY = [
    rule("quantity", "0.3", unit="秒", quantity_unit="second", filters=[{"model": "video-x"}, {"size": "720P"}]),
    rule("quantity", "0.6", unit="秒", quantity_unit="second", filters=[{"model": "video-x"}, {"size": "1080P"}]),
    rule("quantity", "0.04", quantity_unit="image", filters=[{"model": "img"}]),
    rule("quantity", "0.5", unit="万字", quantity_unit="char", filters=[{"model": "tts"}]),
    rule("quantity", "0.5", unit="10k", quantity_unit="char", filters=[{"model": "tts2"}]),
]
QUANTITY_UNITS = {"秒": 1, "万字": 10000}


def price_quantity(event):
    return price_usage(make_program(QUANTITY, QUANTITY_UNITS), Usage.from_event(event), DAY)


def test_quantity_per_second():
    result = price_quantity({"model_name": "video-x", "quantity": 3.5, "unit": "second", "attributes": {"size": "720P"}})
    # 3.5 s * 0.3 = 1.05
    assert [(ln.factor, ln.quantity, ln.unit, ln.amount) for ln in result.lines] == [("quantity", "3.5", "秒", 1_050_000)]
    result = price_quantity({"model_name": "video-x", "quantity": "3.5", "unit": "second", "attributes": {"size": "1080P"}})
    assert result.amount == 2_100_000  # 3.5 * 0.6 = 2.1


def test_quantity_per_image():
    result = price_quantity({"model_name": "img", "quantity": 3, "unit": "image"})
    # 3 * 0.04 = 0.12; no unit on the rule -> per image
    assert [(ln.quantity, ln.unit, ln.amount) for ln in result.lines] == [("3", "image", 120_000)]


@pytest.mark.parametrize("model", ["tts", "tts2"])
def test_quantity_per_10k_chars(model):
    result = price_quantity({"model_name": model, "quantity": 25000, "unit": "char"})
    # 25000 / 10000 * 0.5 = 1.25 (万字 declared; "10k" is a built-in unit)
    assert result.amount == 1_250_000


def test_quantity_unit_must_match_event_unit():
    with pytest.raises(NoPricing, match="model img"):
        price_quantity({"model_name": "img", "quantity": 3, "unit": "second"})


def test_zero_quantity_produces_no_line():
    program = make_program([rule("input_tokens", "1", unit="M"), rule("quantity", "1", quantity_unit="image")])
    result = price_usage(program, Usage("m", input_tokens=1_000_000, quantity=Decimal(0), unit="image"), DAY)
    assert [ln.factor for ln in result.lines] == ["input_tokens"]  # 1e6 * 1 / 1e6 = 1
    assert result.amount == 1_000_000


# --------------------------------------------------------------- aliases ----


def test_legacy_aliases():
    program = make_program(
        [
            rule("prompt_tokens", "1", unit="K"),
            rule("completion_tokens", "2", unit="K"),
            rule("duration", "0.5"),  # per second
        ]
    )
    result = price_usage(
        program, Usage("m", input_tokens=1000, output_tokens=500, quantity=Decimal("4"), unit="second"), DAY
    )
    # input 1000 * 1 / 1000 = 1; output 500 * 2 / 1000 = 1; duration 4 * 0.5 = 2
    assert [(ln.factor, ln.amount) for ln in result.lines] == [
        ("input_tokens", 1_000_000),
        ("output_tokens", 1_000_000),
        ("quantity", 2_000_000),
    ]
    assert result.lines[2].unit == "second"


def test_duration_alias_is_per_second_only():
    with pytest.raises(InvalidParam, match="duration rules are per second"):
        make_program([rule("duration", "0.5", quantity_unit="image")])


# ------------------------------------------------------------ no pricing ----


def test_unknown_model_is_no_pricing():
    with pytest.raises(NoPricing) as info:
        price_usage(example_program(), Usage("gpt-unknown", input_tokens=10), DAY)
    assert "gpt-unknown" in info.value.message and "pp1" in info.value.message


def test_known_model_with_no_usage_prices_zero():
    program = make_program([rule("input_tokens", "1", filters=[{"model": "m"}])])
    result = price_usage(program, Usage("m"), DAY)
    assert (result.amount, result.lines, result.unpriced) == (0, [], ())
    with pytest.raises(NoPricing):
        price_usage(program, Usage("other"), DAY)


def test_partly_priced_event_reports_unpriced_factors():
    program = make_program([rule("input_tokens", "1", unit="K")])
    result = price_usage(program, Usage("m", input_tokens=1000, output_tokens=7), DAY)
    assert result.amount == 1_000_000  # 1000 * 1 / 1000 = 1; output has no rule
    assert result.unpriced == ("output_tokens",)
    assert result.to_dict()["unpriced"] == ["output_tokens"]
    with pytest.raises(NoPricing):
        price_usage(program, Usage("m", output_tokens=7), DAY)


# --------------------------------------------------------- usage events ----


def test_usage_from_event():
    usage = Usage.from_event(
        {"model_name": "m", "input_tokens": "1200", "output_tokens": 30, "quantity": 2.5, "unit": "second",
         "attributes": {"size": "720P"}, "ignored": 1}
    )
    assert usage == Usage("m", 1200, 30, 0, Decimal("2.5"), "second", {"size": "720P"})


@pytest.mark.parametrize(
    "event, message",
    [
        ({}, "model_name"),
        ({"model_name": " "}, "model_name"),
        ({"model_name": "m", "input_tokens": 12.5}, "input_tokens"),
        ({"model_name": "m", "output_tokens": "12.0"}, "output_tokens"),
        ({"model_name": "m", "cached_tokens": True}, "cached_tokens"),
        ({"model_name": "m", "input_tokens": -1}, "input_tokens"),
        ({"model_name": "m", "quantity": 3}, "unit: required"),
        ({"model_name": "m", "quantity": -3, "unit": "second"}, "quantity"),
        ({"model_name": "m", "quantity": float("nan"), "unit": "second"}, "quantity"),
        ({"model_name": "m", "unit": 5}, "unit"),
        ({"model_name": "m", "attributes": []}, "attributes"),
    ],
)
def test_usage_from_event_rejects(event, message):
    with pytest.raises(InvalidParam, match=message):
        Usage.from_event(event)


def test_usage_from_event_rejects_non_dict():
    with pytest.raises(InvalidParam, match="event"):
        Usage.from_event([1])


# ------------------------------------------------------ invalid programs ----


def payload_with(pricing_data=None, **version):
    v = {"id": "v1", "enabled_date": "2026-01-01", "expired_date": "9999-12-31",
         "pricing_data": pricing_data if pricing_data is not None else {"pricings": [rule("input_tokens", "1")]}}
    v.update(version)
    return {"id": "pp9", "currency": "CNY", "versions": [v]}


def pricings(*rules):
    return payload_with({"pricings": list(rules)})


@pytest.mark.parametrize(
    "payload, fragments",
    [
        (pricings(rule("input_tokens", "1"), rule("foo", "1")), ["pp9", "version v1", "pricings[1]", "unknown price factor 'foo'"]),
        (pricings({"unit_prices": "1"}), ["pricings[0]", "price_factors is required"]),
        (pricings(rule("input_tokens", "abc")), ["pricings[0] (input_tokens)", "unit_prices", "plain decimal"]),
        (pricings(rule("input_tokens", "-1")), ["unit_prices", "negative"]),
        (pricings(rule("input_tokens", -0.5)), ["unit_prices", "negative"]),
        (pricings(rule("input_tokens", float("nan"))), ["unit_prices", "finite"]),
        (pricings(rule("input_tokens", True)), ["unit_prices", "boolean"]),
        (pricings(rule("input_tokens", None)), ["unit_prices is required"]),
        (pricings(rule("input_tokens", "1", cost_prices="x")), ["cost_prices", "plain decimal"]),
        (pricings(rule("input_tokens", "1", unit="parsec")), ["unknown unit 'parsec'"]),
        (pricings(rule("quantity", "1")), ["quantity_unit is required"]),
        (pricings(rule("flat", "1", unit="K")), ["flat rules are priced per call"]),
        (pricings(rule("input_tokens", "1", filters="model=m")), ["filters must be a list"]),
        (pricings(rule("input_tokens", "1", filters=[{"model": "a"}, {"model": "b"}])), ["conflicting filters for model"]),
        (pricings(rule("input_tokens", "1", filters=[{"model": None}])), ["filter model must be a plain value"]),
        (pricings(rule("input_tokens", "1", tiers=[{"unit_prices": "2"}])), ["tiers[0]", "above_input_tokens is required"]),
        (pricings(rule("input_tokens", "1", tiers=[{"above_input_tokens": 5, "unit_prices": "2"},
                                                   {"above_input_tokens": 5, "unit_prices": "3"}])), ["tiers[1]", "duplicate"]),
        (pricings(rule("input_tokens", "1", tiers=[{"above_input_tokens": 5}])), ["tiers[0]", "unit_prices is required"]),
        (payload_with({"pricings": []}), ["pricings must be a non-empty list"]),
        (payload_with({"pricings": [rule("input_tokens", "1")], "unit_values": {"M": 0}}), ["unit_values[M] must be greater than 0"]),
        (payload_with({"pricings": [rule("input_tokens", "1")], "unit_values": {"M": "big"}}), ["unit_values[M]"]),
        (payload_with("pricings: [unclosed"), ["pp9", "version v1", "pricing_data is not valid YAML"]),
        (payload_with("just a string"), ["pricing_data must be a mapping"]),
        (payload_with(enabled_date="2026-13-01"), ["enabled_date must be a date"]),
        (payload_with(enabled_date=None), ["enabled_date is required"]),
        (payload_with(expired_date="soon"), ["expired_date must be a date"]),
        (payload_with(expired_date="2026-01-01"), ["expired_date 2026-01-01 must be after enabled_date 2026-01-01"]),
        (payload_with(id=None), ["versions[0]: id is required"]),
        ({"id": "pp9", "currency": "CNY", "versions": []}, ["pp9", "versions must be a non-empty list"]),
        ({"id": "pp9", "versions": payload_with()["versions"]}, ["pp9", "currency is required"]),
        ({"currency": "CNY", "versions": payload_with()["versions"]}, ["id is required"]),
        ("not a dict", ["must be an object"]),
    ],
)
def test_invalid_program_rejected(payload, fragments):
    with pytest.raises(InvalidParam) as info:
        Program.from_payload(payload)
    for fragment in fragments:
        assert fragment in info.value.message


def test_error_message_names_program_and_rule():
    with pytest.raises(InvalidParam) as info:
        Program.from_payload(pricings(rule("input_tokens", "1"), rule("output_tokens", "x", unit="M")))
    assert info.value.message.startswith("pricing program pp9, version v1, pricings[1] (output_tokens): unit_prices: ")


# ------------------------------------------------------------- numerics ----


def test_prices_with_more_than_six_places_and_numbers_in_yaml():
    program = make_program(yaml.safe_load("[{price_factors: input_tokens, unit_prices: 0.0000021}, "
                                          "{price_factors: output_tokens, unit_prices: 3, unit: M}]"))
    result = price_usage(program, Usage("m", input_tokens=1_000_001, output_tokens=1), DAY)
    # input: 1000001 * 0.0000021 = 2.1000021 -> 2_100_002.1 micro -> 2_100_002
    # output: 1 * 3 / 1e6 = 0.000003 -> 3 micro
    assert [(ln.unit_price, ln.amount) for ln in result.lines] == [("0.0000021", 2_100_002), ("3.000000", 3)]


def test_half_up_tie_on_a_line():
    program = make_program([rule("input_tokens", "0.0000015")])
    # 1 token * 0.0000015 = 1.5 micro -> 2; 3 tokens = 4.5 micro -> 5
    assert price_usage(program, Usage("m", input_tokens=1), DAY).amount == 2
    assert price_usage(program, Usage("m", input_tokens=3), DAY).amount == 5


def test_inexact_unit_value_keeps_ties():
    # 3 seconds per unit: price 0.000001 per 3 s; 1.5 s -> 1.5 / 3 * 0.000001 = 0.0000005 = 0.5 micro -> half-up 1
    program = make_program([rule("quantity", "0.000001", unit="3s", quantity_unit="second")], {"3s": 3})
    assert price_usage(program, Usage("m", quantity=Decimal("1.5"), unit="second"), DAY).amount == 1
    # 1 s -> 1/3 micro -> 0; 2 s -> 2/3 micro -> 1
    assert price_usage(program, Usage("m", quantity=Decimal(1), unit="second"), DAY).amount == 0
    assert price_usage(program, Usage("m", quantity=Decimal(2), unit="second"), DAY).amount == 1


def test_amount_above_cap_rejected():
    program = make_program([rule("input_tokens", "99999999999")])
    # 10**15 tokens * 99999999999 per token ~ 1e26 units > the 1e12 cap
    with pytest.raises(InvalidParam, match="exceeds"):
        price_usage(program, Usage("m", input_tokens=10**15), DAY)


# ------------------------------------------------------------ properties ----


PROPERTY_PROGRAM = make_program(
    [
        rule("input_tokens", "2.1", cost_prices="1.5", unit="M",
             tiers=[{"above_input_tokens": 128000, "unit_prices": "4.2", "cost_prices": "3"}]),
        rule("output_tokens", "8.4", cost_prices="0.7", unit="M"),
        rule("cached_tokens", "0.42", unit="M"),
        rule("quantity", "0.033", cost_prices="0.011", unit="3s", quantity_unit="second"),
        rule("flat", "0.0013", cost_prices="0.0005"),
    ],
    {"3s": 3},
)
# Independent oracle, in exact fractions: (undiscounted price, cost) per base unit.
ORACLE = {
    "input_tokens": (Fraction("2.1") / 10**6, Fraction("1.5") / 10**6),
    "input_tokens_tier": (Fraction("4.2") / 10**6, Fraction(3) / 10**6),
    "output_tokens": (Fraction("8.4") / 10**6, Fraction("0.7") / 10**6),
    "cached_tokens": (Fraction("0.42") / 10**6, Fraction(0)),
    "quantity": (Fraction("0.033") / 3, Fraction("0.011") / 3),
    "flat": (Fraction("0.0013"), Fraction("0.0005")),
}
DISCOUNTS = ["0.01", "0.33", "0.5", "0.7", "0.85", "0.9", "0.999", "1", "1.5", "10"]


def half_up_micro(value):
    """Fraction of currency units -> micro-units, half-up (values here are >= 0)."""
    scaled = value * 10**6
    return int(scaled + Fraction(1, 2)) if scaled >= 0 else -int(-scaled + Fraction(1, 2))


@st.composite
def usages(draw):
    input_tokens = draw(st.integers(0, 10**9))
    return Usage(
        "m",
        input_tokens=input_tokens,
        cached_tokens=draw(st.integers(0, input_tokens)),
        output_tokens=draw(st.integers(0, 10**9)),
        quantity=draw(st.decimals(0, 10**6, places=4, allow_nan=False, allow_infinity=False)),
        unit="second",
    )


@settings(max_examples=300, deadline=None)
@given(usages(), st.sampled_from(DISCOUNTS))
def test_property_amount_is_sum_of_lines_and_cost_ignores_discount(usage, discount):
    discounted = price_usage(PROPERTY_PROGRAM, usage, DAY, Decimal(discount))
    full = price_usage(PROPERTY_PROGRAM, usage, DAY)
    assert discounted.amount == sum(ln.amount for ln in discounted.lines)
    assert discounted.cost == sum(ln.cost for ln in discounted.lines)
    assert discounted.original_amount == full.amount == sum(ln.amount for ln in full.lines)
    assert discounted.cost == full.cost
    assert [ln.cost for ln in discounted.lines] == [ln.cost for ln in full.lines]
    if Decimal(discount) <= 1:
        assert discounted.amount <= discounted.original_amount


@settings(max_examples=300, deadline=None)
@given(usages(), st.sampled_from(DISCOUNTS))
def test_property_lines_match_exact_fraction_oracle(usage, discount):
    result = price_usage(PROPERTY_PROGRAM, usage, DAY, Decimal(discount))
    d = Fraction(discount)
    expected = []
    quantities = [
        ("input_tokens", usage.input_tokens - usage.cached_tokens),
        ("output_tokens", usage.output_tokens),
        ("cached_tokens", usage.cached_tokens),
        ("quantity", Fraction(usage.quantity)),
        ("flat", 1),
    ]
    for factor, qty in quantities:
        if not qty:
            continue
        key = "input_tokens_tier" if factor == "input_tokens" and usage.input_tokens > 128000 else factor
        price, cost = ORACLE[key]
        expected.append((factor, half_up_micro(qty * price * d), half_up_micro(qty * cost)))
    assert [(ln.factor, ln.amount, ln.cost) for ln in result.lines] == expected


def test_public_names():
    assert set(pricing.FACTORS) == {
        "input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens",
        "audio_input_tokens", "image_input_tokens", "reasoning_tokens", "audio_output_tokens",
        "characters", "calls", "web_search_calls", "quantity", "flat"}
    assert pricing.ALIASES == {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens", "duration": "quantity"}
    assert isinstance(price_usage(example_program(), Usage("model-a"), DAY), PriceResult)


def test_version_describe_lists_sell_prices_for_a_model():
    version = example_program().version_on(DAY)
    assert version.describe("model-a") == [
        {"factor": "input_tokens", "unit": "M", "unit_price": "2.100000"},
        {"factor": "output_tokens", "unit": "M", "unit_price": "8.400000",
         "tiers": [{"above_input_tokens": 128000, "unit_price": "16.800000"}]},
        {"factor": "cached_tokens", "unit": "M", "unit_price": "0.420000"},
        {"factor": "flat", "unit": "call", "unit_price": "0.010000"},
    ]
    assert version.describe("video-x") == [
        {"factor": "quantity", "unit": "秒", "unit_price": "0.300000", "quantity_unit": "second",
         "filters": {"size": "720P"}},
    ]
    assert version.describe("nobody") == []


# ---- the integer fast path (_int_line) against the Decimal path (_decimal_line) ----
# Random programs (factors, units, prices with up to 9 places, cost prices, tiers, a unit value that
# makes a division inexact) and random events and discounts; the program is priced as compiled (whole
# counts take the integer path) and with the integer fractions taken away (every line in Decimal).

TOKEN_FACTORS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "characters", "calls",
                 "web_search_calls", "audio_input_tokens", "cache_write_tokens")
UNITS = (None, "token", "K", "M", "百万", "万", "10k", "three", "per7")


@st.composite
def decimal_strings(draw, max_units=1000):
    whole = draw(st.integers(0, max_units))
    places = draw(st.integers(0, 9))
    frac = draw(st.integers(0, 10**places - 1)) if places else 0
    text = f"{whole}.{frac:0{places}d}" if places else str(whole)
    return text if Decimal(text) else "0.5"


def _draw_unit_costs_and_tiers(draw, rule, unit, tier_costs):
    """A random rule's unit, cost price and up to three tiers (each with a cost when ``tier_costs``)."""
    if unit is not None:
        rule["unit"] = unit
    if draw(st.booleans()):
        rule["cost_prices"] = draw(decimal_strings())
    thresholds = draw(st.lists(st.integers(0, 10**7), max_size=3, unique=True))
    if thresholds:
        rule["tiers"] = [{"above_input_tokens": t, "unit_prices": draw(decimal_strings()),
                          **({"cost_prices": draw(decimal_strings())} if tier_costs and draw(st.booleans()) else {})}
                         for t in thresholds]


@st.composite
def random_programs(draw):
    rules = []
    for factor in draw(st.lists(st.sampled_from(TOKEN_FACTORS), min_size=1, max_size=6, unique=True)):
        rule = {"price_factors": factor, "unit_prices": draw(decimal_strings())}
        unit = draw(st.sampled_from(UNITS))
        _draw_unit_costs_and_tiers(draw, rule, unit, tier_costs=True)
        rules.append(rule)
    return _random_program("pp-rand", rules)


def _random_program(program_id, rules):
    """One version from 2026-01-01 with the random strategies' unit values."""
    data = {"unit_values": {"three": 3, "per7": "7.5"}, "pricings": rules}
    return Program.from_payload({"id": program_id, "currency": "CNY",
                                 "versions": [{"id": "v", "enabled_date": "2026-01-01", "pricing_data": data}]})


@st.composite
def random_usages(draw):
    big = st.one_of(st.integers(0, 10**4), st.integers(0, 10**9), st.integers(0, 10**15))
    input_tokens, output_tokens = draw(big), draw(big)
    cached = draw(st.integers(0, input_tokens))
    audio = draw(st.integers(0, input_tokens - cached))
    write = draw(st.integers(0, input_tokens - cached - audio))
    return Usage("m", input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached,
                 audio_input_tokens=audio, cache_write_tokens=write,
                 reasoning_tokens=draw(st.integers(0, output_tokens)),
                 characters=draw(big), calls=draw(st.integers(0, 1000)), web_search_calls=draw(st.integers(0, 50)))


def _decimal_only(program):
    """The program with the integer fractions taken away: every line goes through _decimal_line."""
    def strip(p):
        return dataclasses.replace(p, sell_ratio=None, cost_ratio=None)
    versions = []
    for v in program.versions:
        rules = tuple(dataclasses.replace(r, base=strip(r.base), tiers=tuple(strip(t) for t in r.tiers))
                      for r in v.rules)
        versions.append(dataclasses.replace(v, rules=rules, index=pricing._build_index(rules)))
    return dataclasses.replace(program, versions=tuple(versions))


@seed(15)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_programs(), random_usages(), st.one_of(st.just("1"), decimal_strings(max_units=9)))
def test_property_integer_path_equals_decimal_path(program, usage, discount):
    disc = Decimal(discount) if Decimal(discount) else Decimal(1)
    reference = _decimal_only(program)
    try:
        expected = price_usage(reference, usage, DAY, disc)
    except (InvalidParam, NoPricing) as refused:  # over MAX_MICRO, nothing priced: both paths refuse
        with pytest.raises(type(refused)):
            price_usage(program, usage, DAY, disc)
        return
    assert price_usage(program, usage, DAY, disc) == expected
    # and line by line, on every price of every rule (tiers included), where the fast path applies
    for rule in program.versions[0].rules:
        for p in (rule.base, *rule.tiers):
            assert (p.sell_ratio is None) == (p.div is not None)
            if p.sell_ratio is not None:
                for qty in (1, usage.input_tokens, usage.output_tokens, usage.characters):
                    assert pricing._int_line(p, qty, disc) == pricing._decimal_line(p, qty, disc)


# ---- the plans (a version's lookups made once per model) against looking every rule up ----
# Random programs over every factor (tiers, units, costs, model filters for this model and for
# another, now and then an attribute filter, quantity rules per event unit, flat), random events
# (parts, counts, quantities in known and unknown units, huge counts) and discounts: the plan's
# result is the result of ``price_usage(..., planned=False)``, refusals included.

PLAN_FACTORS = tuple(f for f in pricing.FACTORS if f != "quantity")
PLAN_EVENT_UNITS = ("second", "image", "char")


@st.composite
def planned_programs(draw):
    rules = []
    for _ in range(draw(st.integers(1, 8))):
        factor = draw(st.sampled_from(PLAN_FACTORS + ("quantity",)))
        rule = {"price_factors": factor, "unit_prices": draw(decimal_strings())}
        if factor == "quantity":
            rule["quantity_unit"] = draw(st.sampled_from(PLAN_EVENT_UNITS))
        unit = draw(st.sampled_from(UNITS)) if factor != "flat" else None
        _draw_unit_costs_and_tiers(draw, rule, unit, tier_costs=False)
        filters = []
        model = draw(st.sampled_from([None, None, "m", "other"]))
        if model is not None:
            filters.append({"model": model})
        if draw(st.integers(0, 9)) == 0:
            filters.append({"size": draw(st.sampled_from(["720P", "1080P"]))})
        if filters:
            rule["filters"] = filters
        rules.append(rule)
    return _random_program("pp-plan", rules)


@st.composite
def planned_usages(draw):
    big = st.one_of(st.just(0), st.integers(0, 10**4), st.integers(0, 10**9), st.integers(0, 10**15))
    counts = {"input_tokens": draw(big), "output_tokens": draw(big)}
    for whole in ("input_tokens", "output_tokens"):
        left = counts[whole]
        for part in pricing._PARTS_OF[whole]:
            counts[part] = draw(st.one_of(st.just(0), st.integers(0, left)))
            left -= counts[part]
    for factor in pricing.COUNTS:
        counts[factor] = draw(st.one_of(st.just(0), big))
    quantity = draw(st.one_of(st.just(Decimal(0)), st.decimals(0, 10**6, places=4, allow_nan=False,
                                                                allow_infinity=False)))
    unit = draw(st.sampled_from(PLAN_EVENT_UNITS + ("call",)))
    attributes = draw(st.sampled_from([{}, {}, {"size": "720P"}, {"size": "4K"}]))
    return Usage("m", quantity=quantity, unit=unit, attributes=attributes, **counts)


@seed(15)
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planned_programs(), planned_usages(), st.one_of(st.just("1"), st.just("1.0"), decimal_strings(max_units=9)))
def test_property_plan_equals_looking_every_rule_up(program, usage, discount):
    disc = Decimal(discount) if Decimal(discount) else Decimal(1)
    version = program.versions[0]
    filtered = any(r.filters for r in version.rules if r.model in (None, "m"))
    assert (version.plan("m") is None) == filtered     # a plan wherever no attribute can change a lookup
    try:
        expected = price_usage(program, usage, DAY, disc, planned=False)
    except (InvalidParam, NoPricing) as refused:
        with pytest.raises(type(refused)) as raised:
            price_usage(program, usage, DAY, disc)
        assert raised.value.message == refused.message
        return
    assert price_usage(program, usage, DAY, disc) == expected


def test_plan_is_per_model_and_kept_per_version():
    program = make_program([
        rule("input_tokens", "2", unit="M", filters=[{"model": "a"}]),
        rule("input_tokens", "3", unit="M"),
        rule("output_tokens", "5", unit="M", filters=[{"model": "b"}, {"tier": "pro"}]),
    ])
    version = program.versions[0]
    # 1,000,000 input tokens: model a at 2.0/M, any other model at 3.0/M
    assert price_usage(program, Usage("a", input_tokens=10**6), DAY).amount == 2_000_000
    assert price_usage(program, Usage("c", input_tokens=10**6), DAY).amount == 3_000_000
    assert version.plan("a") is version.plan("a") is version.plans["a"] is not None
    # model b has a rule with an attribute filter: it is priced by looking its rules up
    assert version.plan("b") is None
    assert price_usage(program, Usage("b", output_tokens=10**6, attributes={"tier": "pro"}), DAY).amount == 5_000_000
    result = price_usage(program, Usage("b", input_tokens=10**6, output_tokens=10**6), DAY)
    assert (result.amount, result.unpriced) == (3_000_000, ("output_tokens",))
