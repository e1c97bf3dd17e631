"""The billing core: one object per process that owns the config, the database and the
services built on them. ``load_billing_module()`` creates it and registers it in ServerEnv."""
import asyncio
import logging
import os

from .apikeys import ApiKeys
from .config import load_config
from .db.database import Database, desc_from_config
from .version import __version__

log = logging.getLogger("billing_module")

MODULE_NAME = "billing_module"


class BillingCore:
    def __init__(self, config=None, db_desc=None, data_dir=None, instance_id=None):
        self.config = config or load_config(os.environ.get("BILLING_CONFIG") or None)
        self.data_dir = os.path.abspath(data_dir or self.config.server.data_dir)
        self._db_desc = db_desc
        self._db = None
        self.version = __version__
        self.instance_id = instance_id or f"{os.uname().nodename}:{os.getpid()}:{id(self) % 100000}"
        self.apikeys = None
        self._services_built = False
        self._tasks = []
        from .throttle import LoginThrottle
        self.login_throttle = LoginThrottle(self.config.server)
        self.host_sessions_trusted = False   # set by the start-up check (sessions.check_host_sessions)
        self.standalone_admin = None         # the standalone host's admin user name

    _SERVICES = ("caches", "catalog", "ledger", "failures", "accounting", "products", "sync", "auth")

    def __getattr__(self, name):
        # services exist once the database is known; touching one resolves it
        if name in BillingCore._SERVICES and not self.__dict__.get("_services_built"):
            _ = self.db
            return self.__dict__[name]
        raise AttributeError(name)

    # --- database -------------------------------------------------------------------------
    def _resolve_db_desc(self):
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
    def db(self):
        if self._db is None:
            self._db = Database(self._resolve_db_desc(), pool_size=self.config.database.pool_size)
            self._build_services()
        return self._db

    def _build_services(self):
        if self._services_built:
            return
        self._services_built = True
        db = self._db
        self.apikeys = ApiKeys(db)
        from .services import build_services
        build_services(self, db)

    async def create_schema(self):
        """Missing tables and indexes, then the code lists of init/data.json (an upsert)."""
        from .codes import load_code_tables
        from .db.schema import create_schema
        created = await create_schema(self.db)
        await load_code_tables(self.db)
        return created

    async def health(self):
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
    def background_jobs(self):
        """(name, coroutine function, interval seconds) of every periodic job."""
        from .services import background_jobs
        return background_jobs(self)

    async def start_background(self):
        _ = self.db
        for name, job, interval in self.background_jobs():
            self._tasks.append(asyncio.create_task(_periodic(name, job, interval), name=f"billing:{name}"))

    async def stop_background(self):
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    async def cleanup_ctx(self, app):
        """aiohttp cleanup context: background jobs run while the app runs; the pool closes after."""
        if self.config.accounting.background:
            await self.start_background()
        yield
        await self.stop_background()
        await self.close()

    async def close(self):
        if self._db is not None:
            await self._db.close()
            self._db = None
            self._services_built = False


async def _periodic(name, job, interval):
    while True:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background job %s failed; it runs again in %ss", name, interval)
        await asyncio.sleep(interval)
