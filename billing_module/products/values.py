"""The products' units, constants and value rules, shared by every products module.

Quantities are integers of 1e-4 of the unit (``QSCALE``; the same scale as the decimal(15,4)
columns of ``product_usage_log``), so quota arithmetic is exact in SQL on both databases.
Money is integer micro-units; supplier unit costs are integers of 1e-8 of the currency unit.
Ids, money and counts are checked by ``billing_module.validation``; what is here is the
products' own: quantities, unit costs, their choices and their column formats.
"""
import calendar
import datetime
import zoneinfo
from decimal import Decimal
from typing import Literal, overload

from .. import clock, validation
from ..errors import AccountSuspended, BillingError, Conflict, InsufficientBalance, InvalidParam, UnknownCustomer
from ..ids import payload_hash
from ..money import parse_count, parse_quantity

QSCALE = 10_000            # quantities: integers of 1e-4 of the unit
COST_PER_MICRO = 100       # unit costs are 1e-8 of the currency unit, money is 1e-6
MODE_INCLUDED, MODE_OVERAGE, MODE_PAYG = "1", "2", "3"
BILLING_MODES = {MODE_INCLUDED: "included", MODE_OVERAGE: "overage", MODE_PAYG: "pay_as_you_go"}
RESOURCE_TYPES = ("llm", "uapi", "service")
PRODUCT_TYPES = ("llm_model", "api", "bundle")
PRODUCT_STATUSES = ("active", "disabled")
PERIOD_ANCHORS = ("day", "second")   # a period starts at midnight of the subscription day, or at its second
SUBSCRIPTION_STATUSES = ("active", "cancelled", "expired")
TOKEN_UNIT, CALL_UNIT = "token", "call"
# units sold whole unless a product says otherwise (fractional = '1'); others allow fractions
WHOLE_UNITS = ("token", "call", "image", "request")
# accounting's own usage rows are keyed by their record; product_use may not forge such keys
HOOK_SOURCE_TABLE = "accounting_records"
MAX_PERIOD_MONTHS = 120
MAX_PRIORITY = 1_000_000
# refusals of a renewal charge that expire the subscription (anything else is retried)
UNPAID = (InsufficientBalance, AccountSuspended, UnknownCustomer)


class QuotaExceeded(BillingError):
    status, code = 402, "quota_exceeded"


class NoSupplier(Conflict):
    """A product that sells bound resources, none of whose enabled suppliers can serve the use."""
    status, code = 409, "no_supplier"


class NotSubscribed(BillingError):
    status, code = 402, "not_subscribed"


# --- value parsing (bad input raises InvalidParam before anything is written) ---------------------
@overload
def ident(value: object, name: str, required: Literal[True] = True, max_len: int = ...) -> str: ...
@overload
def ident(value: object, name: str, required: bool, max_len: int = ...) -> str | None: ...


def ident(value: object, name: str, required: bool = True, max_len: int = validation.ID_MAX_LEN) -> str | None:
    """An id; the products' arguments are required unless said otherwise."""
    return validation.ident(value, name, required=required, max_len=max_len)


def quantity(value: object, name: str, positive: bool = False) -> int:
    """A quantity of units -> integer 1e-4 units (at most 4 decimal places)."""
    if not validation.given(value):
        raise InvalidParam(f"{name}: required")
    q = int(parse_quantity(value, name, places=4).scaleb(4))
    if positive and q <= 0:
        raise InvalidParam(f"{name}: must be positive")
    return q


def unit_cost(value: object, name: str = "unit_cost") -> int:
    """A supplier unit cost in currency units (up to 8 decimal places) -> integer 1e-8 units."""
    if isinstance(value, float):
        raise InvalidParam(f"{name}: floating-point numbers are not accepted for money; send a decimal string")
    if not validation.given(value):
        raise InvalidParam(f"{name}: required")
    return int(parse_quantity(value, name, places=8).scaleb(8))


def count(value: object, name: str, minimum: int, maximum: int, default: int | None = None) -> int:
    if not validation.given(value):
        if default is None:
            raise InvalidParam(f"{name}: required")
        return default
    n = parse_count(value, name)
    if not minimum <= n <= maximum:
        raise InvalidParam(f"{name}: must be between {minimum} and {maximum}")
    return n


def choice(value: object, name: str, choices: tuple[str, ...], default: str | None = None,
           required: bool = True) -> str | None:
    """One of ``choices``; required unless a ``default`` is given or ``required`` is false."""
    return validation.text(value, name, required=required and default is None, default=default, choices=choices)


