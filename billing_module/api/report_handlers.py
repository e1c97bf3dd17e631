"""Usage report endpoints (``api/usage_list|usage_export|usage_stats.dspy``), admin only: they
show every customer's usage, cost and margin. Importing this module registers them."""
import datetime

from .. import clock
from ..errors import InvalidParam
from ..reports import ACCOUNTING_STATUSES, GROUPS, SOURCES, Reports, UsageFilter
from . import endpoint

READ = ("GET",)
MAX_STATS_ROWS = 1000


def _bound(p, name, end=False):
    """A day ('YYYY-MM-DD') or a time. A day as the end bound includes that whole day."""
    text = p.str(name, max_len=40)
    if text is None:
        return None
    dt = clock.parse(text, name)
    if end and len(text.strip()) == 10:
        dt += datetime.timedelta(days=1)
    return clock.fmt(dt)


def usage_filter(p):
    source = p.str("source", choices=SOURCES, default="accounting")
    f = UsageFilter(source=source, customer_id=p.ident("customer_id"), user_id=p.ident("user_id"),
                    product_id=p.ident("product_id"), start=_bound(p, "start_date"), end=_bound(p, "end_date", end=True))
    if f.start and f.end and f.start >= f.end:
        raise InvalidParam("start_date: must be before end_date")
    if source == "accounting":
        f.model = p.str("model", max_len=128)
        status = p.str("status", choices=ACCOUNTING_STATUSES + ("all",), default="accounted")
        f.status = None if status == "all" else status
    else:
        # model / status are not filters of a product source: ignored, as a page that shows both
        # sources sends the filters of both (issue 14)
        f.status = None
        f.supplier_org_id = p.ident("supplier_org_id")
        f.billing_mode = p.str("billing_mode", choices=("1", "2", "3"))
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
