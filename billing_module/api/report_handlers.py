"""Usage report endpoints (``api/usage_list|usage_export|usage_stats.dspy``), admin only: they
show every customer's usage, cost and margin. Importing this module registers them."""
from ..errors import InvalidParam
from ..reports import ACCOUNTING_STATUSES, BILLING_MODES, GROUPS, MAX_STATS_ROWS, SOURCES, Reports, UsageFilter
from .registry import endpoint

READ = ("GET",)


# the product endpoints' earlier names for the time range, still sent by tests/test_fuzz.py
_RANGE_ALIASES = (("start_date", "start"), ("end_date", "end"))


def time_range(p, aliases=False):
    """``start_date`` / ``end_date`` (a day as the end includes that day); with ``aliases`` the
    product endpoints' ``start`` / ``end`` are accepted in their place."""
    names = []
    for name, alias in _RANGE_ALIASES:
        if aliases and p.present(alias):
            if p.present(name):
                raise InvalidParam(f"{alias}: the same filter as {name}; give one of them")
            name = alias
        names.append(name)
    return p.bounds(*names)


def usage_filter(p, source=None, aliases=False):
    """The report filter from a request: one vocabulary for every usage and product report.
    ``source`` fixed by the endpoint (the product endpoints) or read from the request."""
    source = source or p.str("source", choices=SOURCES, default="accounting")
    start, end = time_range(p, aliases)
    f = UsageFilter(source=source, customer_id=p.ident("customer_id"), user_id=p.ident("user_id"),
                    product_id=p.ident("product_id"), start=start, end=end)
    if source == "accounting":
        f.model = p.str("model", max_len=128)
        status = p.str("status", choices=ACCOUNTING_STATUSES + ("all",), default="accounted")
        f.status = None if status == "all" else status
    else:
        # model / status are not filters of a product source: ignored, as a page that shows both
        # sources sends the filters of both (issue 14)
        f.status = None
        f.supplier_org_id = p.ident("supplier_org_id")
        f.billing_mode = p.str("billing_mode", choices=BILLING_MODES)
        f.subscription_id = p.ident("subscription_id")
    return f


@endpoint("usage_list", methods=READ, admin=True)
async def usage_list(core, caller, p, request):
    page, rows = p.page()
    return await Reports(core.db).usage(usage_filter(p), page, rows)


@endpoint("usage_stats", methods=READ, admin=True)
async def usage_stats(core, caller, p, request):
    f = usage_filter(p)
    group_by = p.str("group_by", choices=GROUPS[f.source], default="day")
    page, rows = p.page(default_rows=100, max_rows=MAX_STATS_ROWS)
    return await Reports(core.db).stats(f, group_by, page, rows)


@endpoint("usage_export", methods=READ, admin=True)
async def usage_export(core, caller, p, request):
    """The usage list as CSV, streamed: every matching row (oldest first), then a TOTAL row."""
    return await Reports(core.db).export_response(request, usage_filter(p))
