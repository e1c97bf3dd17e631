"""Issue 12, items 1 and 13: no event a tenant sends (or a row planted in the queue) stops
accounting for the others, and no event is billed by a model, a currency or a price it does not
have. Each test first reproduces the attack as it was reported."""
import asyncio
import datetime
import json
import os
import subprocess
import sys

import pytest

from billing_module import clock
from billing_module.errors import (
    CurrencyMismatch,
    InsufficientBalance,
    InvalidParam,
    ModelMismatch,
    NoPricing,
    UnpricedFactor,
)
from billing_module.ids import new_id
from tests.conftest import make_config
from tests.helpers import CHAT_A_PRICE, MODELS, PROGRAM, seed_pricing, units, usage

BAD_TIMES = ("0999-12-31 10:00:00", "1999-12-31 23:59:59", "0001-01-01T00:00:00+01:00",
             "9999-12-31T23:00:00-05:00", "2999-01-01 00:00:00")


async def _count(core, sql, ns=None):
    async with core.db.read() as tx:
        return int(await tx.scalar(sql, ns or {}))


async def _record(core, request_id):
    return await core.accounting.record(request_id=request_id)


# --- item 1: times -------------------------------------------------------------------------------
def test_stored_times_always_have_a_four_digit_year():
    assert clock.fmt(datetime.datetime(999, 12, 31, 10, 0, 0)) == "0999-12-31 10:00:00"
    assert clock.fmt(datetime.date(5, 1, 2)) == "0005-01-02 00:00:00"
    assert clock.fmt(datetime.datetime(2026, 1, 2, 3, 4, 5, 678)) == "2026-01-02 03:04:05"


def test_use_time_range_is_checked_and_bounds_come_from_config(tmp_path, fixed_clock):
    times = clock.TimeRange()
    assert times.parse("2000-01-01", "use_time") == "2000-01-01 00:00:00"
    assert times.parse("2026-11-23 12:00:00", "use_time") == "2026-11-23 12:00:00"   # now + 1 day
    for bad in BAD_TIMES + ("2026-11-23 12:00:01",):
        with pytest.raises(InvalidParam):
            times.parse(bad, "use_time")
    cfg = make_config(tmp_path, accounting={"use_time_earliest": "1990-01-01", "use_time_ahead_seconds": 0})
    times = clock.TimeRange.from_config(cfg.accounting)
    assert times.parse("1995-06-01", "use_time") == "1995-06-01 00:00:00"
    with pytest.raises(InvalidParam):
        times.parse("2026-11-22 12:00:01", "use_time")


async def test_out_of_range_use_time_is_a_400_on_every_entry_point(http):
    core = http.core
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    for i, bad in enumerate(BAD_TIMES):
        for path in ("accounting", "accounting_submit", "quote", "authorize"):
            event = usage(f"t{i}-{path}", use_time=bad)
            status, body = await http.post(f"api/{path}.dspy", http.admin_key, json=event)
            assert (status, body["code"]) == (400, "invalid_param"), (path, bad, body)
            assert "use_time" in body["message"]
    assert await _count(core, "select count(*) as n from accounting_records") == 0
    assert await _count(core, "select count(*) as n from billing_hold") == 0
    status, body = await http.post("api/accounting.dspy", http.admin_key, json=usage("ok", use_time="2026-11-22"))
    assert status == 200 and body["use_time"] == "2026-11-22 00:00:00"


async def _plant(core, request_id, customer, use_time, payload):
    """A pending row written around the API, as an attacker with a bug or a bad migration would."""
    now = clock.now_text(-60)      # queued before the honest events
    row = {"id": new_id(), "customer_id": customer, "model_name": "chat-a", "input_tokens": 1000,
           "output_tokens": 500, "total_tokens": 1500, "cached_tokens": 0, "quantity": "0", "amount": 0,
           "currency": "CNY", "request_id": request_id, "status": "pending", "use_time": use_time,
           "payload": payload, "payload_hash": "x", "attempts": 0, "created_at": now, "updated_at": now}
    async with core.db.transaction() as tx:
        await tx.insert("accounting_records", row)


