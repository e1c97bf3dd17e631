"""The crash test, short: the real server process killed with SIGKILL under load, three times."""
import os

import pytest

from billing_module.config import load_config
from billing_module.core import BillingCore
from billing_module.money import to_micro
from billing_module.tools import crashtest


def _env_for(db_desc):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    if db_desc["driver"] != "billing_sqlite":
        kw = db_desc["kwargs"]
        env.update(BILLING_DATABASE_DRIVER="mysql", BILLING_DATABASE_HOST=kw["host"],
                   BILLING_DATABASE_PORT=str(kw["port"]), BILLING_DATABASE_USER=kw["user"],
                   BILLING_DATABASE_PASSWORD=kw.get("plain_password", ""), BILLING_DATABASE_NAME=kw["db"])
    return env


async def test_sigkill_under_load_loses_nothing_and_charges_once(tmp_path, db_desc):
    report = await crashtest.run(str(tmp_path / "crash"), rounds=3, clients=6, min_up=0.4, max_up=1.0,
                                 seed=7, env=_env_for(db_desc), log=lambda *a: None)
    assert report["problems"] == []
    assert report["kills"] == 3 and report["acknowledged"] > 0
    assert report["charged"] == report["acknowledged"]    # every event ever sent was retried until acknowledged
    assert 500 not in report["statuses"], report["statuses"]


@pytest.mark.tampers
async def test_crashtest_judges_only_its_own_customer_on_a_database_with_data(tmp_path, db_desc):
    """A database that already holds other customers' usage (some with ``crash-`` request ids, as an
    earlier run leaves them), a queued event and a balance that does not reconcile: the run reports
    no problem of its own making and still checks its own customer."""
    data_dir, env = str(tmp_path / "crash"), _env_for(db_desc)
    os.makedirs(data_dir)
    core = BillingCore(config=load_config(environ=env, overrides={"server": {"data_dir": data_dir}}), data_dir=data_dir)
    try:
        await core.create_schema()
        await core.catalog.put("pricing", [crashtest.PROGRAM])
        await core.catalog.put("llmage", [crashtest.MODEL])
        await core.ledger.recharge("other-org", to_micro("10"), "other-top")
        for rid in ("crash-legacy-1", "crash-legacy-2", "other-1"):
            await core.accounting.post_usage(dict(crashtest._event(rid, "other-org"), input_tokens=2000))
        await core.accounting.submit_usage(crashtest._event("other-queued", "other-org"))
        await core.ledger.recharge("broken-org", to_micro("5"), "broken-top")
        async with core.db.transaction() as tx:    # another customer's books are off: not the run's doing
            await tx.execute("update customer_balance set balance = balance + 1 where id = 'broken-org'")
    finally:
        await core.close()
    report = await crashtest.run(data_dir, rounds=2, clients=4, min_up=0.4, max_up=0.8, seed=3, env=env,
                                 log=lambda *a: None)
    assert report["problems"] == [], report["problems"]
    assert report["customer"].startswith("crash-") and report["acknowledged"] > 0
    assert report["charged"] == report["acknowledged"]
