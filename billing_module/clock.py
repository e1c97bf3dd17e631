"""The module's one clock. Times are stored as UTC text 'YYYY-MM-DD HH:MM:SS', which sorts
and compares the same way on SQLite and MySQL. Tests replace the clock with ``set_clock``."""
import datetime
from dataclasses import dataclass

from .errors import InvalidParam

FMT = "%Y-%m-%d %H:%M:%S"
_now = None


def utcnow():
    if _now is not None:
        return _now()
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)


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
    return utcnow().date()


def parse(text, field="time"):
    """Accept 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM:SS' or ISO 8601 with T / Z / offset; return naive UTC."""
    if not isinstance(text, str) or not text.strip() or len(text) > 40:
        raise InvalidParam(f"{field}: expected a date or time such as 2026-01-31 12:00:00")
    s = text.strip().replace("Z", "+00:00")
    try:
        dt = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise InvalidParam(f"{field}: '{text[:40]}' is not a date or time such as 2026-01-31 12:00:00") from None
    if dt.tzinfo is not None:
        try:
            dt = dt.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        except OverflowError:   # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise InvalidParam(f"{field}: '{text[:40]}' is out of range") from None
    return dt.replace(microsecond=0)


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