async def _plant_poison(core):
    bad_time = dict(usage("poison-time", customer="mallory"), use_time="999-12-31 10:00:00")
    await _plant(core, "poison-time", "mallory", "999-12-31 10:00:00", json.dumps(bad_time))
    await _plant(core, "poison-json", "mallory", "2026-11-22 10:00:00", "{not json")
    # the event is rebuilt from its payload (never from the columns), so the poison is in the payload
    null_time = dict(usage("poison-null", customer="mallory"), use_time=None)
    await _plant(core, "poison-null", "mallory", None, json.dumps(null_time))


async def test_poison_rows_do_not_stop_the_accountant_for_other_tenants(core):
    await seed_pricing(core)
    for customer in ("cust-1", "cust-2", "mallory"):
        await core.ledger.recharge(customer, units("1"), f"r-{customer}")
    await _plant_poison(core)
    for customer in ("cust-1", "cust-2"):
        for i in range(3):
            await core.accounting.submit_usage(usage(f"{customer}-{i}", customer=customer))
    assert await core.accounting.account_pending() == 6
    for customer in ("cust-1", "cust-2"):
        assert (await core.ledger.balance(customer))["balance"] == "0.982000"   # 1 - 3 x 0.006
    assert (await core.ledger.balance("mallory"))["balance"] == "1.000000"
    failed = await core.failures.search(customer_id="mallory")
    assert sorted(r["request_id"] for r in failed["rows"]) == ["poison-json", "poison-null", "poison-time"]
    assert {r["failure_code"] for r in failed["rows"]} == {"invalid_event"}
    assert {r["retry_state"] for r in failed["rows"]} == {"exhausted"}   # re-reading the bytes cannot help
    for rid in ("poison-time", "poison-json", "poison-null"):
        rec = await _record(core, rid)
        assert (rec.status, rec.error_code) == ("failed", "invalid_event")
    assert await core.accounting.account_pending() == 0      # nothing left behind, nothing crashes


def _cli_env(db_desc, mysql_database):
    env = dict(os.environ)
    if db_desc["driver"] != "billing_sqlite":
        db = mysql_database
        env.update(BILLING_DATABASE_DRIVER="mysql", BILLING_DATABASE_HOST=db["host"],
                   BILLING_DATABASE_PORT=str(db["port"]), BILLING_DATABASE_USER=db["user"],
                   BILLING_DATABASE_PASSWORD=db["password"], BILLING_DATABASE_NAME=db["name"])
    return env


