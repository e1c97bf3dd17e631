"""The input rules of the module, each written once: ids, times and date bounds, amounts, whole
numbers and paging. The API reads request parameters with ``api.params.Params``, which delegates
here; the core (``accounting``) and the products services call these functions directly, so a
value means the same thing whichever door it came in by.

Every function refuses bad input with ``InvalidParam`` (a 400 ``invalid_param`` at the API)
before anything is written; ``None`` or ``""`` is "not given". This module is domain level: it
imports nothing from ``api/`` or the services.
"""
import datetime
import math
import re
import urllib.parse

from . import clock
from .errors import InvalidParam
from .money import to_micro

ID_MAX_LEN = 32
# fullmatch, not match with "$": "$" would let a trailing newline ("id\n") through
_ID_RE = re.compile(r"[A-Za-z0-9_.:@\-]+")
# [0-9], not \d: \d also takes other scripts' digits
_INT_RE = re.compile(r"-?[0-9]{1,18}")
_DAY_LEN = len("YYYY-MM-DD")
MAX_PAGE = 10**9
DEFAULT_ROWS, MAX_ROWS = 20, 500


def given(value: object) -> bool:
    """Whether a parameter was sent at all: ``None`` and ``""`` mean "not given"."""
    return value is not None and value != ""


def text(value: object, name: str, *, required: bool = False, max_len: int = 255, default: str | None = None,
         choices: tuple[str, ...] | None = None) -> str | None:
    """A string (a whole number is taken as its decimal text) of at most ``max_len`` characters,
    without NUL; with ``choices``, one of them."""
    if not given(value):
        if required:
            raise InvalidParam(f"{name}: required")
        return default
    if not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParam(f"{name}: expected a string")
        value = str(value)
    if len(value) > max_len:
        raise InvalidParam(f"{name}: at most {max_len} characters")
    if "\x00" in value:
        raise InvalidParam(f"{name}: contains a NUL character")
    if choices is not None and value not in choices:
        raise InvalidParam(f"{name}: must be one of {', '.join(choices)}")
    return value


def ident(value: object, name: str, *, required: bool = False, max_len: int = ID_MAX_LEN,
          default: str | None = None) -> str | None:
    """An id: letters, digits and ``_ . : @ -`` only, at most ``max_len`` characters."""
    if type(value) is str and len(value) <= max_len and _ID_RE.fullmatch(value):
        return value      # the usual id, valid as sent (every event carries a few): no more checks
    v = text(value, name, required=required, max_len=max_len, default=default)
    if v is not None and not _ID_RE.fullmatch(v):
        raise InvalidParam(f"{name}: only letters, digits and _ . : @ - are allowed")
    return v


def flag(value: object, name: str, default: str | None = None) -> str | None:
    """A yes/no: ``"1"`` or ``"0"`` from a boolean, 1 / 0, or true / false / yes / no."""
    if not given(value):
        return default
    if isinstance(value, bool):
        return "1" if value else "0"
    s = str(value).strip().lower()
    if s in ("1", "true", "yes"):
        return "1"
    if s in ("0", "false", "no"):
        return "0"
    raise InvalidParam(f"{name}: expected 0 or 1")


WEBHOOK_URL_MAX_LEN = 500


def webhook_url(value: object, name: str = "url") -> str | None:
    """A webhook receiver: an absolute http or https URL with a host (no credentials in it)."""
    v = text(value, name, max_len=WEBHOOK_URL_MAX_LEN)
    if v is None:
        return None
    v = v.strip()
    try:
        u = urllib.parse.urlsplit(v)
        u.port   # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise InvalidParam(f"{name}: not a URL") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise InvalidParam(f"{name}: must be an http:// or https:// URL with a host")
    if u.username or u.password or any(c.isspace() for c in v):
        raise InvalidParam(f"{name}: must not contain credentials or spaces")
    return v


