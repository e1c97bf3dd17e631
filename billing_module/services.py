"""Wires the services of the core together: the one place that knows every service."""
from .accounting import Accounting
from .cache import CacheManager
from .catalog import Catalog
from .failures import Failures
from .ledger import Ledger


def build_services(core, db):
    core.caches = CacheManager(core.config.cache.size, core.config.cache.ttl_seconds)
    core.catalog = Catalog(db, core.caches)
    core.ledger = Ledger(db, core.config)
    core.failures = Failures(core)
    core.accounting = Accounting(core)
    from .auth import Auth
    from .sync import SyncManager
    core.auth = Auth(core)
    core.apikeys.secret_box = core.auth.secret_box
    core.sync = SyncManager(core)
    from .products import ProductManager
    core.products = ProductManager(core)
    core.accounting.quota_hook = core.products.quota_hook
    core.accounting.quota_release = core.products.release_quota
    core.accounting.quota_customers = core.products.subscribed_customers


def background_jobs(core):
    """(name, coroutine function, interval seconds); each claims its rows in the database, so
    several instances on one database can all run them."""
    from .sessions import SessionStore
    acc, holds = core.config.accounting, core.config.holds

    async def accountant():
        # drain the queue: a full batch means more may be waiting
        while await core.accounting.account_pending() >= acc.batch_size:
            pass

    return [
        ("accountant", accountant, acc.interval_seconds),
        ("failed-accounting-retries", core.failures.retry_due, max(acc.interval_seconds, 5.0)),
        ("hold-expiry", core.ledger.expire_holds, holds.sweep_interval_seconds),
        ("subscription-renewals", core.products.renew_due, 60.0),
        ("session-purge", SessionStore(core).purge, 300.0),
    ] + core.sync.background_jobs() + core.auth.background_jobs()


def register_functions(core, env):
    """ServerEnv names other modules call in-process (``ServerEnv().billing_*``). Each resolves
    the service at call time: the database (and so the services) exist only after the host's
    DBPools is built."""
    def svc(name, method):
        async def call(*args, **kwargs):
            _ = core.db
            return await getattr(getattr(core, name), method)(*args, **kwargs)
        call.__name__ = f"billing_{method}"
        return call

    env.billing_health = core.health
    env.billing_post_usage = svc("accounting", "post_usage")
    env.billing_submit_usage = svc("accounting", "submit_usage")
    env.billing_post_usage_batch = svc("accounting", "post_usage_batch")
    env.billing_quote = svc("accounting", "quote")
    env.billing_balance = svc("ledger", "balance")
    env.billing_recharge = svc("ledger", "recharge")
    env.billing_refund = svc("ledger", "refund")
    env.billing_adjust = svc("ledger", "adjust")
    env.billing_hold = svc("ledger", "hold")
    env.billing_settle = svc("ledger", "settle")
    env.billing_release = svc("ledger", "release")
    env.billing_reconcile = svc("ledger", "reconcile")
    env.billing_product_use = svc("products", "product_use")
    env.billing_check_quota = svc("products", "check_quota")
    env.billing_product_subscribe = svc("products", "subscribe")

    class ProductManagerProxy:
        """``ServerEnv().billing_product_manager``: the ProductManager, resolved on first use
        (the database, and so the services, exist only after the host's DBPools is built)."""
        def __getattr__(self, name):
            _ = core.db
            return getattr(core.products, name)
    env.billing_product_manager = ProductManagerProxy()
