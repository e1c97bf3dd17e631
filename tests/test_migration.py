"""scripts/migrate_llmage_failed.sql on MariaDB/MySQL: an llmage llmusage_accounting_failed table
(double amounts, timestamp columns) with rows becomes this module's table, every row kept and
every amount exact, and the module then works on it.

The migration is MySQL SQL for llmage's MySQL databases; it has no SQLite variant. Without
BILLING_TEST_MYSQL the database test cannot run: in CI (CI set) that is a failure, elsewhere it
is not collected, like every other MariaDB half of the suite. The static test below runs everywhere."""
import os
import re
import secrets

import pymysql
import pytest

from billing_module.core import BillingCore
from billing_module.db.database import mysql_desc
from billing_module.db.schema import load_models, render_ddl, table_statements
from billing_module.resources import resource_path
from tests.conftest import MYSQL_URL, _mysql_params, make_config

SQL_FILE = str(resource_path("scripts", "migrate_llmage_failed.sql"))

# llmage's model of the table (yumoqing/llmage models/llmusage_accounting_failed.json, commit 07b4893252)
LLMAGE_MODEL = {
    "summary": [{"name": "llmusage_accounting_failed", "title": "failed accounting", "primary": ["id"]}],
    "fields": [
        {"name": "id", "title": "id", "type": "str", "length": 32},
        {"name": "llmusageid", "title": "usage id", "type": "str", "length": 32},
        {"name": "llmid", "title": "model id", "type": "str", "length": 32},
        {"name": "userid", "title": "user id", "type": "str", "length": 32},
        {"name": "userorgid", "title": "org id", "type": "str", "length": 32},
        {"name": "use_date", "title": "use date", "type": "date"},
        {"name": "use_time", "title": "use time", "type": "timestamp"},
        {"name": "amount", "title": "amount", "type": "double", "length": 18, "dec": 5},
        {"name": "cost", "title": "cost", "type": "double", "length": 18, "dec": 5},
        {"name": "failed_reason", "title": "reason", "type": "text"},
        {"name": "failed_time", "title": "failed time", "type": "timestamp"},
        {"name": "retry_count", "title": "retries", "type": "int"},
        {"name": "handled", "title": "handled", "type": "str", "length": 1, "default": "0"},
        {"name": "handled_time", "title": "handled time", "type": "timestamp"},
        {"name": "handled_note", "title": "note", "type": "text"},
    ],
    "indexes": [
        {"name": "idx_laf_use_date", "idxtype": "index", "idxfields": ["use_date"]},
        {"name": "idx_laf_userorgid", "idxtype": "index", "idxfields": ["userorgid"]},
        {"name": "idx_laf_llmid", "idxtype": "index", "idxfields": ["llmid"]},
        {"name": "idx_laf_handled", "idxtype": "index", "idxfields": ["handled"]},
        {"name": "idx_laf_failed_time", "idxtype": "index", "idxfields": ["failed_time"]},
    ],
}

# (id, llmusageid, amount, cost, failed_time in +08:00, handled, note): llmage's values
OLD_ROWS = [
    ("f1", "u1", "0.00123", "0.00050", "2026-05-24 13:55:48", "0", None),
    ("f2", "u2", "12.5", "7.25", "2026-05-24 14:00:00", "1", "refunded by hand"),
    ("f3", "u3", "99999.99999", "0.00001", "2026-05-25 00:30:00", "0", None),
    ("f4", "u4", "0.3", None, "2026-05-25 08:00:00", "0", None),
    ("f5", "u4", "0.3", "0.1", "2026-05-25 09:00:00", "0", None),       # llmage failed u4 twice
    ("f6", "u6", "-1.25", "0", "2026-05-26 10:00:00", "1", "reversal"),
]
EXPECTED_MICRO = {"f1": (1230, 500), "f2": (12500000, 7250000), "f3": (99999999990, 10), "f4": (300000, None),
                  "f5": (300000, 100000), "f6": (-1250000, 0)}


def _statements(text):
    text = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("--"))
    return [s.strip() for s in text.split(";") if s.strip()]


def test_migration_covers_every_column_of_the_model():
    """Static: llmage's columns plus what the SQL adds are exactly the module's columns."""
    sql = open(SQL_FILE, encoding="utf-8").read()
    added = set(re.findall(r"ADD COLUMN (\w+)", sql))
    renamed = dict(re.findall(r"CHANGE (\w+) (\w+)", sql))
    dropped = set(re.findall(r"DROP COLUMN (\w+)", sql))
    old = {f["name"] for f in LLMAGE_MODEL["fields"]}
    final = (old - dropped) | {renamed.get(c, c) for c in added}
    assert final == {f["name"] for f in load_models()["llmusage_accounting_failed"]["fields"]}
    _, indexes = table_statements(load_models()["llmusage_accounting_failed"], "mysql")
    created = set(re.findall(r"CREATE (?:UNIQUE )?INDEX (\w+)", sql))
    old_idx = {f"llmusage_accounting_failed_{i['name']}" for i in LLMAGE_MODEL["indexes"]}
    assert {name for name, _ in indexes} == old_idx | created


def _connect(db=None):
    return pymysql.connect(**_mysql_params(), database=db, autocommit=True)


def _columns(cur, db):
    cur.execute("select column_name, column_type from information_schema.columns where table_schema = %s "
                "and table_name = 'llmusage_accounting_failed'", (db,))
    return {r[0].lower(): r[1].lower() for r in cur.fetchall()}


