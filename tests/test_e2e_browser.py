"""The admin console in a real browser (issue 14): the real ``billing-module serve --demo`` on SQLite
with the public bricks (``../shared/vendor/bricks`` or ``$BILLING_BRICKS_DIR``), headless Debian
Chromium driven by selenium with real clicks and typing, as an operator works. After each action the
effect is checked through the API or the database; every page's browser log must be free of
severe errors (a failed request shows there too) except the deliberate ones. One server and one
browser session serve every flow; the flows run in file order. A PNG of every page goes to
``$E2E_SHOTS`` (default ``tests/.e2e-shots``, git-ignored)."""
import asyncio
import csv
import hashlib
import hmac
import http.server
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.central_server import CentralServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRICKS = os.environ.get("BILLING_BRICKS_DIR") or os.path.join(os.path.dirname(REPO), "shared", "vendor", "bricks")
SHOTS = os.environ.get("E2E_SHOTS") or os.path.join(REPO, "tests", ".e2e-shots")
PASSWORD = "e2e-operator-pass"
WAIT_SECONDS = 20

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def _browser_binaries():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    return chromium, driver


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """The module's JSON API with the demo admin key: where each action's effect is checked."""

    def __init__(self, base, key):
        self.base, self.key = base, key

    def call(self, name, method="GET", **params):
        url = f"{self.base}/api/{name}.dspy"
        data = None
        if method == "GET":
            url += "?" + urllib.parse.urlencode(params)
        else:
            data = json.dumps(params).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())


