"""Proof runs against a running server, over HTTP only (issue 7).

``soak`` drives any billing_module server (the standalone host, or a host with the module
mounted) with concurrent clients for a bounded time, then proves from the outside that the
books are right:

* no 5xx at all (every reply is counted by endpoint and status);
* no overdraft beyond the rules: after every hold and every usage charge the customer's
  ``available`` (balance - held) is at least ``-credit_limit``, lowered only by what settles of
  delivered usage beyond their hold ("overruns") may take; ``arrears`` only after such a settle;
* every acknowledged request is charged exactly once: the client's own record of acknowledged
  request_ids and amounts equals the customer's ledger entry by entry, to the micro-unit; a
  usage event the server refused but stored (``insufficient_balance``) or whose reply never came
  is either charged exactly once at its price or waits in failed accounting (never lost);
  a submitted (queued) event is charged or waits in failed accounting after the drain;
* the same request_id sent again (later, or concurrently, or after a client-side timeout)
  is answered as a duplicate, never acted on twice; the same key with another payload is 409;
* balance = sum of the ledger for every customer it used, and ``reconcile`` is clean when the
  caller can reach the database (``reconcile=`` in Python, ``--config`` / ``--data-dir`` here).

Each run uses its own customers (``s<seed>-<random>-c<i>``), so it can run against a server
that holds other data. The usage model is the first priced model (``pricing``) whose quote is
positive, or ``model``. The server needs its background accountant for submitted events (the
default of ``billing-module serve``).

    billing-module proof soak --url http://127.0.0.1:9180 --key <admin key> --seconds 120
"""
import argparse
import asyncio
import collections
import json
import os
import random
import secrets
import sys
import time
from typing import Any

import aiohttp

from ..money import from_micro, to_micro

SHAPES = ((1000, 500), (2000, 100), (300, 1200))   # (input_tokens, output_tokens) of the usage events
MAX_ATTEMPTS = 12                                    # per request: timeouts, "send it again" conflicts


class SoakError(Exception):
    """The soak could not start (server unreachable, no priced model...)."""


def _micro(text):
    return to_micro(text, strict=False)


