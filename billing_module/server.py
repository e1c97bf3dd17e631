"""The standalone host: an ahserver application around the module on an SQLite file.

It lays out a host work directory inside ``data_dir`` the way a platform host is laid out
(``conf/config.json``, ``wwwroot/billing_module`` -> the module's ``wwwroot``), registers the
module exactly as a host's ``init()`` would, and serves it.
"""
import json
import logging
import os
import sys

from aiohttp import web

from .core import MODULE_NAME
from .datadir import secret_file
from .db.database import desc_from_config
from .errors import Forbidden, Unauthorized
from .resources import resource_dir

log = logging.getLogger("billing_module")

WWWROOT = str(resource_dir("wwwroot"))
HOST_DBNAME = "billing"


def reset_host_singletons():
    """ahserver and sqlor keep process-wide singletons; a new host in the same process (tests,
    a restart) must start from none of them."""
    from ahserver.serverenv import ServerEnv
    from appPublic.jsonConfig import JsonConfig
    from appPublic.registerfunction import RegisterFunction
    from sqlor.dbpools import DBPools
    for cls in (JsonConfig, RegisterFunction, DBPools, ServerEnv):
        if hasattr(cls, "instance"):
            cls.instance = None


async def close_host_pools():
    """Close the connections of sqlor's own pool (the generated CRUD pages use it). sqlor never
    closes them, and on MySQL each one sits in the transaction of its last SELECT, whose
    metadata locks would hold up any DDL (a migration, a dropped database)."""
    from sqlor.dbpools import DBPools
    pools = getattr(getattr(DBPools, "instance", None), "_pools", None) or {}
    for pool in pools.values():
        for entry in pool.sqlors:
            conn = getattr(entry.sqlor, "conn", None)
            if conn is None:
                continue
            closing = conn.close()
            if hasattr(closing, "__await__"):
                await closing


