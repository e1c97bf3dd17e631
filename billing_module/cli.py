"""The ``billing-module`` command. Every subcommand takes ``--config FILE`` and ``--data-dir DIR``
so that it works on the database a ``serve`` with the same options uses."""
import argparse
import asyncio
import os
import sys

from .cli_options import add_common_options, load_from_args
from .errors import BillingError, ConfigError


def build_parser():
    parser = argparse.ArgumentParser(
        prog="billing-module", description="billing_module: billing and accounting",
        epilog="also: " + "; ".join(f"{k}: {v[1]}" for k, v in PASS_THROUGH.items()))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the standalone server")
    add_common_options(p)
    p.add_argument("--demo", action="store_true", help="seed demo customers, prices and a product")
    p.add_argument("--host", help="bind address (server.host)")
    p.add_argument("--port", type=int, help="port (server.port)")
    p.add_argument("--bricks-dir", help="bricks front end (a build or its source folder) served at /bricks/ "
                   "(server.bricks_dir)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port and the database")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prepared", action="store_true", help=argparse.SUPPRESS)   # a worker: its parent prepared

    p = sub.add_parser("initdb", help="create missing tables and indexes (never drops or alters)")
    add_common_options(p)

    p = sub.add_parser("ddl", help="print the schema DDL")
    add_common_options(p)
    p.add_argument("--dialect", choices=["mysql", "sqlite"], required=True)

    p = sub.add_parser("reconcile", help="prove every balance equals its ledger; exit 1 on any mismatch")
    add_common_options(p)

    p = sub.add_parser("account-pending", help="account queued (submitted) usage now, in batches")
    add_common_options(p)

    p = sub.add_parser("backup", help="move accounted records used before a date to the history table")
    add_common_options(p)
    p.add_argument("--before", required=True, help="cut-off date (UTC), e.g. 2026-11-01")

    from .sync import cli as sync_cli
    sync_cli.add_parser(sub)

    p = sub.add_parser("apikey", help="create, list or revoke API keys")
    ak = p.add_subparsers(dest="action", required=True)
    c = ak.add_parser("create", help="print a new key alone on stdout")
    add_common_options(c)
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--admin", action="store_true", help="a key for every customer and the admin endpoints")
    who.add_argument("--customer", metavar="ID", help="a key limited to one customer")
    who.add_argument("--app", action="store_true", help="a signed-request app key (prints app_key and secret)")
    c.add_argument("--signed", action="store_true", help="make the key a signed-request key (app key + secret)")
    c.add_argument("--name", default="")
    c.add_argument("--expires", help="expiry time (UTC), e.g. 2027-01-01")
    c.add_argument("--allowed-ips", default="", help="comma-separated client IPs (empty: any)")
    add_common_options(ak.add_parser("list"))
    r = ak.add_parser("revoke")
    add_common_options(r)
    r.add_argument("key", help="key id or prefix")
    _add_user_parser(sub)
    p = sub.add_parser("statements", help="monthly statements")
    st = p.add_subparsers(dest="action", required=True)
    c = st.add_parser("close", help="close a month's statements for every customer (idempotent)")
    add_common_options(c)
    c.add_argument("--month", required=True, help="YYYY-MM, in the configured timezone")
    return parser


def _add_user_parser(sub):
    p = sub.add_parser("user", help="the standalone host's page users (admins and customer users)")
    us = p.add_subparsers(dest="action", required=True)
    a = us.add_parser("add", help="add a page user; the password from stdin, or generated and printed once")
    add_common_options(a)
    a.add_argument("name")
    who = a.add_mutually_exclusive_group(required=True)
    who.add_argument("--admin", action="store_true", help="sees every customer and the admin pages")
    who.add_argument("--customer", metavar="ID", help="the user's organisation (needs --role)")
    a.add_argument("--role", choices=("customer.admin", "customer.user"), help="with --customer")
    a.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_common_options(us.add_parser("list"))
    for action, text in (("disable", "disable a user: its sessions end at once"), ("passwd", "set a new password")):
        c = us.add_parser(action, help=text)
        add_common_options(c)
        c.add_argument("name")
        if action == "passwd":
            c.add_argument("--password-stdin", action="store_true", help="read the password from stdin")


async def _with_core(cfg, data_dir, work):
    from .core import BillingCore
    os.makedirs(data_dir, exist_ok=True)
    core = BillingCore(config=cfg, data_dir=data_dir)
    try:
        await core.create_schema()
        return await work(core)
    finally:
        await core.close()


