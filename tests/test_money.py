"""Tests for billing_module.money: every expected value is worked out by hand."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_module.errors import InvalidParam
from billing_module.money import (
    MAX_MICRO,
    MICRO,
    from_micro,
    parse_count,
    parse_quantity,
    round_micro,
    to_micro,
)


def test_micro_constant():
    assert MICRO == 1_000_000
    # cap: 1e12 units * 1e6 = 1e18 micro, below the bigint max 9.22e18
    assert MAX_MICRO == 10**18 < 2**63 - 1


# ------------------------------------------------------------- to_micro ----


@pytest.mark.parametrize(
    "value, expected",
    [
        (5, 5_000_000),  # an int is whole currency units: 5 * 1e6
        (-3, -3_000_000),
        (0, 0),
        ("12.5", 12_500_000),  # 12.5 * 1e6
        ("-0.000001", -1),  # one micro-unit
        ("0.000001", 1),
        ("0", 0),
        ("-0", 0),
        ("+1.5", 1_500_000),
        (" 7.25 ", 7_250_000),  # surrounding whitespace ignored
        ("1.0000000", 1_000_000),  # 7 places but the value has none: exact
        ("12.345600", 12_345_600),
        (Decimal("0.1"), 100_000),
        (Decimal("1E+3"), 1_000_000_000),  # Decimal objects are taken by value: 1000 units
        (10**12, 10**18),  # the cap itself is allowed
        ("-1000000000000", -(10**18)),
    ],
)
def test_to_micro_accepts(value, expected):
    assert to_micro(value) == expected


@pytest.mark.parametrize("value", [True, False])
def test_to_micro_rejects_bool(value):
    with pytest.raises(InvalidParam, match="boolean"):
        to_micro(value)


@pytest.mark.parametrize("value", [1.5, 0.0, 12.0, float("nan"), float("inf")])
def test_to_micro_rejects_any_float_and_asks_for_a_string(value):
    with pytest.raises(InvalidParam, match="decimal string") as info:
        to_micro(value, "price")
    assert info.value.message.startswith("price: ")
    assert info.value.code == "invalid_param" and info.value.status == 400


@pytest.mark.parametrize(
    "value", ["NaN", "nan", "Infinity", "-inf", "sNaN", Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")]
)
def test_to_micro_rejects_nan_and_infinity(value):
    with pytest.raises(InvalidParam):
        to_micro(value)


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_to_micro_rejects_blank(value):
    with pytest.raises(InvalidParam, match="amount: must not be empty"):
        to_micro(value)


@pytest.mark.parametrize(
    "value",
    [
        "1e3",  # exponents: refused in strings (documented)
        "1E-6",
        "1_000",  # Decimal() would accept this
        ".5",
        "5.",
        "1.2.3",
        "abc",
        "0x10",
        "\u0661\u0662",  # Arabic-Indic digits, which Decimal() would accept
        "12 000",
    ],
)
def test_to_micro_rejects_non_plain_strings(value):
    with pytest.raises(InvalidParam, match="plain decimal"):
        to_micro(value)


@pytest.mark.parametrize("value", [None, [1], {"a": 1}, b"1"])
def test_to_micro_rejects_other_types(value):
    with pytest.raises(InvalidParam):
        to_micro(value)


@pytest.mark.parametrize("value", ["0.0000001", "-1.1234567", Decimal("0.0000005")])
def test_to_micro_strict_rejects_more_than_six_places(value):
    with pytest.raises(InvalidParam, match="at most 6 decimal places"):
        to_micro(value)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0.0000005", 1),  # 0.5 micro -> half-up -> 1
        ("-0.0000005", -1),  # away from zero
        ("0.0000004999", 0),
        ("0.0000025", 3),  # 2.5 micro -> 3 (half-even would give 2)
        ("-0.0000025", -3),
        ("1.0000015", 1_000_002),  # 1_000_001.5 micro -> 1_000_002
    ],
)
def test_to_micro_non_strict_rounds_half_up(value, expected):
    assert to_micro(value, strict=False) == expected


@pytest.mark.parametrize("value", [10**12 + 1, -(10**12) - 1, "1000000000000.000001", Decimal("1E+13"), "99999999999999999999"])
def test_to_micro_rejects_above_cap(value):
    with pytest.raises(InvalidParam, match="exceeds 1000000000000"):
        to_micro(value)


# ----------------------------------------------------------- from_micro ----


@pytest.mark.parametrize(
    "micro, text",
    [
        (12_345_600, "12.345600"),
        (-1, "-0.000001"),
        (0, "0.000000"),
        (1, "0.000001"),
        (999_999, "0.999999"),
        (-1_500_000, "-1.500000"),
        (10**18, "1000000000000.000000"),
    ],
)
def test_from_micro(micro, text):
    assert from_micro(micro) == text


@pytest.mark.parametrize("value", [True, 1.5, Decimal(1), "1"])
def test_from_micro_rejects_non_int(value):
    with pytest.raises(TypeError):
        from_micro(value)


@given(st.integers(min_value=-MAX_MICRO, max_value=MAX_MICRO))
def test_round_trip_micro(micro):
    text = from_micro(micro)
    assert len(text.split(".")[1]) == 6
    assert to_micro(text) == micro


@given(st.decimals(min_value=-(10**12), max_value=10**12, places=6, allow_nan=False, allow_infinity=False))
def test_round_trip_decimal_string(d):
    assert Decimal(from_micro(to_micro(format(d, "f")))) == d


# ----------------------------------------------------------- round_micro ----


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0.0000005", 1),  # exactly half a micro-unit: up
        ("-0.0000005", -1),  # negative half: away from zero
        ("0.0000004999999", 0),
        ("-0.0000004999999", 0),
        ("0.0000015", 2),
        ("1.0000025", 1_000_003),  # 1_000_002.5 -> 1_000_003 (not banker's 1_000_002)
        ("-1.0000025", -1_000_003),
        ("2.5", 2_500_000),
        ("0", 0),
    ],
)
def test_round_micro_half_up(value, expected):
    assert round_micro(Decimal(value)) == expected


def test_round_micro_rejects_non_finite():
    with pytest.raises(ValueError):
        round_micro(Decimal("NaN"))


@given(st.integers(min_value=-(10**19), max_value=10**19))
def test_round_micro_matches_half_up_formula(tenths):
    # value = tenths / 10 micro-units; half-up = (|tenths| + 5) // 10 with the sign put back
    expected = (abs(tenths) + 5) // 10
    if tenths < 0:
        expected = -expected
    assert round_micro(Decimal(tenths).scaleb(-7)) == expected


# -------------------------------------------------------- parse_quantity ----


@pytest.mark.parametrize(
    "value, expected",
    [
        (3.5, Decimal("3.5")),  # float via str(): exactly 3.5
        (0.1, Decimal("0.1")),  # not 0.1000000000000000055...
        ("3.5", Decimal("3.5")),
        (3, Decimal(3)),
        (0, Decimal(0)),
        ("-0", Decimal(0)),
        ("0.1234", Decimal("0.1234")),
        ("1.50000", Decimal("1.5")),  # trailing zeros are not places
        (Decimal("2.25"), Decimal("2.25")),
        ("99999999999.9999", Decimal("99999999999.9999")),  # largest decimal(15,4)
    ],
)
def test_parse_quantity_accepts(value, expected):
    assert parse_quantity(value, "quantity") == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "negative"),
        ("-0.5", "negative"),
        (-0.5, "negative"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (Decimal("NaN"), "finite"),
        ("NaN", "plain decimal"),
        ("inf", "plain decimal"),
        (True, "boolean"),
        (None, "must be a number"),
        ("", "empty"),
        ("0.12345", "at most 4 decimal places"),
        (1e-05, "at most 4 decimal places"),  # str(1e-05) is "1e-05" -> 0.00001
        (10**11, "below"),
    ],
)
def test_parse_quantity_rejects(value, message):
    with pytest.raises(InvalidParam, match=message) as info:
        parse_quantity(value, "quantity")
    assert info.value.message.startswith("quantity: ")


def test_parse_quantity_places():
    with pytest.raises(InvalidParam, match="at most 2 decimal places"):
        parse_quantity("1.234", "q", places=2)
    assert parse_quantity("1.23", "q", places=2) == Decimal("1.23")
    # places=None: no limit (used for prices)
    assert parse_quantity("0.0000021", "q", places=None) == Decimal("0.0000021")


# ----------------------------------------------------------- parse_count ----


@pytest.mark.parametrize(
    "value, expected",
    [(12, 12), ("12", 12), (" 12 ", 12), (0, 0), ("0", 0), (10**15, 10**15), (str(10**15), 10**15), ("000012", 12)],
)
def test_parse_count_accepts(value, expected):
    assert parse_count(value, "input_tokens") == expected


@pytest.mark.parametrize(
    "value",
    [
        "12.0",
        12.5,
        12.0,
        True,
        False,
        -1,
        "-1",
        "+1",
        "",
        "1e3",
        Decimal(12),
        None,
        10**15 + 1,
        str(10**15 + 1),
        "9" * 5000,  # must be a clean error, not int()'s digit limit
        "\u0661\u0662",
    ],
)
def test_parse_count_rejects(value):
    with pytest.raises(InvalidParam) as info:
        parse_count(value, "input_tokens")
    assert info.value.message.startswith("input_tokens: ")