@pytest.fixture(scope="module")
def central():
    """The central platform (tests/central_server.py) on its own event loop in a thread, with users
    to sync, so that "sync now" has something to do."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = CentralServer("e2e-app", "e2e-secret")
    server.put("users", [{"id": "e2e-org", "kind": "org", "name": "E2E Org", "org_type": "customer",
                          "status": "active"}])
    url = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    yield {"BILLING_SYNC_CENTRAL_URL": url, "BILLING_SYNC_APP_KEY": "e2e-app", "BILLING_SYNC_APP_SECRET": "e2e-secret"}
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, central):
    _browser_binaries()
    if not os.path.isdir(BRICKS):
        pytest.skip(f"no bricks at {BRICKS}: set BILLING_BRICKS_DIR to a bricks build or its source folder")
    data_dir = tmp_path_factory.mktemp("e2e")
    port = _free_port()
    # background retries of failed accounting wait an hour: only the operator's "retry now" counts
    # alert webhooks: one attempt each, looked for every second (the alerts flow redelivers by hand)
    env = dict(os.environ, BILLING_SERVER_ADMIN_PASSWORD=PASSWORD, BILLING_ACCOUNTING_RETRY_BASE_SECONDS="3600",
               BILLING_ALERTS_MAX_ATTEMPTS="1", BILLING_ALERTS_DELIVERY_INTERVAL_SECONDS="1", **central)
    env.pop("BILLING_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "billing_module.cli", "serve", "--demo", "--port", str(port),
                             "--data-dir", str(data_dir), "--bricks-dir", BRICKS],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        key = None
        for line in iter(proc.stdout.readline, ""):
            if "demo API key" in line:
                key = line.rsplit(" ", 1)[1].strip()
                break
        assert key, "the server printed no demo key"
        base = f"http://127.0.0.1:{port}/billing_module"
        api = Api(base, key)
        deadline = time.monotonic() + 60
        while True:
            try:
                if api.call("health").get("success"):
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        _seed(api)
        yield {"base": base, "api": api, "db": os.path.join(data_dir, "billing.db"), "root": f"http://127.0.0.1:{port}"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _seed(api):
    """Usage on two days for two customers, and two events that cannot be priced (failed accounting)."""
    events = [("e2e-u1", "demo-acme", "demo-chat", "2026-11-20 10:00:00"),
              ("e2e-u2", "demo-acme", "demo-chat", "2026-11-21 11:00:00"),
              ("e2e-u3", "demo-globex", "demo-chat", "2026-11-21 12:00:00"),
              ("e2e-f1", "demo-acme", "e2e-missing-a", "2026-11-21 13:00:00"),
              ("e2e-f2", "demo-globex", "e2e-missing-b", "2026-11-21 14:00:00")]
    for request_id, customer, model, at in events:
        api.call("accounting", "POST", request_id=request_id, customer_id=customer, model_name=model,
                 input_tokens=100000, output_tokens=20000, use_time=at)
    assert api.call("failed_accounting_list")["total"] == 2


class Console:
    """One browser session; helpers that act as an operator does and read what the page shows."""

    def __init__(self, driver, server):
        self.d, self.base, self.api = driver, server["base"], server["api"]
        self.server = server
        os.makedirs(SHOTS, exist_ok=True)

    def open(self, page):
        self.d.get(f"{self.base}/{page}")
        self.wait(lambda: self.d.execute_script("return typeof bricks_app !== 'undefined' && bricks_app && !!bricks_app.root"),
                  f"{page} did not build")

    def wait(self, condition, what):
        def check(_):
            try:
                return condition()
            except StaleElementReferenceException:
                return False
        return WebDriverWait(self.d, WAIT_SECONDS).until(check, message=what)

    def el(self, css):
        return self.wait(lambda: self.d.find_element(By.CSS_SELECTOR, css), f"no element {css}")

    def click(self, wid):
        self.el(f"#{wid}").click()

    def row_button(self, cell_text, name):
        """The button ``name`` in the grid row that shows ``cell_text`` in one of its cells."""
        xpath = f"//div[normalize-space(text())='{cell_text}']/parent::div/button[@id='{name}']"
        return self.wait(lambda: self.d.find_element(By.XPATH, xpath), f"no {name} button in the row of {cell_text}")

    def type(self, form, name, text):
        field = self.el(f"#{form} [name={name}]")
        field.clear()
        field.send_keys(text)

    def fill(self, form, **values):
        for name, text in values.items():
            self.type(form, name, text)

    def submit(self, form, **values):
        """Fill ``form`` and click its button (``<form>_go``)."""
        self.fill(form, **values)
        self.click(f"{form}_go")

    def select(self, form, name, value):
        Select(self.el(f"#{form} select[name={name}]")).select_by_value(value)

    def text(self, css):
        return self.el(css).text

    def wait_text(self, css, fragment):
        self.wait(lambda: fragment in self.d.find_element(By.CSS_SELECTOR, css).text,
                  f"{css} never showed {fragment!r}")
        return self.d.find_element(By.CSS_SELECTOR, css).text

    def shot(self, name):
        self.d.save_screenshot(os.path.join(SHOTS, f"{name}.png"))

    def severe_logs(self, allowed=()):
        """Severe browser log entries (script errors, failed requests) other than the ``allowed`` ones."""
        return [e["message"] for e in self.d.get_log("browser")
                if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]

    def db(self, sql, *args):
        with sqlite3.connect(f"file:{self.server['db']}?mode=ro", uri=True) as conn:
            return conn.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def console(server):
    chromium, chromedriver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield Console(driver, server)
    finally:
        driver.quit()


@pytest.fixture
def clean_log(console):
    """Each flow starts with an empty browser log and ends without severe entries."""
    console.d.get_log("browser")
    yield
    assert console.severe_logs() == []


def test_login_refuses_a_wrong_password_then_opens_the_console(console):
    c = console
    c.d.get(f"{c.base}/index.ui")          # before logging in, the console leads to the login page
    c.wait(lambda: c.d.current_url.endswith("/login.ui"), "no way to the login page")
    c.open("login.ui")
    c.d.get_log("browser")
    c.fill("billing_login_form", username="admin", password="wrong")
    c.click("billing_login_go")
    c.wait_text("#billing_login_error", "password")
    c.shot("login-refused")
    # the refusal is a deliberate 401 of login.dspy; nothing else may fail
    assert c.severe_logs(allowed=("login.dspy",)) == []
    c.type("billing_login_form", "password", PASSWORD)
    c.click("billing_login_go")
    c.wait(lambda: c.d.current_url.endswith("/index.ui"), "login did not open the console")
    c.wait(lambda: bool(c.d.find_elements(By.CSS_SELECTOR, "#billing_content #fa_page")), "console not built")
    assert c.text("#card_1") and "Unhandled failures" in c.text("#card_2")
    assert c.text("#card_2").split("\n")[1] == "2"
    c.shot("console")
    assert c.severe_logs() == []


def test_menu_navigates(console, clean_log):
    c = console
    c.open("index.ui")
    for nav, page_id in (("nav_balances", "bal_page"), ("nav_products", "prod_page"),
                         ("nav_sync_status", "sync_page"), ("nav_failed_accounting", "fa_page")):
        c.click(nav)
        c.el(f"#billing_content #{page_id}")
    c.click("nav_usage_logs")
    c.el("#billing_content #usage_page")
    c.shot("console-usage-logs")


def test_failed_accounting_filter_retry_and_mark_handled(console, clean_log):
    c = console
    c.open("failed_accounting.ui")
    c.wait_text("#fa_grid", "e2e-missing-a")
    c.submit("fa_filter", customer_id="demo-globex")
    c.wait(lambda: "e2e-missing-a" not in c.text("#fa_grid") and "e2e-missing-b" in c.text("#fa_grid"),
           "the customer filter did not narrow the grid")
    c.shot("failed-accounting")
    before = c.api.call("failed_accounting_list", customer_id="demo-globex")["rows"][0]
    c.row_button("e2e-missing-b", "retry").click()
    outcome = c.wait_text("#fa_result", "Retry accounting")
    after = c.api.call("failed_accounting_list", customer_id="demo-globex")["rows"][0]
    assert after["retry_count"] == before["retry_count"] + 1
    assert after["failed_reason"] in outcome or after["retry_state"] in outcome
    c.row_button("e2e-missing-b", "handle").click()
    c.type("fa_handle_form", "note", "model retired; customer credited by hand")
    c.shot("failed-accounting-handle")
    c.click("fa_handle_go")
    c.wait_text("#fa_result", "Mark handled: done")
    row = c.api.call("failed_accounting_list", customer_id="demo-globex", handled="1")["rows"][0]
    assert row["handled"] == "1" and row["handled_note"] == "model retired; customer credited by hand"
    assert c.api.call("failed_accounting_list", handled="0")["total"] == 1


def test_usage_logs_totals_chart_and_export_match_the_api(console, clean_log):
    c = console
    c.open("usage_logs.ui")
    c.wait_text("#accounting_totals", "records")
    c.submit("ua_filter", customer_id="demo-acme")
    stats = c.api.call("usage_stats", group_by="total", customer_id="demo-acme", status="accounted")["rows"][0]
    c.wait(lambda: c.text("#accounting_total_records") == f"{stats['records']} records", "totals not filtered")
    assert stats["records"] == 2
    assert c.text("#accounting_total_amount") == f"amount {stats['amount']}"
    days = c.api.call("usage_stats", group_by="day", customer_id="demo-acme", status="accounted")["rows"]
    chart = c.text("#accounting_chart")
    for day in days:
        assert day["key"] in chart and f"{day['amount']} ({day['records']} records" in chart
    c.wait(lambda: "demo-globex" not in c.text("#ua_grid") and "demo-acme" in c.text("#ua_grid"), "grid not filtered")
    c.shot("usage-logs")
    # the export button opens the CSV of the filter: catch the URL it opens, fetch it with the session
    c.d.execute_script("window.open = function (url) { window.__opened = url; };")
    c.click("ua_export")
    url = c.wait(lambda: c.d.execute_script("return window.__opened || null"), "export opened nothing")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["customer_id"] == ["demo-acme"] and query["source"] == ["accounting"]
    cookies = "; ".join(f"{k['name']}={k['value']}" for k in c.d.get_cookies())
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Cookie": cookies}), timeout=10) as r:
        rows = list(csv.reader(io.StringIO(r.read().decode("utf-8-sig"))))
    data = [r for r in rows[1:] if r and r[0] != "TOTAL"]
    assert len(data) == stats["records"]


def _balance(c, customer):
    return c.api.call("balance", customer_id=customer)["balance"]


def test_balances_recharge_and_adjust_double_click_charges_once(console, clean_log):
    c = console
    c.open("balances.ui")
    start = _balance(c, "demo-initech")
    c.row_button("demo-initech", "money").click()
    c.wait_text("#bal_forms", "Customer: demo-initech")
    c.type("bal_recharge", "amount", "12.50")
    ActionChains(c.d).double_click(c.el("#bal_recharge_go")).perform()
    c.wait_text("#bal_result", "Recharge: done")
    # one more click on the same form: the same request id comes back as the first recharge
    c.click("bal_recharge_go")
    c.wait(lambda: "duplicate: true" in c.text("#bal_result"), "the second send was not answered as a duplicate")
    recharges = c.db("select count(*) from ledger_entry where customer_id = ? and entry_type = 'recharge'", "demo-initech")
    assert recharges == [(2,)]          # the demo's and this one
    assert float(_balance(c, "demo-initech")) == float(start) + 12.5
    c.submit("bal_adjust", amount="-2.00", reason="goodwill correction")
    c.wait_text("#bal_result", "Adjustment: done")
    assert float(_balance(c, "demo-initech")) == float(start) + 10.5
    c.shot("balances")


def test_a_request_does_not_carry_the_previous_ones_filters(console, clean_log):
    """bricks 2023 keeps one parameter object for every request; the host's page header starts each
    request from its own (without it, the second call below would still filter on arrears)."""
    c = console
    c.open("balances.ui")
    totals = c.d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const url = arguments[0];
        jcall(url, {method: 'GET', params: {status: 'arrears'}})
            .then(first => jcall(url, {method: 'GET', params: {}}).then(second => done([first.total, second.total])));
    """, f"{c.base}/api/balances.dspy")
    assert totals == [0, c.api.call("balances")["total"]] and totals[1] == 3