def _indexes(cur, db):
    cur.execute("select index_name, non_unique, group_concat(column_name order by seq_in_index) "
                "from information_schema.statistics where table_schema = %s and table_name = "
                "'llmusage_accounting_failed' group by index_name, non_unique", (db,))
    return {r[0].lower(): (r[1], r[2]) for r in cur.fetchall()}


async def _migration_on_mariadb_keeps_rows_and_exact_amounts(tmp_path):
    assert MYSQL_URL, "the migration test needs BILLING_TEST_MYSQL (MariaDB/MySQL) in CI"
    name = f"billing_mig_{os.getpid()}_{secrets.token_hex(3)}"
    fresh = name + "_fresh"
    admin = _connect()
    try:
        with admin.cursor() as c:
            for db in (name, fresh):
                c.execute(f"create database {db} character set utf8mb4 collate utf8mb4_unicode_ci")
        conn = _connect(name)
        with conn.cursor() as c:
            # llmage's table, from its model, through the same generator llmage used
            for stmt in _statements(render_ddl(LLMAGE_MODEL, "mysql")):
                if not stmt.lower().startswith("drop"):
                    c.execute(stmt)
            c.execute("set time_zone = '+08:00'")     # llmage wrote local (China) times
            for fid, uid, amount, cost, at, handled, note in OLD_ROWS:
                c.execute("insert into llmusage_accounting_failed (id, llmusageid, llmid, userid, userorgid, use_date, "
                          "use_time, amount, cost, failed_reason, failed_time, retry_count, handled, handled_note) "
                          "values (%s, %s, 'llm-1', 'user-1', 'org-1', %s, %s, %s, %s, 'upstream said no', %s, 1, %s, %s)",
                          (fid, uid, at[:10], at, amount, cost, at, handled, note))
            for stmt in _statements(open(SQL_FILE, encoding="utf-8").read()):
                c.execute(stmt)
            c.execute("set time_zone = '+00:00'")
            c.execute("select id, llmusageid, request_id, amount, cost, failed_time, use_time, handled, handled_note, "
                      "retry_state, failure_code, retry_count from llmusage_accounting_failed order by id")
            rows = {r[0]: r for r in c.fetchall()}
            # every row kept, amounts exact
            assert set(rows) == {r[0] for r in OLD_ROWS}
            for fid, (amount, cost) in EXPECTED_MICRO.items():
                assert (rows[fid][3], rows[fid][4]) == (amount, cost), fid
            # times: the same instants, as UTC wall time
            assert str(rows["f1"][5]) == "2026-05-24 05:55:48" and str(rows["f1"][6]) == "2026-05-24 05:55:48"
            # handled state and notes kept; migrated rows wait for an operator
            assert rows["f2"][7:9] == ("1", "refunded by hand") and rows["f1"][7] == "0"
            assert {r[9] for r in rows.values()} == {"exhausted"} and {r[10] for r in rows.values()} == {"llmage_migrated"}
            # the older of llmage's two rows for u4 keeps its usage id in request_id only
            assert (rows["f4"][1], rows["f4"][2]) == (None, "u4") and (rows["f5"][1], rows["f5"][2]) == ("u4", "u4")
            # the table now has the module's columns and indexes
            migrated_cols, migrated_idx = _columns(c, name), _indexes(c, name)
            # a second run stops at its first statement and changes nothing
            with pytest.raises(pymysql.err.OperationalError):
                for stmt in _statements(open(SQL_FILE, encoding="utf-8").read()):
                    c.execute(stmt)
            c.execute("select sum(amount), count(*) from llmusage_accounting_failed")
            assert c.fetchone() == (sum(a for a, _ in EXPECTED_MICRO.values()), len(OLD_ROWS))
        conn.close()

        fresh_core = BillingCore(config=make_config(tmp_path), db_desc=mysql_desc(**_desc(fresh)), data_dir=str(tmp_path))
        await fresh_core.create_schema()
        await fresh_core.close()
        with _connect(fresh).cursor() as c:
            want_cols, want_idx = _columns(c, fresh), _indexes(c, fresh)
        assert {k: v for k, v in migrated_cols.items()} == want_cols
        assert migrated_idx == want_idx

        # the module works on the migrated table: schema creation leaves it alone, the list reads it
        core = BillingCore(config=make_config(tmp_path), db_desc=mysql_desc(**_desc(name)), data_dir=str(tmp_path))
        try:
            created = await core.create_schema()
            assert not [c for c in created if c.startswith("llmusage_accounting_failed")]
            listed = await core.failures.search(rows=10)
            assert listed["total"] == len(OLD_ROWS)
            by_id = {r["id"]: r for r in listed["rows"]}
            assert by_id["f1"]["amount"] == "0.001230" and by_id["f3"]["amount"] == "99999.999990"
            assert by_id["f6"]["amount"] == "-1.250000" and by_id["f4"]["cost"] == "0.000000"
            handled = await core.failures.mark_handled("f1", "llmage row, settled outside", operator="ops")
            assert handled["handled"] == "1"
        finally:
            await core.close()
    finally:
        with admin.cursor() as c:
            for db in (name, fresh):
                c.execute(f"drop database if exists {db}")
        admin.close()


def _desc(db):
    p = _mysql_params()
    return {"host": p["host"], "port": p["port"], "user": p["user"], "password": p["password"], "name": db}


# collected where MariaDB is named (and always in CI, where its absence is a failure)
if MYSQL_URL or os.environ.get("CI"):
    test_migration_on_mariadb_keeps_rows_and_exact_amounts = _migration_on_mariadb_keeps_rows_and_exact_amounts
