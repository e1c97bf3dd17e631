"""The billing core: one object per process that owns the config, the database and the
services built on them. ``load_billing_module()`` creates it and registers it in ServerEnv."""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from . import metrics
from .accounting import Accounting
from .alerts import Alerts
from .apikeys import ApiKeys
from .auth import Auth
from .budgets import Budgets
from .cache import CacheManager
from .catalog import Catalog
from .codes import load_code_tables
from .config import Config, load_config
from .db.database import Database, desc_from_config
from .db.schema import create_schema
from .failures import FailureRetries, Failures
from .ledger import Ledger
from .page_users import PageUsers
from .products import ProductManager
from .services import Job, Services, background_jobs, build_services
from .session_store import SessionStore
from .statements import Statements
from .sync import SyncManager
from .throttle import LoginThrottle
from .version import __version__

log = logging.getLogger("billing_module")

MODULE_NAME = "billing_module"


class BillingCore:
    """Owns the config, the database and the services. Constructing it touches no database: in a
    host the database is known only once the host's DBPools exists, so the database and the
    services (``services.build_services``) are built on first use of ``db`` or of a service."""

    def __init__(self, config: Config | None = None, db_desc: dict | None = None, data_dir: str | None = None,
                 instance_id: str | None = None) -> None:
        self.config: Config = config or load_config(os.environ.get("BILLING_CONFIG") or None)
        self.data_dir = os.path.abspath(data_dir or self.config.server.data_dir)
        self._db_desc = db_desc
        self._db: Database | None = None
        self._services: Services | None = None
        self.version = __version__
        self.instance_id = instance_id or f"{os.uname().nodename}:{os.getpid()}:{id(self) % 100000}"
        self._tasks: list[asyncio.Task] = []
        # the standalone host's console credentials (server.py sets them; None in a host)
        self.admin_password: str | None = None
        self.demo_admin_key: str | None = None
        self.login_throttle = LoginThrottle(self.config.server)
        self.host_sessions_trusted = False   # set by the start-up check (sessions.check_host_sessions)
        self.standalone_admin: str | None = None   # the standalone host's admin user name

    # --- database -------------------------------------------------------------------------
    def _resolve_db_desc(self) -> dict:
        """Standalone: from our config. In a host: the host's database for this module, read
        lazily, because the host's DBPools does not exist yet when load_billing_module() runs."""
        if self._db_desc is not None:
            return self._db_desc
        from ahserver.serverenv import ServerEnv
        env = ServerEnv()
        get_dbname = env.get_module_dbname
        if get_dbname is not None:
            from sqlor.dbpools import DBPools
            dbname = get_dbname(MODULE_NAME)
            desc = DBPools().databases.get(dbname) if DBPools().databases else None
            if desc:
                return {"driver": desc["driver"], "kwargs": dict(desc.get("kwargs") or {})}
        return desc_from_config(self.config, self.data_dir)

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self._resolve_db_desc(), pool_size=self.config.database.pool_size,
                                statement_timeout_seconds=self.config.database.statement_timeout_seconds,
                                on_run_again=metrics.ran_again)
        return self._db

    @property
    def services(self) -> Services:
        """Every service, built on first use (which resolves the database)."""
        if self._services is None:
            self._services = build_services(self.config, self.db, self.data_dir)
        return self._services

    # the services by name, for the edges (API handlers, CLI, ServerEnv functions)
    @property
    def caches(self) -> CacheManager:
        return self.services.caches

    @property
    def catalog(self) -> Catalog:
        return self.services.catalog

    @property
    def apikeys(self) -> ApiKeys:
        return self.services.apikeys

    @property
    def auth(self) -> Auth:
        return self.services.auth

    @property
    def budgets(self) -> Budgets:
        return self.services.budgets

    @property
    def ledger(self) -> Ledger:
        return self.services.ledger

    @property
    def products(self) -> ProductManager:
        return self.services.products

    @property
    def failures(self) -> Failures:
        return self.services.failures

    @property
    def accounting(self) -> Accounting:
        return self.services.accounting

    @property
    def retries(self) -> FailureRetries:
        return self.services.retries

    @property
    def sync(self) -> SyncManager:
        return self.services.sync

    @property
    def sessions(self) -> SessionStore:
        return self.services.sessions

    @property
    def page_users(self) -> PageUsers:
        return self.services.page_users

    @property
    def statements(self) -> Statements:
        return self.services.statements

    @property
    def alerts(self) -> Alerts:
        return self.services.alerts

    async def create_schema(self) -> list[str]:
        """Missing tables and indexes, then the code lists of init/data.json (an upsert)."""
        created = await create_schema(self.db)
        await load_code_tables(self.db)
        return created

    async def health(self) -> dict[str, Any]:
        try:
            # through run(): a broken connection moves to the next node, as a request would
            await self.db.run(lambda tx: tx.scalar("select 1 as ok"), write=False)
            db_state = "ok"
        except Exception as e:  # health reports; it does not raise
            log.warning("health: database check failed: %s", e)
            db_state = "error"
        return {"status": "ok" if db_state == "ok" else "degraded", "db": db_state,
                "version": self.version, "dialect": self.db.dialect, "db_node": self.db.node}

    # --- background tasks ---------------------------------------------------------------------
    def background_jobs(self) -> list[Job]:
        """(name, coroutine function, interval seconds) of every periodic job."""
        return background_jobs(self.services, self.config)

    async def start_background(self) -> None:
        for name, job, interval in self.background_jobs():
            self._tasks.append(asyncio.create_task(_periodic(name, job, interval), name=f"billing:{name}"))

    async def stop_background(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    async def cleanup_ctx(self, app: Any) -> AsyncIterator[None]:
        """aiohttp cleanup context: background jobs run while the app runs; the pool closes after."""
        if self.config.accounting.background:
            await self.start_background()
        yield
        await self.stop_background()
        await self.close()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
            self._services = None


async def _periodic(name: str, job: Callable[[], Awaitable[Any]], interval: float) -> None:
    while True:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background job %s failed; it runs again in %ss", name, interval)
        await asyncio.sleep(interval)
