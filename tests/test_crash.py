"""The crash test, short: the real server process killed with SIGKILL under load, three times."""
import os

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
