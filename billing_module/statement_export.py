"""A statement as a file: CSV (the reports' CSV rules: text cells cannot become formulas,
amounts stay numbers), a printable HTML page (every value escaped), and PDF: the HTML page
rendered by WeasyPrint, an optional dependency (``pip install billing_module[pdf]``) because it
needs the Pango libraries of the system, which pip does not bring. Without it ``pdf`` is a 400
that says so, and the browser's "print to PDF" of the HTML page does the same job.
"""
import html

from .errors import InvalidParam
from .reports import _csv_line, _number_cell, safe_cell

FORMATS = ("csv", "html", "pdf")
_SUMMARY = (("opening", "Opening balance"), ("recharges", "Recharges"), ("charges", "Charges"),
            ("prior_period_charges", "  of which prior-period usage"), ("refunds", "Refunds"),
            ("adjustments", "Adjustments"), ("closing", "Closing balance"), ("held_at_close", "Held at the cut-off"))
_LINE_KINDS = {"model": "Model", "product": "Product", "holds": "Holds"}


def file_name(st: dict, fmt: str) -> str:
    return f"statement-{st['customer_id']}-{st['month']}.{fmt}"


def to_csv(st: dict) -> str:
    rows = [["statement", safe_cell(st.get("number") or "(open)")], ["customer", safe_cell(st["customer_id"])],
            ["month", st["month"]], ["status", st["status"]], ["currency", safe_cell(st.get("currency"))],
            ["period (UTC)", f"{st['period_start']} .. {st['period_end']}"], []]
    rows += [[label.strip(), _number_cell(st[key])] for key, label in _SUMMARY]
    rows += [[], ["kind", "name", "entry type", "count", "amount", "prior-period"]]
    rows += [[_LINE_KINDS[ln["kind"]], safe_cell(ln["name"]), ln["entry_type"], ln["count"],
              _number_cell(ln["amount"]), _number_cell(ln["prior_period"])] for ln in st["lines"]]
    rows += [[], ["open hold", "request id", "amount", "created at"]]
    rows += [[safe_cell(h["hold_id"]), safe_cell(h["request_id"]), _number_cell(h["amount"]), h["created_at"]]
             for h in st["holds"]]
    return _csv_line(rows)


def _table(head: list, rows: list) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def to_html(st: dict) -> str:
    e = html.escape
    title = f"Statement {st.get('number') or '(open)'}: {st['customer_id']}, {st['month']}"
    summary = _table(["", st.get("currency") or ""], [[label, st[key]] for key, label in _SUMMARY])
    lines = _table(["Kind", "Name", "Entry type", "Count", "Amount", "Prior-period"],
                   [[_LINE_KINDS[ln["kind"]], ln["name"], ln["entry_type"], ln["count"], ln["amount"],
                     ln["prior_period"]] for ln in st["lines"]])
    holds = _table(["Hold", "Request id", "Amount", "Created at (UTC)"],
                   [[h["hold_id"], h["request_id"], h["amount"], h["created_at"]] for h in st["holds"]])
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #999;padding:4px 8px;text-align:left}"
            "@media print{body{margin:0}}</style></head><body>"
            f"<h1>{e(title)}</h1><p>Status: {e(st['status'])}. Period (UTC): {e(st['period_start'])} .. "
            f"{e(st['period_end'])} ({e(st['time_zone'])} month).</p>"
            f"<h2>Summary</h2>{summary}<h2>Charges</h2>{lines}<h2>Holds open at the cut-off</h2>{holds}"
            "</body></html>")


def to_pdf(st: dict) -> bytes:
    try:
        import weasyprint
    except (ImportError, OSError) as e:    # OSError: the package is there, the Pango libraries are not
        raise InvalidParam(f"format: pdf needs WeasyPrint and the Pango libraries on the server ({e}); "
                           "use html and print it", code="pdf_unavailable") from None
    return weasyprint.HTML(string=to_html(st)).write_pdf()
