"""``billing-module bench``: the figures in BENCHMARKS.md, each database in one run.

Every figure is measured against a floor taken in the same run on the same database: one-row
INSERT transactions through the same transaction path the module uses. Ratios travel between
machines; absolute rates do not. A run appends one row per database to BENCHMARKS.md with the
exact command that produced it.
"""
import argparse
import asyncio
import gc
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time

import orjson
import pymysql

from .. import clock
from ..accounting import CLAIM_PENDING, UPSERT_ONLY, accounted_update
from ..config import load_config
from ..core import BillingCore
from ..db.database import mysql_desc, sqlite_desc
from ..ids import new_id
from ..money import to_micro
from ..pricing import Usage

PROGRAM = {
    "id": "bench-pp", "name": "bench", "currency": "CNY",
    "versions": [{"id": "bench-v1", "enabled_date": "2026-01-01", "expired_date": "9999-12-31",
                  "pricing_data": {"pricings": [
                      {"price_factors": "input_tokens", "unit_prices": "2.0", "cost_prices": "1.0", "unit": "M",
                       "filters": [{"model": "bench-chat"}]},
                      {"price_factors": "output_tokens", "unit_prices": "8.0", "cost_prices": "4.0", "unit": "M",
                       "filters": [{"model": "bench-chat"}]}]}}],
}
MODEL = {"id": "bench-llm", "name": "bench-chat", "ppid": "bench-pp"}


PAIRED_SLICES = 5   # the turns of floor_and_charge: each side in 5 slices, one after the other


