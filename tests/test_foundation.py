"""The foundation: schema from the models on both databases, initdb idempotence, health and
API-key auth over HTTP, config errors."""
import os
import subprocess
import sys

import pytest

from billing_module.config import load_config
from billing_module.db.schema import create_schema, ddl_script, load_models
from billing_module.errors import ConfigError

SEEDS = {
    # table: {field: expected column family}, from shared/seeds 000-004
    "accounting_records": {"id": "str", "customer_id": "str", "llmid": "str", "model_name": "str", "pricing_id": "str",
                           "input_tokens": "int64", "output_tokens": "int64", "total_tokens": "int64",
                           "quantity": "decimal", "amount": "int64", "currency": "str", "request_id": "str",
                           "transno": "str", "status": "str", "created_at": "time", "updated_at": "time"},
    "customer_balance": {"id": "str", "balance": "int64", "currency": "str", "credit_limit": "int64",
                         "last_recharge": "time", "last_consumption": "time", "status": "str",
                         "sync_version": "str", "cached_at": "time"},
    "sync_state": {"id": "str", "entity_type": "str", "entity_id": "str", "last_sync_time": "time",
                   "sync_version": "str", "sync_status": "str", "error_msg": "text", "retry_count": "int",
                   "created_at": "time", "updated_at": "time"},
    "llmusage_accounting_failed": {"id": "str", "llmusageid": "str", "llmid": "str", "userid": "str",
                                   "userorgid": "str", "use_date": "date", "use_time": "time", "amount": "int64",
                                   "cost": "int64", "failed_reason": "text", "failed_time": "time",
                                   "retry_count": "int", "handled": "str", "handled_time": "time",
                                   "handled_note": "text"},
    "product_usage_log": {"id": "str", "product_id": "str", "subscription_id": "str", "user_id": "str",
                          "user_org_id": "str", "product_resource_id": "str", "supplier_org_id": "str",
                          "resource_type": "str", "resource_ref_id": "str", "used_amount": "decimal",
                          "used_unit": "str", "unit_cost": "int64", "total_cost": "int64", "sell_price": "int64",
                          "billing_mode": "str", "source_ref_table": "str", "source_ref_id": "str",
                          "use_time": "time", "created_at": "time"},
}
SEED_INDEXES = {
    "accounting_records": {"idx_customer_id": ("index", ["customer_id"]), "idx_llmid": ("index", ["llmid"]),
                           "idx_request_id": ("unique", ["request_id"]), "idx_status": ("index", ["status"]),
                           "idx_created_at": ("index", ["created_at"])},
    "customer_balance": {"idx_status": ("index", ["status"]), "idx_balance": ("index", ["balance"])},
    "sync_state": {"idx_entity_type": ("index", ["entity_type"]),
                   "idx_entity_type_id": ("unique", ["entity_type", "entity_id"]),
                   "idx_sync_status": ("index", ["sync_status"])},
    "llmusage_accounting_failed": {"idx_laf_use_date": ("index", ["use_date"]), "idx_laf_userorgid": ("index", ["userorgid"]),
                                   "idx_laf_llmid": ("index", ["llmid"]), "idx_laf_handled": ("index", ["handled"]),
                                   "idx_laf_failed_time": ("index", ["failed_time"])},
    "product_usage_log": {"idx_pul_product": ("index", ["product_id"]), "idx_pul_subscription": ("index", ["subscription_id"]),
                          "idx_pul_user": ("index", ["user_id", "user_org_id"]), "idx_pul_supplier": ("index", ["supplier_org_id"]),
                          "idx_pul_time": ("index", ["use_time"]),
                          "idx_pul_source": ("index", ["source_ref_table", "source_ref_id"])},
}
SEED_CODES = {"product_usage_log": {"product_id", "supplier_org_id", "resource_type", "billing_mode"}}


async def _columns(tx, table):
    if tx.dialect == "sqlite":
        rows = await tx.select(f"select lower(name) as name, lower(type) as type from pragma_table_info('{table}')")
    else:
        rows = await tx.select("select lower(column_name) as name, lower(column_type) as type from information_schema.columns "
                               "where table_schema = database() and table_name = ${t}$", {"t": table})
    return {r.name: r.type for r in rows}


