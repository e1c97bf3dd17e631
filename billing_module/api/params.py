"""Reading request parameters (JSON body, form or query, as ahserver merges them) with
clear ``invalid_param`` errors. Every reader rejects a wrong type instead of guessing."""
import math
import re

from ..errors import InvalidParam
from ..money import to_micro

_ID_RE = re.compile(r"[A-Za-z0-9_.:@\-]+")
# What a browser page sends for a field left empty: "" (an empty input), "undefined" (a select
# never touched: JavaScript's undefined made a string in a query), "null" (JSON null made a
# string). All mean "not given", for every parameter: an optional filter is then no filter, a
# required one is "required" rather than a customer named "undefined".
ABSENT = ("", "undefined", "null")


class Params:
    def __init__(self, raw):
        self.raw = dict(raw or {})

    def _get(self, name):
        v = self.raw.get(name)
        if isinstance(v, list):
            raise InvalidParam(f"{name}: given more than once")
        if isinstance(v, str) and v in ABSENT:
            return None
        return v

    def value(self, name):
        """The value as sent (None when absent), for a reader further in that checks it itself."""
        return self._get(name)

    def present(self, name):
        v = self.raw.get(name)
        return v is not None and not (isinstance(v, str) and v in ABSENT)

    def str(self, name, required=False, max_len=255, default=None, choices=None):
        v = self._get(name)
        if v is None or v == "":
            if required:
                raise InvalidParam(f"{name}: required")
            return default
        if not isinstance(v, str):
            if isinstance(v, bool) or not isinstance(v, (int,)):
                raise InvalidParam(f"{name}: expected a string")
            v = str(v)
        if len(v) > max_len:
            raise InvalidParam(f"{name}: at most {max_len} characters")
        if "\x00" in v:
            raise InvalidParam(f"{name}: contains a NUL character")
        if choices is not None and v not in choices:
            raise InvalidParam(f"{name}: must be one of {', '.join(choices)}")
        return v

    def ident(self, name, required=False, max_len=32, default=None):
        """An id: letters, digits and _ . : @ - only."""
        v = self.str(name, required=required, max_len=max_len, default=default)
        if v is not None and not _ID_RE.fullmatch(v):     # fullmatch: "$" would let "id\n" through
            raise InvalidParam(f"{name}: only letters, digits and _ . : @ - are allowed")
        return v

    def amount(self, name="amount", required=True):
        """Money: a decimal string (or a whole number) -> integer micro-units; floats are refused."""
        v = self._get(name)
        if v is None or v == "":
            if required:
                raise InvalidParam(f"{name}: required")
            return None
        return to_micro(v, name)

    def int(self, name, required=False, default=None, minimum=None, maximum=None):
        v = self._get(name)
        if v is None or v == "":
            if required:
                raise InvalidParam(f"{name}: required")
            return default
        if isinstance(v, bool):
            raise InvalidParam(f"{name}: expected an integer")
        if isinstance(v, float):
            if not math.isfinite(v) or v != int(v):
                raise InvalidParam(f"{name}: expected an integer")
            v = int(v)
        elif isinstance(v, str):
            if not re.fullmatch(r"-?[0-9]{1,18}", v.strip()):   # [0-9]: \d also takes other scripts' digits
                raise InvalidParam(f"{name}: expected an integer")
            v = int(v.strip())
        elif not isinstance(v, int):
            raise InvalidParam(f"{name}: expected an integer")
        if minimum is not None and v < minimum:
            raise InvalidParam(f"{name}: must be at least {minimum}")
        if maximum is not None and v > maximum:
            raise InvalidParam(f"{name}: must be at most {maximum}")
        return v

    def flag(self, name, default=None):
        v = self._get(name)
        if v is None or v == "":
            return default
        if isinstance(v, bool):
            return "1" if v else "0"
        s = str(v).strip().lower()
        if s in ("1", "true", "yes"):
            return "1"
        if s in ("0", "false", "no"):
            return "0"
        raise InvalidParam(f"{name}: expected 0 or 1")

    def page(self, default_rows=20, max_rows=500):
        page = self.int("page", default=1, minimum=1, maximum=10**9)
        rows = self.int("rows", default=None, minimum=1, maximum=max_rows)
        if rows is None:
            rows = self.int("page_size", default=default_rows, minimum=1, maximum=max_rows)
        return page, rows