def integer(value: object, name: str, *, required: bool = False, default: int | None = None,
            minimum: int | None = None, maximum: int | None = None) -> int | None:
    """A whole number: an int, an integral float (JSON ``5.0``) or a string of ASCII digits."""
    if not given(value):
        if required:
            raise InvalidParam(f"{name}: required")
        return default
    if isinstance(value, bool):
        raise InvalidParam(f"{name}: expected an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InvalidParam(f"{name}: expected an integer")
        value = int(value)
    elif isinstance(value, str):
        if not _INT_RE.fullmatch(value.strip()):
            raise InvalidParam(f"{name}: expected an integer")
        value = int(value.strip())
    elif not isinstance(value, int):
        raise InvalidParam(f"{name}: expected an integer")
    if minimum is not None and value < minimum:
        raise InvalidParam(f"{name}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise InvalidParam(f"{name}: must be at most {maximum}")
    return value


def amount(value: object, name: str = "amount", *, required: bool = True,
           non_negative: bool = False) -> int | None:
    """Money in currency units (a decimal string or a whole number; floats are refused) ->
    integer micro-units."""
    if not given(value):
        if required:
            raise InvalidParam(f"{name}: required")
        return None
    micro = to_micro(value, name)
    if non_negative and micro < 0:
        raise InvalidParam(f"{name}: must not be negative")
    return micro


def time_text(value: object, name: str) -> str:
    """A day or a time (``YYYY-MM-DD``, ``YYYY-MM-DD HH:MM:SS``, ISO 8601 with T / Z / offset)
    -> UTC text ``YYYY-MM-DD HH:MM:SS``, the year always four digits so that texts compare as
    times (``strftime('%Y')`` writes the year 999 as ``999``, which sorts after 2026)."""
    return _fmt(clock.parse(value, name))


def _fmt(dt: datetime.datetime) -> str:
    return dt.isoformat(sep=" ", timespec="seconds")


def bound(value: object, name: str, *, end: bool = False, zone: datetime.tzinfo | None = None) -> str | None:
    """One bound of a time range, as UTC text. The start is inclusive, the end exclusive; a day
    given as the end includes that whole day (the reports' convention: "to day 31" means up to
    the 32nd). A day or time without an offset is wall time in ``zone`` (the deployment's
    ``timezone``; UTC when None), so "2026-11-01" is that zone's midnight."""
    if not given(value):
        return None
    if end and isinstance(value, str) and len(value.strip()) == _DAY_LEN:
        try:
            value = (clock.parse(value, name) + datetime.timedelta(days=1)).date().isoformat()
        except OverflowError:
            raise InvalidParam(f"{name}: must be before 9999-12-31") from None
    return _fmt(clock.parse(value, name, zone))


def bounds(start: object, end: object, start_name: str = "start_date", end_name: str = "end_date", *,
           end_day_inclusive: bool = True, zone: datetime.tzinfo | None = None) -> tuple[str | None, str | None]:
    """A time range ``[start, end)`` in UTC text; the start must come before the end. Without
    ``end_day_inclusive`` a day as the end means its midnight ("before that day"). Naive values
    are wall time in ``zone``."""
    t0, t1 = bound(start, start_name, zone=zone), bound(end, end_name, end=end_day_inclusive, zone=zone)
    if t0 is not None and t1 is not None and t0 >= t1:
        raise InvalidParam(f"{start_name}: must be before {end_name}")
    return t0, t1


_MONTH_RE = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")


def month(value: object, name: str = "month", *, required: bool = False) -> str | None:
    """A calendar month ``YYYY-MM`` (years 2000 to 9998, so the month after it exists)."""
    v = text(value, name, required=required, max_len=7)
    if v is None:
        return None
    m = _MONTH_RE.fullmatch(v)
    if not m or not 2000 <= int(m.group(1)) <= 9998:
        raise InvalidParam(f"{name}: expected a month such as 2026-11")
    return v


def page(page_no: object = None, rows: object = None, *, default_rows: int = DEFAULT_ROWS,
         max_rows: int = MAX_ROWS, rows_name: str = "rows") -> tuple[int, int]:
    """``(page, rows)``: page 1 is the first; ``rows`` per page, at most ``max_rows``."""
    number = integer(page_no, "page", default=1, minimum=1, maximum=MAX_PAGE)
    size = integer(rows, rows_name, default=default_rows, minimum=1, maximum=max_rows)
    assert number is not None and size is not None   # both have a default
    return number, size
