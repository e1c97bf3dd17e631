"""The composition root: every service gets its collaborators from services.build_services, the
core builds them on first use (not when constructed), and the ServerEnv functions carry the
signatures of the service methods they call."""
import inspect
from types import SimpleNamespace

import pytest

from billing_module.accounting import Accounting
from billing_module.core import BillingCore
from billing_module.errors import InvalidParam
from billing_module.inprocess import register_functions
from billing_module.ledger import Ledger
from billing_module.products.consumption import Consumption
from tests.helpers import units


def test_constructing_the_core_and_registering_touches_no_database(config, tmp_path):
    # a database that cannot exist: building it would fail on first use, not here
    core = BillingCore(config=config, db_desc={"driver": "no-such-driver", "kwargs": {}}, data_dir=str(tmp_path))
    env = SimpleNamespace()
    register_functions(core, env)
    assert core._db is None and core._services is None
    assert callable(env.billing_post_usage) and env.billing_product_manager is not None


async def test_each_service_has_the_collaborators_built_once(core):
    s = core.services
    assert core.services is s                                   # built once per core
    assert s.accounting.catalog is s.catalog and s.accounting.ledger is s.ledger
    assert s.accounting.failures is s.failures and s.accounting.quota is s.products.hook
    assert s.retries.failures is s.failures and s.retries.accounting is s.accounting
    assert s.auth.apikeys is s.apikeys and s.apikeys.secret_box is s.auth.secret_box
    assert s.sync.catalog is s.catalog and s.products.hook.ledger is s.ledger
    assert not hasattr(BillingCore, "__getattr__")


async def test_close_and_reuse_builds_the_services_again(core):
    first = core.services
    await core.close()
    assert core.services is not first and core.accounting.db is core.db


def _parameters(func):
    return list(inspect.signature(func).parameters)


async def test_serverenv_functions_have_the_service_signatures(core):
    env = SimpleNamespace()
    register_functions(core, env)
    assert _parameters(env.billing_post_usage) == _parameters(Accounting.post_usage)[1:] == ["raw"]
    assert _parameters(env.billing_hold) == _parameters(Ledger.hold)[1:]
    assert _parameters(env.billing_product_use) == _parameters(Consumption.product_use)[1:]
    assert env.billing_post_usage.__name__ == "billing_post_usage"
    assert env.billing_product_manager.get() is core.products


async def test_serverenv_functions_reach_the_services(core):
    env = SimpleNamespace()
    register_functions(core, env)
    await env.billing_recharge("c1", units("2"), "r1")
    assert (await env.billing_balance("c1"))["balance"] == "2.000000"
    assert (await env.billing_reconcile())["mismatches"] == []
    with pytest.raises(InvalidParam, match="product_id"):
        await env.billing_product_use("c1", "u1", "p1\n", 1, source_ref_table="task", source_ref_id="t1")
    assert (await env.billing_product_manager.bindings())["total"] == 0
