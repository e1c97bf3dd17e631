"""Usage report endpoints (``api/usage_list|usage_export|usage_stats.dspy``). A platform caller
sees every customer's usage with cost and margin; a customer caller (``Caller.scope`` has put its
own customer in the filter) its organisation's LLM / API usage without cost and margin; the
product source (suppliers, their costs) is the platform's. Importing this module registers them."""
from .. import clock
from ..errors import Forbidden, InvalidParam
from ..reports import ACCOUNTING_STATUSES, BILLING_MODES, GROUPS, MAX_STATS_ROWS, SOURCES, Reports, UsageFilter
from .registry import endpoint

READ = ("GET",)


# the product endpoints' earlier names for the time range, still sent by tests/test_fuzz.py
RANGE_ALIASES = (("start_date", "start"), ("end_date", "end"))


def time_range(p, zone, aliases=False):
    """``start_date`` / ``end_date`` (a day as the end includes that day; naive times are wall
    time in ``zone``); with ``aliases`` the product endpoints' ``start`` / ``end`` are accepted
    in their place."""
    names = []
    for name, alias in RANGE_ALIASES:
        if aliases and p.present(alias):
            if p.present(name):
                raise InvalidParam(f"{alias}: the same filter as {name}; give one of them")
            name = alias
        names.append(name)
    return p.bounds(*names, zone=zone)


def usage_filter(core, p, source=None, aliases=False):
    """The report filter from a request: one vocabulary for every usage and product report.
    ``source`` fixed by the endpoint (the product endpoints) or read from the request."""
    source = source or p.str("source", choices=SOURCES, default="accounting")
    start, end = time_range(p, clock.zone(core.config.timezone), aliases)
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


def _scoped(core, caller, p):
    """The request's filter and the reports as this caller may see them."""
    f = usage_filter(core, p)
    if not caller.is_admin:
        if f.source != "accounting":
            raise Forbidden("product usage reports (suppliers and their costs) are the platform's")
        caller.check_customer(f.customer_id)
    return f, Reports(core.db, platform_view=caller.is_admin, time_zone=core.config.timezone)


@endpoint("usage_list", methods=READ)
async def usage_list(core, caller, p, request):
    f, reports = _scoped(core, caller, p)
    page, rows = p.page()
    return await reports.usage(f, page, rows)


@endpoint("usage_stats", methods=READ)
async def usage_stats(core, caller, p, request):
    f, reports = _scoped(core, caller, p)
    group_by = p.str("group_by", choices=GROUPS[f.source], default="day")
    page, rows = p.page(default_rows=100, max_rows=MAX_STATS_ROWS)
    return await reports.stats(f, group_by, page, rows)


@endpoint("usage_export", methods=READ)
async def usage_export(core, caller, p, request):
    """The usage list as CSV, streamed: every matching row (oldest first), then a TOTAL row."""
    f, reports = _scoped(core, caller, p)
    return await reports.export_response(request, f)
