"""``load_billing_module()``: how a host plugs the module in.

The host's ``init()`` calls it before ahserver builds ``DBPools``; nothing here touches the
database (the core connects on first use). Every name registered in ServerEnv starts with
``billing_`` (ahserver's ``initEnv()`` overwrites about 80 common names after init runs).
"""
import logging

from . import clock
from .core import BillingCore
from .inprocess import register_functions

log = logging.getLogger("billing_module")

_core = None


def get_core():
    return _core


def load_billing_module(config=None, db_desc=None, data_dir=None, register_background=True):
    """Create the core and register it in ServerEnv. Returns the core.

    Inside a host: call with no arguments from ``init()``; the database is the host's
    (``get_module_dbname('billing_module')``), background jobs start with the app.
    """
    global _core
    from ahserver.serverenv import ServerEnv

    core = BillingCore(config=config, db_desc=db_desc, data_dir=data_dir)
    _core = core
    env = ServerEnv()
    env.billing_core = core

    async def billing_api(request, params_kw, name):
        from .api import handle
        return await handle(core, request, params_kw, name)

    env.billing_api = billing_api
    # "today" on a page is the deployment's day (config ``timezone``), as the reports read days
    env.billing_today = lambda: clock.local_today(core.config.timezone).isoformat()
    from .guard import install_request_guard
    install_request_guard()
    register_functions(core, env)
    if register_background:
        try:
            from ahserver.configuredServer import add_cleanupctx
            add_cleanupctx(core.cleanup_ctx)
        except ImportError:  # pragma: no cover - ahserver always has it
            log.warning("ahserver has no add_cleanupctx; background jobs must be started by the host")
    return core
