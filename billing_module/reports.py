"""Usage reports: the usage list with a totals row, its CSV export and grouped statistics.

Two sources, never mixed (a product use can also have an accounting record, so a union would
count it twice):

* ``accounting``: ``accounting_records`` (LLM and API usage priced by the pricing cache);
* ``product``: ``product_usage_log`` (product consumption, with its supplier cost).

Every query of a source is built here from one filter (``UsageFilter``) and one aggregate
expression list, so the list's ``totals``, the CSV's totals row and ``stats`` sum exactly the
rows the list shows. Amounts are integer micro-units in SQL and decimal strings (6 places) out.
The products' reports (``ProductManager.usage_list``, ``overage``, ``stats``) are the product
source seen through the products' reply shapes.
"""
from __future__ import annotations

import codecs
import datetime
import logging
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from aiohttp import web

from . import clock, validation
from .db import dialect as dialects
from .db.database import Database
from .money import from_micro

log = logging.getLogger("billing_module.reports")

SOURCES = ("accounting", "product")
ACCOUNTING_STATUSES = ("accounted", "pending", "failed")
GROUPS = {"accounting": ("day", "month", "model", "user", "customer", "total"),
          "product": ("day", "month", "product", "customer", "supplier", "total")}
BILLING_MODES = ("1", "2", "3")    # product_usage_log.billing_mode: included, overage, pay-as-you-go
MAX_STATS_ROWS = 1000
EXPORT_CHUNK_ROWS = 1000


@dataclass
class UsageFilter:
    """Validated filters (the API layer parses and checks them). ``start`` / ``end`` are
    'YYYY-MM-DD HH:MM:SS' texts: ``start`` inclusive, ``end`` exclusive."""
    source: str = "accounting"
    customer_id: str | None = None
    user_id: str | None = None
    model: str | None = None     # accounting: model_name or llmid
    product_id: str | None = None
    status: str | None = "accounted"  # accounting: None means every status
    supplier_org_id: str | None = None  # product
    billing_mode: str | None = None  # product
    subscription_id: str | None = None  # product
    overage_only: bool = False   # product: only what was charged (billing modes 2 and 3)
    start: str | None = None
    end: str | None = None


def product_filter(customer_id: object = None, product_id: object = None, subscription_id: object = None,
                   billing_mode: object = None, supplier_org_id: object = None, user_id: object = None,
                   start: object = None, end: object = None, overage_only: bool = False,
                   zone: datetime.tzinfo | None = None) -> UsageFilter:
    """The product source's filter from unchecked values (the in-process products API): ids,
    the billing mode and the time range (naive times: wall time in ``zone``) are checked by the
    module's validation rules."""
    t0, t1 = validation.bounds(start, end, "start", "end", zone=zone)
    return UsageFilter(
        source="product", status=None, customer_id=validation.ident(customer_id, "customer_id"),
        user_id=validation.ident(user_id, "user_id"), product_id=validation.ident(product_id, "product_id"),
        subscription_id=validation.ident(subscription_id, "subscription_id"),
        supplier_org_id=validation.ident(supplier_org_id, "supplier_org_id"),
        billing_mode=validation.text(billing_mode, "billing_mode", choices=BILLING_MODES),
        start=t0, end=t1, overage_only=bool(overage_only))


# --- one description per source: columns, money columns, filters -------------------------------
class _Source:
    def __init__(self, name, table, time_col, customer_col, select, money, sums, filters, csv_columns, groups):
        self.name, self.table, self.time_col, self.customer_col = name, table, time_col, customer_col
        self.select = select            # list columns (SQL text, code-controlled)
        self.money = money              # row keys holding micro-units
        self.sums = sums                # (alias, SQL aggregate) of the totals and the stats
        self.filters = filters          # (UsageFilter attribute, SQL condition with ${attr}$)
        self.csv_columns = csv_columns  # (header, row key)
        self.groups = groups            # group name -> (key SQL, label SQL)