def _product_id(message):
    m = re.search(r"product_id: (\S+?)(;|$)", message)
    assert m, message
    return m.group(1)


def _create_and_edit_product(c):
    c.open("products.ui")
    c.fill("prod_form", code="e2e-pack", product_name="E2E pack", quantity_unit="token", included_quantity="1000",
           list_price="30.00", period_months="1", overage_price="0.01", price_per="1000")
    c.click("prod_save_go")
    product_id = _product_id(c.wait_text("#prod_result", "Save product: done"))
    assert c.db("select product_name, status from product where id = ?", product_id) == [("E2E pack", "active")]
    # edit: the same form with the product id replaces the product
    c.fill("prod_form", product_id=product_id, product_name="E2E pack plus")
    c.click("prod_save_go")
    c.wait(lambda: c.db("select product_name from product where id = ?", product_id) == [("E2E pack plus",)],
           "the edit did not reach the database")
    c.shot("products")
    return product_id


def _bind_resource(c, product_id):
    c.open("product_resources.ui")
    c.select("pr_bind", "resource_type", "llm")
    c.submit("pr_bind", product_id=product_id, resource_ref_id="demo-llm-chat", resource_name="demo chat")
    c.wait_text("#pr_result", "Bind resource: done")
    bindings = c.api.call("product_bindings", product_id=product_id)["rows"]
    assert [b["resource_ref_id"] for b in bindings] == ["demo-llm-chat"]
    resource_id = bindings[0]["product_resource_id"]
    c.submit("pr_filter", product_id=product_id)
    c.wait_text("#pr_grid", resource_id)
    c.shot("product-resources")
    return resource_id


