"""Seed data shared by the tests."""
import asyncio

from billing_module.accounting import Accounting
from billing_module.money import to_micro

PROGRAM = {
    "id": "pp-chat", "name": "chat models", "currency": "CNY",
    "versions": [{
        "id": "ppt-2026", "enabled_date": "2026-01-01", "expired_date": "9999-12-31",
        "pricing_data": {
            "unit_values": {"M": 1000000, "second": 1, "image": 1},
            "pricings": [
                # 2.0 per million input tokens, 8.0 per million output: 1,000 in + 500 out = 0.002 + 0.004
                {"price_factors": "input_tokens", "unit_prices": "2.0", "cost_prices": "1.0", "unit": "M",
                 "filters": [{"model": "chat-a"}]},
                {"price_factors": "output_tokens", "unit_prices": "8.0", "cost_prices": "4.0", "unit": "M",
                 "filters": [{"model": "chat-a"}]},
                {"price_factors": "flat", "unit_prices": "1.0", "filters": [{"model": "flat-1"}]},
                # priced per call: its token counts are free, said so (a factor without a rule is unpriced)
                {"price_factors": "input_tokens", "unit_prices": "0", "filters": [{"model": "flat-1"}]},
                {"price_factors": "output_tokens", "unit_prices": "0", "filters": [{"model": "flat-1"}]},
            ],
        },
    }],
}
MODELS = [
    {"id": "llm-a", "name": "chat-a", "ppid": "pp-chat", "ownerid": "0", "providerid": "prov-1"},
    {"id": "llm-flat", "name": "flat-1", "ppid": "pp-chat", "ownerid": "0", "providerid": "prov-1"},
    {"id": "llm-noprice", "name": "no-price", "ppid": "pp-missing"},
]


async def seed_pricing(core):
    await core.catalog.put("pricing", [PROGRAM])
    await core.catalog.put("llmage", MODELS)


def units(text):
    return to_micro(text)


def usage(request_id, customer="cust-1", model="chat-a", **kw):
    event = {"request_id": request_id, "customer_id": customer, "model_name": model,
             "input_tokens": 1000, "output_tokens": 500, "use_time": "2026-11-22 10:00:00"}
    event.update(kw)
    return event


CHAT_A_PRICE = "0.006000"   # 1,000 x 2.0/1e6 + 500 x 8.0/1e6


class _HookOnly:
    """A quota source made of a hook (``accounting.QuotaSource``): it sees the events of the
    customers whose balance row counts a subscription (``mark_subscribed``)."""

    def __init__(self, hook):
        self.quota_hook = hook

    async def release_quota(self, tx, record_id):
        return False

    async def link_ledger(self, tx, record_ids):
        return None


def accounting_with_quota(core, hook):
    """An Accounting on the core's database and services (as services.build_services builds it)
    whose quota hook is ``hook(tx, event, price, record_id)``, for the customers ``mark_subscribed``."""
    return Accounting(core.db, core.config, catalog=core.catalog, ledger=core.ledger, failures=core.failures,
                      quota=_HookOnly(hook))


async def mark_subscribed(core, customer_id):
    """The customer's balance row counts a subscription, as subscribing makes it: its charges go
    to the quota hook first."""
    async with core.db.transaction() as tx:
        await tx.execute("update customer_balance set subscription_count = 1 where id = ${c}$", {"c": customer_id})


def other_node(desc):
    """The same database through the next node of the cluster (unchanged without a cluster): a
    second module instance built with it works on another Galera node."""
    hosts = desc.get("hosts")
    if not hosts or len(hosts) < 2:
        return desc
    return dict(desc, hosts=hosts[1:] + hosts[:1])


class UsageLoad:
    """Clients posting usage events through ``cores`` (client n through ``cores[n % len]``) until
    ``stop``: a 503 (DatabaseUnavailable) is answered by sending the same event again, so every
    acknowledged request_id is known; a caller's 4xx fails the client; ``hang_seconds`` bounds each
    post (a hung post fails the test). After ``stop`` an event still refused is given up."""

    def __init__(self, cores, prefix, hang_seconds=None):
        self.cores, self.prefix, self.hang_seconds = list(cores), prefix, hang_seconds
        self.acknowledged: set[str] = set()
        self.answers = {"ok": 0, "503": 0}
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def start(self, clients):
        self.tasks += [asyncio.create_task(self._client(n)) for n in range(clients)]

    async def _client(self, n):
        from billing_module.errors import BillingError, DatabaseUnavailable
        core, i = self.cores[n % len(self.cores)], 0
        while not self.stop.is_set():
            rid, i = f"{self.prefix}{n}-{i}", i + 1
            while True:
                try:
                    await asyncio.wait_for(core.accounting.post_usage(usage(rid)), self.hang_seconds)
                except DatabaseUnavailable:
                    self.answers["503"] += 1
                    if self.stop.is_set():
                        break
                    await asyncio.sleep(0.05)
                    continue
                except BillingError as e:
                    assert e.status < 500, e
                    raise
                self.acknowledged.add(rid)
                self.answers["ok"] += 1
                break

    async def finish(self, timeout=None):
        """Stop the clients and wait for them (their failures raise here)."""
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout)

    def cancel(self):
        """Stop and cancel every client: a hung post must not outlive its test."""
        self.stop.set()
        for t in self.tasks:
            t.cancel()

    def summary(self):
        return f"{self.answers['ok']} events acknowledged, {self.answers['503']} answers 503"


def runs_again(why: str) -> float:
    """``billing_transactions_run_again_total{why}`` as /metrics reports it (0 before the first)."""
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value("billing_transactions_run_again_total", {"why": why}) or 0