async def test_account_pending_command_survives_poison_rows(core, db_desc, mysql_database, tmp_path):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    await _plant_poison(core)
    await core.accounting.submit_usage(usage("honest"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billing_module.cli", "account-pending", "--data-dir", str(tmp_path),
        env=_cli_env(db_desc, mysql_database), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    assert "accounted 1 pending events" in out.decode()
    assert (await _record(core, "honest")).status == "accounted"
    assert (await _record(core, "poison-json")).status == "failed"


# --- item 13 (a): llmid and model_name disagree --------------------------------------------------------
async def test_llmid_and_model_name_that_disagree_are_refused(http):
    core = http.core
    await seed_pricing(core)      # llm-a is chat-a (tokens); flat-1 costs 1.0 a call
    await core.ledger.recharge("cust-1", units("5"), "r1")
    for path in ("accounting", "accounting_submit", "quote", "authorize"):
        event = usage(f"mm-{path}", model="flat-1", llmid="llm-a")
        status, body = await http.post(f"api/{path}.dspy", http.admin_key, json=event)
        assert (status, body["code"]) == (400, "model_mismatch"), (path, body)
    assert await _count(core, "select count(*) as n from accounting_records") == 0
    assert (await core.ledger.balance("cust-1"))["balance"] == "5.000000"
    status, body = await http.post("api/accounting.dspy", http.admin_key,
                                    json=usage("agree", model="chat-a", llmid="llm-a"))
    assert status == 200 and body["amount"] == CHAT_A_PRICE


async def test_a_queued_event_is_priced_by_its_id_never_by_its_name(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("5"), "r1")
    # the id is not known yet when the event is queued, so the name cannot be checked then
    await core.accounting.submit_usage(usage("later", model="flat-1", llmid="llm-new"))
    await core.catalog.put("llmage", [{"id": "llm-new", "name": "chat-a", "ppid": "pp-chat"}])
    assert await core.accounting.account_pending() == 0
    rec = await _record(core, "later")
    assert (rec.status, rec.error_code) == ("failed", "model_mismatch")
    assert (await core.ledger.balance("cust-1"))["balance"] == "5.000000"
    with pytest.raises(ModelMismatch):
        await core.accounting.post_usage(usage("now", model="flat-1", llmid="llm-a"))


# --- item 13 (b): a price list in another currency than the balance ------------------------------------
USD_PROGRAM = dict(PROGRAM, id="pp-usd", currency="USD")


async def _seed_usd_model(core):
    await seed_pricing(core)
    await core.catalog.put("pricing", [USD_PROGRAM])
    await core.catalog.put("llmage", [dict(MODELS[0], id="llm-usd", ppid="pp-usd")])


async def test_currency_mismatch_is_refused_and_kept_as_failed_on_every_path(core):
    await _seed_usd_model(core)
    for customer in ("cust-1", "cust-2"):
        await core.ledger.recharge(customer, units("1"), f"r-{customer}")   # CNY balances
    usd = {"model": "chat-a", "llmid": "llm-usd"}
    with pytest.raises(CurrencyMismatch):                    # one event alone
        await core.accounting.post_usage(usage("usd-1", **usd))
    # a group: the refused event falls back to one by one, the others are charged
    await core.accounting.post_usage(usage("warm", customer="cust-2"))   # its lookups cached: a group forms
    events = [usage(f"g{i}", customer="cust-2") for i in range(4)]
    events.insert(2, usage("usd-2", **usd))
    results = await asyncio.gather(*[core.accounting.post_usage(e) for e in events], return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["dict", "dict", "CurrencyMismatch", "dict", "dict"]
    await core.accounting.submit_usage(usage("usd-3", **usd))          # the accountant
    assert await core.accounting.account_pending() == 0
    assert (await core.ledger.balance("cust-1"))["balance"] == "1.000000"
    assert (await core.ledger.balance("cust-2"))["balance"] == "0.970000"
    for rid in ("usd-1", "usd-2", "usd-3"):
        rec = await _record(core, rid)
        assert (rec.status, rec.error_code) == ("failed", "currency_mismatch"), rid
    failed = await core.failures.search(customer_id="cust-1")
    assert {r["failure_code"] for r in failed["rows"]} == {"currency_mismatch"} and failed["total"] == 3
    # fixed at the source: the program is republished in the balance's currency, the retry charges
    await core.catalog.put("pricing", [dict(USD_PROGRAM, currency="CNY")])
    for row in failed["rows"]:
        assert (await core.retries.retry(row["id"]))["amount"] == CHAT_A_PRICE
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.982000"


async def test_currency_mismatch_is_named_before_a_short_balance(core):
    """The debit's conditional update checks the currency (no read first): a balance in another
    currency that is also too small is still refused as currency_mismatch, and nothing moves."""
    await _seed_usd_model(core)
    await core.ledger.recharge("cust-1", units("0.000001"), "r1")           # CNY, far too little
    with pytest.raises(CurrencyMismatch):
        await core.accounting.post_usage(usage("usd-short", model="chat-a", llmid="llm-usd"))
    assert (await core.ledger.balance("cust-1"))["balance"] == "0.000001"
    assert (await _record(core, "usd-short")).error_code == "currency_mismatch"
    with pytest.raises(InsufficientBalance):                                 # same currency: short
        await core.accounting.post_usage(usage("cny-short"))


async def test_a_hold_for_an_estimated_event_in_another_currency_is_refused(http):
    core = http.core
    await _seed_usd_model(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    event = dict(usage("hold-usd", llmid="llm-usd"))
    status, body = await http.post("api/authorize.dspy", http.admin_key, json=event)
    assert (status, body["code"]) == (409, "currency_mismatch")
    assert (await core.ledger.balance("cust-1"))["held"] == "0.000000"
    status, body = await http.post("api/authorize.dspy", http.admin_key, json=usage("hold-cny"))
    assert status == 200 and body["amount"] == CHAT_A_PRICE


async def test_demo_prices_under_a_usd_config_are_refused_not_debited(db_desc, tmp_path, mysql_database):
    from billing_module.core import BillingCore
    from billing_module.demo import seed_demo
    from tests.conftest import _mark_ready
    cfg = make_config(tmp_path)
    cfg["currency"] = "USD"      # serve --demo under currency: USD; the demo price list is in CNY
    core = BillingCore(config=cfg, db_desc=db_desc, data_dir=str(tmp_path))
    try:
        await core.create_schema()
        _mark_ready(db_desc, mysql_database)
        await seed_demo(core)
        assert (await core.ledger.balance("demo-acme"))["currency"] == "USD"
        with pytest.raises(CurrencyMismatch):
            await core.accounting.post_usage({"request_id": "d1", "customer_id": "demo-acme",
                                              "model_name": "demo-chat", "input_tokens": 1000})
        assert (await core.ledger.balance("demo-acme"))["balance"] == "100.000000"
    finally:
        await core.close()


# --- item 13 (c): factors without a price ----------------------------------------------------------------
IMAGE_RULE = {"price_factors": "quantity", "quantity_unit": "image", "unit_prices": "0.5", "unit": "image",
              "filters": [{"model": "chat-a"}]}


def _with_image_price():
    version = dict(PROGRAM["versions"][0])
    data = dict(version["pricing_data"], pricings=version["pricing_data"]["pricings"] + [IMAGE_RULE])
    return dict(PROGRAM, versions=[dict(version, pricing_data=data)])


async def test_an_unpriced_factor_is_not_half_charged_but_kept_until_priced(http):
    core = http.core
    await seed_pricing(core)          # chat-a prices tokens only
    await core.ledger.recharge("cust-1", units("5"), "r1")
    event = usage("img-1", quantity="2", unit="image")
    status, body = await http.post("api/accounting.dspy", http.admin_key, json=event)
    assert (status, body["code"], body["unpriced_factors"]) == (404, "unpriced_factor", ["quantity"])
    assert (await core.ledger.balance("cust-1"))["balance"] == "5.000000"
    rec = await _record(core, "img-1")
    assert (rec.status, rec.error_code) == ("failed", "unpriced_factor")
    assert {"factor": "quantity", "unpriced": True} in json.loads(rec.price_lines)
    status, body = await http.post("api/quote.dspy", http.admin_key, json=usage("q", quantity="2", unit="image"))
    assert status == 200 and body["unpriced_factors"] == ["quantity"] and body["amount"] == CHAT_A_PRICE
    status, body = await http.post("api/authorize.dspy", http.admin_key, json=usage("h", quantity="2", unit="image"))
    assert (status, body["code"]) == (404, "unpriced_factor")
    # the accountant and a group refuse it the same way
    await core.accounting.submit_usage(usage("img-2", quantity="1", unit="image"))
    assert await core.accounting.account_pending() == 0
    results = await asyncio.gather(core.accounting.post_usage(usage("tok")),
                                   core.accounting.post_usage(usage("img-3", quantity="1", unit="image")),
                                   return_exceptions=True)
    assert type(results[0]) is dict and isinstance(results[1], UnpricedFactor)
    # the price appears: the retries charge the whole event
    await core.catalog.put("pricing", [_with_image_price()])
    failed = await core.failures.search(customer_id="cust-1")
    assert failed["total"] == 3 and {r["failure_code"] for r in failed["rows"]} == {"unpriced_factor"}
    amounts = sorted([(await core.retries.retry(r["id"]))["amount"] for r in failed["rows"]])
    assert amounts == ["0.506000", "0.506000", "1.006000"]
    assert (await core.ledger.balance("cust-1"))["balance"] == "2.976000"   # 5 - 0.006 - 2 x 0.506 - 1.006


async def test_partial_pricing_when_allowed_lists_what_was_not_charged(core):
    core.config.accounting["allow_partial_pricing"] = True
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    first = await core.accounting.post_usage(usage("p1", quantity="2", unit="image"))
    assert (first["amount"], first["unpriced_factors"]) == (CHAT_A_PRICE, ["quantity"])
    assert [ln["factor"] for ln in first["lines"]] == ["input_tokens", "output_tokens"]
    assert await core.accounting.post_usage(usage("p1", quantity="2", unit="image")) == dict(first, duplicate=True)
    await core.accounting.submit_usage(usage("p2", quantity="1", unit="image"))
    assert await core.accounting.account_pending() == 1
    view = await core.accounting.post_usage(usage("p2", quantity="1", unit="image"))
    assert view["unpriced_factors"] == ["quantity"] and view["duplicate"] is True
    plain = await core.accounting.post_usage(usage("p3"))
    assert plain["unpriced_factors"] == []


def test_legacy_factor_names_on_an_event_are_read_not_dropped():
    from billing_module.pricing import Usage
    u = Usage.from_event({"model_name": "m", "prompt_tokens": 1000, "completion_tokens": "500", "duration": "4"})
    assert (u.input_tokens, u.output_tokens, u.quantity, u.unit) == (1000, 500, 4, "second")
    same = Usage.from_event({"model_name": "m", "prompt_tokens": 1000, "input_tokens": 1000})
    assert same.input_tokens == 1000
    for bad in ({"prompt_tokens": 1000, "input_tokens": 1}, {"duration": 3, "unit": "image"},
                {"completion_tokens": -1}):
        with pytest.raises(InvalidParam):
            Usage.from_event(dict(bad, model_name="m"))


async def test_an_event_with_legacy_token_names_is_charged_not_zero(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    event = {"request_id": "legacy", "customer_id": "cust-1", "model_name": "chat-a",
             "prompt_tokens": 1000, "completion_tokens": 500, "use_time": "2026-11-22 10:00:00"}
    assert (await core.accounting.post_usage(event))["amount"] == CHAT_A_PRICE
    video = dict(event, request_id="legacy-video", model_name="flat-1", duration=4)
    del video["prompt_tokens"], video["completion_tokens"]
    with pytest.raises(UnpricedFactor):     # flat-1 has no per-second price: not silently free
        await core.accounting.post_usage(video)


async def test_a_corrupt_price_list_row_fails_its_own_events_only(core):
    await seed_pricing(core)
    async with core.db.transaction() as tx:     # written around the sync, which validates
        await tx.execute("insert into pricing_cache (id, name, currency, payload, version, cached_at) "
                         "values ('pp-bad', 'bad', 'CNY', '{not json', '1', '2026-11-22 10:00:00')")
    await core.catalog.put("llmage", [{"id": "llm-bad", "name": "bad-model", "ppid": "pp-bad"}])
    for customer in ("cust-1", "cust-2"):
        await core.ledger.recharge(customer, units("1"), f"r-{customer}")
    await core.accounting.submit_usage(usage("bad-q", customer="cust-1", model="bad-model"))
    await core.accounting.submit_usage(usage("good-q", customer="cust-2"))
    assert await core.accounting.account_pending() == 1
    rec = await _record(core, "bad-q")
    assert (rec.status, rec.error_code) == ("failed", "no_pricing")
    with pytest.raises(NoPricing):
        await core.accounting.post_usage(usage("bad-now", customer="cust-1", model="bad-model"))
    assert (await core.ledger.balance("cust-2"))["balance"] == "0.994000"


async def test_an_admin_retry_of_a_poison_row_is_an_answer_not_a_500(http):
    core = http.core
    await seed_pricing(core)
    await core.ledger.recharge("mallory", units("1"), "r1")
    await _plant_poison(core)
    await core.accounting.account_pending()
    failed = await core.failures.search(customer_id="mallory")
    for row in failed["rows"]:
        status, body = await http.post("api/failed_accounting_retry.dspy", http.admin_key, json={"id": row["id"]})
        assert status < 500, body
        assert status == 200 or body["code"] in ("invalid_event", "invalid_param"), body


STORED_TIMES = ["2026-11-22 10:00:00", "2026-11-22 10+05:00", "2026-11-22T10:00:00", "1999-12-31 23:59:59",
                "2000-01-01 00:00:00", "2999-01-01 00:00:00", "2026-02-30 10:00:00", "2026-11-22 24:00:00",
                "2026-11-22 10:00:0Z", " 2026-11-22 10:00:", "2026-11-22 10:00", "", None, 20261122, "x" * 19]


@pytest.mark.parametrize("text", STORED_TIMES)
def test_stored_time_check_gives_the_parser_verdict(text):
    """The accountant's quick re-check of a stored use_time accepts and refuses what parse does."""
    times = clock.TimeRange()
    try:
        times.parse(text, "use_time")
        expected = None
    except InvalidParam as e:
        expected = e.message
    if expected is None:
        times.check_stored(text, "use_time")
    else:
        with pytest.raises(InvalidParam) as refused:
            times.check_stored(text, "use_time")
        assert refused.value.message == expected