def _add_edit_disable_supplier(c, product_id, resource_id):
    c.open("product_suppliers.ui")
    c.fill("ps_add", product_resource_id=resource_id, supplier_org_id="sup-e2e", supplier_name="E2E supplier",
           unit_cost="0.000001")
    c.click("ps_add_go")
    c.wait_text("#ps_result", "Add supplier: done")
    assert c.api.call("product_suppliers", product_resource_id=resource_id)["rows"][0]["supplier_org_id"] == "sup-e2e"
    c.submit("ps_filter", product_id=product_id)
    c.row_button("sup-e2e", "edit").click()
    c.submit("ps_edit", priority="5")
    c.wait_text("#ps_result", "Update supplier: done")
    assert c.api.call("product_suppliers", product_resource_id=resource_id)["rows"][0]["priority"] == 5
    c.click("ps_filter_go")
    c.row_button("sup-e2e", "disable").click()
    c.wait_text("#ps_result", "Disable supplier: done")
    rows = c.api.call("product_suppliers", product_resource_id=resource_id, include_disabled="1")["rows"]
    assert str(rows[0]["enabled"]) == "0"
    c.shot("product-suppliers")


def _subscribe(c, customer_id, product_id):
    c.open("product_subscriptions.ui")      # each page load draws a new request id
    c.submit("sub_new", customer_id=customer_id, product_id=product_id, user_id="demo-user-1")


