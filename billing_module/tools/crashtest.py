"""Crash test: the standalone server under concurrent accounting load, killed with SIGKILL at
random moments, restarted, with clients retrying whatever was not acknowledged.

Afterwards every acknowledged event must be accounted exactly once, no retry may have charged
twice, nothing may be left pending, and the books must reconcile.

A run works for a customer of its own (``crash-<run id>``, request ids ``crash-<run id>-<n>``) and
checks only that customer's records, ledger entries, balance and reconcile line, so it can run on a
database that already holds other data (another run's, a demo's, production-shaped test data).

    billing-module crashtest --data-dir /tmp/crash --rounds 10 --clients 16
"""
import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time

import aiohttp

from ..config import load_config
from ..core import BillingCore
from ..money import from_micro, to_micro

PROGRAM = {"id": "crash-pp", "name": "crash", "currency": "CNY",
           "versions": [{"id": "crash-v1", "enabled_date": "2000-01-01", "expired_date": "9999-12-31",
                         "pricing_data": {"pricings": [
                             {"price_factors": "input_tokens", "unit_prices": "3.0", "unit": "M",
                              "filters": [{"model": "crash-chat"}]}]}}]}
MODEL = {"id": "crash-llm", "name": "crash-chat", "ppid": "crash-pp"}
PRICE = to_micro("0.003")            # 1,000 input tokens x 3.0 / 1e6
START_BALANCE = to_micro("100000")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _event(request_id, customer):
    return {"request_id": request_id, "customer_id": customer, "model_name": "crash-chat",
            "input_tokens": 1000, "use_time": "2026-11-22 12:00:00"}


async def _prepare(cfg, data_dir, customer):
    core = BillingCore(config=cfg, data_dir=data_dir)
    try:
        await core.create_schema()
        await core.catalog.put("pricing", [PROGRAM])
        await core.catalog.put("llmage", [MODEL])
        await core.ledger.recharge(customer, START_BALANCE, f"{customer}-start")
        key, _ = await core.apikeys.create("admin", name="crash test")
        return key
    finally:
        await core.close()


class Server:
    def __init__(self, data_dir, env):
        self.data_dir, self.env = data_dir, env
        self.port = _free_port()
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/billing_module/api"

    async def start(self, session):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "billing_module.cli", "serve", "--port", str(self.port),
             "--data-dir", self.data_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{self.url}/health.dspy") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} at start")
            await asyncio.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill(self):
        assert self.proc is not None, "the server was started"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        assert self.proc is not None, "the server was started"
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


