"""The module's caches: an entry lives ``ttl`` seconds from when it was stored, the least
recently used goes first when one is full, and a warm quote keeps answering from memory until
its entry's time is up (then the cache tables are read again: another worker's sync shows)."""
from billing_module.cache import MISSING, CacheManager, NamedCache
from billing_module.catalog import Catalog
from billing_module.pricing import Usage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_expires_ttl_seconds_after_it_was_stored():
    clock = Clock()
    c = NamedCache("t", size=10, ttl=30, timer=clock)
    c.put("k", "v")
    clock.now += 29.9
    assert c.get("k") == "v"
    c.put("j", None)                     # a known miss is cached too
    clock.now += 0.1                     # "k" is 30 s old: gone; "j" is not
    assert c.get("k") is MISSING and c.get("j") is None
    assert c.stats() == {"hits": 2, "misses": 1, "size": 1, "maxsize": 10}


async def test_get_or_load_loads_again_once_an_entry_expired():
    clock = Clock()
    c = NamedCache("t", size=10, ttl=5, timer=clock)
    loads = []

    async def loader():
        loads.append(clock.now)
        return len(loads)
    assert [await c.get_or_load("k", loader), await c.get_or_load("k", loader)] == [1, 1]
    clock.now += 5
    assert await c.get_or_load("k", loader) == 2 and loads == [1000.0, 1005.0]


def test_the_least_recently_used_entry_goes_first():
    c = NamedCache("t", size=2, ttl=60, timer=Clock())
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1               # "b" is now the least recently used
    c.put("c", 3)
    assert (c.get("a"), c.get("b"), c.get("c")) == (1, MISSING, 3)


async def test_a_warm_quote_sees_another_workers_price_once_its_entry_expired(core):
    # this worker's catalog, and another's over the same database (``serve --workers``): a sync
    # in the other drops only its own caches
    clock = Clock()
    mine = Catalog(core.db, CacheManager(ttl=300, timer=clock))
    other = Catalog(core.db, CacheManager())
    program = {"id": "pp-ttl", "name": "ttl", "currency": "CNY", "versions": [
        {"id": "v1", "enabled_date": "2026-01-01", "pricing_data": {"pricings": [
            {"price_factors": "input_tokens", "unit_prices": "2.0", "unit": "M"}]}}]}
    await other.put("pricing", [program])
    await other.put("llmage", [{"id": "llm-ttl", "name": "m-ttl", "ppid": "pp-ttl"}])
    usage = Usage("m-ttl", input_tokens=1_000_000)

    async def amount():
        price, _ = await mine.quote(usage, "llm-ttl", None, None)
        return price.amount
    assert await amount() == 2_000_000
    program["versions"][0]["pricing_data"]["pricings"][0]["unit_prices"] = "3.0"
    await other.put("pricing", [program])
    clock.now += 299
    assert await amount() == 2_000_000   # from memory: this worker was not told
    clock.now += 1
    assert await amount() == 3_000_000   # its time was up: read from the cache tables again