def _check_consumption(c, product_id, resource_id):
    """A use of the product (refused while its only supplier is disabled: no supplier, no sale),
    then the per-product and per-day figures the page shows."""
    refused = c.api.call("product_use", "POST", customer_id="demo-acme", user_id="demo-user-1",
                         product_id=product_id, amount="1500", source_ref_table="e2e", source_ref_id="use-0")
    assert refused["code"] == "no_supplier", refused
    supplier = c.api.call("product_suppliers", product_resource_id=resource_id)["rows"][0]
    assert c.api.call("product_supplier_update", "POST", supplier_id=supplier["supplier_id"], enabled="1")["success"]
    used = c.api.call("product_use", "POST", customer_id="demo-acme", user_id="demo-user-1", product_id=product_id,
                      amount="1500", source_ref_table="e2e", source_ref_id="use-1")
    assert used["success"], used
    c.open("product_consumption.ui")
    per_product = c.api.call("usage_stats", source="product", group_by="product")["rows"]
    text = c.wait_text("#pc_by_product", per_product[0]["amount"])
    assert "E2E pack plus" in text or product_id in text
    per_day = c.api.call("usage_stats", source="product", group_by="day")["rows"]
    assert per_day[0]["key"] in c.text("#pc_by_day") and per_day[0]["amount"] in c.text("#pc_by_day")
    c.shot("product-consumption")


def test_products_create_bind_supply_subscribe_and_cancel(console, clean_log):
    c = console
    product_id = _create_and_edit_product(c)
    resource_id = _bind_resource(c, product_id)
    _add_edit_disable_supplier(c, product_id, resource_id)
    _subscribe(c, "demo-initech", product_id)          # 15.50 left: the 30.00 package does not fit
    refusal = c.wait_text("#sub_result", "Subscribe: refused")
    assert "insufficient" in refusal.lower()
    assert c.api.call("product_subscriptions", customer_id="demo-initech", status="")["total"] == 0
    c.shot("subscription-refused")
    _subscribe(c, "demo-acme", product_id)
    c.wait_text("#sub_result", "Subscribe: done")
    subs = c.api.call("product_subscriptions", customer_id="demo-acme", product_id=product_id)["rows"]
    assert [s["status"] for s in subs] == ["active"]
    _check_consumption(c, product_id, resource_id)
    c.open("product_subscriptions.ui")
    c.submit("sub_filter", customer_id="demo-acme")
    c.row_button("demo-acme", "cancel_now").click()
    c.wait_text("#sub_result", "Cancel subscription: done")
    subs = c.api.call("product_subscriptions", customer_id="demo-acme", product_id=product_id, status="")["rows"]
    assert [s["status"] for s in subs] == ["cancelled"]


def test_budgets_set_list_refuse_and_remove(console, clean_log):
    """An operator sets a daily budget for an organisation on budgets.ui; a charge past it is refused
    (402 budget_exceeded), the grid shows its spend, and an empty limit removes it."""
    c = console
    c.open("budgets.ui")
    # typed into the select, as a keyboard user does: bricks' UiCode reads its value on 'input'
    c.el("#bud_set select[name=period]").send_keys("day")
    c.fill("bud_set", customer_id="demo-globex", limit="0.000002")
    c.click("bud_set_go")
    c.wait_text("#bud_result", "Save budget: done")
    rows = c.api.call("budgets", customer_id="demo-globex")["rows"]
    assert [(r["scope"], r["period"], r["limit"], r["spent"]) for r in rows] == [("org", "day", "0.000002", "0.000000")]
    refused = c.api.call("accounting", "POST", request_id="e2e-budget-1", customer_id="demo-globex",
                         model_name="demo-chat", input_tokens=100000, output_tokens=20000)
    assert refused["code"] == "budget_exceeded" and refused["budget"]["subject_id"] == "demo-globex", refused
    assert c.db("select count(*) from accounting_records where request_id = 'e2e-budget-1'") == [(0,)]
    c.submit("bud_filter", customer_id="demo-globex")
    c.wait_text("#bud_grid", "0.000002")
    c.shot("budgets")
    c.fill("bud_set", customer_id="demo-globex", limit="0")      # zero (or empty) removes it
    c.click("bud_set_go")
    c.wait_text("#bud_result", "removed: true")
    assert c.api.call("budgets", customer_id="demo-globex")["rows"] == []


def test_sync_now_shows_its_outcome(console, clean_log):
    c = console
    c.open("sync_status.ui")
    c.click("sync_now_1")
    outcome = c.wait_text("#sync_result", "Sync now")
    assert "Sync now: done" in outcome, outcome
    entity = c.api.call("sync_status")["entities"][0]
    assert entity["entity"] == "users" and entity["sync_status"] == "success"
    assert "users: success" in outcome
    assert c.db("select name from users_cache where id = 'e2e-org'") == [("E2E Org",)]
    c.shot("sync-status")


