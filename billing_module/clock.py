"""The module's one clock. Times are stored as UTC text 'YYYY-MM-DD HH:MM:SS', which sorts
and compares the same way on SQLite and MySQL. Tests replace the clock with ``set_clock``."""
import datetime

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
    return dt.strftime(FMT)


def today():
    return utcnow().date()


def parse(text, field="time"):
    """Accept 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM:SS' or ISO 8601 with T / Z / offset; return naive UTC."""
    from .errors import InvalidParam
    if not isinstance(text, str) or not text.strip() or len(text) > 40:
        raise InvalidParam(f"{field}: expected a date or time such as 2026-01-31 12:00:00")
    s = text.strip().replace("Z", "+00:00")
    try:
        dt = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise InvalidParam(f"{field}: '{text[:40]}' is not a date or time such as 2026-01-31 12:00:00") from None
    if dt.tzinfo is not None:
        dt = dt.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return dt.replace(microsecond=0)