async def _indexes(tx, table):
    """{index name: (unique|index, [columns])}"""
    if tx.dialect == "sqlite":
        rows = await tx.select(
            f"select il.name as name, il.\"unique\" as uniq, ii.name as col from pragma_index_list('{table}') il, "
            "pragma_index_info(il.name) ii where il.origin = 'c' order by il.name, ii.seqno")
    else:
        rows = await tx.select(
            "select index_name as name, case when non_unique = 0 then 1 else 0 end as uniq, column_name as col "
            "from information_schema.statistics where table_schema = database() and table_name = ${t}$ "
            "and index_name <> 'PRIMARY' order by index_name, seq_in_index", {"t": table})
    out = {}
    for r in rows:
        kind, cols = out.setdefault(r.name.lower(), ("unique" if int(r.uniq) else "index", []))
        cols.append(r.col.lower())
    return out


FAMILY = {
    "sqlite": {"str": ("text",), "text": ("text",), "int64": ("bigint",), "int": ("int",), "decimal": ("decimal(15,4)",),
               "time": ("text",), "date": ("text",)},
    "mysql": {"str": ("varchar", "char"), "text": ("longtext",), "int64": ("bigint",), "int": ("int",),
              "decimal": ("decimal(15,4)",), "time": ("datetime",), "date": ("date",)},
}


async def test_every_seed_field_and_index_exists_with_its_type(core):
    async with core.db.read() as tx:
        for table, fields in SEEDS.items():
            cols = await _columns(tx, table)
            for field, family in fields.items():
                assert field in cols, f"{table}.{field} missing"
                assert cols[field].startswith(FAMILY[tx.dialect][family]), f"{table}.{field} is {cols[field]}, want {family}"
            have = await _indexes(tx, table)
            for name, (kind, idxcols) in SEED_INDEXES[table].items():
                full = f"{table}_{name}"
                assert full in have, f"index {full} missing"
                assert have[full] == (kind, idxcols), f"{full}: {have[full]}"


async def test_money_and_token_columns_are_64_bit(core):
    models = load_models()
    async with core.db.read() as tx:
        for table, model in models.items():
            cols = await _columns(tx, table)
            for f in model["fields"]:
                if "micro-units" in f["title"] or f["name"].endswith("_tokens"):
                    assert cols[f["name"]].startswith("bigint"), f"{table}.{f['name']} is {cols[f['name']]}"


async def test_seed_code_references_kept():
    models = load_models()
    for table, fields in SEED_CODES.items():
        assert {c["field"] for c in models[table]["codes"]} >= fields


def test_model_titles_are_safe_in_generated_ddl():
    # the generators paste titles into SQL comments and split scripts on ';'
    for table, model in load_models().items():
        for f in model["fields"] + model["summary"]:
            assert not set(f.get("title", "")) & set(";'\"\n"), f"{table}: unsafe title {f['title']!r}"


async def test_initdb_twice_keeps_data_and_changes_nothing(core):
    async with core.db.transaction() as tx:
        await tx.insert("sync_state", {"id": "s1", "entity_type": "users", "entity_id": "", "sync_status": "success",
                                       "retry_count": 0, "created_at": "2026-01-01 00:00:00", "updated_at": "2026-01-01 00:00:00"})
    assert await create_schema(core.db) == []
    assert await create_schema(core.db) == []
    async with core.db.read() as tx:
        assert await tx.scalar("select count(*) as n from sync_state") == 1


async def test_initdb_recreates_a_missing_index_without_touching_the_table(core):
    async with core.db.transaction() as tx:
        await tx.execute("drop index customer_balance_idx_balance" + (" on customer_balance" if tx.dialect == "mysql" else ""))
    assert await create_schema(core.db) == ["customer_balance.customer_balance_idx_balance"]