class Soak:
    def __init__(self, base_url, admin_key, seconds=60, clients=8, seed=1, customers=3, model=None,
                 reconcile=None, drain_seconds=30.0, timeout=15.0, max_requests_per_client=100000):
        base = base_url.rstrip("/")
        self.api = base + ("/api/" if base.endswith("/billing_module") else "/billing_module/api/")
        self.admin_key, self.seconds, self.n_clients, self.seed = admin_key, float(seconds), int(clients), seed
        self.n_customers, self.model, self.reconcile = max(1, int(customers)), model, reconcile
        self.drain_seconds, self.timeout = float(drain_seconds), float(timeout)
        self.max_requests = max_requests_per_client
        self.prefix = f"s{seed}-{secrets.token_hex(3)}"
        self.shared = [f"{self.prefix}-c{i}" for i in range(self.n_customers)]
        # each client's own customer takes its concurrent duplicates: nothing else moves its
        # balance meanwhile, so copies of one request must all get the same answer
        self.private = [f"{self.prefix}-p{i}" for i in range(self.n_clients)]
        self.customers = self.shared + self.private
        self.rng = random.Random(seed)
        # what the clients saw
        self.counts = collections.defaultdict(collections.Counter)     # endpoint -> status -> n
        self.expected = {}        # (customer, entry_type, request_id) -> micro: acknowledged
        self.maybe = {}           # (customer, entry_type, request_id) -> micro: sent, stored or unanswered
        self.submitted = {}       # request_id -> (customer, micro): acknowledged submits
        self.stored_failed = {}   # request_id -> (customer, micro): refused usage the server stores as failed
        # (kind, key) -> replies that said "not a duplicate"
        self.new_acks: collections.Counter = collections.Counter()
        self.overrun: collections.Counter = collections.Counter()     # customer -> micro settled beyond holds (sent)
        self.acked: collections.Counter = collections.Counter()
        self.stats: collections.Counter = collections.Counter()
        self.problems = []
        self.acked_log = []       # (kind, body, reply) of acknowledged requests, for resends
        self.price = {}           # (customer, shape) -> micro

    # --- HTTP ----------------------------------------------------------------------------------
    async def _call(self, method, name, body=None, query=None, timeout=None):
        """One request: (status or 'timeout' / 'error', parsed body or None)."""
        url = self.api + name + ".dspy"
        kw: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=timeout or self.timeout)}
        if method == "GET":
            kw["params"] = query or {}
        else:
            kw["json"] = body
        try:
            async with self.session.request(method, url, **kw) as r:
                text = await r.text()
                status = r.status
        except asyncio.TimeoutError:
            self.counts[name]["timeout"] += 1
            return "timeout", None
        except aiohttp.ClientError as e:
            self.counts[name]["error"] += 1
            self.stats["connection_errors"] += 1
            return "error", {"message": str(e)}
        self.counts[name][status] += 1
        try:
            data = json.loads(text)
        except ValueError:
            data = {"raw": text[:200]}
        if status >= 500:
            self.problems.append(f"{name}: status {status}: {text[:300]}")
        return status, data

    async def _answer(self, name, body, first_timeout=None, info=None):
        """Send until a definitive answer: a client-side timeout or a 409 "send it again" is retried
        with the same request. Returns (status, body); status 'unanswered' when none came.
        ``info["resent"]`` tells whether an earlier attempt may have reached the server."""
        for attempt in range(MAX_ATTEMPTS):
            status, data = await self._call("POST", name, body, timeout=first_timeout if attempt == 0 else None)
            if status in ("timeout", "error"):
                self.stats["retries"] += 1
                if info is not None:
                    info["resent"] = True
                continue
            if status == 409 and "again" in (data or {}).get("message", ""):
                self.stats["retries_after_409"] += 1
                await asyncio.sleep(0.005 * (attempt + 1))
                continue
            return status, data
        return "unanswered", None

    def _first_timeout(self, rng):
        """Now and then a client that gives up early (and sends the same request again)."""
        if rng.random() < 0.08:
            self.stats["short_timeouts"] += 1
            return rng.uniform(0.001, 0.03)
        return None

    def _new(self, kind, key, data):
        if not data.get("duplicate"):
            self.new_acks[(kind, key)] += 1

    # --- setup ---------------------------------------------------------------------------------
    async def setup(self):
        status, data = await self._call("GET", "health")
        if status != 200:
            raise SoakError(f"health: {status} {data}")
        status, data = await self._call("GET", "pricing")
        if status != 200:
            raise SoakError(f"pricing: {status} {data}")
        names = ([self.model] if self.model
                 else [r.get("model_name") for r in data.get("rows", []) if r.get("model_name")])
        for name in names:
            status, data = await self._call("POST", "quote", self._event(self.customers[0], "quote", SHAPES[0], name))
            if status == 200 and _micro(data["amount"]) > 0:
                self.model = name
                break
        else:
            raise SoakError(f"no priced model with a positive quote among {names}")
        for c in self.customers:
            for shape in SHAPES:
                status, data = await self._call("POST", "quote", self._event(c, "quote", shape))
                if status != 200 or _micro(data["amount"]) <= 0:
                    raise SoakError(f"quote {c} {shape}: {status} {data}")
                self.price[(c, shape)] = _micro(data["amount"])
        self.unit = max(self.price.values())      # the scale of every amount below
        for i, c in enumerate(self.customers):
            rid, start = f"{c}-start", (20 if c in self.shared else 5) * self.unit
            status, data = await self._answer("recharge", {"customer_id": c, "amount": from_micro(start),
                                                           "request_id": rid})
            if status != 200:
                raise SoakError(f"recharge {c}: {status} {data}")
            self._ack_recharge(c, rid, start, data)
            if i == 0:   # one shared customer lives on credit too
                status, data = await self._call("POST", "account_update",
                                                {"customer_id": c, "credit_limit": from_micro(5 * self.unit)})
                if status != 200:
                    raise SoakError(f"account_update {c}: {status} {data}")

    def _event(self, customer, request_id, shape, model=None):
        return {"request_id": request_id, "customer_id": customer, "model_name": model or self.model,
                "input_tokens": shape[0], "output_tokens": shape[1]}

    # --- acknowledgements ------------------------------------------------------------------------
    def _ack_recharge(self, customer, rid, amount, data):
        self.expected[(customer, "recharge", rid)] = amount
        self.acked["recharge"] += 1
        self._new("recharge", rid, data)
        if _micro(data.get("amount", "0")) != amount:
            self.problems.append(f"recharge {rid}: replied amount {data.get('amount')}, sent {from_micro(amount)}")

    # --- one client --------------------------------------------------------------------------------
    async def client(self, i, deadline):
        rng = random.Random(f"{self.seed}-{i}")
        holds: list[tuple[str, str, int]] = []          # (customer, request_id, amount) of open holds
        n = 0
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and n < self.max_requests:
            n += 1
            c = self.private[i] if rng.random() < 0.3 else rng.choice(self.shared)
            r = rng.random()
            tag = f"{self.prefix}-{i}-{n}"
            if r < 0.15:
                await self.op_recharge(rng, c, tag)
            elif r < 0.40:
                await self.op_usage(rng, c, tag)
            elif r < 0.50:
                await self.op_submit(rng, c, tag)
            elif r < 0.72:
                await self.op_hold(rng, c, tag, holds)
            elif r < 0.85 and holds:
                await self.op_close(rng, holds.pop(rng.randrange(len(holds))))
            elif r < 0.92:
                await self.op_concurrent_duplicates(rng, self.private[i], tag, holds)
            elif r < 0.97:
                await self.op_resend(rng)
            else:
                await self.op_conflict(rng)
        for hold in holds:       # the run leaves no hold open
            await self.op_close(rng, hold, release=True)

    async def op_recharge(self, rng, c, tag):
        amount = rng.choice((1, 2, 4)) * self.unit
        body = {"customer_id": c, "amount": from_micro(amount), "request_id": f"{tag}-rc"}
        status, data = await self._answer("recharge", body, self._first_timeout(rng))
        if status == 200:
            self._ack_recharge(c, body["request_id"], amount, data)
            self.acked_log.append(("recharge", body, data))
        elif status == "unanswered":
            self.maybe[(c, "recharge", body["request_id"])] = amount
        else:
            self.problems.append(f"recharge {body['request_id']}: {status} {data}")

    def _usage_body(self, rng, c, rid):
        shape = rng.choice(SHAPES)
        return self._event(c, rid, shape), self.price[(c, shape)]

    def _usage_reply(self, c, body, price, status, data, name="accounting"):
        rid = body["request_id"]
        if status == 200:
            self.acked["accounting"] += 1
            self._new("usage", rid, data)
            if data.get("status") != "accounted" or _micro(data.get("amount", "0")) != price:
                self.problems.append(f"accounting {rid}: {data.get('status')} {data.get('amount')}, "
                                     f"quoted {from_micro(price)}")
            self.expected[(c, "usage", rid)] = price
            self.acked_log.append(("accounting", body, data))
        elif status == 402 and (data or {}).get("code") == "insufficient_balance":
            self.stats["usage_refused_insufficient"] += 1
            self.stored_failed[rid] = (c, price)       # stored as failed by design; may be charged later
            self.maybe[(c, "usage", rid)] = price
        elif status == "unanswered":
            self.maybe[(c, "usage", rid)] = price
        else:
            self.problems.append(f"{name} {rid}: {status} {data}")

    async def op_usage(self, rng, c, tag):
        body, price = self._usage_body(rng, c, f"{tag}-u")
        status, data = await self._answer("accounting", body, self._first_timeout(rng))
        self._usage_reply(c, body, price, status, data)
        await self.check_balance(c, "usage")

    async def op_submit(self, rng, c, tag):
        body, price = self._usage_body(rng, c, f"{tag}-q")
        status, data = await self._answer("accounting_submit", body, self._first_timeout(rng))
        self._submit_reply(c, body, price, status, data)

    def _submit_reply(self, c, body, price, status, data):
        rid = body["request_id"]
        if status in (200, 202):
            self.acked["accounting_submit"] += 1
            self._new("submit", rid, data)
            if (status == 202) == bool(data.get("duplicate")):
                self.problems.append(f"accounting_submit {rid}: status {status} with duplicate={data.get('duplicate')}")
            self.submitted[rid] = (c, price)
            self.maybe[(c, "usage", rid)] = price
            self.acked_log.append(("accounting_submit", body, data))
        elif status == "unanswered":
            self.maybe[(c, "usage", rid)] = price
        else:
            self.problems.append(f"accounting_submit {rid}: {status} {data}")

    async def op_hold(self, rng, c, tag, holds):
        rid = f"{tag}-h"
        if rng.random() < 0.2:       # hold the price of an estimated event
            shape = rng.choice(SHAPES)
            body, amount = self._event(c, rid, shape), self.price[(c, shape)]
        else:
            amount = rng.choice((1, 3, 6)) * self.unit
            body = {"customer_id": c, "amount": from_micro(amount), "request_id": rid}
        body["ttl_seconds"] = int(min(86400, max(600, 3 * self.seconds + 120)))
        info: dict[str, Any] = {}
        status, data = await self._answer("authorize", body, self._first_timeout(rng), info)
        self._hold_reply(c, body, amount, status, data, holds)
        if status == 402 and info.get("resent"):
            await self._refused_hold_exists(body["request_id"], "after a timed-out first attempt", holds)
        await self.check_balance(c, "authorize")

    async def _refused_hold_exists(self, rid, how, holds):
        """A hold refused with 402 must not exist: releasing it must find nothing (404)."""
        status, data = await self._answer("release", {"request_id": rid})
        holds[:] = [h for h in holds if h[1] != rid]      # released now, if it was there
        if status != 404:
            self.problems.append(f"authorize {rid} was answered 402 insufficient_balance {how}, but the hold "
                                 f"exists (release: {status} {(data or {}).get('status')})")

    def _hold_reply(self, c, body, amount, status, data, holds):
        rid = body["request_id"]
        if status == 200:
            self.acked["authorize"] += 1
            self._new("hold", rid, data)
            if _micro(data.get("amount", "0")) != amount or data.get("status") != "open":
                self.problems.append(f"authorize {rid}: {data.get('status')} {data.get('amount')}, "
                                     f"expected open {from_micro(amount)}")
            if not any(h[1] == rid for h in holds):
                holds.append((c, rid, amount))
            self.acked_log.append(("authorize", body, data))
        elif status == 402 and (data or {}).get("code") == "insufficient_balance":
            self.stats["holds_refused_insufficient"] += 1
        elif status == "unanswered":
            holds.append((c, rid, amount))        # close it at the end whatever became of it
        else:
            self.problems.append(f"authorize {rid}: {status} {data}")

    async def op_close(self, rng, hold, release=False):
        c, rid, amount = hold
        if release or rng.random() < 0.35:
            status, data = await self._answer("release", {"request_id": rid}, self._first_timeout(rng))
            if status == 200:
                self.acked["release"] += 1
                self._new("release", rid, data)
            elif not (status == 404 and release):     # an unanswered authorize may never have held
                self.problems.append(f"release {rid}: {status} {data}")
            return
        if rng.random() < 0.1:     # delivered more than estimated: the settle may go into arrears
            settled = amount + rng.randint(1, self.unit)
            self.overrun[c] += settled - amount
            self.stats["overrun_settles"] += 1
        else:
            settled = rng.randint(0, amount)
        body = {"request_id": rid, "amount": from_micro(settled)}
        status, data = await self._answer("settle", body, self._first_timeout(rng))
        if settled > amount and status == 400 and (data or {}).get("code") == "settle_exceeds_hold":
            # this server refuses overruns (holds.max_settle_over_hold_ratio): settle the hold itself
            self.overrun[c] -= settled - amount
            self.stats["overruns_refused"] += 1
            settled = amount
            body = {"request_id": rid, "amount": from_micro(settled)}
            status, data = await self._answer("settle", body, self._first_timeout(rng))
        if status == 200:
            self.acked["settle"] += 1
            self._new("settle", rid, data)
            self.expected[(c, "settle", rid)] = settled
            if rng.random() < 0.2:      # the same settle again: a replay, not a second charge
                again_status, again = await self._answer("settle", body)
                self.stats["duplicates_sent"] += 1
                if again_status != 200 or not again.get("duplicate"):
                    self.problems.append(f"settle {rid} resent: {again_status} {again}")
        elif status == "unanswered":
            self.maybe[(c, "settle", rid)] = settled
        else:
            self.problems.append(f"settle {rid}: {status} {data}")
        await self.check_balance(c, "settle")

    async def op_concurrent_duplicates(self, rng, c, tag, holds):
        """The same new request 2-4 times at once: exactly one is acted on."""
        kind = rng.choice(("recharge", "accounting", "accounting_submit", "authorize"))
        k = rng.randint(2, 4)
        self.stats["concurrent_duplicate_groups"] += 1
        self.stats["duplicates_sent"] += k - 1
        if kind == "recharge":
            amount = rng.choice((1, 2)) * self.unit
            body = {"customer_id": c, "amount": from_micro(amount), "request_id": f"{tag}-crc"}
        elif kind == "authorize":
            amount = self.unit
            body = {"customer_id": c, "amount": from_micro(amount), "request_id": f"{tag}-ch",
                    "ttl_seconds": int(min(86400, max(600, 3 * self.seconds + 120)))}
        else:
            body, amount = self._usage_body(rng, c, f"{tag}-c{'u' if kind == 'accounting' else 'q'}")
        replies = await asyncio.gather(*(self._answer(kind, body) for _ in range(k)))
        fresh = 0
        for status, data in replies:
            if kind == "recharge":
                if status == 200:
                    fresh += not data.get("duplicate")
                    self._ack_recharge(c, body["request_id"], amount, data)
                else:
                    self.problems.append(f"recharge {body['request_id']} (concurrent): {status} {data}")
            elif kind == "accounting":
                fresh += status == 200 and not data.get("duplicate")
                self._usage_reply(c, body, amount, status, data)
            elif kind == "accounting_submit":
                fresh += status == 202
                self._submit_reply(c, body, amount, status, data)
            else:
                fresh += status == 200 and not data.get("duplicate")
                self._hold_reply(c, body, amount, status, data, holds)
        statuses = [s for s, _ in replies]
        refused = all(s == 402 for s in statuses)
        if fresh != 1 and not refused:
            self.problems.append(f"{kind} {body['request_id']} sent {k} times at once: {fresh} replies said new "
                                 f"({statuses})")
        elif fresh == 1 and any(s == 402 for s in statuses):
            # one copy was acted on, another told it was refused: the same request, two answers
            # (only this client moves this customer's balance, so no recharge came in between)
            self.problems.append(f"{kind} {body['request_id']} sent {k} times at once: acted on once, yet "
                                 f"answered {statuses}")
            if kind == "authorize":
                await self._refused_hold_exists(body["request_id"], "while a copy of it held", holds)
        if kind in ("accounting", "authorize"):
            await self.check_balance(c, kind)

    async def op_resend(self, rng):
        """An acknowledged request again, later: the first result, marked duplicate."""
        if not self.acked_log:
            return
        kind, body, first = rng.choice(self.acked_log)
        self.stats["duplicates_sent"] += 1
        status, data = await self._answer(kind, body)
        if status not in (200, 202) or not data.get("duplicate"):
            self.problems.append(f"{kind} {body['request_id']} resent: {status} {data}")
        elif kind in ("recharge", "accounting") and data.get("amount") != first.get("amount"):
            self.problems.append(f"{kind} {body['request_id']} resent: amount {data.get('amount')}, "
                                 f"first {first.get('amount')}")

    async def op_conflict(self, rng):
        """A used request_id with another payload: 409, and nothing charged."""
        used = [e for e in self.acked_log if e[0] in ("recharge", "accounting")]
        if not used:
            return
        kind, body, _ = rng.choice(used)
        other = dict(body)
        if kind == "recharge":
            other["amount"] = from_micro(_micro(body["amount"]) + self.unit)
        else:
            other["input_tokens"] = body["input_tokens"] + 1
        self.stats["conflict_probes"] += 1
        status, data = await self._answer(kind, other)
        if status != 409 or (data or {}).get("code") != "conflict":
            self.problems.append(f"{kind} {body['request_id']} with another payload: {status} {data}")

    async def check_balance(self, c, after):
        """available >= -credit_limit - overruns sent so far; arrears only after an overrun."""
        status, data = await self._call("GET", "balance", query={"customer_id": c})
        self.stats["balance_checks"] += 1
        if status != 200:
            self.problems.append(f"balance {c}: {status} {data}")
            return
        available, credit = _micro(data["available"]), _micro(data["credit_limit"])
        if available < -credit - self.overrun[c]:
            self.stats["overdraft_violations"] += 1
            self.problems.append(f"overdraft after {after}: {c} available {data['available']}, credit limit "
                                 f"{data['credit_limit']}, overruns settled {from_micro(self.overrun[c])}")
        if data["status"] == "arrears" and not self.overrun[c]:
            self.problems.append(f"{c} in arrears after {after} with no settle beyond its hold")
        if int(_micro(data["held"])) < 0:
            self.problems.append(f"{c}: negative held {data['held']}")

    # --- after the run -------------------------------------------------------------------------------
    async def _pages(self, name, customer):
        rows, page = [], 1
        while True:
            status, data = await self._call("GET", name, query={"customer_id": customer, "page": page, "rows": 500})
            if status != 200:
                raise SoakError(f"{name} {customer}: {status} {data}")
            rows += data["rows"]
            if not data["rows"] or len(rows) >= int(data["total"]):
                return rows
            page += 1

    async def read_books(self):
        """Per customer: (balance reply, ledger rows, failed-accounting rows), read while no
        request of this run is in flight (balance read again until it did not move)."""
        books = {}
        for c in self.customers:
            for _ in range(10):
                _, before = await self._call("GET", "balance", query={"customer_id": c})
                ledger = await self._pages("transactions", c)
                failed = await self._pages("failed_accounting_list", c)
                _, after = await self._call("GET", "balance", query={"customer_id": c})
                if before == after:
                    break
                await asyncio.sleep(0.2)
            books[c] = (after, ledger, failed)
        return books

    async def drain(self):
        """Wait (bounded) until every acknowledged submit is charged or in failed accounting."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.drain_seconds
        while True:
            books = await self.read_books()
            waiting = self._unsettled_submits(books)
            if not waiting or loop.time() >= end:
                return books, waiting
            await asyncio.sleep(0.5)

    def _unsettled_submits(self, books):
        done = set()
        for _, ledger, failed in books.values():
            done |= {e["request_id"] for e in ledger if e["entry_type"] == "usage"}
            done |= {f["request_id"] for f in failed}
        return sorted(set(self.submitted) - done)

    def verify(self, books, waiting=()):
        """Compare the client's record with each customer's ledger. Returns the problems."""
        problems = []
        for rid in waiting:
            problems.append(f"submitted usage {rid} is neither charged nor in failed accounting after the drain")
        self.stats["late_charges"] = self.stats["queued_charged"] = 0
        for c, (bal, ledger, failed) in books.items():
            failed_ids = {f["request_id"] for f in failed if f.get("retry_state") != "resolved"}
            seen: collections.Counter = collections.Counter()
            total = 0
            for e in ledger:
                key = (c, e["entry_type"], e["request_id"])
                amount = _micro(e["amount"])
                total += amount
                seen[key] += 1
                sign = 1 if e["entry_type"] == "recharge" else -1
                want = self.expected.get(key, self.maybe.get(key))
                if want is None:
                    problems.append(f"{c}: ledger entry {e['entry_type']} {e['request_id']} {e['amount']} "
                                    f"matches no request of this run")
                elif amount != sign * want:
                    problems.append(f"{c}: {e['entry_type']} {e['request_id']} charged {e['amount']}, "
                                    f"expected {from_micro(sign * want)}")
                elif key not in self.expected:      # by design: charged after the reply
                    self.stats["queued_charged" if e["request_id"] in self.submitted else "late_charges"] += 1
            for key, n in seen.items():
                if n > 1:
                    problems.append(f"{c}: {key[1]} {key[2]} is in the ledger {n} times")
            expected_total = 0
            for key, want in self.expected.items():
                if key[0] != c:
                    continue
                sign = 1 if key[1] == "recharge" else -1
                expected_total += sign * want
                if not seen[key]:
                    problems.append(f"{c}: acknowledged {key[1]} {key[2]} ({from_micro(want)}) is not in the ledger")
            late = sum((1 if k[1] == "recharge" else -1) * self.maybe[k] for k in seen
                       if k not in self.expected and k in self.maybe)
            for rid, (cust, _) in self.stored_failed.items():
                if cust == c and not seen[(c, "usage", rid)] and rid not in failed_ids:
                    problems.append(f"{c}: usage {rid} refused as insufficient_balance is neither charged nor "
                                    f"waiting in failed accounting (lost)")
            balance = _micro(bal["balance"])
            if balance != total:
                problems.append(f"{c}: balance {bal['balance']} but its ledger sums to {from_micro(total)}")
            if total != expected_total + late:
                problems.append(f"{c}: ledger sums to {from_micro(total)}, the client expects "
                                f"{from_micro(expected_total + late)}")
            if _micro(bal["held"]) != 0:
                problems.append(f"{c}: {bal['held']} still held after every hold was closed")
            if _micro(bal["available"]) < -_micro(bal["credit_limit"]) - self.overrun[c]:
                problems.append(f"{c}: final available {bal['available']} below the credit limit "
                                f"{bal['credit_limit']} and the overruns {from_micro(self.overrun[c])}")
            self.ledger_summary[c] = {"entries": len(ledger), "ledger_sum": from_micro(total),
                                      "expected": from_micro(expected_total + late), "balance": bal["balance"],
                                      "held": bal["held"], "credit_limit": bal["credit_limit"],
                                      "failed_waiting": len(failed_ids)}
        for (kind, key), n in self.new_acks.items():
            if n > 1:
                problems.append(f"{kind} {key} was answered as new {n} times")
        return problems

    # --- the run -------------------------------------------------------------------------------------
    async def run(self):
        started = time.monotonic()
        self.ledger_summary = {}
        limit = max(16, self.n_clients * 4)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.admin_key}"},
                                         connector=aiohttp.TCPConnector(limit=limit)) as self.session:
            await self.setup()
            deadline = asyncio.get_running_loop().time() + self.seconds
            await asyncio.gather(*(self.client(i, deadline) for i in range(self.n_clients)))
            ran = time.monotonic() - started
            books, waiting = await self.drain()
            self.problems += self.verify(books, waiting)
            self.books = books
        reconcile = None
        if self.reconcile is not None:
            reconcile = await self.reconcile()
            if reconcile["mismatches"]:
                self.problems.append(f"reconcile: {reconcile['mismatches'][:5]}")
        return self.report(ran, reconcile)

    def report(self, ran, reconcile):
        requests = {name: dict(sorted(((str(k), v) for k, v in c.items()))) for name, c in sorted(self.counts.items())}
        server_errors = sum(v for c in self.counts.values() for k, v in c.items() if isinstance(k, int) and k >= 500)
        return {
            "ok": not self.problems, "problems": self.problems[:200], "problem_count": len(self.problems),
            "seconds": round(ran, 1), "clients": self.n_clients, "seed": self.seed, "model": self.model,
            "customers": self.customers, "requests": requests,
            "total_requests": sum(sum(c.values()) for c in self.counts.values()), "server_errors": server_errors,
            "acknowledged": dict(self.acked), "stats": dict(self.stats), "ledger": self.ledger_summary,
            "reconcile": None if reconcile is None else {"customers": reconcile["customers"],
                                                         "mismatches": len(reconcile["mismatches"])},
        }


async def soak(base_url, admin_key, seconds, clients, seed, **options):
    """Drive the server at ``base_url`` for ``seconds`` with ``clients`` concurrent clients and
    prove the books (see the module docstring). Returns the report (``report["ok"]``)."""
    return await Soak(base_url, admin_key, seconds=seconds, clients=clients, seed=seed, **options).run()


def format_report(r):
    lines = [f"soak: {r['clients']} clients, {r['seconds']} s, seed {r['seed']}, model {r['model']}, "
             f"{r['total_requests']} requests, {r['server_errors']} server errors"]
    for name, statuses in r["requests"].items():
        lines.append(f"  {name:22} " + "  ".join(f"{k}: {v}" for k, v in statuses.items()))
    lines.append("  acknowledged: " + ", ".join(f"{k} {v}" for k, v in sorted(r["acknowledged"].items())))
    lines.append("  " + ", ".join(f"{k} {v}" for k, v in sorted(r["stats"].items())))
    for c, s in r["ledger"].items():
        lines.append(f"  {c}: {s['entries']} ledger entries, sum {s['ledger_sum']} = expected {s['expected']}, "
                     f"balance {s['balance']}, held {s['held']}, credit {s['credit_limit']}, "
                     f"failed waiting {s['failed_waiting']}")
    lines.append(f"  reconcile: {r['reconcile'] if r['reconcile'] is not None else 'not run (no database access)'}")
    lines += [f"  PROBLEM {p}" for p in r["problems"]]
    lines.append("OK" if r["ok"] else f"FAILED: {r['problem_count']} problems")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------
def add_parser(sub):
    """``billing-module proof soak ...`` (the cli adds this to its subcommands)."""
    p = sub.add_parser("proof", help="prove a running server over HTTP (soak)")
    _add_runs(p)
    return p


def _add_runs(p):
    runs = p.add_subparsers(dest="proof", required=True)
    s = runs.add_parser("soak", help="concurrent clients for a while, then prove the books")
    s.add_argument("--url", default=os.environ.get("BILLING_PROOF_URL", "http://127.0.0.1:9180"),
                   help="the server root (default http://127.0.0.1:9180)")
    s.add_argument("--key", default=os.environ.get("BILLING_PROOF_KEY"), help="an admin API key ($BILLING_PROOF_KEY)")
    s.add_argument("--seconds", type=float, default=60)
    s.add_argument("--clients", type=int, default=8)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--customers", type=int, default=3)
    s.add_argument("--model", help="usage model name (default: the first priced model)")
    s.add_argument("--drain-seconds", type=float, default=30, help="wait for queued usage to be accounted")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--config", help="the server's config: reconcile its database after the run")
    s.add_argument("--data-dir", help="the server's data dir: reconcile its database after the run")


def run(args):
    """Run a parsed ``proof`` command; returns the exit status (0: proven)."""
    if not args.key:
        print("billing-module proof: --key (or $BILLING_PROOF_KEY) is required: an admin API key", file=sys.stderr)
        return 2
    return asyncio.run(_soak_cli(args))


async def _soak_cli(args):
    core = None
    if args.config or args.data_dir:
        from ..cli_options import load_from_args
        from ..core import BillingCore
        cfg, data_dir = load_from_args(args)
        core = BillingCore(config=cfg, data_dir=data_dir)
    try:
        report = await soak(args.url, args.key, args.seconds, args.clients, args.seed, customers=args.customers,
                            model=args.model, drain_seconds=args.drain_seconds,
                            reconcile=core.ledger.reconcile if core is not None else None)
    except SoakError as e:
        print(f"billing-module proof: {e}", file=sys.stderr)
        return 2
    finally:
        if core is not None:
            await core.close()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="billing-module proof",
                                     description="prove a running billing_module server over HTTP")
    _add_runs(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
