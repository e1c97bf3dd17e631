"""Money as integer micro-units, and the parsers for everything a caller sends.

Inside the module an amount is always a Python ``int`` of micro-units
(1e-6 of the currency unit); at every edge (API replies, CSV, pages) it is a
decimal string with exactly six places (``from_micro``). Money is never a
binary float: floats are refused on input and all arithmetic is
``decimal.Decimal`` in this module's own context (``CTX``), so a caller that
changes the thread's decimal context cannot change a price.

Rounding rule (the only one): half-up (``ROUND_HALF_UP``, i.e. a .5 micro-unit
goes away from zero: 0.0000005 -> 0.000001, -0.0000005 -> -0.000001) to the
micro-unit, applied once per priced line (see ``pricing.py``).

Accepted input:

* ``int``: whole currency units (``5`` is 5.000000, i.e. 5_000_000 micro).
* ``Decimal``: any finite value.
* ``str``: plain decimal notation only, ``[+-]digits[.digits]`` with ASCII
  digits, surrounding whitespace ignored. Exponents (``"1e3"``), underscores
  (``"1_000"``), ``".5"``, ``"5."``, ``"NaN"`` and ``"Infinity"`` are refused.
* ``bool`` is always refused; ``float`` is refused for money and accepted,
  when finite, only by ``parse_quantity`` (converted through ``str()``).

Money magnitudes are capped at ``MAX_UNITS`` = 1e12 currency units
(``MAX_MICRO`` = 1e18 micro-units), which keeps every stored amount inside a
signed 64-bit integer (max ~9.22e18).
"""

import math
import re
from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)

from billing_module.errors import InvalidParam

MICRO = 1_000_000
PLACES = 6
MAX_UNITS = 10**12
MAX_MICRO = MAX_UNITS * MICRO
MAX_COUNT = 10**15
# Quantities are stored as decimal(15,4): at most 11 integer digits.
MAX_QUANTITY = Decimal(10**11)

# Wide enough that products of capped values (1e15 tokens x 1e12 price, with
# decimals) are exact; the only rounding is the explicit half-up below.
CTX = Context(prec=80, rounding=ROUND_HALF_UP, traps=[InvalidOperation, DivisionByZero, Overflow])

_ONE = Decimal(1)
_MAX_UNITS_D = Decimal(MAX_UNITS)
_DECIMAL_RE = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_DIGITS_RE = re.compile(r"[0-9]+")


def _decimal_str(value, field):
    """A stripped plain-decimal string -> Decimal, or InvalidParam."""
    text = value.strip()
    if not text:
        raise InvalidParam(f"{field}: must not be empty")
    if not _DECIMAL_RE.fullmatch(text):
        raise InvalidParam(
            f"{field}: {value!r} is not a plain decimal number (expected digits with an optional '.', e.g. \"12.50\")"
        )
    return Decimal(text)


def decimal_places(d):
    """Number of significant decimal places of a finite Decimal (1.50 -> 1)."""
    exponent = d.normalize(CTX).as_tuple().exponent
    return -exponent if exponent < 0 else 0


def to_micro(value, field="amount", strict=True):
    """Parse a money value in currency units into int micro-units.

    With ``strict`` (the default, for API input) more than six significant
    decimal places is an error; otherwise the value is rounded half-up.
    """
    if isinstance(value, bool):
        raise InvalidParam(f"{field}: must be a decimal string, not a boolean")
    if isinstance(value, float):
        raise InvalidParam(
            f"{field}: floating-point numbers are not accepted for money; send a decimal string such as \"12.50\""
        )
    if isinstance(value, int):
        if abs(value) > MAX_UNITS:
            raise InvalidParam(f"{field}: magnitude exceeds {MAX_UNITS} currency units")
        return value * MICRO
    if isinstance(value, str):
        d = _decimal_str(value, field)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidParam(f"{field}: must be a finite number, got {value}")
        d = value
    else:
        raise InvalidParam(f"{field}: must be a decimal string, got {type(value).__name__}")
    if abs(d) > _MAX_UNITS_D:
        raise InvalidParam(f"{field}: magnitude exceeds {MAX_UNITS} currency units")
    if strict and decimal_places(d) > PLACES:
        raise InvalidParam(f"{field}: at most {PLACES} decimal places are allowed, got {value!s}")
    return round_micro(d)


def from_micro(micro):
    """int micro-units -> decimal string with exactly six places."""
    if type(micro) is not int:    # a bool too (read on every line of every reply: one check)
        raise TypeError(f"from_micro expects int micro-units, got {type(micro).__name__}")
    if micro < 0:
        units, frac = divmod(-micro, MICRO)
        return f"-{units}.{frac:06d}"
    units, frac = divmod(micro, MICRO)
    return f"{units}.{frac:06d}"


def round_micro(d):
    """Decimal currency units -> int micro-units, rounded half-up (away from zero at .5)."""
    if not d.is_finite():
        raise ValueError(f"cannot round non-finite value {d}")
    return int(d.scaleb(PLACES, CTX).to_integral_value(ROUND_HALF_UP, CTX))


def parse_quantity(value, field, places=4):
    """A non-negative, non-money quantity (e.g. 3.5 seconds) -> Decimal.

    Finite floats are accepted here (JSON clients send 3.5) and converted via
    ``str()``, never used as binary values. ``places=None`` lifts the limit on
    decimal places (used for prices). Values must be below ``MAX_QUANTITY``.
    """
    if isinstance(value, bool):
        raise InvalidParam(f"{field}: must be a number, not a boolean")
    if isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidParam(f"{field}: must be a finite number, got {value}")
        d = Decimal(str(value))
    elif isinstance(value, str):
        d = _decimal_str(value, field)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidParam(f"{field}: must be a finite number, got {value}")
        d = value
    else:
        raise InvalidParam(f"{field}: must be a number, got {type(value).__name__}")
    if d < 0:
        raise InvalidParam(f"{field}: must not be negative, got {value}")
    if d >= MAX_QUANTITY:
        raise InvalidParam(f"{field}: must be below {MAX_QUANTITY}, got {value}")
    if places is not None and decimal_places(d) > places:
        raise InvalidParam(f"{field}: at most {places} decimal places are allowed, got {value}")
    if not d:
        return Decimal(0)  # also turns "-0" into 0
    return d


def parse_count(value, field):
    """A non-negative integer count (tokens): an int or a string of ASCII digits."""
    if isinstance(value, bool):
        raise InvalidParam(f"{field}: must be a whole number, not a boolean")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        text = value.strip()
        if not _DIGITS_RE.fullmatch(text):
            raise InvalidParam(f"{field}: must be a non-negative whole number, got {value!r}")
        if len(text.lstrip("0")) > len(str(MAX_COUNT)):
            raise InvalidParam(f"{field}: must not exceed {MAX_COUNT}")
        n = int(text)
    else:
        raise InvalidParam(f"{field}: must be a non-negative whole number, got {type(value).__name__} {value!r}")
    if n < 0:
        raise InvalidParam(f"{field}: must not be negative, got {n}")
    if n > MAX_COUNT:
        raise InvalidParam(f"{field}: must not exceed {MAX_COUNT}")
    return n