@pytest.mark.parametrize("table", ["appcodes", "appcodes_kv", "users_cache", "pricing_cache", "llmage_cache",
                                   "sync_state"])
def test_each_crud_table_shows_its_rows(console, clean_log, table):
    c = console
    c.open(f"tables.ui?table={table}")
    (count,) = c.db(f"select count(*) from {table}")[0]
    assert count > 0
    first = c.db(f"select {'entity_type' if table == 'sync_state' else 'id'} from {table} order by 1")[0][0]
    c.wait_text("#tbl_grid", str(first))
    c.shot(f"table-{table}")


class _Receiver(http.server.BaseHTTPRequestHandler):
    """A customer's webhook receiver: keeps each request's headers and raw body."""
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alerts_page_sets_a_customer_webhook_shows_a_failed_delivery_and_redelivers_it(console, clean_log):
    c = console
    port = _free_port()                    # nothing listens yet: the first delivery fails
    secret = "e2e-customer-webhook-secret"
    balance = c.api.call("balance", customer_id="demo-acme")["balance"]
    c.open("alerts.ui")
    c.click("al_webhook_open")
    c.fill("al_webhook_form", customer_id="demo-acme", url=f"http://127.0.0.1:{port}/hook", secret=secret,
           low_balance_amount=balance)
    c.click("al_webhook_go")
    outcome = c.wait_text("#al_result", "Customer alert webhook")
    assert "done" in outcome and secret not in outcome and "e2e-…" in outcome, outcome
    settings = c.api.call("alert_webhook", customer_id="demo-acme")
    assert settings["url"] == f"http://127.0.0.1:{port}/hook" and settings["low_balance_amount"] == balance
    # the balance goes below the customer's threshold: one alert, its delivery fails (no receiver)
    assert c.api.call("adjust", "POST", customer_id="demo-acme", amount="-1", request_id="e2e-alert-1",
                      reason="alert flow")["success"]
    c.wait(lambda: c.api.call("alerts", customer_id="demo-acme", status="failed")["total"] == 1,
           "the delivery did not fail")
    [alert] = c.api.call("alerts", customer_id="demo-acme")["rows"]
    c.open("index.ui")
    c.wait_text("#card_6", "1 failed")
    c.open("alerts.ui")
    c.select("al_filter", "status", "failed")
    c.click("al_filter_go")
    c.wait_text("#al_grid", alert["id"])
    c.shot("alerts")
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        c.row_button(alert["id"], "redeliver").click()
        c.wait_text("#al_result", "Redeliver alert: done")
        c.wait(lambda: len(_Receiver.received) == 1, "the redelivered alert did not arrive")
    finally:
        receiver.shutdown()
        receiver.server_close()
    headers, body = _Receiver.received[0]
    assert json.loads(body)["id"] == alert["id"] and json.loads(body)["type"] == "low_balance"
    signed = headers["X-Billing-Timestamp"].encode() + b"." + body
    assert hmac.compare_digest(hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest(),
                               headers["X-Billing-Signature"])
    c.wait(lambda: c.api.call("alerts", customer_id="demo-acme")["rows"][0]["status"] == "delivered",
           "the delivery is not marked delivered")


def test_no_page_answers_500(console, server):
    """Every page of the module, as a browser opens it (wrapped in the bricks header), after login."""
    c = console
    cookies = "; ".join(f"{k['name']}={k['value']}" for k in c.d.get_cookies())
    root = os.path.join(REPO, "wwwroot")
    pages = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
                   for f in files if f.endswith(".ui"))
    assert len(pages) > 15
    for page in pages:
        req = urllib.request.Request(f"{server['base']}/{page}", headers={"Cookie": cookies})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
        assert r.status == 200 and "new BricksApp(opts).run();" in body, page


def _previous_month():
    today = time.gmtime()
    return f"{today.tm_year - 1}-12" if today.tm_mon == 1 else f"{today.tm_year}-{today.tm_mon - 1:02d}"


def _fetch_opened(c, click_id):
    """Click a button that opens a download, catch the URL it opens and fetch it with the session."""
    c.d.execute_script("window.__opened = null; window.open = function (url) { window.__opened = url; };")
    c.click(click_id)
    url = c.wait(lambda: c.d.execute_script("return window.__opened || null"), f"{click_id} opened nothing")
    cookies = "; ".join(f"{k['name']}={k['value']}" for k in c.d.get_cookies())
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Cookie": cookies}), timeout=10) as r:
        return url, list(csv.reader(io.StringIO(r.read().decode("utf-8-sig"))))