def setup_logging(cfg, data_dir, console=True):
    level = getattr(logging, cfg.server.log_level.upper())
    logger = logging.getLogger("billing_module")
    logger.setLevel(level)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_file = cfg.server.log_file
    if log_file:
        path = log_file if os.path.isabs(log_file) else os.path.join(data_dir, log_file)
        fh = logging.FileHandler(path, encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if console:
        ch = logging.StreamHandler(sys.stderr)
        ch.setFormatter(fmt)
        logger.addHandler(ch)
    # ahserver's own logger writes here (it reopens the file per line; errors only)
    from appPublic.log import MyLogger
    MyLogger.instance = None
    MyLogger("ahserver", levelname="clientinfo", logfile=os.path.join(data_dir, "ahserver.log"))


def write_host_workdir(cfg, data_dir, db_desc):
    """conf/config.json and wwwroot/ for ahserver, inside data_dir."""
    os.makedirs(os.path.join(data_dir, "conf"), exist_ok=True)
    www = os.path.join(data_dir, "wwwroot")
    os.makedirs(www, exist_ok=True)
    link = os.path.join(www, MODULE_NAME)
    if os.path.islink(link) and os.readlink(link) != WWWROOT:
        os.unlink(link)
    try:
        os.symlink(WWWROOT, link)
    except FileExistsError:     # there already, or another process made it just now
        pass
    password_key = secret_file(data_dir, ".password_key")
    db_kwargs = _host_db_kwargs(db_desc["kwargs"], password_key)
    install_bricks(cfg, www)
    host_config = {
        "password_key": password_key,
        "logger": {"name": "billing", "levelname": "clientinfo", "logfile": os.path.join(data_dir, "ahserver.log")},
        "databases": {HOST_DBNAME: {"driver": db_desc["driver"], "kwargs": db_kwargs, "dbname": HOST_DBNAME}},
        "filesroot": os.path.join(data_dir, "files"),
        "website": {
            "paths": [[www, ""]],
            "host": cfg.server.host,
            "port": cfg.server.port,
            "indexes": ["index.html", "index.ui", "index.dspy"],
            "processors": [[".tmpl", "tmpl"], [".dspy", "dspy"], [".ui", "bui"]],
        },
    }
    _write_private(os.path.join(data_dir, "conf", "config.json"), json.dumps(host_config, indent=1))
    return host_config


def _host_db_kwargs(kwargs, password_key):
    """The database kwargs for ahserver's config.json: sqlor decrypts ``password`` with
    ``password_key`` (AES), so the file never holds the password in clear."""
    from appPublic.aes import aes_encode_b64
    kwargs = dict(kwargs)
    plain = kwargs.pop("plain_password", None)
    if plain:
        kwargs["password"] = aes_encode_b64(password_key, plain)
    return kwargs


def _write_private(path, text):
    """Write a file that holds secrets: mode 600 from its creation (an existing file is
    narrowed to 600 before it is rewritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
def install_bricks(cfg, www):
    """``/bricks/`` from ``server.bricks_dir`` (see billing_module.bricks)."""
    from . import bricks
    bricks.install(www, cfg.server.bricks_dir or None)


def serve_static_files(app, data_dir):
    """Bricks, the favicon, 404s for missing files and the way to the login page, ahead of the
    login check."""
    from . import bricks
    app.middlewares.insert(0, bricks.static_middleware(os.path.join(data_dir, "wwwroot"),
                                                       f"/{MODULE_NAME}/login.ui"))


def make_auth_class():
    """The standalone host's permission check, in place of rbac: the API authenticates each call
    itself (API keys or the session's caller), the login page is open, the customer area
    (``my/``) and the logout need a login, every other page a platform (admin) login."""
    from ahserver.auth_api import AuthAPI, get_session_userinfo

    # the API and the sync export check API keys / signatures themselves
    # (and /metrics, which takes an admin key or the scrape token)
    open_prefixes = (f"/{MODULE_NAME}/api/", f"/{MODULE_NAME}/fast/", f"/{MODULE_NAME}/sync/",
                     f"/{MODULE_NAME}/login", f"/{MODULE_NAME}/metrics")
    customer_prefixes = (f"/{MODULE_NAME}/my/", f"/{MODULE_NAME}/logout")

    class StandaloneAuth(AuthAPI):
        async def setupAuth(self, app):
            # never ahserver's own setup: its session secret is derived from the port
            from ahserver.serverenv import ServerEnv

            from .sessions import session_secret, setup_standalone_sessions
            core = ServerEnv().billing_core
            setup_standalone_sessions(app, core, session_secret(core.data_dir))
            app.middlewares.append(self.checkAuth)

        async def checkUserPermission(self, request, user, path):
            if path.startswith(open_prefixes):
                return True
            if not user:
                return False
            from ahserver.serverenv import ServerEnv

            from .sessions import session_caller
            try:
                caller = await session_caller(ServerEnv().billing_core, request)
            except Forbidden:
                return False
            return caller is not None and (caller.is_admin or path.startswith(customer_prefixes))

        @web.middleware
        async def checkAuth(self, request, handler):
            # ahserver's middleware logs each request through a logger that inspects the stack
            # and reopens its file per line; this one logs only refusals and errors.
            userinfo = await get_session_userinfo(request)
            try:
                allowed = await self.checkUserPermission(request, userinfo.userid, request.path)
            except Unauthorized:      # a page user disabled since the login: as if logged out
                allowed, userinfo.userid = False, None
            if allowed:
                return await handler(request)
            if userinfo.userid is None:
                raise web.HTTPUnauthorized(text=json.dumps({"success": False, "code": "unauthorized",
                                                            "message": "log in first"}),
                                           content_type="application/json")
            raise web.HTTPForbidden()

    return StandaloneAuth


async def build_app(cfg, data_dir, db_desc=None, demo=False, background=True, prepared=False):
    """Build the standalone ahserver app; returns (app, core). The schema is created first,
    unless ``prepared``: a worker of ``serve --workers N``, whose parent wrote the host's work
    directory and created the schema once (workers doing it at the same time raced on its files)."""
    from ahserver.configuredServer import ConfiguredServer
    from ahserver.serverenv import ServerEnv

    from .init import load_billing_module

    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    db_desc = db_desc or desc_from_config(cfg, data_dir)
    reset_host_singletons()
    if not prepared:
        write_host_workdir(cfg, data_dir, db_desc)

    # what a host's init() does
    ServerEnv().get_module_dbname = lambda module: HOST_DBNAME
    core = load_billing_module(config=cfg, db_desc=db_desc, data_dir=data_dir, register_background=False)
    core.admin_password = cfg.server.admin_password or secret_file(data_dir, ".admin_password", 12)
    core.standalone_admin = cfg.server.admin_user
    from .auth import load_secret_key
    load_secret_key(cfg, data_dir)

    server = ConfiguredServer(auth_klass=make_auth_class(), workdir=data_dir)
    server.configPath(server.config)
    app = await server.build_app()
    serve_static_files(app, data_dir)
    created = [] if prepared else await core.create_schema()
    if created:
        log.info("schema: created %s", ", ".join(created))
    if demo:
        from .demo import seed_demo
        await seed_demo(core)
    if background:
        app.cleanup_ctx.append(core.cleanup_ctx)
    else:
        async def close_core(app):
            await core.close()
        app.on_cleanup.append(close_core)

    async def close_pools(app):
        await close_host_pools()
    app.on_cleanup.append(close_pools)
    return app, core


def _banner(cfg, data_dir, core, demo, workers=1):
    base = f"http://{cfg.server.host}:{cfg.server.port}/{MODULE_NAME}"
    db = core.db.desc.kwargs.get("dbname") or core.db.desc.kwargs.get("db")
    lines = [f"billing_module {core.version} on {core.db.dialect} ({db}), {workers} worker process(es)",
             f"  health:      {base}/api/health.dspy",
             f"  admin pages: {base}/index.ui  (user {cfg.server.admin_user}, password in "
             f"{os.path.join(data_dir, '.admin_password')})"]
    if demo:
        lines += [f"  demo API key (admin): {core.demo_admin_key}",
                  f"  try: curl -H 'Authorization: Bearer {core.demo_admin_key}' "
                  f"'{base}/api/balance.dspy?customer_id=demo-acme'"]
    for ln in lines:
        print(ln, flush=True)


def serve(cfg, data_dir, demo=False, workers=1, argv=None, quiet=False, prepared=False):
    """Run until SIGINT/SIGTERM (aiohttp turns both into a clean shutdown).

    ``workers > 1``: that many server processes share the port (SO_REUSEPORT) and the database,
    the way the platform scales out; their background jobs claim their rows in the database."""
    import asyncio
    os.makedirs(data_dir, exist_ok=True)
    setup_logging(cfg, data_dir)
    if workers > 1:
        return _serve_workers(cfg, data_dir, demo, workers, argv or [])

    async def make():
        app, core = await build_app(cfg, data_dir, demo=demo, prepared=prepared)
        if not quiet:
            _banner(cfg, data_dir, core, demo)
        tune_gc()
        return app

    web.run_app(make(), host=cfg.server.host, port=cfg.server.port, print=None, reuse_port=True,
                handle_signals=True, shutdown_timeout=10)
    asyncio.set_event_loop(asyncio.new_event_loop())


# the youngest generation is collected after this many more container objects than were freed
GC_YOUNG_THRESHOLD = 20_000


def tune_gc():
    """The collector for a server process that has started. A batch request keeps tens of
    thousands of objects alive until its reply: with the default threshold (700) the collector
    runs every few events and walks them again and again, and each full collection walks the whole
    heap (modules, caches), a fifth of a batch's CPU. What starting made stays: frozen, never
    walked again; what a request frees goes by reference counting, so the young generation rarely
    reaches the threshold (cycles still are collected when it does)."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _serve_workers(cfg, data_dir, demo, workers, argv):
    """The parent of ``workers`` server processes: prepares the database once, starts them,
    forwards SIGINT/SIGTERM and waits for them all."""
    import asyncio
    import signal
    import subprocess

    from .core import BillingCore

    async def prepare():
        write_host_workdir(cfg, data_dir, desc_from_config(cfg, data_dir))
        core = BillingCore(config=cfg, data_dir=data_dir)
        try:
            await core.create_schema()
            if demo:
                from .demo import seed_demo
                await seed_demo(core)
            core.admin_password = cfg.server.admin_password or secret_file(data_dir, ".admin_password", 12)
            _banner(cfg, data_dir, core, demo, workers)
        finally:
            await core.close()
    asyncio.run(prepare())
    from .metrics import prepare_multiprocess
    prepare_multiprocess(data_dir)   # the workers inherit it: one scrape sums them all
    child_argv = [a for a in argv if a != "--demo"]
    command = [sys.executable, "-m", "billing_module.cli", *child_argv, "--workers", "1", "--quiet", "--prepared"]
    children = [subprocess.Popen(command) for _ in range(workers)]

    def forward(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [c.wait() for c in children]
    return max(codes) if codes else 0