def text(value: object, name: str, max_len: int, required: bool = False) -> str | None:
    """A label: stripped, at most ``max_len`` characters; blank is None."""
    if not validation.given(value):
        if required:
            raise InvalidParam(f"{name}: required")
        return None
    if not isinstance(value, str):
        raise InvalidParam(f"{name}: expected a string")
    value = value.strip()
    if not value and required:
        raise InvalidParam(f"{name}: required")
    if len(value) > max_len or "\x00" in value:
        raise InvalidParam(f"{name}: at most {max_len} characters")
    return value or None


# --- column formats --------------------------------------------------------------------------------
def qtext(q: int) -> str:
    """Integer 1e-4 units -> plain decimal text without trailing zeros ('2.5', '10')."""
    s = format(Decimal(int(q)).scaleb(-4), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def qdb(q: int) -> str:
    """Integer 1e-4 units -> the decimal(15,4) column value."""
    return format(Decimal(int(q)).scaleb(-4), "f")


def q_from_db(v: object) -> int:
    """A decimal(15,4) column (Decimal on MySQL; int or float on SQLite, exact to 15 digits)."""
    return 0 if v is None else int(Decimal(str(v)).scaleb(4).to_integral_value())


def int_from_db(v: object) -> int:
    return 0 if v is None else int(Decimal(str(v)))


def cost_text(c: int) -> str:
    return f"{c // 10**8}.{c % 10**8:08d}"


def div_half_up(num: int, den: int) -> int:
    """round(num / den) half-up, for non-negative integers (exact, no Decimal needed)."""
    return (2 * num + den) // (2 * den)


def plan_overage(product, over: int) -> int:
    """Micro-units that ``over`` (1e-4 units) past the quota cost at the product's overage price
    (which must be set), half-up: the one overage rule of product_use and accounted events."""
    return div_half_up(over * int(product.overage_price), int(product.price_per) * QSCALE)


# --- periods and keys ------------------------------------------------------------------------------
def add_months(dt: datetime.datetime, months: int) -> datetime.datetime:
    """``dt`` plus whole months; the day is clamped to the month's last day (Jan 31 -> Feb 28)."""
    y, m = divmod(dt.month - 1 + months, 12)
    year, month = dt.year + y, m + 1
    return dt.replace(year=year, month=month, day=min(dt.day, calendar.monthrange(year, month)[1]))


def period(started_at: str, months: int, k: int, tz: str = "UTC") -> tuple[str, str]:
    """Start and end of period ``k`` (0 = the first), UTC texts; every period is anchored on the
    first start, so month-end clamping never drifts (Jan 31 -> Feb 28 -> Mar 31). Months are
    added to the wall time in ``tz``, so a period that starts at local midnight ends at one."""
    zone = zoneinfo.ZoneInfo(tz)
    local = clock.parse(started_at).replace(tzinfo=datetime.timezone.utc).astimezone(zone).replace(tzinfo=None)

    def utc(months_on: int) -> str:
        wall = add_months(local, months_on).replace(tzinfo=zone)
        return clock.fmt(wall.astimezone(datetime.timezone.utc))
    return utc(k * months), utc((k + 1) * months)


def local_start(at: str, tz: str, anchor: str) -> str:
    """When a period that begins at ``at`` (UTC text) starts: at that second (``anchor`` 'second'),
    or at midnight of that day in ``tz`` ('day'); a UTC text."""
    if anchor != "day":
        return at
    zone = zoneinfo.ZoneInfo(tz)
    local = clock.parse(at).replace(tzinfo=datetime.timezone.utc).astimezone(zone)
    return clock.fmt(local.replace(hour=0, minute=0, second=0).astimezone(datetime.timezone.utc))


def local_date(at: str, tz: str) -> str:
    """The date of a UTC text in ``tz`` ('YYYY-MM-DD'): how a period is labelled."""
    zone = zoneinfo.ZoneInfo(tz)
    return clock.parse(at).replace(tzinfo=datetime.timezone.utc).astimezone(zone).date().isoformat()


def period_index(started_at: str, months: int, at: str, tz: str = "UTC") -> int:
    """The number of the period (0 = the first) that contains ``at``, on the anchor of ``period``."""
    start, now = clock.parse(started_at), clock.parse(at)
    k = max(0, ((now.year - start.year) * 12 + now.month - start.month) // months)
    while k > 0 and clock.parse(period(started_at, months, k, tz)[0]) > now:
        k -= 1
    while clock.parse(period(started_at, months, k, tz)[1]) <= now:
        k += 1
    return k


def ledger_key(key: str) -> str:
    """A ledger request_id (at most 64 characters) derived from a usage idempotency key."""
    return key if len(key) <= 64 else "h:" + payload_hash(key)[:62]