# commands with their own argument parsers: ``billing-module <name> --help``. The tools are imported
# only when their command runs: the runtime never imports billing_module.tools.
PASS_THROUGH = {
    "bench": ("billing_module.tools.bench", "benchmarks; appends figures to BENCHMARKS.md with --record"),
    "crashtest": ("billing_module.tools.crashtest", "SIGKILL the server under load and verify exactly-once"),
    "proof": ("billing_module.tools.proof", "soak and other proof runs against a running server"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASS_THROUGH:
        import importlib
        return importlib.import_module(PASS_THROUGH[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ddl":
            from .db.schema import ddl_script
            print(ddl_script(args.dialect))
            return 0
        cfg, data_dir = load_from_args(args)
        if args.command == "serve":
            from .server import serve
            if args.workers < 1:
                raise ConfigError("--workers must be at least 1")
            return serve(cfg, data_dir, demo=args.demo, workers=args.workers, argv=argv, quiet=args.quiet,
                         prepared=args.prepared) or 0
        return asyncio.run(_run(args, cfg, data_dir))
    except (ConfigError, BillingError) as e:
        print(f"billing-module: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2


async def _run(args, cfg, data_dir):
    if args.command == "initdb":
        from .core import BillingCore
        os.makedirs(data_dir, exist_ok=True)
        core = BillingCore(config=cfg, data_dir=data_dir)
        try:
            created = await core.create_schema()
        finally:
            await core.close()
        print("created: " + ", ".join(created) if created else "schema is up to date; nothing to do")
        return 0
    if args.command == "apikey":
        return await _with_core(cfg, data_dir, lambda core: _apikey(core, args))
    if args.command == "statements":
        return await _with_core(cfg, data_dir, lambda core: _close_statements(core, args.month))
    if args.command == "user":
        return await _with_core(cfg, data_dir, lambda core: _user(core, cfg, args))
    if args.command == "sync":
        from .sync import cli as sync_cli
        return await _with_core(cfg, data_dir, lambda core: sync_cli.run(core, args))
    if args.command == "reconcile":
        return await _with_core(cfg, data_dir, _reconcile)
    if args.command == "account-pending":
        return await _with_core(cfg, data_dir, _account_pending)
    if args.command == "backup":
        from . import clock
        before = clock.fmt(clock.parse(args.before, "--before"))

        async def backup(core):
            print(f"moved {await core.failures.backup_accounted(before)} accounted records used before {before}")
            return 0
        return await _with_core(cfg, data_dir, backup)
    raise SystemExit(f"unknown command {args.command}")


async def _reconcile(core):
    report = await core.ledger.reconcile()
    for m in report["mismatches"]:
        print("MISMATCH " + "  ".join(f"{k}={v}" for k, v in m.items()))
    print(f"checked {report['customers']} customers: {len(report['mismatches'])} mismatches")
    statement_mismatches = await core.statements.reconcile()
    for m in statement_mismatches:
        print("STATEMENT MISMATCH " + "  ".join(f"{k}={v}" for k, v in m.items()))
    print(f"closed statements against the ledger: {len(statement_mismatches)} mismatches")
    return 1 if report["mismatches"] or statement_mismatches else 0


async def _close_statements(core, month):
    closed = await core.statements.close_month(month, closed_by="cli")
    print(f"closed {closed} statements for {month}")
    return 0


async def _account_pending(core):
    total = 0
    while True:
        n = await core.accounting.account_pending()
        total += n
        if n < core.config.accounting.batch_size:
            break
    print(f"accounted {total} pending events")
    return 0


async def _apikey(core, args):
    keys = core.apikeys
    if args.action == "create":
        expires = None
        if args.expires:
            from . import clock
            expires = clock.fmt(clock.parse(args.expires, "--expires"))
        scope = "admin" if args.admin else "app" if args.app else "customer"
        key, _ = await keys.create(scope, customer_id=args.customer, name=args.name, expires_at=expires,
                                   allowed_ips=args.allowed_ips, signed=args.signed or args.app)
        if hasattr(key, "app_key"):
            print(f"app_key: {key.app_key}\nsecret: {key.secret}")
        else:
            print(key)
        return 0
    if args.action == "list":
        for r in await keys.list():
            state = "enabled" if r.enabled == "1" else f"revoked {r.revoked_at}"
            print(f"{r.id}  {r.key_prefix}  {r.scope:8}  {r.customer_id or '-':20}  {state}  {r.name}")
        return 0
    if args.action == "revoke":
        await keys.revoke(args.key)
        print(f"revoked {args.key}")
        return 0


def _new_password(args) -> tuple[str, bool]:
    """(password, generated): one line from stdin with --password-stdin, else a random one."""
    from .page_users import generate_password
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\r\n"), False
    return generate_password(), True


async def _user(core, cfg, args):
    from .page_users import ADMIN_ROLE
    users = core.page_users
    if args.action == "list":
        for r in await users.list():
            state = "enabled" if r.enabled == "1" else "disabled"
            print(f"{r.name:24}  {r.role:15}  {r.customer_id or '-':20}  {state}")
        return 0
    if args.action == "disable":
        await users.disable(args.name)
        print(f"disabled {args.name}")
        return 0
    if args.action == "add":
        if args.name == cfg.server.admin_user:
            raise ConfigError(f"{args.name} is the configured admin (server.admin_user); choose another name")
        if bool(args.customer) != bool(args.role):
            raise ConfigError("--customer and --role go together (--admin takes neither)")
    password, generated = _new_password(args)
    if args.action == "add":
        await users.add(args.name, ADMIN_ROLE if args.admin else args.role, args.customer, password)
        print(f"added {args.name}")
    else:
        await users.set_password(args.name, password)
        print(f"new password set for {args.name}")
    if generated:
        print(f"password: {password}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
