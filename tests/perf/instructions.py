"""Instructions per operation, counted by valgrind (cachegrind): a figure the machine's speed does
not move, for an A/B of a hot path between two trees (this machine's CPU speed swings by half from
one minute to the next, which a timed A/B of a few percent cannot see through). Not part of the
runtime package and not collected by pytest. Needs ``valgrind`` (Debian package). Usage, from the
repository root:

    python tests/perf/instructions.py quote                 # this tree
    python tests/perf/instructions.py batch --tree /tmp/base --tree .   # two trees, one after the other

``quote``: a warm ``Catalog.quote`` (the bench's ``pricing_hit_us``); ``batch``: an event through
``post_usage_batch`` on SQLite, 1,000 to a batch (the work of the batch endpoint, SQLite's own
included). Each count is (instructions of a run with N operations - those of a run with none) / N:
start-up and set-up cancel out.
"""
import argparse
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

N = {"quote": 20_000, "batch": 3_000}


async def _workload(kind: str, n: int) -> None:
    from billing_module.money import to_micro
    from billing_module.pricing import Usage
    from billing_module.tools.bench import Bench, event
    bench = Bench("sqlite", "quick", None)
    core = await bench.fresh_core("count")
    try:
        if kind == "quote":
            quote, usage = core.catalog.quote, Usage.from_event(event("q"))
            await quote(usage, None, "bench-chat", "bench-c0")
            for _ in range(n):
                await quote(usage, None, "bench-chat", "bench-c0")
        else:
            await core.ledger.recharge("bench-c0", to_micro("1000000"), "top")
            await core.accounting.post_usage_batch([event(f"warm-{i}") for i in range(1000)])
            for k in range(0, n, 1000):
                await core.accounting.post_usage_batch([event(f"b{k}-{i}") for i in range(1000)])
    finally:
        await core.close()
        bench.cleanup()


def _instructions(tree: Path, kind: str, n: int) -> int:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                           sys.executable, __file__, "--run", kind, str(n)],
                          capture_output=True, text=True, env=env, cwd="/tmp")
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        sys.exit(f"valgrind run failed in {tree}:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(N))
    ap.add_argument("--tree", action="append", type=Path, help="a source tree to count (repeatable; default: .)")
    ap.add_argument("-n", type=int, help="operations counted (default: 20,000 quotes, 3,000 events)")
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.run:            # inside valgrind: the workload alone
        asyncio.run(_workload(args.kind, int(rest[0])))
        return 0
    n = args.n or N[args.kind]
    for tree in args.tree or [Path(".")]:
        tree = tree.resolve()
        per_op = (_instructions(tree, args.kind, n) - _instructions(tree, args.kind, 0)) / n
        print(f"{args.kind}: {per_op:,.0f} instructions per {'quote' if args.kind == 'quote' else 'event'}  ({tree})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
