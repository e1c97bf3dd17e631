"""``billing-module sync [ENTITY] [--full]``: pull from the central platform now, with one
progress line per page. Exit code 0 when every entity synced, 1 when one failed, 2 when the
sync is not configured or already running."""
import sys

from ..cli_options import add_common_options
from ..errors import BillingError
from .base import ENTITY_ORDER


def add_parser(subparsers):
    p = subparsers.add_parser("sync", help="pull users / pricing / models / upstream APIs from the central platform")
    add_common_options(p)
    p.add_argument("entity", nargs="?", choices=ENTITY_ORDER, help="one entity (default: all, in this order)")
    p.add_argument("--full", action="store_true",
                   help="start from version 0 and delete local rows the centre no longer has")
    return p


async def run(core, args, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    manager = core.sync

    def progress(entity, info):
        more = "more to come" if info["has_more"] else "done"
        print(f"{entity}: page {info['page']} -> version {info['version']}: {info['items']} items, "
              f"{info['deleted']} deleted ({info['total_items']} items so far, {more})", file=out, flush=True)

    try:
        results = await manager.sync(args.entity, full=args.full, progress=progress)
    except BillingError as e:
        print(f"billing-module sync: {e.message}", file=err)
        return 2
    code = 0
    for r in results:
        for w in r["warnings"]:
            print(f"{r['entity']}: warning: {w}", file=out)
        if r["status"] == "success":
            print(f"{r['entity']}: success at version {r['version']} ({r['items']} items, {r['deleted']} deleted, "
                  f"{r['pages']} pages, {r['seconds']}s)", file=out, flush=True)
        else:
            code = 1
            print(f"{r['entity']}: FAILED: {r['error']}", file=err, flush=True)
    return code
