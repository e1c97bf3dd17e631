"""Schema from the table models in ``models/*.json``.

MySQL DDL comes from the framework's generator (xls2ddl's ``json2ddl``); SQLite DDL from
sqlor's SQLite template (the generator has no SQLite dialect). Both templates start with
``drop table if exists``: that statement is removed, and ``create_schema`` only creates the
tables, columns and indexes that do not exist yet (a column added to an existing table gets its
model default, or its derived value). It never drops or changes anything that exists.
"""
import copy
import json
import os
import re

from appPublic.myTE import MyTemplateEngine
from sqlor.ddl_template_mysql import mysql_ddl_tmpl
from sqlor.ddl_template_sqlite3 import sqlite3_ddl_tmpl

from ..resources import resource_dir
from . import dialect as dialects

# accounting_records older than a cut-off move here (failures.backup_accounted); the history
# table is the live table plus the time of the move, so it is derived, not written twice.
HISTORY_TABLES = {"accounting_records_history": ("accounting_records", "记账记录历史")}


# Columns derived from other tables, kept on the balance row that every debit updates anyway, so
# that the debit knows without a query whether anything more applies to it. Each is the SQL that
# computes it for a ``customer_balance`` row: the writes of its source recompute it in their own
# transaction (budgets.set_budget, alerts.set_webhook, the subscription writes), a new balance row starts from it
# (Ledger._create_account), and the column added to an existing table is filled with it.
DERIVED_COLUMNS = {
    "customer_balance": {
        "budget_count": "(select count(*) from billing_budget where billing_budget.customer_id = customer_balance.id)",
        "low_balance_set": ("(select count(*) from alert_webhook where alert_webhook.customer_id = customer_balance.id "
                            "and (alert_webhook.low_balance_amount is not null "
                            "or alert_webhook.low_balance_percent is not null))"),
        "subscription_count": ("(select count(*) from product_subscription where product_subscription.customer_id = "
                               "customer_balance.id and product_subscription.status = 'active')"),
    },
}


def refresh_derived(table, columns=None, where=""):
    """UPDATE that recomputes derived ``columns`` (all of the table's when None) of the rows of
    ``table`` that ``where`` (an SQL condition) selects, or of every row."""
    derived = DERIVED_COLUMNS[table]
    sets = ", ".join(f"{c} = {derived[c]}" for c in (columns or derived))
    return f"update {table} set {sets}" + (f" where {where}" if where else "")


def models_dir():
    return str(resource_dir("models"))


def load_models(folder=None):
    """{table name: model dict}, in file-name order, plus the derived history tables."""
    folder = folder or models_dir()
    models = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                m = json.load(f)
            models[m["summary"][0]["name"]] = m
    for table, (source, title) in HISTORY_TABLES.items():
        if source in models:
            models[table] = _history_model(models[source], table, title)
    return models


def _history_model(source, table, title):
    m = copy.deepcopy(source)
    m["summary"][0].update(name=table, title=title)
    m["fields"].append({"name": "backup_time", "title": "归档时间 (UTC)", "type": "datetime"})
    # no unique keys in history: the live table already guaranteed them
    m["indexes"] = [dict(i, idxtype="index") for i in m["indexes"]
                    if i["name"] in ("idx_customer_id", "idx_request_id", "idx_created_at", "idx_customer_use_time")]
    m["codes"] = []
    return m


# Ids and idempotency keys compare byte for byte on both databases: SQLite compares text that way,
# and the MySQL tables' default collation (utf8mb4_unicode_ci) would make 'DEMO-ACME' the same
# customer as 'demo-acme'. The column-level collation wins over the table's and the database's.
ID_COLLATION = "utf8mb4_bin"
_KEY_COLUMNS = {"idempotency_key", "active_key", "source_ref_table", "transno"}


def is_id_column(field):
    """A text column holding an id or an idempotency key (ids end in 'id': customer_id, llmid)."""
    name = field["name"].lower()
    return field["type"] in ("str", "char") and (name.endswith("id") or name in _KEY_COLUMNS)


def id_columns(model):
    return [f for f in model["fields"] if is_id_column(f)]


def render_ddl(model, dialect):
    tmpl = sqlite3_ddl_tmpl if dialect == dialects.SQLITE else mysql_ddl_tmpl
    data = copy.deepcopy(model)
    pri = data["summary"][0]["primary"]
    if isinstance(pri, str):
        data["summary"][0]["primary"] = [pri]
    ddl = MyTemplateEngine([]).renders(tmpl, data)
    if dialect != dialects.SQLITE:
        for field in id_columns(model):
            ddl = re.sub(rf"(`{field['name']}` VARCHAR\(\d+\))", rf"\1 COLLATE {ID_COLLATION}", ddl, count=1)
    return ddl