class Clients:
    """Send events; an event is acknowledged by a 200/202 reply, else it is sent again later
    with the same request_id and payload (what a well-behaved client of a billing API does)."""

    def __init__(self, key, rng, customer, submit_share=0.3):
        self.key, self.rng, self.customer, self.submit_share = key, rng, customer, submit_share
        self.next_id = 0
        self.retry = []            # request ids sent but not acknowledged
        self.acked = {}            # request id -> "accounting" | "accounting_submit"
        self.sent = 0
        self.statuses = {}
        self.route = {}            # a request id always goes to the same endpoint

    def _take(self, allow_new):
        if self.retry:
            return self.retry.pop()
        if not allow_new:
            return None
        self.next_id += 1
        rid = f"{self.customer}-{self.next_id}"
        self.route[rid] = "accounting_submit" if self.rng.random() < self.submit_share else "accounting"
        return rid

    async def run(self, session, url, stop, allow_new=True):
        while not stop.is_set():
            rid = self._take(allow_new)
            if rid is None:
                return
            endpoint = self.route[rid]
            self.sent += 1
            try:
                async with session.post(f"{url}/{endpoint}.dspy", json=_event(rid, self.customer),
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                    body = await r.json(content_type=None)
                    self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                    if r.status in (200, 202) and body.get("success"):
                        self.acked[rid] = endpoint
                    else:
                        self.retry.append(rid)
                        if r.status >= 500:
                            await asyncio.sleep(0.05)
            except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
                self.retry.append(rid)
                await asyncio.sleep(0.02)


async def run(data_dir, rounds=5, clients=8, min_up=0.3, max_up=1.5, seed=0, env=None, log=print):
    rng = random.Random(seed)
    env = dict(os.environ if env is None else env)
    env.setdefault("BILLING_ACCOUNTING_INTERVAL_SECONDS", "0.05")
    env["BILLING_SERVER_LOG_FILE"] = "server.log"
    env.pop("BILLING_CONFIG", None)
    cfg = load_config(environ=env, overrides={"server": {"data_dir": data_dir}})
    os.makedirs(data_dir, exist_ok=True)
    customer = f"crash-{secrets.token_hex(4)}"
    key = await _prepare(cfg, data_dir, customer)
    load = Clients(key, rng, customer)
    kills = 0
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for n in range(rounds):
            server = Server(data_dir, env)
            await server.start(session)
            stop = asyncio.Event()
            workers = [asyncio.create_task(load.run(session, server.url, stop)) for _ in range(clients)]
            await asyncio.sleep(rng.uniform(min_up, max_up))
            server.kill()                      # mid-request, mid-transaction, mid-batch
            kills += 1
            stop.set()
            await asyncio.gather(*workers)
            log(f"round {n + 1}: killed after {load.sent} sends, {len(load.acked)} acknowledged, "
                f"{len(load.retry)} to retry")
        # a last life: resend everything not acknowledged, let the accountant drain the queue
        server = Server(data_dir, env)
        await server.start(session)
        stop = asyncio.Event()
        while load.retry:
            await asyncio.gather(*[load.run(session, server.url, stop, allow_new=False) for _ in range(clients)])
        await _wait_drained(cfg, data_dir, customer)
        server.stop()
    report = await verify(cfg, data_dir, load)
    report.update(customer=customer, kills=kills, sent=load.sent, statuses=load.statuses)
    return report


async def _wait_drained(cfg, data_dir, customer, seconds=60):
    core = BillingCore(config=cfg, data_dir=data_dir)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            async with core.db.read() as tx:
                if not await tx.scalar("select count(*) as n from accounting_records where status = 'pending' "
                                       "and customer_id = ${c}$", {"c": customer}):
                    return
            await asyncio.sleep(0.1)
    finally:
        await core.close()


async def verify(cfg, data_dir, load):
    """Every acknowledged event accounted once; every event ever sent charged at most once. Only the
    run's own customer is looked at: other customers' data is not this run's to judge."""
    customer = load.customer
    core = BillingCore(config=cfg, data_dir=data_dir)
    try:
        async with core.db.read() as tx:
            records = await tx.select("select request_id, status, amount from accounting_records "
                                      "where customer_id = ${c}$", {"c": customer})
            entries = await tx.select("select request_id, count(*) as n, sum(amount) as total from ledger_entry "
                                      "where entry_type = 'usage' and customer_id = ${c}$ group by request_id",
                                      {"c": customer})
        report = await core.ledger.reconcile()
        balance = await core.ledger.balance(customer)
    finally:
        await core.close()
    by_id = {r.request_id: r for r in records}
    charged = {e.request_id: (int(e.n), int(e.total)) for e in entries}
    problems = []
    for rid in load.acked:
        rec = by_id.get(rid)
        if rec is None or rec.status != "accounted":
            problems.append(f"{rid}: acknowledged but {'missing' if rec is None else rec.status}")
        elif charged.get(rid) != (1, -PRICE):
            problems.append(f"{rid}: ledger {charged.get(rid)}")
    twice = [rid for rid, (n, _) in charged.items() if n != 1]
    problems += [f"{rid}: charged {charged[rid][0]} times" for rid in twice]
    unacked_charged = [rid for rid in charged if rid not in load.acked]
    problems += [f"{rid}: charged but never acknowledged" for rid in unacked_charged]
    expected = START_BALANCE - PRICE * len(charged)
    if to_micro(balance["balance"]) != expected:
        problems.append(f"balance {balance['balance']} != {from_micro(expected)}")
    problems += [f"reconcile: {m}" for m in report["mismatches"] if m.get("customer_id") == customer]
    return {"acknowledged": len(load.acked), "charged": len(charged), "problems": problems,
            "balance": balance["balance"]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="billing-module crashtest")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    report = asyncio.run(run(args.data_dir, rounds=args.rounds, clients=args.clients, seed=args.seed))
    print(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