_ACCOUNTING = _Source(
    "accounting", "accounting_records r", "r.use_time", "r.customer_id",
    select=("r.id, r.request_id, r.use_time, r.customer_id, u.name as customer_name, r.user_id, r.model_name, "
            "r.llmid, r.product_id, r.status, r.input_tokens, r.output_tokens, r.cached_tokens, r.quantity, r.unit, "
            "r.amount, r.cost, r.currency, r.subscription_id, r.price_version, r.error_code"),
    money=("amount", "cost"),
    sums=(("records", "count(*)"), ("amount", "coalesce(sum(r.amount), 0)"), ("cost", "coalesce(sum(r.cost), 0)"),
          ("input_tokens", "coalesce(sum(r.input_tokens), 0)"), ("output_tokens", "coalesce(sum(r.output_tokens), 0)"),
          ("cached_tokens", "coalesce(sum(r.cached_tokens), 0)")),
    filters=(("customer_id", "r.customer_id = ${customer_id}$"), ("user_id", "r.user_id = ${user_id}$"),
             ("model", "(r.model_name = ${model}$ or r.llmid = ${model}$)"),
             ("product_id", "r.product_id = ${product_id}$"), ("status", "r.status = ${status}$"),
             ("start", "r.use_time >= ${start}$"), ("end", "r.use_time < ${end}$")),
    csv_columns=(("use_time", "use_time"), ("request_id", "request_id"), ("customer_id", "customer_id"),
                 ("customer_name", "customer_name"), ("user_id", "user_id"), ("model_name", "model_name"),
                 ("llmid", "llmid"), ("product_id", "product_id"), ("status", "status"),
                 ("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                 ("cached_tokens", "cached_tokens"),
                 ("quantity", "quantity"), ("unit", "unit"), ("amount", "amount"), ("cost", "cost"),
                 ("currency", "currency"), ("subscription_id", "subscription_id"), ("record_id", "id")),
    groups={"model": ("coalesce(r.model_name, r.llmid)", "max(coalesce(r.model_name, r.llmid))"),
            "user": ("coalesce(r.user_id, '')", "max(r.user_id)"),
            "customer": ("r.customer_id", "max(u.name)")},
)

_PRODUCT = _Source(
    "product", "product_usage_log r", "r.use_time", "r.user_org_id",
    select=("r.id, r.use_time, r.user_org_id as customer_id, u.name as customer_name, r.user_id, r.product_id, "
            "p.product_name, r.subscription_id, r.resource_type, r.resource_ref_id, r.supplier_org_id, r.used_amount, "
            "r.used_unit, r.included_amount, r.overage_amount, r.billing_mode, r.sell_price as amount, "
            "r.total_cost as cost, r.currency, r.source_ref_table, r.source_ref_id"),
    money=("amount", "cost"),
    sums=(("records", "count(*)"), ("amount", "coalesce(sum(r.sell_price), 0)"),
          ("cost", "coalesce(sum(r.total_cost), 0)")),
    filters=(("customer_id", "r.user_org_id = ${customer_id}$"), ("user_id", "r.user_id = ${user_id}$"),
             ("product_id", "r.product_id = ${product_id}$"),
             ("supplier_org_id", "r.supplier_org_id = ${supplier_org_id}$"),
             ("billing_mode", "r.billing_mode = ${billing_mode}$"),
             ("subscription_id", "r.subscription_id = ${subscription_id}$"),
             ("overage_only", "r.billing_mode in ('2', '3')"), ("start", "r.use_time >= ${start}$"),
             ("end", "r.use_time < ${end}$")),
    csv_columns=(("use_time", "use_time"), ("customer_id", "customer_id"), ("customer_name", "customer_name"),
                 ("user_id", "user_id"), ("product_id", "product_id"), ("product_name", "product_name"),
                 ("billing_mode", "billing_mode"), ("resource_type", "resource_type"),
                 ("resource_ref_id", "resource_ref_id"), ("supplier_org_id", "supplier_org_id"),
                 ("used_amount", "used_amount"), ("used_unit", "used_unit"), ("included_amount", "included_amount"),
                 ("overage_amount", "overage_amount"), ("amount", "amount"), ("cost", "cost"),
                 ("currency", "currency"), ("subscription_id", "subscription_id"), ("usage_id", "id")),
    groups={"product": ("r.product_id", "max(p.product_name)"), "customer": ("r.user_org_id", "max(u.name)"),
            "supplier": ("coalesce(r.supplier_org_id, '')", "max(r.supplier_org_id)")},
)
_SOURCES = {"accounting": _ACCOUNTING, "product": _PRODUCT}


def _joins(src):
    # display names only; a missing cache row leaves the name empty, never drops the usage row
    joins = f" left join users_cache u on u.id = {src.customer_col} and u.entity_kind = 'org'"
    if src.name == "product":
        joins += " left join product p on p.id = r.product_id"
    return joins


def _where(src, f):
    where, ns = [], {}
    for attr, cond in src.filters:
        value = getattr(f, attr)
        if value is not None and value is not False:
            where.append(cond)
            ns[attr] = value
    return (" where " + " and ".join(where)) if where else "", ns


# (time column, month?) -> SQL of its local day or month (``Reports._day_sql``)
DaySql = Callable[[str, bool], str]


def _aggregate_sql(src, f, group=None, day_sql: DaySql | None = None):
    """The one aggregate statement: totals (``group`` None or 'total') or one row per group."""
    where, ns = _where(src, f)
    sums = ", ".join(f"{expr} as {alias}" for alias, expr in src.sums)
    if group in (None, "total"):
        return f"select {sums} from {src.table}{_joins(src)}{where}", ns
    key, label = _group_key(src, group, day_sql)
    return f"select {key} as k, {label} as label, {sums} from {src.table}{_joins(src)}{where} group by {key}", ns


def _group_key(src, group, day_sql):
    """(key SQL, label SQL) of a group."""
    if group in ("day", "month"):
        key = day_sql(src.time_col, group == "month")
        return key, f"max({key})"
    return src.groups[group]


def _quantities_sql(tx, src, f, group, day_sql, keys, ns):
    """The product source's quantities per unit of the groups ``keys`` (units differ between
    products, so quantities never sum across them). round(x * 10000) turns decimal(15,4) into
    exact integers of 1e-4 units (SQLite stores them as floats)."""
    where, where_ns = _where(src, f)
    ns.update(where_ns)
    if group == "total":
        key, group_by = "'total'", "r.used_unit"
    else:
        key = _group_key(src, group, day_sql)[0]
        group_by = f"{key}, r.used_unit"
        where += (" and " if where else " where ") + f"{key} in {tx.in_list(keys, ns, 'qk')}"
    return (f"select {key} as k, r.used_unit as unit, sum(round(r.used_amount * 10000)) as q, "
            "sum(round(coalesce(r.included_amount, 0) * 10000)) as qi, "
            "sum(round(coalesce(r.overage_amount, 0) * 10000)) as qo "
            f"from {src.table}{where} group by {group_by} order by 2")


def _int(v):
    # SUM of a bigint comes back as Decimal on MySQL, int on SQLite
    return int(v or 0)


def _quantity(v):
    """decimal(15,4) as plain text: Decimal on MySQL, int / float / text on SQLite."""
    if v is None:
        return None
    return format(Decimal(str(v)).normalize(), "f")


def _units(v):
    """A sum of integers of 1e-4 units as plain decimal text ('2.5', '10')."""
    return _quantity(Decimal(_int(v)).scaleb(-4))


def _sums_view(src, row):
    out = {}
    for alias, _ in src.sums:
        out[alias] = from_micro(_int(row[alias])) if alias in src.money else _int(row[alias])
    amount, margin = _int(row["amount"]), _int(row["amount"]) - _int(row["cost"])
    out["margin"] = from_micro(margin)
    # the margin as a fraction of the amount, 4 places half-up; None when nothing was charged
    out["margin_rate"] = str((Decimal(margin) / Decimal(amount)).quantize(Decimal("0.0001"), ROUND_HALF_UP)) \
        if amount else None
    return out


# what only the platform sees: the supplier cost and the margin (a customer's view drops them)
PLATFORM_ONLY_KEYS = frozenset({"cost", "margin", "margin_rate"})


def _customer_view(view: dict) -> dict:
    return {k: v for k, v in view.items() if k not in PLATFORM_ONLY_KEYS}


def _row_view(src, row):
    view = dict(row)
    for k in src.money:
        view[k] = None if row[k] is None else from_micro(int(row[k]))
    for k in ("quantity", "used_amount", "included_amount", "overage_amount"):
        if k in view:
            view[k] = _quantity(view[k])
    return view


def safe_cell(value: object) -> str:
    """A CSV cell that a spreadsheet shows as text: a = + - @ tab or CR that leads the cell, or
    follows a , or ; inside it (where a spreadsheet splitting on that character starts a new
    cell, quotes or not), gets a ' in front."""
    if value is None:
        return ""
    return _FORMULA_START.sub(r"\1'\2", str(value))


_FORMULA_START = re.compile(r"(^|[,;])([=+\-@\t\r])")


class Reports:
    def __init__(self, db: Database, platform_view: bool = True, time_zone: str = "UTC") -> None:
        self.db = db
        self.platform_view = platform_view     # False: a customer's view, without cost and margin
        self.time_zone = time_zone             # days and months are this zone's (config ``timezone``)

    async def _day_sql(self, tx, column: str, source_sql: str, ns: dict, f: UsageFilter) -> DaySql:
        """How this zone's days and months of ``column`` are written in SQL for the rows of
        ``source_sql`` (``from ... where ...``): UTC times shifted by the zone's offset in force
        at each time (daylight saving included), over the filter's range or else the rows'."""
        dialect = self.db.dialect
        if self.time_zone == "UTC":
            return lambda col, month: dialects.substr_date(dialect, col, month)
        lo, hi = f.start, f.end
        if lo is None or hi is None:
            span = await tx.one(f"select min({column}) as lo, max({column}) as hi {source_sql}", ns)
            lo, hi = lo or span["lo"], hi or span["hi"]
        now = clock.utcnow()
        lo_t = clock.parse(str(lo)) if lo is not None else now
        hi_t = clock.parse(str(hi)) + datetime.timedelta(seconds=1) if hi is not None else now
        segments = clock.offset_segments(clock.zone(self.time_zone), min(lo_t, hi_t), max(lo_t, hi_t))
        return lambda col, month: dialects.local_date(dialect, col, segments, month)

    def _shown(self, view: dict) -> dict:
        return view if self.platform_view else _customer_view(view)

    def _csv_columns(self, src: _Source) -> list[tuple[str, str]]:
        return [c for c in src.csv_columns if self.platform_view or c[1] not in PLATFORM_ONLY_KEYS]

    # --- the list ----------------------------------------------------------------------------
    async def usage(self, f: UsageFilter, page: int = 1, rows: int = 20) -> dict[str, Any]:
        """``{"total", "rows", "totals"}``: one page (newest first) and the totals of every row
        the filter matches."""
        src = _SOURCES[f.source]
        result = await self._page(src, f, src.select, page, rows)
        result["rows"] = [self._shown(_row_view(src, r)) for r in result["rows"]]
        result["totals"] = self._shown(result["totals"])
        result.update(page=page, page_size=rows, source=f.source)
        return result

    async def usage_log(self, f: UsageFilter, page: int = 1, rows: int = 20) -> dict[str, Any]:
        """The product source's page as whole ``product_usage_log`` rows (the products' usage
        view shapes them), with the totals of every matching row."""
        assert f.source == "product", "usage_log reads product_usage_log"
        return await self._page(_PRODUCT, f, "r.*", page, rows)

    async def _page(self, src, f, select, page, rows):
        where, ns = _where(src, f)
        sql = f"select {select} from {src.table}{_joins(src)}{where}"
        agg_sql, agg_ns = _aggregate_sql(src, f)
        async with self.db.read() as tx:
            result = await tx.page(sql, ns, f"{src.time_col} desc, r.id desc", page, rows)
            totals = await tx.one(agg_sql, agg_ns)
        result["totals"] = _sums_view(src, totals)
        return result

    # --- statistics --------------------------------------------------------------------------
    async def stats(self, f: UsageFilter, group_by: str = "day", page: int = 1, rows: int = 100,
                    order: str = "amount") -> dict[str, Any]:
        """One row per day / model / product / customer / supplier (or one for ``total``) with
        records, amount, cost, margin and margin rate; ``amount_pct`` is the row's amount as a
        whole percent of the largest group's, for bar charts; ``totals`` sums every group. Days
        sort ascending, other groups by amount (``order="key"``: by key). Product rows also
        carry their ``quantities`` per unit."""
        src = _SOURCES[f.source]
        total_sql, total_ns = _aggregate_sql(src, f)
        order_by = "k" if group_by in ("day", "month") or order == "key" else "amount desc, k"
        result: dict[str, Any]
        async with self.db.read() as tx:
            where, where_ns = _where(src, f)
            day_sql = await self._day_sql(tx, src.time_col, f"from {src.table}{where}", where_ns, f)
            sql, ns = _aggregate_sql(src, f, group_by, day_sql)
            if group_by == "total":
                result = {"total": 1, "rows": [await tx.one(sql, ns)]}
                top = result["rows"][0]["amount"]
            else:
                result = await tx.page(sql, ns, order_by, page, rows)
                top = await tx.scalar(f"select max(amount) as m from ({sql}) grouped_", ns)
            totals = await tx.one(total_sql, total_ns)
            quantities = await self._quantities(tx, src, f, group_by, result["rows"], day_sql)
        top = _int(top)
        out = []
        for r in result["rows"]:
            view = _sums_view(src, r)
            view["key"] = "total" if group_by == "total" else r["k"]
            view["label"] = "total" if group_by == "total" else (r["label"] or r["k"])
            amount = _int(r["amount"])
            view["amount_pct"] = (amount * 100 // top) if top > 0 and amount > 0 else 0
            if quantities is not None:
                view["quantities"] = quantities.get(view["key"], [])
            out.append(self._shown(view))
        return {"total": result["total"], "rows": out, "totals": self._shown(_sums_view(src, totals)),
                "group_by": group_by,
                "source": f.source}

    async def subscription_fees(self, f, group_by: str) -> dict:
        """{group key: micro-units} of the subscription fees (ledger entries 'subscription', net of
        their refunds' sign) charged in the filter's time range, by product, customer, day or
        month ('total': one key), for the product statistics' margins. Fees belong to no supplier:
        grouped by supplier, the answer is empty."""
        if group_by == "supplier" or f.supplier_org_id is not None:
            return {}
        conds = [("customer_id", "l.customer_id = ${customer_id}$"), ("product_id", "s.product_id = ${product_id}$"),
                 ("start", "l.created_at >= ${start}$"), ("end", "l.created_at < ${end}$")]
        where, ns = "", {}
        for attr, cond in conds:
            if getattr(f, attr) is not None:
                where += f" and {cond}"
                ns[attr] = getattr(f, attr)
        source = ("from ledger_entry l join product_subscription s on s.id = l.ref_id "
                  f"where l.entry_type = 'subscription' and l.ref_type = 'product_subscription'{where}")
        async with self.db.read() as tx:
            day_sql = await self._day_sql(tx, "l.created_at", source, ns, f)
            keys = {"product": "s.product_id", "customer": "l.customer_id", "total": "'total'",
                    "day": day_sql("l.created_at", False), "month": day_sql("l.created_at", True)}
            key = keys[group_by]
            rows = await tx.select(f"select {key} as k, sum(-l.amount) as fees {source} group by {key}", ns)
        return {r.k: _int(r.fees) for r in rows}

    async def _quantities(self, tx, src, f, group_by, rows, day_sql):
        """{group key: [{"unit", "amount", "included", "overage"}]} for the product source."""
        if src is not _PRODUCT:
            return None
        if not rows:
            return {}
        keys = [] if group_by == "total" else [r["k"] for r in rows]
        ns: dict[str, Any] = {}
        sql = _quantities_sql(tx, src, f, group_by, day_sql, keys, ns)
        out: dict[str, list[dict[str, Any]]] = {}
        for q in await tx.select(sql, ns):
            out.setdefault(q["k"], []).append({"unit": q["unit"], "amount": _units(q["q"]),
                                               "included": _units(q["qi"]), "overage": _units(q["qo"])})
        return out

    # --- CSV export --------------------------------------------------------------------------
    def export_name(self, f: UsageFilter) -> str:
        return f"usage-{f.source}-{clock.utcnow().strftime('%Y%m%d-%H%M%S')}.csv"

    async def export_chunks(self, f: UsageFilter, chunk_rows: int = EXPORT_CHUNK_ROWS) -> AsyncGenerator[str, None]:
        """CSV text in chunks: a header, every matching row (oldest first) and a TOTAL row.

        Rows are read by keyset (use_time, id) a chunk at a time, all in one read transaction,
        so on MySQL every chunk and the totals see one snapshot and the TOTAL row sums exactly
        the exported rows."""
        src = _SOURCES[f.source]
        where, ns = _where(src, f)
        after = f"({src.time_col} > ${{k_time}}$ or ({src.time_col} = ${{k_time}}$ and r.id > ${{k_id}}$))"
        first_sql = (f"select {src.select} from {src.table}{_joins(src)}{where} "
                     f"order by {src.time_col}, r.id limit ${{chunk_}}$")
        next_sql = (f"select {src.select} from {src.table}{_joins(src)}"
                    f"{where + ' and ' if where else ' where '}{after} "
                    f"order by {src.time_col}, r.id limit ${{chunk_}}$")
        agg_sql, agg_ns = _aggregate_sql(src, f)
        columns = self._csv_columns(src)
        headers = [h for h, _ in columns]
        yield codecs.BOM_UTF8.decode("utf-8") + _csv_line([headers])   # the BOM makes Excel read UTF-8
        async with self.db.read() as tx:
            key = None
            while True:
                params = dict(ns, chunk_=chunk_rows)
                if key is None:
                    rows = await tx.select(first_sql, params)
                else:
                    params.update(k_time=key[0], k_id=key[1])
                    rows = await tx.select(next_sql, params)
                if not rows:
                    break
                yield _csv_line([_csv_values(src, r, columns) for r in rows])
                key = (rows[-1]["use_time"], rows[-1]["id"])
                if len(rows) < chunk_rows:
                    break
            totals = _sums_view(src, await tx.one(agg_sql, agg_ns))
        total_row = []
        for header, _ in columns:
            if header == "use_time":
                total_row.append("TOTAL")
            elif header in totals:
                total_row.append(str(totals[header]))
            else:
                total_row.append("")
        total_row[1] = f"{totals['records']} records"
        yield _csv_line([total_row])

    async def export_response(self, request: web.Request, f: UsageFilter) -> web.StreamResponse:
        """Stream the CSV to the client as an aiohttp StreamResponse."""
        resp = web.StreamResponse(headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{self.export_name(f)}"',
            "Cache-Control": "no-store",
        })
        chunks = self.export_chunks(f)
        # the first chunk is the header; reading the second before prepare() lets a database
        # error still answer a clean 500 instead of a cut file
        pending = [await chunks.__anext__()]
        try:
            pending.append(await chunks.__anext__())
        except StopAsyncIteration:
            pass
        await resp.prepare(request)
        try:
            for text in pending:
                await resp.write(text.encode("utf-8"))
            async for text in chunks:
                await resp.write(text.encode("utf-8"))
        except ConnectionError:
            log.info("usage export: the client went away")
            return resp
        except Exception:
            # headers are sent: the only honest signal left is a broken transfer (no TOTAL row)
            log.exception("usage export failed mid-stream")
            if request.transport is not None:
                request.transport.close()
            return resp
        finally:
            await chunks.aclose()     # ends the read transaction and returns the connection
        await resp.write_eof()
        return resp


# numbers this module formats itself cannot be formulas; quoting them would turn a negative
# amount into text in the spreadsheet
_NUMERIC_KEYS = {"amount", "cost", "input_tokens", "output_tokens", "cached_tokens", "quantity", "used_amount",
                 "included_amount", "overage_amount"}


def _csv_values(src, row, columns):
    view = _row_view(src, row)
    return [_number_cell(view.get(key)) if key in _NUMERIC_KEYS else safe_cell(view.get(key))
            for _, key in columns]


def _number_cell(value):
    """An amount stays a number (a refund's ``-1.5`` is not a formula); anything else in a
    numeric column is treated as text."""
    if value is None:
        return ""
    text = str(value)
    return text if _NUMBER.match(text) else safe_cell(text)


_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
# Spreadsheets split on ',' or, in many locales, on ';': a cell holding either (or a quote or a
# line break) is quoted, so "x;=1+1" stays one text cell instead of becoming a formula.
_NEEDS_QUOTES = re.compile(r'[,;"\r\n]')


def _csv_cell(text):
    return '"' + text.replace('"', '""') + '"' if _NEEDS_QUOTES.search(text) else text


def _csv_line(rows):
    return "".join(",".join(_csv_cell(str(cell)) for cell in row) + "\r\n" for row in rows)