def id_collation_migration(models=None):
    """ALTER statements that give an existing MySQL/MariaDB schema the binary id collation of
    ``render_ddl`` (``create_schema`` never alters a table): scripts/migrate_binary_ids.sql. Each
    column keeps its rendered definition (type, NULL, default, comment)."""
    out = []
    for name, model in (models or load_models()).items():
        create, _ = table_statements(model, dialects.MYSQL)
        for field in id_columns(model):
            found = re.search(rf"^\s*(`{field['name']}` VARCHAR.*?),?$", create, re.M)
            assert found is not None, f"{name}.{field['name']}: no VARCHAR column in the generated DDL"
            line = found.group(1).strip()
            out.append(f"ALTER TABLE {name} MODIFY {line};")
    return out


def _statements(ddl):
    """Split a rendered script into statements, dropping comments-only lines and DROPs."""
    out = []
    for part in ddl.split(";"):
        lines = [ln for ln in part.splitlines() if ln.strip() and not ln.strip().startswith("--")]
        stmt = "\n".join(lines).strip()
        if stmt and not re.match(r"(?i)^drop\s", stmt):
            out.append(stmt)
    return out


def table_statements(model, dialect):
    """(create table statement, [(index name, create index statement)]) for one model."""
    create, indexes = None, []
    for stmt in _statements(render_ddl(model, dialect)):
        if re.match(r"(?i)^create\s+table", stmt):
            create = stmt
        else:
            m = re.match(r"(?i)^create\s+(unique\s+)?index\s+(\w+)", stmt)
            if not m:
                raise ValueError(f"unexpected DDL statement: {stmt[:80]}")
            indexes.append((m.group(2).lower(), stmt))
    return create, indexes


def add_column_statement(model, dialect, column):
    """ALTER TABLE that adds ``column`` of ``model`` to an existing table, defined as the table's
    rendered DDL defines it. SQLite's template writes no DEFAULT, and SQLite refuses a NOT NULL
    column without one, so the model's default is added there."""
    create, _ = table_statements(model, dialect)
    found = re.search(rf"^\s*(`{column}` .*?)$", create, re.M)
    assert found is not None, f"{column}: not in the generated DDL of {model['summary'][0]['name']}"
    line = found.group(1)
    if dialect == dialects.SQLITE:
        line = line.split("--", 1)[0]
    line = line.strip().rstrip(",").strip()
    field = next(f for f in model["fields"] if f["name"] == column)
    if dialect == dialects.SQLITE and "DEFAULT" not in line.upper() and field.get("default") is not None:
        line += " DEFAULT '" + str(field["default"]).replace("'", "''") + "'"
    elif dialect == dialects.SQLITE and "NOT NULL" in line.upper() and field.get("default") is None:
        raise ValueError(f"{column}: a NOT NULL column needs a default to be added to an existing table")
    return f"ALTER TABLE {model['summary'][0]['name']} ADD COLUMN {line}"


def ddl_script(dialect, models=None):
    """The whole schema as a script that is safe to run on a database that has some of it."""
    models = models or load_models()
    out = []
    for model in models.values():
        create, indexes = table_statements(model, dialect)
        out.append(re.sub(r"(?i)^create\s+table", "CREATE TABLE IF NOT EXISTS", create) + ";")
        for _, stmt in indexes:
            if dialect == dialects.SQLITE:
                stmt = re.sub(r"(?i)^create\s+(unique\s+)?index",
                              lambda m: f"CREATE {m.group(1) or ''}INDEX IF NOT EXISTS", stmt)
            out.append(stmt + ";")
        out.append("")
    return "\n".join(out)


async def _catalog_names(tx, what, table=None):
    sql, ns = dialects.catalog_query(tx.dialect, what, table)
    return {r.name for r in await tx.select(sql, ns)}


async def existing_tables(tx):
    return await _catalog_names(tx, "tables")


async def existing_indexes(tx, table):
    return await _catalog_names(tx, "indexes", table)


async def existing_columns(tx, table):
    return await _catalog_names(tx, "columns", table)


async def create_schema(db, models=None):
    """Create missing tables, columns and indexes. Returns the list of what it created (empty
    when the schema is complete, so a second run changes nothing)."""
    models = models or load_models()
    created = []
    added: dict[str, list[str]] = {}
    async with db.transaction() as tx:
        tables = await existing_tables(tx)
    for name, model in models.items():
        create, indexes = table_statements(model, db.dialect)
        # DDL commits implicitly on MySQL; each statement stands alone, and may run long
        async with db.transaction(bounded=False) as tx:
            if name not in tables:
                await tx.execute(create)
                created.append(name)
            else:
                have_columns = await existing_columns(tx, name)
                for field in model["fields"]:
                    if field["name"].lower() not in have_columns:
                        await tx.execute(add_column_statement(model, db.dialect, field["name"]))
                        created.append(f"{name}.{field['name']}")
                        added.setdefault(name, []).append(field["name"])
            have = await existing_indexes(tx, name)
            for idx_name, stmt in indexes:
                if idx_name not in have:
                    await tx.execute(stmt)
                    created.append(f"{name}.{idx_name}")
    # added derived columns are filled once every table they are derived from exists
    for name, columns in added.items():
        derived = [c for c in columns if c in DERIVED_COLUMNS.get(name, {})]
        if derived:
            async with db.transaction() as tx:
                await tx.execute(refresh_derived(name, derived))
    return created
