"""The module's one clock. Times are stored as UTC text 'YYYY-MM-DD HH:MM:SS', which sorts
and compares the same way on SQLite and MySQL. Tests replace the clock with ``set_clock``.

People read days and months in the deployment's time zone (config ``timezone``): a filter's
naive time is wall time there, and a report's day is the local day (``offset_segments``)."""
import datetime
import functools
import re
import time
import zoneinfo
from dataclasses import dataclass

from .errors import InvalidParam

FMT = "%Y-%m-%d %H:%M:%S"
# ``fmt``'s output, digit for digit ([0-9], not \d: \d also takes other scripts' digits)
_STORED_FORM = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_now = None


def utcnow():
    if _now is not None:
        return _now()
    global _second
    t = int(time.time())
    if t != _second[0]:    # a new second: its datetime, kept for the calls within it (one per event)
        _second = t, datetime.datetime.fromtimestamp(t, datetime.timezone.utc).replace(tzinfo=None)
    return _second[1]


# (epoch second, its naive UTC datetime): comparing an int is cheaper than building a datetime
_second: tuple[int, datetime.datetime] = (-1, datetime.datetime(1970, 1, 1))


def set_clock(func):
    """``func()`` returns a naive UTC datetime; ``None`` restores the real clock."""
    global _now
    _now = func


def now_text(delta_seconds=0):
    return fmt(utcnow() + datetime.timedelta(seconds=delta_seconds))


def fmt(dt):
    """'YYYY-MM-DD HH:MM:SS', the year always four digits: ``strftime('%Y')`` writes year 999 as
    '999', which sorts after '2026' and does not parse back."""
    if not isinstance(dt, datetime.datetime):
        dt = datetime.datetime.combine(dt, datetime.time())
    return dt.replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


def today():
    if _now is not None:
        return _now().date()
    t = time.time()
    day_start, day = _today
    if not day_start <= t < day_start + 86400:
        day_start, day = _day_of(t)
    return day


def _day_of(t):
    """(the epoch second the UTC day of ``t`` began, that day), kept for the next ``today``."""
    global _today
    day = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).date()
    _today = datetime.datetime.combine(day, datetime.time(), datetime.timezone.utc).timestamp(), day
    return _today


# Pricing asks for today on every event: comparing one float is cheaper than building a datetime.
_today = (0.0, datetime.date(1970, 1, 1))


def parse(text, field="time", zone: datetime.tzinfo | None = None):
    """Accept 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM:SS' or ISO 8601 with T / Z / offset; return naive UTC.
    A time without an offset is wall time in ``zone`` (UTC when None)."""
    if not isinstance(text, str) or not text.strip() or len(text) > 40:
        raise InvalidParam(f"{field}: expected a date or time such as 2026-01-31 12:00:00")
    s = text.strip().replace("Z", "+00:00")
    try:
        dt = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise InvalidParam(f"{field}: '{text[:40]}' is not a date or time such as 2026-01-31 12:00:00") from None
    if dt.tzinfo is None and zone is not None:
        dt = dt.replace(tzinfo=zone)
    if dt.tzinfo is not None:
        try:
            dt = dt.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        except OverflowError:   # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise InvalidParam(f"{field}: '{text[:40]}' is out of range") from None
    return dt.replace(microsecond=0)


@functools.lru_cache(maxsize=64)
def zone(name: str) -> datetime.tzinfo:
    """The IANA zone ``name`` (config ``timezone``, checked when the configuration loads)."""
    return zoneinfo.ZoneInfo(name)


def local_today(zone_name: str) -> datetime.date:
    """Today in the deployment's time zone (what "today" means on a page)."""
    return utcnow().replace(tzinfo=datetime.timezone.utc).astimezone(zone(zone_name)).date()


def utc_offset_minutes(tz: datetime.tzinfo, at: datetime.datetime) -> int:
    """The offset of ``tz`` from UTC at the UTC instant ``at`` (naive), in minutes."""
    offset = at.replace(tzinfo=datetime.timezone.utc).astimezone(tz).utcoffset()
    return int(offset.total_seconds() // 60) if offset is not None else 0


_STEP = datetime.timedelta(days=7)    # zones change their offset at most a few times a year


@functools.lru_cache(maxsize=256)
def offset_segments(tz: datetime.tzinfo, lo: datetime.datetime, hi: datetime.datetime
                    ) -> tuple[tuple[str | None, int], ...]:
    """The offsets of ``tz`` over the UTC instants [lo, hi] (naive): ``((until, minutes), ...)``,
    each ``until`` the UTC text where the next offset begins, the last ``None``. A zone without
    daylight saving gives one segment. Transitions are found by weekly steps and a bisection to
    the second, so a report can turn UTC times into local days in SQL."""
    segments: list[tuple[str | None, int]] = []
    current = utc_offset_minutes(tz, lo)
    t = lo
    while t < hi:
        nxt = min(t + _STEP, hi)
        if utc_offset_minutes(tz, nxt) != current:
            a, b = t, nxt        # offset(a) == current != offset(b): bisect to the first second of b's
            while b - a > datetime.timedelta(seconds=1):
                mid = a + (b - a) / 2
                mid = mid.replace(microsecond=0)
                if utc_offset_minutes(tz, mid) == current:
                    a = mid
                else:
                    b = mid
            segments.append((fmt(b), current))
            current = utc_offset_minutes(tz, b)
            nxt = b
        t = nxt
    segments.append((None, current))
    return tuple(segments)


@dataclass(frozen=True)
class TimeRange:
    """The times a caller may send for an event: from ``earliest`` to now + ``ahead_seconds``
    (config ``accounting.use_time_earliest`` / ``accounting.use_time_ahead_seconds``)."""
    earliest: datetime.datetime = datetime.datetime(2000, 1, 1)
    ahead_seconds: int = 86400

    @classmethod
    def from_config(cls, accounting) -> "TimeRange":
        return cls(parse(accounting.use_time_earliest, "accounting.use_time_earliest"),
                   accounting.use_time_ahead_seconds)

    def parse(self, text, field: str) -> str:
        """``text`` as stored time text, or InvalidParam when it is not a time within the range."""
        if type(text) is str and _STORED_FORM.fullmatch(text):
            # already ``fmt``'s form (what clients mostly send): only its range is checked
            try:
                dt = datetime.datetime.fromisoformat(text)
            except ValueError:      # e.g. month 13: the general parser says why
                dt = None
            if dt is not None and self.earliest <= dt <= utcnow() + datetime.timedelta(seconds=self.ahead_seconds):
                return text
        dt = parse(text, field)
        latest = utcnow() + datetime.timedelta(seconds=self.ahead_seconds)
        if not self.earliest <= dt <= latest:
            raise InvalidParam(f"{field}: must be between {fmt(self.earliest)} and {fmt(latest)} (UTC), "
                               f"got '{text[:40]}'")
        return fmt(dt)

    def check_stored(self, text, field: str) -> None:
        """``parse``'s verdict on a time this module stored (``fmt``'s form, re-checked by the
        accountant on every row it claims), without the general parser: text of exactly that form
        within the range passes here; anything else gets the full ``parse`` (which says why)."""
        if isinstance(text, str) and len(text) == 19 and text[10] == " ":
            try:
                dt = datetime.datetime.fromisoformat(text)
            except ValueError:
                dt = None
            if dt is not None and dt.tzinfo is None and \
                    self.earliest <= dt <= utcnow() + datetime.timedelta(seconds=self.ahead_seconds):
                return
        self.parse(text, field)
