"""Issue 18: a session scoped to an organisation. Every endpoint of ``api.HANDLERS`` is called by
each customer caller (page users with customer.admin / customer.user, and a customer API key for
comparison) with another organisation's ids and without them: no reply ever names the other
organisation or its rows, and its books do not move. A platform page user sees both (so the
sweep can fail). Page users from the CLI log in through login.dspy like the admin."""
import subprocess
import sys

import pytest

from billing_module.api import HANDLERS
from billing_module.page_users import PageUsers
from tests.helpers import seed_pricing, usage

OWN, OTHER = "org-alpha", "org-beta7"
SECRET_MARK = "beta7"             # in every id of the other organisation's rows
PASSWORD = "correct horse battery"
# open endpoints that hold no customer's data and change the session itself
SKIPPED = {"admin_login": "the login itself", "admin_logout": "ends the session the sweep runs in"}


async def _seed(core):
    await seed_pricing(core)
    ids = {}
    for org in (OWN, OTHER):
        tag = "a" if org == OWN else SECRET_MARK
        await core.ledger.recharge(org, 50_000_000, f"r-{tag}")
        await core.accounting.post_usage(usage(f"u-{tag}", customer=org))
        hold = await core.ledger.hold(org, 1_000_000, f"h-{tag}")
        ids[org] = {"hold_id": hold["hold_id"], "request_id": f"h-{tag}"}
    # the catalogue is the platform's, shown to every customer: its names carry no mark
    product = await core.products.save_product(code="pack-1", product_name="pack", quantity_unit="call",
                                               included_quantity="10", list_price="3", overage_price="0.5")
    sub = await core.products.subscribe(OTHER, product["product_id"], f"s-{SECRET_MARK}")
    ids[OTHER]["subscription_id"] = sub["subscription_id"]
    await core.products.product_use(OTHER, f"user-{SECRET_MARK}", product["product_id"], 1,
                                    source_ref_table="task", source_ref_id=f"t-{SECRET_MARK}")
    return ids[OTHER]


async def _books(core, org):
    async with core.db.read() as tx:
        entries = await tx.scalar("select count(*) as n from ledger_entry where customer_id = ${c}$", {"c": org})
    return int(entries), await core.ledger.balance(org)


async def _login(http, name):
    r = await http.client.post("/billing_module/login.dspy", data={"username": name, "password": PASSWORD},
                               headers={"Origin": str(http.client.make_url("/")).rstrip("/")})
    assert r.status == 200, await r.text()


async def _sweep(http, headers, other_ids):
    """(endpoint, method, status, body) of every endpoint called with the other organisation's
    ids, then with none."""

    origin = {"Origin": str(http.client.make_url("/")).rstrip("/")}
    aimed = {"customer_id": OTHER, "id": other_ids["hold_id"], "record_id": f"u-{SECRET_MARK}", **other_ids}
    replies = []
    for name, (_, methods, _, _) in sorted(HANDLERS.items()):
        if name in SKIPPED:
            continue
        for params in (aimed, {}):
            for method in methods:
                url = f"/billing_module/api/{name}.dspy"
                if method == "GET":
                    r = await http.client.get(url, params=params, headers=headers)
                else:
                    r = await http.client.post(url, json=params, headers={**headers, **origin})
                replies.append((name, method, r.status, await r.text()))
    return replies


@pytest.mark.parametrize("role", ["customer.admin", "customer.user", "customer key"])
async def test_a_customer_caller_never_sees_another_organisation_on_any_endpoint(http, role):
    core = http.core
    other_ids = await _seed(core)
    headers = {}
    if role == "customer key":
        key, _ = await core.apikeys.create("customer", customer_id=OWN)
        headers = {"Authorization": f"Bearer {key}"}
    else:
        await PageUsers(core.db).add("alice", role, OWN, PASSWORD)
        await _login(http, "alice")
    before = await _books(core, OTHER)
    replies = await _sweep(http, headers, other_ids)
    leaks = [(n, m, s, b[:200]) for n, m, s, b in replies if SECRET_MARK in b]
    assert leaks == []
    assert not [(n, m, s) for n, m, s, b in replies if s >= 500]
    assert await _books(core, OTHER) == before
    # the caller does reach its own organisation
    own = {(n, m): (s, b) for n, m, s, b in await _sweep(http, headers, {"hold_id": "-", "request_id": "-"})}
    assert own[("balance", "GET")][0] == 200 and OWN in own[("balance", "GET")][1]
    assert own[("transactions", "GET")][0] == 200 and "r-a" in own[("transactions", "GET")][1]


async def test_a_platform_page_user_sees_every_organisation(http):
    """The pair of the sweep above: the same calls by an admin page user do show the other
    organisation (the mark the sweep looks for is really there to be found)."""
    core = http.core
    other_ids = await _seed(core)
    await PageUsers(core.db).add("root", "admin", None, PASSWORD)
    await _login(http, "root")
    seen = {n for n, m, s, b in await _sweep(http, {}, other_ids) if SECRET_MARK in b and s == 200}
    assert {"balance", "balances", "transactions", "usage_list", "product_subscriptions"} <= seen


