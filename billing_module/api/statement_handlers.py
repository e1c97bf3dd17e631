"""Monthly statements (``api/statements.dspy``, ``api/statement_export.dspy``): a customer caller
reads its own (``Caller.scope`` names its customer), a platform caller any customer's."""
from aiohttp import web

from ..statement_export import FORMATS, file_name, to_csv, to_html, to_pdf
from ..statements import Statements
from .callers import named_customer
from .registry import endpoint

READ = ("GET",)
_CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8", "pdf": "application/pdf"}


def book(core) -> Statements:
    return core.statements


@endpoint("statements", methods=READ)
async def statements(core, caller, p, request):
    """With ``month``: that month's statement (closed, or the month so far as ``open``); without:
    the customer's closed statements, newest first."""
    customer_id = named_customer(p, caller)
    month = p.month()
    if month is not None:
        return await book(core).statement(customer_id, month)
    page, rows = p.page()
    return await book(core).closed(customer_id, page, rows)


@endpoint("statement_export", methods=READ)
async def statement_export(core, caller, p, request):
    """A closed statement as a file: ``format`` csv (default), html or pdf."""
    fmt = p.str("format", choices=FORMATS, default="csv")
    st = await book(core).by_id(p.ident("id", required=True))
    caller.check_customer(st["customer_id"])
    body = {"csv": to_csv, "html": to_html, "pdf": to_pdf}[fmt](st)
    disposition = "inline" if fmt == "html" else "attachment"
    return web.Response(body=body.encode("utf-8") if isinstance(body, str) else body, headers={
        "Content-Type": _CONTENT_TYPES[fmt], "Cache-Control": "no-store",
        "Content-Disposition": f'{disposition}; filename="{file_name(st, fmt)}"'})