def event(request_id, customer="bench-c0", use_time=None):
    return {"request_id": request_id, "customer_id": customer, "model_name": "bench-chat",
            "input_tokens": 1200, "output_tokens": 300, "use_time": use_time or "2026-11-22 10:00:00"}


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Bench:
    def __init__(self, dialect, scale, mysql_url):
        self.dialect, self.scale, self.mysql_url = dialect, scale, mysql_url
        self.results = {}
        self.tmp = tempfile.mkdtemp(prefix="billing-bench-")

    async def fresh_core(self, name):
        cfg = load_config(environ={}, overrides={"server": {"data_dir": self.tmp, "log_file": ""},
                                                 "accounting": {"background": False, "batch_size": 1000}})
        if self.dialect == "sqlite":
            desc = sqlite_desc(os.path.join(self.tmp, f"{name}.db"))
        else:
            params = _mysql_params(self.mysql_url)
            db = f"billing_bench_{os.getpid()}_{name}"
            conn = pymysql.connect(**params)
            with conn.cursor() as c:
                c.execute(f"drop database if exists {db}")
                c.execute(f"create database {db} character set utf8mb4")
            conn.close()
            self._mysql_dbs.append((params, db))
            desc = mysql_desc(params["host"], params["port"], params["user"], params["password"], db)
        core = BillingCore(config=cfg, db_desc=desc, data_dir=self.tmp, instance_id=f"bench-{name}")
        await core.create_schema()
        await core.catalog.put("pricing", [PROGRAM])
        await core.catalog.put("llmage", [MODEL])
        return core

    _mysql_dbs: list[tuple[dict, str]] = []

    def cleanup(self):
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)
        for params, db in self._mysql_dbs:
            conn = pymysql.connect(**params)
            with conn.cursor() as c:
                c.execute(f"drop database if exists {db}")
            conn.close()
        self._mysql_dbs.clear()

    # --- the figures ---------------------------------------------------------------------------------
    async def floor_and_charge(self, core, n, workers, slices=PAIRED_SLICES):
        """``(floor_tps, post_usage_tps)`` measured in turns: ``slices`` slices of each, the floor's
        then the charge's, each side's time summed. This machine's speed swings within minutes;
        in turns, both sides meet the same swings, so their ratio is the code's and not the
        minute's (a paired comparison, as an A/B in turns is).

        The floor, the rate to beat: a one-row INSERT per transaction through
        Database.transaction, of the row any usage log must write (an accounting_records row, as
        llmage writes its llmusage row), with no pricing, balance or ledger. The charge:
        ``Accounting.post_usage`` (price, debit, ledger entry, record in one transaction), all on
        one customer (the hot row)."""
        template = await _stored_row(core, f"floor-{workers}-template")
        rows = [dict(template, id=new_id(), request_id=f"floor-{workers}-{i}", status="accounted") for i in range(n)]
        await core.ledger.recharge("bench-c0", to_micro("1000000"), f"w{workers}-top")

        async def insert(i):
            async with core.db.transaction() as tx:
                await tx.insert("accounting_records", rows[i])

        async def charge(i):
            await core.accounting.post_usage(event(f"w{workers}-{i}"))
        spent = {insert: 0.0, charge: 0.0}
        for k in range(slices):
            turn = range(n * k // slices, n * (k + 1) // slices)
            for one in spent:
                spent[one] += await _timed(one, turn, workers)
        return n / spent[insert], n / spent[charge]

    async def floor_batch(self, core, n, batch):
        """The accountant's floor: a multi-row INSERT of the same ``accounting_records`` rows in
        batches of the accountant's size, one transaction per batch, through the same driver."""
        template = await _stored_row(core, "floor-batch-template")
        rows = [dict(template, id=new_id(), request_id=f"floor-batch-{i}", status="accounted") for i in range(n)]
        t = time.perf_counter()
        for k in range(0, n, batch):
            async with core.db.transaction() as tx:
                await tx.insert_many("accounting_records", rows[k:k + batch])
        return n / (time.perf_counter() - t)

    async def accountant(self, core, n):
        await core.ledger.recharge("bench-c0", to_micro("1000000"), "acc-top")
        for c in range(1, 10):
            await core.ledger.recharge(f"bench-c{c}", to_micro("1000000"), f"acc-top-{c}")
        # queue n events over 10 customers: the first of each submitted, the others copies of it
        # written in bulk (the submit path is not what is timed)
        templates = [await _stored_row(core, f"acc-{c}", customer=f"bench-c{c}") for c in range(min(n, 10))]
        rows = [dict(templates[i % 10], id=new_id(), request_id=f"acc-{i}") for i in range(len(templates), n)]
        for k in range(0, n, 2000):
            async with core.db.transaction() as tx:
                await tx.insert_many("accounting_records", rows[k:k + 2000])
        t = time.perf_counter()
        done = 0
        while True:
            got = await core.accounting.account_pending(limit=core.config.accounting.batch_size)
            done += got
            if got == 0:
                break
        elapsed = time.perf_counter() - t
        assert done == n, f"accounted {done} of {n}"
        return n / elapsed

    async def authorize_settle(self, core, n):
        await core.ledger.recharge("bench-c0", to_micro("1000000"), "auth-top")
        auth, settle = [], []
        for i in range(n):
            t0 = time.perf_counter()
            hold = await core.ledger.hold("bench-c0", to_micro("0.5"), f"auth-{i}")
            t1 = time.perf_counter()
            await core.ledger.settle(to_micro("0.2"), hold_id=hold["hold_id"])
            t2 = time.perf_counter()
            auth.append(t1 - t0)
            settle.append(t2 - t1)
        return {"authorize_p50_ms": pct(auth, 50) * 1e3, "authorize_p99_ms": pct(auth, 99) * 1e3,
                "settle_p50_ms": pct(settle, 50) * 1e3, "settle_p99_ms": pct(settle, 99) * 1e3}

    async def accountant_writes(self, core, n):
        """The accountant's own statements with its per-event Python taken out: the same claim
        (``CLAIM_PENDING``), per batch one debit with its multi-row ledger entries
        (``Ledger.post_many``) and the multi-row update of the records (``accounted_update`` rows),
        every event priced once up front instead of rebuilt and priced. What the design asks of the
        database per event; the accountant's rate is bounded by it."""
        await core.ledger.recharge("bench-c0", to_micro("1000000"), "writes-top")
        template = await _stored_row(core, "writes-0")
        price, model = await core.catalog.quote(Usage.from_event(event("writes-0")), None, "bench-chat", "bench-c0")
        rows = [dict(template, id=new_id(), request_id=f"writes-{i}") for i in range(1, n)]
        for k in range(0, len(rows), 2000):
            async with core.db.transaction() as tx:
                await tx.insert_many("accounting_records", rows[k:k + 2000])
        t = time.perf_counter()
        done = 0
        while done < n:
            async with core.db.transaction() as tx:
                claimed = await tx.select(CLAIM_PENDING + tx.skip_locked(), {"n": core.config.accounting.batch_size})
                now = clock.now_text()
                updates = [accounted_update(rec, price, model, now) for rec in claimed]
                entries, _ = await core.ledger.post_many(
                    tx, "bench-c0", [{"amount": -u["amount"], "request_id": rec["request_id"],
                                      "payload_hash": rec["payload_hash"], "ref_type": "accounting_records",
                                      "ref_id": u["id"]} for u, rec in zip(updates, claimed, strict=True)],
                    "usage", must_cover=True, refuse_suspended=True)
                for u, e in zip(updates, entries, strict=True):
                    u["ledger_entry_id"] = e["id"]
                await tx.update_many("accounting_records", updates, keep=UPSERT_ONLY, later=True)
            done += len(claimed)
        return n / (time.perf_counter() - t)

    async def pricing_hit(self, core, n):
        usage = Usage.from_event(event("p"))
        quote = core.catalog.quote
        await quote(usage, None, "bench-chat", "bench-c0")      # warm the caches
        t = time.perf_counter()
        for _ in range(n):
            await quote(usage, None, "bench-chat", "bench-c0")
        return (time.perf_counter() - t) / n * 1e6

    async def http_accounting(self, core_name, n, concurrency, workers=1, batches=0):
        """The standalone server, started by its command in its own process(es), on 127.0.0.1;
        a concurrent aiohttp client in this process. Also the rate of ``health`` (a trivial
        endpoint through the same framework path): the ceiling the framework itself sets; the
        native route of accounting (``/billing_module/fast/accounting``); and ``batches``
        requests of 1,000 events each through ``accounting_batch`` from 4 concurrent clients."""
        import subprocess

        import aiohttp
        core = await self.fresh_core(core_name)
        await core.ledger.recharge("bench-c0", to_micro("1000000"), "http-top")
        key, _ = await core.apikeys.create("admin")
        desc = core.db.desc
        await core.close()
        env = dict(os.environ, BILLING_SERVER_LOG_FILE="", BILLING_SERVER_LOG_LEVEL="warning")
        if self.dialect == "mysql":
            kw = desc["kwargs"]
            env.update(BILLING_DATABASE_DRIVER="mysql", BILLING_DATABASE_HOST=kw["host"],
                       BILLING_DATABASE_PORT=str(kw["port"]), BILLING_DATABASE_USER=kw["user"],
                       BILLING_DATABASE_PASSWORD=kw.get("plain_password", ""), BILLING_DATABASE_NAME=kw["db"])
        else:
            env["BILLING_DATABASE_PATH"] = desc["kwargs"]["dbname"]
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "billing_module.cli", "serve", "--port", str(port),
                                 "--workers", str(workers), "--data-dir", os.path.join(self.tmp, core_name)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        base = f"http://127.0.0.1:{port}/billing_module/api"
        out = {}
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
                for _ in range(300):
                    try:
                        async with session.get(f"{base}/health.dspy") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                fast = base.removesuffix("/api") + "/fast/accounting"
                for label, method, url, make in (
                        ("health", "GET", f"{base}/health.dspy", lambda i: None),
                        ("http", "POST", f"{base}/accounting.dspy", lambda i: event(f"http-{i}")),
                        ("http_native", "POST", fast, lambda i: event(f"native-{i}"))):
                    latencies: list[float] = []
                    errors = 0
                    queue = iter(range(n))

                    # awaited within this iteration; the defaults only make that visible
                    async def client(queue=queue, method=method, url=url, make=make, latencies=latencies):
                        nonlocal errors
                        for i in queue:
                            t0 = time.perf_counter()
                            async with session.request(method, url, json=make(i)) as r:
                                await r.read()
                                errors += r.status != 200
                            latencies.append(time.perf_counter() - t0)
                    t = time.perf_counter()
                    await asyncio.gather(*[client() for _ in range(concurrency)])
                    elapsed = time.perf_counter() - t
                    out.update({f"{label}_rps": n / elapsed, f"{label}_p50_ms": pct(latencies, 50) * 1e3,
                                f"{label}_p99_ms": pct(latencies, 99) * 1e3, f"{label}_errors": errors})
                if batches:
                    # the targeted figure on the route the module registers for high-volume callers
                    # (api/native.py); the same endpoint through ahserver's .dspy path beside it
                    native = await _http_batches(session, fast + "_batch", batches, "batch")
                    dspy = await _http_batches(session, f"{base}/accounting_batch.dspy", batches, "batch-dspy")
                    out.update(http_batch_eps=native["eps"], http_batch_errors=native["errors"],
                               http_batch_dspy_eps=dspy["eps"], http_batch_dspy_errors=dspy["errors"])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        out["http_workers"] = workers
        return out

    async def growth(self, sizes, samples):
        """post_usage and failed_accounting_list latency with N existing records."""
        out = {}
        core = await self.fresh_core("growth")
        await core.ledger.recharge("bench-c0", to_micro("10000000"), "growth-top")
        have = 0
        try:
            for size in sizes:
                await self._fill(core, have, size)
                have = size
                post = []
                for i in range(samples):
                    t0 = time.perf_counter()
                    await core.accounting.post_usage(event(f"g{size}-{i}"))
                    post.append(time.perf_counter() - t0)
                lst = []
                for i in range(max(5, samples // 10)):
                    t0 = time.perf_counter()
                    await core.failures.search(customer_id=f"bench-c{i % 10}", handled="0", page=1, rows=20)
                    lst.append(time.perf_counter() - t0)
                out[size] = {"post_p50_ms": pct(post, 50) * 1e3, "list_p50_ms": pct(lst, 50) * 1e3}
        finally:
            await core.close()
        return out

    async def _fill(self, core, start, end):
        """Bulk-insert accounted records (and a failed row per 100) without going through the API:
        one template row, varied in id, request, customer and day."""
        template = dict(await _stored_row(core, "fill-template"), status="accounted")
        chunk = 5000
        for k in range(start, end, chunk):
            recs, failed = [], []
            for i in range(k, min(end, k + chunk)):
                use_time = f"2026-{1 + i % 11:02d}-{1 + i % 28:02d} 10:00:00"
                row = dict(template, id=new_id(), request_id=f"fill-{i}", customer_id=f"bench-c{i % 10}",
                           use_time=use_time)
                recs.append(row)
                if i % 100 == 0:
                    failed.append({"id": new_id(), "llmusageid": row["id"], "llmid": "bench-llm", "userid": None,
                                   "userorgid": row["customer_id"], "use_date": use_time[:10],
                                   "use_time": use_time, "amount": 0, "cost": 0, "failed_reason": "bench",
                                   "failed_time": use_time, "retry_count": 0, "handled": "0",
                                   "request_id": row["request_id"], "failure_code": "no_pricing",
                                   "retry_state": "exhausted"})
            async with core.db.transaction() as tx:
                await tx.insert_many("accounting_records", recs)
                await tx.insert_many("llmusage_accounting_failed", failed)


async def _stored_row(core, request_id, customer="bench-c0"):
    """An accounting_records row exactly as the module writes it, got through its public API (the
    event submitted, the stored record read back), to copy for bulk inserts."""
    await core.accounting.submit_usage(event(request_id, customer=customer))
    return dict(await core.accounting.record(request_id=request_id))


async def _http_batches(session, url, batches, prefix, size=1000, clients=4):
    """Events per second through a batch endpoint: ``batches`` requests of ``size`` events. The
    bodies are encoded before the clock starts (a gateway has its events serialised already); the
    clients decode every reply and count a request whose events were not all accounted as an error."""
    bodies = [orjson.dumps({"events": [event(f"{prefix}-{b}-{i}") for i in range(size)]}) for b in range(batches)]
    queue, errors = iter(bodies), 0

    async def client():
        nonlocal errors
        for body in queue:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                reply = orjson.loads(await r.read())
                errors += r.status != 200 or reply.get("counts", {}).get("accounted") != size
    t = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return {"eps": batches * size / (time.perf_counter() - t), "errors": errors}


async def _timed(one, indices, workers):
    """Seconds for ``one(i)`` over ``indices``, ``workers`` callers at a time."""
    queue = iter(indices)

    async def worker():
        for i in queue:
            await one(i)
    t = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(workers)])
    return time.perf_counter() - t


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mysql_params(url):
    import urllib.parse
    u = urllib.parse.urlparse(url)
    return dict(host=u.hostname or "127.0.0.1", port=u.port or 3306, user=u.username or "root",
                password=urllib.parse.unquote(u.password or ""))


SCALES = {
    # name: (floor/post_usage events, accountant events, auth pairs, pricing calls, http requests,
    #        growth sizes, samples)
    "quick": (500, 5000, 300, 20000, 1000, (0, 10_000), 100),
    "full": (3000, 50000, 2000, 200000, 5000, (0, 100_000, 1_000_000), 300),
}
HTTP_BATCHES = {"quick": 20, "full": 100}    # accounting_batch requests of 1,000 events

# (figure, "min" or "max", target on SQLite, target on MariaDB): what ``--check`` holds a run to
TARGETS = [
    ("post_usage_vs_floor_1", "min", 0.5, 0.5),
    ("post_usage_vs_floor_8", "min", 1.0, 0.5),
    ("accountant_vs_floor_batch", "min", 0.5, 0.5),
    ("http_batch_eps", "min", 10_000, None),
    ("http_batch_vs_accountant", "min", 0.5, 0.5),
    ("http_native_vs_health", "min", 1.5, 1.5),
    ("pricing_hit_us", "max", 5.0, 5.0),
    ("post_growth_ratio", "max", 1.5, 1.5),
    ("list_growth_ratio", "max", 1.5, 1.5),
]


def check(all_results):
    """Print every targeted figure against its target; the list of those missed."""
    missed = []
    for dialect, r in all_results.items():
        for name, kind, sqlite_target, mysql_target in TARGETS:
            target = sqlite_target if dialect == "sqlite" else mysql_target
            if target is None:
                continue
            if name not in r:
                print(f"  check {dialect:6} {name:28} not measured (skipped)")
                continue
            ok = r[name] >= target if kind == "min" else r[name] <= target
            op = ">=" if kind == "min" else "<="
            verdict = "ok" if ok else "MISSED"
            print(f"  check {dialect:6} {name:28} {_fmt(r[name]):>10} {op} {_fmt(target):<8} {verdict}")
            if not ok:
                missed.append((dialect, name))
    return missed


async def settled(aw):
    """``aw`` awaited after a full collection, so that the garbage of the figure before is not
    collected on this one's clock (pyperf does the same; the server tunes its collector itself)."""
    gc.collect()
    return await aw


async def _round(b, n, n_acc, n_auth, n_price, n_http, skip, workers, k):
    """One round of every timed figure (``k``: the round, for fresh names), raw."""
    r = {}
    core = await b.fresh_core(f"main{k}")
    try:
        for w in (1, 8):
            floor, charge = await settled(b.floor_and_charge(core, n, w))
            r[f"floor_tps_{w}"], r[f"post_usage_tps_{w}"] = floor, charge
            r[f"post_usage_vs_floor_{w}"] = charge / floor     # within the round: see floor_and_charge
        r.update(await settled(b.authorize_settle(core, n_auth)))
        r["pricing_hit_us"] = await settled(b.pricing_hit(core, n_price))
        batch = core.config.accounting.batch_size
        r["floor_batch_rows_per_s"] = await settled(b.floor_batch(core, n_acc, batch))
    finally:
        await core.close()
    core = await b.fresh_core(f"accountant{k}")
    try:
        r["accountant_eps"] = await settled(b.accountant(core, n_acc))
    finally:
        await core.close()
    core = await b.fresh_core(f"writes{k}")
    try:
        r["accountant_writes_eps"] = await settled(b.accountant_writes(core, n_acc))
    finally:
        await core.close()
    if "http" not in skip:
        r.update(await b.http_accounting(f"http{k}", n_http, 32, workers=workers, batches=HTTP_BATCHES[b.scale]))
    return r


def best_of(rounds):
    """Each figure's best over the rounds (a rate's highest, a time's lowest; errors summed), and
    its spread (lowest, highest). Interference from the rest of the machine only ever slows a
    round, so the best is the closest to the code's own speed (timeit's rule); the other ratios
    are then taken between bests (``ratios``). A ratio a round measured in turns is the median of
    the rounds' (a best would pick the round whose turns the machine happened to favour)."""
    best, spread = {}, {}
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        if "_vs_" in name:
            best[name] = statistics.median(values)
        elif name.endswith("_errors"):
            best[name] = sum(values)
        elif name.endswith(("_ms", "_us")):
            best[name] = min(values)
        elif name == "http_workers":
            best[name] = values[0]
        else:
            best[name] = max(values)
        if len(values) > 1 and not name.endswith("_errors") and name != "http_workers":
            spread[name] = (min(values), max(values))
    return best, spread


def ratios(r):
    """The ratios ``--check`` holds to its targets that the rounds do not measure in turns, from
    the best figures they compare."""
    r["accountant_vs_floor_batch"] = r["accountant_eps"] / r["floor_batch_rows_per_s"]
    r["accountant_writes_vs_floor_batch"] = r["accountant_writes_eps"] / r["floor_batch_rows_per_s"]
    if "http_rps" in r:
        r["http_vs_health"] = r["http_rps"] / r["health_rps"]
        r["http_native_vs_health"] = r["http_native_rps"] / r["health_rps"]
        r["http_batch_vs_accountant"] = r["http_batch_eps"] / r["accountant_eps"]


async def run_one(dialect, scale, mysql_url, skip=(), workers=1, only_growth=False, rounds=3):
    """Every figure of one database: ``(figures, spreads)``."""
    n, n_acc, n_auth, n_price, n_http, sizes, samples = SCALES[scale]
    b = Bench(dialect, scale, mysql_url)
    r: dict = {}
    spread: dict = {}
    try:
        if not only_growth:
            measured = [await _round(b, n, n_acc, n_auth, n_price, n_http, skip, workers, k) for k in range(rounds)]
            r, spread = best_of(measured)
            ratios(r)
        if "growth" not in skip:
            g = await b.growth(sizes, samples)
            base = g[sizes[0]]
            for size, v in g.items():
                r[f"post_p50_ms@{size}"] = v["post_p50_ms"]
                r[f"list_p50_ms@{size}"] = v["list_p50_ms"]
            top = g[sizes[-1]]
            r["post_growth_ratio"] = top["post_p50_ms"] / base["post_p50_ms"]
            r["list_growth_ratio"] = top["list_p50_ms"] / base["list_p50_ms"]
    finally:
        b.cleanup()
    return r, spread


def _delayed(url, delay_ms):
    """(the proxy process, the URL that reaches ``url``'s server through it)."""
    import subprocess
    import urllib.parse
    params = _mysql_params(url)
    proxy = subprocess.Popen([sys.executable, "-m", "billing_module.tools.delay_proxy",
                              "--target", f"{params['host']}:{params['port']}", "--delay-ms", str(delay_ms)],
                             stdout=subprocess.PIPE, text=True)
    line = proxy.stdout.readline().strip() if proxy.stdout else ""
    if not line.startswith("listening on "):
        proxy.kill()
        raise SystemExit(f"the delay proxy did not start: {line!r}")
    u = urllib.parse.urlparse(url)
    netloc = u.netloc.rpartition("@")[0] + "@" if "@" in u.netloc else ""
    return proxy, urllib.parse.urlunparse(u._replace(netloc=netloc + line.removeprefix("listening on ")))


def _round_trip_ms(url, n=200):
    """The median time of a ``select 1`` on one connection: what one wait for MySQL costs."""
    conn = pymysql.connect(**_mysql_params(url))
    try:
        times = []
        with conn.cursor() as c:
            for _ in range(n):
                t = time.perf_counter()
                c.execute("select 1")
                c.fetchall()
                times.append((time.perf_counter() - t) * 1e3)
        return pct(times, 50)
    finally:
        conn.close()


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv=None):
    p = argparse.ArgumentParser(prog="billing-module bench")
    p.add_argument("--db", choices=["sqlite", "mysql", "both"], default="sqlite")
    p.add_argument("--mysql", default=os.environ.get("BILLING_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test"))
    p.add_argument("--scale", choices=list(SCALES), default="quick")
    p.add_argument("--skip", action="append", default=[], choices=["http", "growth"])
    p.add_argument("--only-growth", action="store_true", help="only the growth figures (the long part of --scale full)")
    p.add_argument("--workers", type=int, default=1, help="server processes for the HTTP figure")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of the timed figures; each figure is its best round (see best_of)")
    p.add_argument("--record", metavar="FILE", help="append the figures to this markdown file (BENCHMARKS.md)")
    p.add_argument("--check", action="store_true",
                   help="print each targeted figure with its target; exit 1 when one is missed")
    p.add_argument("--mysql-delay-ms", type=float, default=0.0,
                   help="reach MySQL through a proxy that holds each chunk this long, one way (a database "
                        "across a network; tools/delay_proxy.py); the measured round trip is reported")
    args = p.parse_args(argv)
    command = "billing-module bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    dialects = ["sqlite", "mysql"] if args.db == "both" else [args.db]
    all_results, spreads = {}, {}
    proxy = None
    mysql_url = args.mysql
    if args.mysql_delay_ms and "mysql" in dialects:
        proxy, mysql_url = _delayed(args.mysql, args.mysql_delay_ms)
    try:
        for d in dialects:
            r, spread = asyncio.run(run_one(d, args.scale, mysql_url, skip=args.skip, workers=args.workers,
                                            only_growth=args.only_growth, rounds=max(1, args.rounds)))
            if d == "mysql":
                r["round_trip_ms"] = _round_trip_ms(mysql_url)
            all_results[d] = r
            spreads[d] = spread
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
    for d in dialects:
        r, spread = all_results[d], spreads[d]
        print(f"== {d} ({args.scale}, best of {max(1, args.rounds)} rounds, a ratio measured in turns the "
              "rounds' median; the rounds' spread beside it)")
        for k, v in r.items():
            lo_hi = f"   ({_fmt(spread[k][0])} .. {_fmt(spread[k][1])})" if k in spread else ""
            print(f"  {k:28} {_fmt(v):>10}{lo_hi}")
    if args.record:
        with open(args.record, "a", encoding="utf-8") as f:
            stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            for d, r in all_results.items():
                f.write(f"\n### {stamp}: {d}, scale {args.scale}\n\n`{command}`\n\n")
                f.write("| figure | best (a ratio in turns: median) | rounds' spread |\n|---|---|---|\n")
                for k, v in r.items():
                    lo_hi = spreads[d].get(k)
                    f.write(f"| {k} | {_fmt(v)} | {f'{_fmt(lo_hi[0])} .. {_fmt(lo_hi[1])}' if lo_hi else ''} |\n")
    missed = []
    if args.check:
        print("== targets")
        missed = check(all_results)
        print(f"  {len(missed)} missed" if missed else "  every target met")
    # the last line stays the JSON of every figure
    print(json.dumps({d: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                      for d, r in all_results.items()}))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