async def test_page_users_from_the_cli_log_in_and_a_disabled_one_is_logged_out(http, tmp_path):
    core = http.core
    await core.ledger.recharge(OWN, 5_000_000, "r-own")
    cli = [sys.executable, "-m", "billing_module.cli", "user"]
    common = ["--data-dir", str(tmp_path)]   # the sqlite file of the db_desc fixture
    if core.db.dialect != "sqlite":
        pytest.skip("the CLI reaches the configured database; the MariaDB run covers the API above")
    added = subprocess.run(cli + ["add", "carol", "--customer", OWN, "--role", "customer.user"] + common,
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    generated = added.stdout.split("password: ")[1].strip()
    piped = subprocess.run(cli + ["passwd", "carol", "--password-stdin"] + common, input=PASSWORD + "\n",
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and "password:" not in piped.stdout
    listed = subprocess.run(cli + ["list"] + common, capture_output=True, text=True, timeout=60).stdout
    assert "carol" in listed and "customer.user" in listed and generated not in listed
    async with core.db.read() as tx:
        stored = await tx.scalar("select password_hash from page_user where name = 'carol'")
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    await _login(http, "carol")
    r = await http.client.get("/billing_module/api/balance.dspy")
    assert r.status == 200 and OWN in await r.text()
    # admin pages stay admin-only; the admin keeps working
    assert (await http.client.get("/billing_module/balances.ui")).status == 403
    assert (await http.client.get("/billing_module/api/balances.dspy")).status == 403
    subprocess.run(cli + ["disable", "carol"] + common, check=True, capture_output=True, timeout=60)
    r = await http.client.get("/billing_module/api/balance.dspy")
    assert r.status == 401
    r = await http.client.post("/billing_module/login.dspy", data={"username": "carol", "password": PASSWORD},
                               headers={"Origin": str(http.client.make_url("/")).rstrip("/")})
    assert r.status == 401


async def _page(http, path, method="GET", **params):
    params = {k: str(v) for k, v in dict(params, _webbricks_="1").items()}
    url = f"/billing_module/{path}"
    if method == "GET":
        r = await http.client.get(url, params=params)
    else:
        r = await http.client.post(url, data=params, headers={"Origin": str(http.client.make_url("/")).rstrip("/")})
    return r.status, await r.text()


async def test_the_customer_area_shows_only_the_users_organisation_and_its_admin_manages_keys(http):
    import json
    core = http.core
    await _seed(core)
    users = PageUsers(core.db)
    await users.add("alice", "customer.admin", OWN, PASSWORD)
    await users.add("bob", "customer.user", OWN, PASSWORD)
    from billing_module import clock
    from billing_module.statements import Statements, month_of, previous_month
    last_month = previous_month(month_of(clock.utcnow(), "UTC"))
    await Statements(core.db, core.config).close(OWN, last_month)
    await _login(http, "alice")
    own_balance = (await core.ledger.balance(OWN))["balance"]
    pages = ["my/index.ui", "my/balance.ui", "my/usage.ui", "my/subscriptions.ui", "my/statements.ui", "my/keys.ui"]
    for path, params in [(p, {}) for p in pages] + [("my/usage.ui", {"part": "summary"}), ("my/keys.ui", {"part": "list"})]:
        status, text = await _page(http, path, **params)
        assert status == 200 and SECRET_MARK not in text, (path, params, text[:300])
        json.loads(text)
    assert own_balance in (await _page(http, "my/balance.ui"))[1]
    assert "records" in (await _page(http, "my/usage.ui", part="summary"))[1]
    assert "my_nav_keys" in (await _page(http, "my/index.ui"))[1]
    assert f"my_statement_csv_{last_month}" in (await _page(http, "my/statements.ui"))[1]
    assert (await _page(http, "balances.ui"))[0] == 403           # the admin pages stay the platform's
    # a key created in the page is shown once, works for the organisation only, and is revoked there
    status, text = await _page(http, "my/keys.ui", "POST", part="create", name="ci")
    key = json.loads(text)["subwidgets"][1]["options"]["text"]
    assert status == 200 and key.startswith("bk_")
    assert key not in (await _page(http, "my/keys.ui", part="list"))[1]
    assert (await http.get("api/balance.dspy", key))[0] == 200
    assert (await http.get("api/balance.dspy", key, customer_id=OTHER))[0] == 403
    prefix = key.split("_")[1]
    listed = (await http.get("api/customer_keys.dspy"))[1]["rows"]
    assert [k["key_prefix"] for k in listed] == [prefix]
    other_key, other_row = await core.apikeys.create("customer", customer_id=OTHER)
    status, text = await _page(http, "my/keys.ui", "POST", part="revoke", key_id=other_row["id"])
    assert "Refused" in text and (await http.get("api/balance.dspy", other_key))[0] == 200
    status, text = await _page(http, "my/keys.ui", "POST", part="revoke", key_id=listed[0]["key_id"])
    assert "Key revoked" in text and (await http.get("api/balance.dspy", key))[0] == 401
    # a customer.user sees the area without the keys, and cannot create one
    await _login(http, "bob")
    assert "my_nav_keys" not in (await _page(http, "my/index.ui"))[1]
    status, text = await _page(http, "my/keys.ui", "POST", part="create", name="x")
    assert "Refused" in text and "customer.admin" in text