async def test_initdb_adds_a_missing_column_and_fills_a_derived_one(core):
    """A table made by an older version gains the model's new columns; a column derived from
    other tables (db/schema.py DERIVED_COLUMNS) is filled from them for the existing rows."""
    await core.ledger.recharge("c1", 10_000_000, "r1")
    await core.ledger.recharge("c2", 10_000_000, "r2")
    await core.budgets.set_budget("c1", "org", "c1", "day", 5_000_000)
    await core.budgets.set_budget("c1", "user", "u1", "week", 5_000_000)
    await core.alerts.set_webhook("c1", {"low_balance_amount": 1_000_000}, "admin")
    product = await core.products.save_product(code="p", product_name="p", quantity_unit="call",
                                               included_quantity="1", list_price="1")
    await core.products.subscribe("c2", product["product_id"], "s1")
    derived = ("budget_count", "low_balance_set", "subscription_count")
    async with core.db.transaction() as tx:
        for column in derived:
            await tx.execute(f"alter table customer_balance drop column {column}")
    assert await create_schema(core.db) == [f"customer_balance.{column}" for column in derived]
    assert await create_schema(core.db) == []
    async with core.db.read() as tx:
        rows = await tx.select(f"select id, {', '.join(derived)} from customer_balance order by id")
    assert [(r.id, *(int(r[c]) for c in derived)) for r in rows] == [("c1", 2, 1, 0), ("c2", 0, 0, 1)]
    await core.ledger.recharge("c3", 10_000_000, "r3")       # a new row after the migration


def test_ddl_has_no_drop_and_uses_bigint_for_money():
    for dialect in ("mysql", "sqlite"):
        ddl = ddl_script(dialect)
        assert "drop table" not in ddl.lower()
        assert "`balance` bigint" in ddl


def test_ddl_command_prints_both_dialects():
    for dialect in ("mysql", "sqlite"):
        out = subprocess.run([sys.executable, "-m", "billing_module.cli", "ddl", "--dialect", dialect],
                             capture_output=True, text=True, check=True).stdout
        assert "CREATE TABLE IF NOT EXISTS accounting_records" in out


def test_config_defaults_file_env_and_errors(tmp_path):
    cfg = load_config(environ={})
    assert cfg.database.driver == "sqlite" and cfg.accounting.batch_size == 500
    f = tmp_path / "c.yaml"
    f.write_text("accounting:\n  batch_size: 50\nserver:\n  port: 9999\n")
    cfg = load_config(str(f), environ={"BILLING_SERVER_PORT": "9000"})
    assert cfg.accounting.batch_size == 50 and cfg.server.port == 9000
    with pytest.raises(ConfigError, match="accounting.batch_size"):
        load_config(environ={"BILLING_ACCOUNTING_BATCH_SIZE": "-3"})
    f.write_text("acounting:\n  batch_size: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'acounting'"):
        load_config(str(f), environ={})
    f.write_text("server: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(f), environ={})


async def test_health_is_open_and_reports_the_database(http):
    status, body = await http.get("api/health.dspy")
    assert status == 200
    assert body["success"] is True and body["status"] == "ok" and body["db"] == "ok" and body["version"]


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer bk_nothere_xxxx", "Basic abc", "Bearer not-a-key"])
async def test_api_needs_a_valid_key(http, header):
    headers = {"Authorization": header} if header else {}
    r = await http.client.get("/billing_module/api/balance.dspy", params={"customer_id": "c1"}, headers=headers)
    body = await r.json(content_type=None)
    assert r.status == 401 and body["success"] is False and body["code"] == "unauthorized"


async def test_revoked_key_is_refused(http):
    key, row = await http.core.apikeys.create("admin", name="temp")
    status, _ = await http.get("api/balance.dspy", key=key, customer_id="c1")
    assert status != 401
    await http.core.apikeys.revoke(row["id"])
    status, body = await http.get("api/balance.dspy", key=key, customer_id="c1")
    assert status == 401 and body["code"] == "unauthorized"


def test_cli_apikey_create_prints_only_the_key(tmp_path):
    env = dict(os.environ, BILLING_SERVER_LOG_FILE="")
    env.pop("BILLING_CONFIG", None)
    out = subprocess.run([sys.executable, "-m", "billing_module.cli", "apikey", "create", "--admin", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True, env=env).stdout
    assert out.count("\n") == 1 and out.startswith("bk_")
    listed = subprocess.run([sys.executable, "-m", "billing_module.cli", "apikey", "list", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, check=True, env=env).stdout
    assert out.split("_")[1] in listed
