"""Prometheus metrics (text format, ``prometheus_client``), served at ``/billing_module/metrics``.

Two kinds, chosen so that ``serve --workers N`` (N processes, one port) gives one true answer
whichever process the scraper reaches:

- **What happened in a process** (events accounted and failed, accounting latency, cache hits
  and misses) are counters and a histogram. With several workers they are kept in
  ``prometheus_client``'s multiprocess mode: ``serve --workers N`` points
  ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder of the data dir before it starts the workers,
  each writes its own files, and a scrape sums them all. One process keeps them in memory.
- **What the database holds** (accountant queue depth and lag, failed-accounting backlog, sync
  age per entity) are gauges read from the database at scrape time: the same for every process
  and every instance sharing the database, and never stale.
"""
import functools
import os
import shutil
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from . import clock

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

EVENTS_ACCOUNTED = Counter("billing_events_accounted", "Usage events accounted (charged)", ["path"])
EVENTS_FAILED = Counter("billing_events_failed", "Usage events refused or stored as failed, by code",
                        ["path", "code"])
ACCOUNTING_SECONDS = Histogram(
    "billing_accounting_seconds", "Time to account: one post_usage call, or one accountant batch", ["path"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
CACHE_REQUESTS = Counter("billing_cache_requests", "Cache lookups by result (hit or miss)", ["cache", "result"])
WEBHOOK_DELIVERIES = Counter("billing_webhook_deliveries", "Alert webhooks delivered (2xx), by receiver",
                             ["target"])
WEBHOOK_FAILURES = Counter("billing_webhook_failures", "Alert webhook attempts that failed, by receiver and "
                           "outcome (retry: tried again later; gave_up: the delivery is failed)", ["target", "outcome"])

TRANSACTIONS_RUN_AGAIN = Counter(
    "billing_transactions_run_again", "Transactions run again from the start, by why: assumption (a debit "
    "assumed to pass did not: run the careful way), conflict (deadlock, lock timeout, Galera certification), "
    "node (the database node failed or did not answer)", ["why"])


def ran_again(why: str) -> None:
    TRANSACTIONS_RUN_AGAIN.labels(why).inc()


def cache_counters(name: str) -> tuple:
    """(hit counter, miss counter) of one named cache, bound once (the lookup is a hot path)."""
    return CACHE_REQUESTS.labels(name, "hit"), CACHE_REQUESTS.labels(name, "miss")


def accounted(path: str, count: int = 1) -> None:
    if count:
        EVENTS_ACCOUNTED.labels(path).inc(count)


def failed(path: str, code: str) -> None:
    EVENTS_FAILED.labels(path, code).inc()


def webhook_delivered(target: str) -> None:
    WEBHOOK_DELIVERIES.labels(target).inc()


def webhook_failed(target: str, outcome: str) -> None:
    WEBHOOK_FAILURES.labels(target, outcome).inc()


def batch_outcomes(results: list[dict]) -> None:
    """The events of one ``accounting_batch`` call: accounted ones and refusals by code."""
    accounted("batch", sum(1 for result in results if result.get("outcome") == "accounted"))   # one inc
    for result in results:
        if result.get("outcome") == "refused":
            failed("batch", str(result.get("code") or "error"))


def observed(path: str) -> Callable:
    """Decorate an async accounting call: its latency, and it accounted one event or failed with
    a code (``BillingError.code``; anything else is ``error``)."""
    seconds, events = ACCOUNTING_SECONDS.labels(path), EVENTS_ACCOUNTED.labels(path)   # bound once: a hot path

    def wrap(func: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
        @functools.wraps(func)
        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                result = await func(*args, **kwargs)
            except Exception as e:
                failed(path, getattr(e, "code", "error"))
                raise
            finally:
                seconds.observe(time.perf_counter() - started)
            if not (isinstance(result, dict) and result.get("duplicate")):
                events.inc()
            return result
        return timed
    return wrap


def prepare_multiprocess(data_dir: str) -> str:
    """Before starting N workers: a fresh folder for their metric files (a file left by an
    earlier run would be summed in). An operator's own ``PROMETHEUS_MULTIPROC_DIR`` is kept."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        path = os.path.join(data_dir, "prometheus-multiproc")
        shutil.rmtree(path, ignore_errors=True)
        os.environ[MULTIPROC_ENV] = path
    os.makedirs(path, exist_ok=True)
    return path


def render(database_families: list) -> bytes:
    """The scrape: the process metrics (summed over workers in multiprocess mode), then the
    gauges read from the database."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY
        text = generate_latest(REGISTRY)
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Fixed(database_families))
    return text + generate_latest(snapshot)


class _Fixed:
    """A collector of families already computed (from the database, before rendering)."""
    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return iter(self.families)


def gauge(name: str, documentation: str, labels: tuple = (), samples: list | None = None) -> GaugeMetricFamily:
    """A gauge family; ``samples`` is [(label values, value)]."""
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for values, value in samples or []:
        family.add_metric(list(values), value)
    return family


async def database_families(db) -> list:
    """The gauges read from the database at scrape time (see the module docstring)."""
    now = clock.utcnow()
    async with db.read() as tx:
        queue = await tx.one("select count(*) as n, min(created_at) as oldest from accounting_records "
                             "where status = 'pending'", {})
        backlog = await tx.select("select failure_code, retry_state, count(*) as n from llmusage_accounting_failed "
                                  "where handled = '0' group by failure_code, retry_state", {})
        synced = await tx.select("select entity_type, max(last_sync_time) as last from sync_state "
                                 "where last_sync_time is not null group by entity_type", {})
        webhooks = await tx.select("select target, status, count(*) as n from alert_delivery "
                                   "where status <> 'delivered' group by target, status", {})
    lag = _seconds_since(now, queue.oldest) if queue.oldest else 0.0
    return [
        gauge("billing_accountant_queue_depth", "Submitted usage events waiting for the accountant",
              samples=[((), int(queue.n or 0))]),
        gauge("billing_accountant_lag_seconds", "Age of the oldest event waiting for the accountant (0: none)",
              samples=[((), lag)]),
        gauge("billing_failed_accounting_backlog", "Failed accounting not handled yet, by code and retry state",
              ("code", "retry_state"),
              [((r.failure_code or "", r.retry_state or ""), int(r.n)) for r in backlog]),
        gauge("billing_sync_age_seconds", "Seconds since the last successful sync, per entity", ("entity",),
              [((r.entity_type,), _seconds_since(now, r.last)) for r in synced if r.last]),
        gauge("billing_webhook_undelivered", "Alert webhook deliveries not delivered yet, by receiver and status "
              "(pending: waiting for an attempt; failed: gave up)", ("target", "status"),
              [((r.target, r.status), int(r.n)) for r in webhooks]),
    ]


def _seconds_since(now, stored) -> float:
    """``stored`` is a datetime (MySQL) or the module's 'YYYY-MM-DD HH:MM:SS' text (SQLite)."""
    when = stored if hasattr(stored, "year") else clock.parse(str(stored))
    return max(0.0, (now - when.replace(tzinfo=None)).total_seconds())