def test_a_customer_admin_sees_only_its_organisation_exports_usage_and_downloads_last_months_statement(
        console, server):
    """Issue 18: last month has a recharge of demo-acme (a recharge whose entry is dated last month,
    as if it had been made then), the month is closed by the operator's command; the organisation's
    customer.admin (a page user from the CLI) logs in through login.ui and lands in its own area."""
    c, month = console, _previous_month()
    assert c.api.call("recharge", "POST", customer_id="demo-acme", amount="7.25", request_id="e2e-last-month")["success"]
    with sqlite3.connect(server["db"]) as conn:
        conn.execute("update ledger_entry set created_at = ? where request_id = 'e2e-last-month'", (f"{month}-15 10:00:00",))
    cli = [sys.executable, "-m", "billing_module.cli"]
    data_dir = ["--data-dir", os.path.dirname(server["db"])]
    subprocess.run(cli + ["statements", "close", "--month", month] + data_dir, check=True, capture_output=True,
                   timeout=60, cwd=REPO)
    subprocess.run(cli + ["user", "add", "acme-admin", "--customer", "demo-acme", "--role", "customer.admin",
                          "--password-stdin"] + data_dir, input="acme-admin-pass\n", text=True, check=True,
                   capture_output=True, timeout=60, cwd=REPO)
    c.d.delete_all_cookies()
    c.open("login.ui")
    c.d.get_log("browser")
    c.fill("billing_login_form", username="acme-admin", password="acme-admin-pass")
    c.click("billing_login_go")
    c.wait(lambda: c.d.current_url.endswith("/my/index.ui"), "login did not open the customer area")
    assert c.wait_text("#my_org", "demo-acme") == "demo-acme"
    balance = c.api.call("balance", customer_id="demo-acme")
    c.wait_text("#my_balance", balance["balance"])
    assert c.text("#my_available") == balance["available"]
    c.wait_text("#my_ledger", "e2e-last-month")
    assert "demo-globex" not in c.d.find_element(By.TAG_NAME, "body").text
    c.shot("my-balance")
    # usage: the organisation's rows only, without cost; the export is exactly them
    c.click("my_nav_usage")
    stats = c.api.call("usage_stats", group_by="total", customer_id="demo-acme")["rows"][0]
    c.wait(lambda: c.text("#my_usage_records") == f"{stats['records']} records", "usage totals not shown")
    assert "demo-globex" not in c.text("#my_content")
    _, rows = _fetch_opened(c, "my_usage_export")
    header, data = rows[0], [r for r in rows[1:] if r and r[0] != "TOTAL"]
    assert "cost" not in header and len(data) == stats["records"]
    assert {r[header.index("customer_id")] for r in data} == {"demo-acme"}
    c.shot("my-usage")
    # last month's statement: its totals are the ledger's
    c.click("my_nav_statements")
    c.wait_text(f"#my_statement_{month}", month)
    _, rows = _fetch_opened(c, f"my_statement_csv_{month}")
    figures = {r[0]: r[1] for r in rows if len(r) == 2}
    start, end = figures["period (UTC)"].split(" .. ")
    ledger = c.db("select coalesce(sum(amount), 0) from ledger_entry where customer_id = 'demo-acme' and created_at < ?", end)
    opening = c.db("select coalesce(sum(amount), 0) from ledger_entry where customer_id = 'demo-acme' and created_at < ?", start)
    from billing_module.money import from_micro
    assert figures["Closing balance"] == from_micro(ledger[0][0]) and figures["Opening balance"] == from_micro(opening[0][0])
    assert figures["Recharges"] == "7.250000"
    c.shot("my-statements")
    # the organisation's budgets, read-only: its own, not another's
    for customer in ("demo-acme", "demo-globex"):
        assert c.api.call("budget_set", "POST", scope="org", customer_id=customer, period="month",
                          limit="123.45")["success"]
    c.click("my_nav_budgets")
    c.wait_text("#my_budgets", "123.450000")
    assert "demo-globex" not in c.text("#my_content") and "demo-acme" in c.text("#my_content")
    c.shot("my-budgets")
    for customer in ("demo-acme", "demo-globex"):
        c.api.call("budget_set", "POST", scope="org", customer_id=customer, period="month", limit="0")
    assert c.severe_logs(allowed=("login.dspy",)) == []
