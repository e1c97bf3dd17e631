"""Reading request parameters (JSON body, form or query, as ahserver merges them) with
clear ``invalid_param`` errors. Every reader rejects a wrong type instead of guessing; the rules
themselves live in ``billing_module.validation``, shared with the core."""
from .. import validation
from ..errors import InvalidParam

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
        return self._get(name) is not None

    def str(self, name, required=False, max_len=255, default=None, choices=None):
        return validation.text(self._get(name), name, required=required, max_len=max_len, default=default,
                               choices=choices)

    def ident(self, name, required=False, max_len=validation.ID_MAX_LEN, default=None):
        """An id: letters, digits and _ . : @ - only."""
        return validation.ident(self._get(name), name, required=required, max_len=max_len, default=default)

    def amount(self, name="amount", required=True):
        """Money: a decimal string (or a whole number) -> integer micro-units; floats are refused."""
        return validation.amount(self._get(name), name, required=required)

    def int(self, name, required=False, default=None, minimum=None, maximum=None):
        return validation.integer(self._get(name), name, required=required, default=default, minimum=minimum,
                                  maximum=maximum)

    def month(self, name="month", required=False):
        """A calendar month ``YYYY-MM``."""
        return validation.month(self._get(name), name, required=required)

    def flag(self, name, default=None):
        return validation.flag(self._get(name), name, default)

    def bounds(self, start="start_date", end="end_date", end_day_inclusive=True, zone=None):
        """A time range ``(start, end)`` as UTC 'YYYY-MM-DD HH:MM:SS' texts, the end exclusive (a day
        as the end includes that day unless ``end_day_inclusive`` is false); naive values are
        wall time in ``zone`` (the deployment's time zone)."""
        return validation.bounds(self._get(start), self._get(end), start, end, end_day_inclusive=end_day_inclusive,
                                 zone=zone)

    def page(self, default_rows=validation.DEFAULT_ROWS, max_rows=validation.MAX_ROWS):
        # page_size: the bricks DataGrid's name for rows
        rows_name = "rows" if validation.given(self._get("rows")) else "page_size"
        return validation.page(self._get("page"), self._get(rows_name), default_rows=default_rows,
                               max_rows=max_rows, rows_name=rows_name)
