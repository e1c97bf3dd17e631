"""``billing-module bench --check``: the targets, judged (the figures themselves are the bench's)."""
def test_bench_check_names_each_missed_target(capsys):
    from billing_module.tools.bench import check
    figures = {"post_usage_vs_floor_1": 0.7, "post_usage_vs_floor_8": 0.9, "pricing_hit_us": 3.0,
               "http_batch_eps": 12000.0}
    assert check({"sqlite": figures, "mysql": dict(figures, http_batch_eps=10.0)}) == [
        ("sqlite", "post_usage_vs_floor_8")]
    out = capsys.readouterr().out
    assert "post_usage_vs_floor_8" in out and "MISSED" in out and "not measured" in out


def test_each_figure_is_its_best_round_and_ratios_in_turns_are_the_rounds_median():
    """A rate's highest round, a time's lowest, errors added up; a ratio measured within each
    round (floor and charge in turns) is the median of the rounds', not the ratio of two bests
    that may come from different rounds; the other ratios are between bests."""
    from billing_module.tools.bench import best_of, ratios
    rounds = [{"floor_tps_1": 100.0, "post_usage_tps_1": 60.0, "post_usage_vs_floor_1": 0.6,
               "floor_batch_rows_per_s": 1000.0, "accountant_eps": 400.0, "accountant_writes_eps": 700.0,
               "pricing_hit_us": 5.0, "http_batch_errors": 1},
              {"floor_tps_1": 120.0, "post_usage_tps_1": 50.0, "post_usage_vs_floor_1": 50 / 120,
               "floor_batch_rows_per_s": 900.0, "accountant_eps": 450.0, "accountant_writes_eps": 650.0,
               "pricing_hit_us": 4.0, "http_batch_errors": 2},
              {"floor_tps_1": 90.0, "post_usage_tps_1": 45.0, "post_usage_vs_floor_1": 0.5,
               "floor_batch_rows_per_s": 950.0, "accountant_eps": 420.0, "accountant_writes_eps": 600.0,
               "pricing_hit_us": 4.5, "http_batch_errors": 0}]
    best, spread = best_of(rounds)
    ratios(best)
    assert best["floor_tps_1"] == 120.0 and best["post_usage_tps_1"] == 60.0 and best["pricing_hit_us"] == 4.0
    assert best["http_batch_errors"] == 3 and "http_batch_errors" not in spread
    assert spread["pricing_hit_us"] == (4.0, 5.0)
    assert best["post_usage_vs_floor_1"] == 0.5            # the median round's, not 60 / 120 of the bests
    assert spread["post_usage_vs_floor_1"] == (50 / 120, 0.6)
    assert best["accountant_vs_floor_batch"] == 0.45
    assert "http_batch_vs_accountant" not in best          # no HTTP figures in these rounds


async def test_floor_and_charge_take_turns_and_charge_every_event_once():
    """The paired figure on a real core, 23 of each in 4 uneven turns (5, 6, 6, 6): every one of
    the floor's rows is written and every charge is accounted, once, none left out at a turn's
    edge."""
    from billing_module.tools.bench import Bench
    bench = Bench("sqlite", "quick", None)
    core = await bench.fresh_core("paired")
    try:
        floor, charge = await bench.floor_and_charge(core, 23, 3, slices=4)
        async with core.db.read() as tx:
            rows = await tx.select("select request_id, status from accounting_records")
    finally:
        await core.close()
        bench.cleanup()
    ids = {r["request_id"]: r["status"] for r in rows}
    assert {f"floor-3-{i}" for i in range(23)} <= set(ids)
    assert all(ids[f"w3-{i}"] == "accounted" for i in range(23))
    assert len(ids) == 23 + 23 + 1                         # and the floor's template row
    assert floor > 0 and charge > 0


async def test_the_delay_proxy_forwards_every_byte_in_order_each_hop_held_its_delay():
    """The bench's database "across a network": a real echo server behind the proxy; what comes
    back is what was sent, in order, and no sooner than two hops' delay."""
    import asyncio
    import time

    from billing_module.tools.delay_proxy import serve

    async def echo(reader, writer):
        while data := await reader.read(1000):
            writer.write(data)
            await writer.drain()
        writer.close()
    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = await serve("127.0.0.1", target.sockets[0].getsockname()[1], 0.02)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    sent = b"".join(i.to_bytes(2, "big") for i in range(5000))
    started = time.monotonic()
    writer.write(sent[:7])
    first = await reader.readexactly(7)
    waited = time.monotonic() - started
    for i in range(7, len(sent), 997):
        writer.write(sent[i:i + 997])
    rest = await reader.readexactly(len(sent) - 7)
    writer.close()
    proxy.close()
    target.close()
    assert first + rest == sent
    assert waited >= 0.04


def test_the_bench_reaches_mysql_through_the_proxy(mysql_database):
    """``--mysql-delay-ms``: the URL handed to the figures reaches the same server through the
    proxy, whose round trip is longer by at least its two hops."""
    import pytest

    from billing_module.tools.bench import _delayed, _round_trip_ms
    if mysql_database is None:
        pytest.skip("no MySQL named (BILLING_TEST_MYSQL)")
    import urllib.parse
    secret = f":{urllib.parse.quote(mysql_database['password'])}" if mysql_database.get("password") else ""
    url = f"mysql://{mysql_database['user']}{secret}@{mysql_database['host']}:{mysql_database['port']}"
    proxy, far = _delayed(url, 5)
    try:
        assert far.startswith(f"mysql://{mysql_database['user']}{secret}@127.0.0.1:") and far != url
        assert _round_trip_ms(far, n=5) >= 10          # two hops of 5 ms at least
    finally:
        proxy.terminate()
        proxy.wait()
