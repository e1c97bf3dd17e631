"""The composition root: the one place that builds every service and hands each its
collaborators. Nothing else constructs a service; nothing assigns a collaborator after the fact.

Build order follows the dependencies (each line uses only what the lines above built):
caches -> catalog; secret box -> api keys -> auth; secret box -> alerts -> low-balance watch ->
ledger -> products (and their quota hook) -> failures -> accounting -> retries; catalog, alerts -> sync.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .accounting import Accounting
from .alerts import Alerts, LowBalanceWatch
from .apikeys import ApiKeys
from .auth import Auth, SecretBox
from .budgets import Budgets
from .cache import FLUSH_SECONDS, CacheManager
from .catalog import Catalog
from .config import Config
from .db.database import Database
from .failures import FailureRetries, Failures
from .ledger import Ledger
from .page_users import PageUsers
from .products import ProductManager
from .session_store import SessionStore
from .statements import Statements
from .sync import SyncManager

Job = tuple[str, Callable[[], Awaitable[Any]], float]


@dataclass(frozen=True)
class Services:
    """Every service of one core, built on one database."""
    caches: CacheManager
    catalog: Catalog
    apikeys: ApiKeys
    auth: Auth
    budgets: Budgets
    ledger: Ledger
    products: ProductManager
    failures: Failures
    accounting: Accounting
    retries: FailureRetries
    sync: SyncManager
    sessions: SessionStore
    page_users: PageUsers
    statements: Statements
    alerts: Alerts


def build_services(config: Config, db: Database, data_dir: str) -> Services:
    caches = CacheManager(config.cache.size, config.cache.ttl_seconds)
    catalog = Catalog(db, caches)
    secret_box = SecretBox(config, data_dir)
    apikeys = ApiKeys(db, secret_box)
    alerts = Alerts(db, config, secret_box)
    budgets = Budgets(db, config, alerts=alerts)
    ledger = Ledger(db, config, watch=LowBalanceWatch(config, alerts), budgets=budgets)
    products = ProductManager(db=db, config=config, ledger=ledger, budgets=budgets)
    failures = Failures(db, config, alerts)
    accounting = Accounting(db, config, catalog=catalog, ledger=ledger, failures=failures, quota=products.hook,
                            budgets=budgets)
    return Services(
        caches=caches, catalog=catalog, apikeys=apikeys, auth=Auth(db, config, apikeys, secret_box),
        budgets=budgets, ledger=ledger, products=products, failures=failures, accounting=accounting,
        retries=FailureRetries(failures, accounting), sync=SyncManager(db, config, catalog, alerts),
        sessions=SessionStore(db), page_users=PageUsers(db), statements=Statements(db, config), alerts=alerts)


def background_jobs(services: Services, config: Config) -> list[Job]:
    """(name, coroutine function, interval seconds); each claims its rows in the database, so
    several instances on one database can all run them."""
    acc, holds = config.accounting, config.holds
    accounting = services.accounting

    async def accountant() -> None:
        # drain the queue: a full batch means more may be waiting
        while await accounting.account_pending() >= acc.batch_size:
            pass

    jobs: list[Job] = [
        ("accountant", accountant, acc.interval_seconds),
        ("failed-accounting-retries", services.retries.retry_due, max(acc.interval_seconds, 5.0)),
        ("hold-expiry", services.ledger.expire_holds, holds.sweep_interval_seconds),
        ("subscription-renewals", services.products.renew_due, 60.0),
        ("session-purge", services.sessions.purge, 300.0),
        ("statement-close", services.statements.close_due, config.statements.close_interval_seconds),
        ("alert-delivery", services.alerts.deliver_due, config.alerts.delivery_interval_seconds),
        ("cache-metrics", services.caches.flush_job, FLUSH_SECONDS),
    ]
    return jobs + services.sync.background_jobs() + services.auth.background_jobs()
