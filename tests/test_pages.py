"""Every admin page (``wwwroot/**/*.ui``) through the host's own ``.ui`` processor (``bui``), as the
bricks client asks for it (``_webbricks_=1``, after the admin login), on both databases:

* it renders to valid JSON;
* every ``widgettype`` is a bricks widget known from the reference (bricks-widgets.md §3);
* every URL in it points at an endpoint that exists and answers in the shape its widget expects:
  ``{"total", "rows"}`` for DataGrid / DataViewer / Tabular data, a widget description for
  ``urlwidget`` loads and actions, a file for plain links.

Endpoints that other parts of the module register (products, sync) must be wired into
``billing_module.api.handle``; until they are, the URL check names them. Page actions go through
``action.ui``: every action it lists must be a registered POST endpoint.
"""
import json
import os
import re
import urllib.parse

import pytest

from billing_module.api import HANDLERS
from billing_module.errors import NoPricing
from billing_module.resources import resource_dir
from tests.helpers import seed_pricing, units, usage

WWWROOT = str(resource_dir("wwwroot"))

# bricks-widgets.md §3: [S] confirmed in the public 2023 source, [U] used by current platform pages
KNOWN_S = {"VBox", "HBox", "HFiller", "VFiller", "VScrollPanel", "HScrollPanel", "TabPanel", "Accordion", "Text",
           "Title1", "Title2", "Title3", "Title4", "Title5", "Title6", "Image", "Icon", "BlankIcon", "MarkdownViewer",
           "MultipleStateImage", "AudioPlayer", "VideoPlayer", "Video", "Form", "ModalForm", "PopupForm", "MiniForm",
           "UiStr", "UiPassword", "UiInt", "UiFloat", "UiTel", "UiEmail", "UiFile", "UiCheck", "UiCheckBox", "UiDate",
           "UiText", "UiCode", "UiAudio", "UiVideo", "Button", "Toolbar", "Menu", "DataViewer", "DataGrid", "Tree",
           "EditableTree", "Modal", "BMessage", "BError"}
KNOWN_U = {"Filler", "ResponsableBox", "DynamicColumn", "Title", "Svg", "InlineForm", "Combobox", "DatePicker",
           "Tabular", "PopupWindow", "Message", "Error", "Conform"}
KNOWN = KNOWN_S | KNOWN_U | {"urlwidget"}
# host endpoints that generated CRUD pages use (appbase's code lists, the host's icons)
HOST_PREFIXES = ("/appbase/get_code.dspy", "/imgs/", "/appbase/get_icon.dspy")
MODULE = "/billing_module/"


@pytest.fixture
async def host(http):
    """The standalone host; afterwards the host's own sqlor pool (the generated CRUD endpoints
    use it) is closed, as the server does at shutdown."""
    yield http
    from billing_module.server import close_host_pools
    await close_host_pools()


def ui_pages():
    pages = []
    for root, _, files in os.walk(WWWROOT):
        for name in files:
            if name.endswith(".ui"):
                pages.append(os.path.relpath(os.path.join(root, name), WWWROOT).replace(os.sep, "/"))
    return sorted(pages)


def action_names():
    text = open(os.path.join(WWWROOT, "action.ui"), encoding="utf-8").read()
    block = text[text.index("ACTIONS = {"):text.index("} -%}", text.index("ACTIONS = {"))]
    return re.findall(r'"(\w+)":', block)


class Refs:
    """What one page description contains: widget types and the URLs it will call."""

    def __init__(self):
        self.types = set()
        self.calls = []      # (kind, url, method, params, where)

    def walk(self, node, where="page"):
        if isinstance(node, list):
            for n in node:
                self.walk(n, where)
            return
        if not isinstance(node, dict):
            return
        wt = node.get("widgettype")
        opts = node.get("options") if isinstance(node.get("options"), dict) else {}
        if wt:
            self.types.add(wt)
            where = f"{wt}#{node.get('id', '')}"
            if wt == "urlwidget":
                self.calls.append(("widget", opts.get("url"), opts.get("method", "GET"), opts.get("params") or {}, where))
            elif wt in ("DataGrid", "DataViewer"):
                if opts.get("dataurl"):
                    self.calls.append(("table", opts["dataurl"], opts.get("method", "GET"), opts.get("params") or {}, where))
                if opts.get("viewer_tmpl"):
                    self.walk(json.loads(opts["viewer_tmpl"]), where + ".viewer_tmpl")
            elif wt == "Tabular" and opts.get("data_url"):
                self.calls.append(("table", opts["data_url"], opts.get("data_method", "GET"),
                                   opts.get("data_params") or {}, where))
            for f in opts.get("fields") or []:
                if f.get("dataurl"):
                    self.calls.append(("codes", f["dataurl"], f.get("method", "GET"), f.get("params") or {}, where))
                if isinstance(f.get("action"), dict):
                    self.bind(f["action"], f"{where}.{f.get('name')}")
        if "actiontype" in node:
            self.bind(node, where)
        for k, v in node.items():
            if k in ("binds", "subwidgets", "content", "items", "conform") or (k == "options" and wt):
                self.walk(v, where)
            elif k in ("params",) and isinstance(v, dict):
                for pv in v.values():
                    if isinstance(pv, str) and pv.startswith("http"):
                        self.calls.append(("link", pv, "GET", {}, where))

    def bind(self, b, where):
        kind = b.get("actiontype")
        opts = b.get("options") or {}
        if kind == "urlwidget":
            self.calls.append(("widget", opts.get("url"), opts.get("method", "GET"), opts.get("params") or {},
                               f"{where} bind {b.get('event')}"))
        elif kind == "bricks":
            self.walk(opts, where)
        elif kind not in ("method", "script", "event", "registerfunction"):
            raise AssertionError(f"{where}: unknown actiontype {kind}")


def _path(url):
    return urllib.parse.urlparse(url).path


async def _login(http):
    r = await http.client.post("/billing_module/login.dspy",
                               data={"username": "admin", "password": http.core.admin_password})
    assert r.status == 200, await r.text()


async def _render(http, path, method="GET", params=None):
    params = dict(params or {}, _webbricks_="1")
    if method == "GET":
        r = await http.client.get(path, params={k: str(v) for k, v in params.items()})
    else:
        r = await http.client.post(path, data={k: str(v) for k, v in params.items()})
    return r.status, await r.text()


async def _seed(http):
    core = http.core
    await seed_pricing(core)
    await core.catalog.put("users", [{"id": "cust-1", "kind": "org", "name": "Acme \"quoted\" & Co"}])
    await core.ledger.recharge("cust-1", units("5"), "r1")
    await core.accounting.post_usage(usage("p1", user_id="u-1"))
    with pytest.raises(NoPricing):
        await core.accounting.post_usage(usage("p2", model="missing-model"))   # one failed record


async def _check_call(http, kind, url, method, params, where):
    """'' when the URL answers as its widget expects, else what is wrong."""
    path = _path(url or "")
    if not path:
        return f"{where}: empty URL"
    if not path.startswith(MODULE):
        return "" if path.startswith(HOST_PREFIXES) else f"{where}: {url} is outside the module"
    rel = path[len(MODULE):]
    if os.path.isdir(os.path.join(WWWROOT, rel)):
        rel = rel.rstrip("/") + "/index.ui"          # the host serves a directory's index.ui
        path = MODULE + rel
    if not os.path.isfile(os.path.join(WWWROOT, rel)):
        return f"{where}: {rel} does not exist"
    if kind == "link":
        return ""
    status, text = await _render(http, path, method, params)
    try:
        body = json.loads(text)
    except ValueError:
        return f"{where}: {rel} answered {status} non-JSON: {text[:200]!r}"
    if kind == "table":
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("total"), int) \
                or not isinstance(body.get("rows"), list):
            return f"{where}: {rel} answered {status} {str(body)[:300]}, not {{total, rows}}"
    elif kind == "codes":
        if status != 200 or not isinstance(body, list):
            return f"{where}: {rel} answered {status}, not a list of {{value, text}}"
    elif kind == "widget":
        if status != 200 or not isinstance(body, dict) or body.get("widgettype") not in KNOWN:
            return f"{where}: {rel} answered {status} {str(body)[:300]}, not a widget description"
        message = (body.get("options") or {}).get("message", "")
        if "no API named" in message or "unknown action" in message or "internal_error" in message:
            return f"{where}: {rel} {params.get('action', '')}: {message}"
    return ""


async def test_every_page_renders_known_widgets_and_live_urls(host):
    await _seed(host)
    await _login(host)
    problems, checked, seen = [], 0, set()
    pages = ui_pages()
    assert {"index.ui", "login.ui", "failed_accounting.ui", "usage_logs.ui", "balances.ui", "product_resources.ui",
            "product_suppliers.ui", "product_subscriptions.ui", "product_consumption.ui", "sync_status.ui"} <= set(pages)
    queue = [(MODULE + p, "GET", {}, p) for p in pages if p != "action.ui"]
    while queue:
        path, method, params, where = queue.pop(0)
        key = (path, method, json.dumps(params, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        status, text = await _render(host, path, method, params)
        try:
            desc = json.loads(text)
        except ValueError:
            problems.append(f"{where}: {path} {params} is not valid JSON ({status}): {text[:300]!r}")
            continue
        refs = Refs()
        refs.walk(desc)
        unknown = refs.types - KNOWN
        if unknown:
            problems.append(f"{where}: unknown widget types {sorted(unknown)}")
        for kind, url, m, prm, w in refs.calls:
            checked += 1
            problem = await _check_call(host, kind, url, m, prm, f"{path[len(MODULE):]} {w}")
            if problem:
                problems.append(problem)
            elif kind == "widget" and _path(url).endswith(".ui") and not _path(url).endswith("action.ui"):
                queue.append((_path(url), m, prm, f"{where} -> {w}"))   # a part of a page: check it too
    assert checked > 40
    assert not problems, "pages with problems:\n" + "\n".join(problems)


async def _registered():
    """HANDLERS once ``handle`` has imported its handler modules (as on the first request)."""
    from billing_module.api import handle
    await handle(None, None, {}, "__no_such_api__")
    return HANDLERS


async def test_page_actions_are_registered_post_endpoints():
    await _registered()
    missing = [n for n in action_names() if n not in HANDLERS or "POST" not in HANDLERS[n][1]]
    assert "failed_accounting_retry" in action_names() and "recharge" in action_names()
    assert not missing, f"action.ui lists actions that are not registered POST endpoints (wire their handler modules): {missing}"


def _outcome(text):
    """(done?, title, message) of action.ui's outcome card."""
    body = json.loads(text)
    assert body["id"] == "action_outcome", body
    title, message = (w["options"]["text"] for w in body["subwidgets"])
    return body["options"]["bgcolor"] == "#e6f4ea", title, message


async def test_actions_run_the_api_and_answer_widgets(host):
    await _seed(host)
    await _login(host)
    status, text = await _render(host, MODULE + "action.ui", "POST",
                                 {"action": "recharge", "customer_id": "cust-1", "amount": "2.5", "request_id": "ui-r1"})
    ok, title, message = _outcome(text)
    assert status == 200 and ok and title == "Recharge: done"
    assert "balance_after: 7.494000" in message
    # the same form sent twice charges once
    _, text = await _render(host, MODULE + "action.ui", "POST",
                            {"action": "recharge", "customer_id": "cust-1", "amount": "2.5", "request_id": "ui-r1"})
    assert "duplicate: true" in _outcome(text)[2]
    assert (await host.core.ledger.balance("cust-1"))["balance"] == "7.494000"
    # bad input: an Error widget with the API's code and message; nothing written
    _, text = await _render(host, MODULE + "action.ui", "POST",
                            {"action": "adjust", "customer_id": "cust-1", "amount": "1e3", "request_id": "ui-a1", "reason": "x"})
    ok, title, message = _outcome(text)
    assert not ok and "refused" in title and "invalid_param" in message
    # mark a failure handled from the page, with a note
    failed = (await host.core.failures.search())["rows"][0]
    _, text = await _render(host, MODULE + "action.ui", "POST",
                            {"action": "failed_accounting_handle", "id": failed["id"], "note": "model retired"})
    ok, _, message = _outcome(text)
    assert ok and "handled: 1" in message
    # only listed actions, only POST
    _, text = await _render(host, MODULE + "action.ui", "POST", {"action": "admin_login"})
    assert not _outcome(text)[0]
    _, text = await _render(host, MODULE + "action.ui", "GET", {"action": "recharge"})
    assert _outcome(text)[:2] == (False, "Action refused")


async def test_pages_need_the_login_and_the_login_page_is_open(host):
    r = await host.client.get(MODULE + "index.ui", params={"_webbricks_": "1"})
    assert r.status == 401
    status, text = await _render(host, MODULE + "login.ui")
    assert status == 200 and json.loads(text)["widgettype"] == "VBox"
    r = await host.client.post(MODULE + "action.ui", data={"_webbricks_": "1", "action": "recharge"})
    assert r.status == 401


async def test_user_text_cannot_break_a_page(host):
    """Names, notes and reasons with quotes, backslashes and newlines stay JSON strings."""
    await _seed(host)
    await _login(host)
    nasty = 'a"b\\c\n</script>{{x}}'
    status, text = await _render(host, MODULE + "failed_accounting.ui", "GET",
                                 {"part": "handle", "id": "x1", "failure_code": nasty, "failed_reason": nasty})
    body = json.loads(text)
    assert status == 200 and body["subwidgets"][1]["options"]["text"] == nasty + ": " + nasty
    status, text = await _render(host, MODULE + "balances.ui", "GET", {"part": "forms", "customer_id": nasty})
    def recharge_params(text):
        """The recharge button's bind parameters: the customer and request id travel there, as
        bricks 2023 drops preset form values."""
        button = json.loads(text)["subwidgets"][0]["subwidgets"][-1]
        return button["binds"][0]["options"]["params"]
    assert recharge_params(text)["customer_id"] == nasty
    # each drawing of the money forms carries a fresh request id
    _, again = await _render(host, MODULE + "balances.ui", "GET", {"part": "forms", "customer_id": "c"})
    ids = {recharge_params(t)["request_id"] for t in (text, again)}
    assert len(ids) == 2


async def test_apis_that_pages_call_server_side_are_registered():
    """index.ui, sync_status.ui and product_subscriptions.ui read APIs while they are drawn."""
    await _registered()
    called = set()
    for page in ui_pages():
        for line in open(os.path.join(WWWROOT, page), encoding="utf-8"):
            if "billing_api(" in line:
                called |= set(re.findall(r'"(\w+)"\)', line))
    assert {"sync_status", "failed_accounting_list", "balances", "usage_stats", "product_quota"} <= called
    missing = sorted(n for n in called if n not in HANDLERS or "GET" not in HANDLERS[n][1])
    assert not missing, f"pages call APIs that are not registered GET endpoints (wire their handler modules): {missing}"


def test_generated_crud_pages_are_current(tmp_path):
    """wwwroot/<table>/ holds exactly what json/build.sh generates from json/*.json and models/."""
    import filecmp
    import subprocess
    specs = resource_dir("json")
    subprocess.run(["bash", str(specs / "build.sh"), str(tmp_path)], check=True, capture_output=True)
    tables = sorted(os.listdir(tmp_path))
    assert tables == sorted(n[:-5] for n in os.listdir(specs) if n.endswith(".json"))
    for t in tables:
        cmp = filecmp.dircmp(str(tmp_path / t), os.path.join(WWWROOT, t))
        assert not (cmp.left_only or cmp.right_only or cmp.diff_files), (t, cmp.left_only, cmp.right_only, cmp.diff_files)
        for name in os.listdir(tmp_path / t):
            if name.startswith("get_"):
                text = (tmp_path / t / name).read_text(encoding="utf-8")
                assert "never a client sort" in text and "never a client filter tree" in text
    # read-only tables have no write endpoints; the code lists keep theirs
    assert not [n for n in os.listdir(tmp_path / "users_cache") if n.startswith(("add_", "update_", "delete_"))]
    assert not os.path.exists(tmp_path / "api_key")    # keys are never listed to a browser
    assert os.path.exists(tmp_path / "appcodes_kv" / "update_appcodes_kv.dspy")


async def test_generated_data_endpoints_ignore_client_sort_and_filters(host):
    await _login(host)
    await host.core.catalog.put("users", [{"id": "o1", "kind": "org", "name": "b"}, {"id": "o2", "kind": "org", "name": "a"}])
    for params in ({"sort": "id; drop table users_cache"}, {"data_filter": '{"field": "1=1 or id", "op": "=", "const": "x"}'}):
        r = await host.client.get(MODULE + "users_cache/get_users_cache.dspy", params=dict(params, _webbricks_="1"))
        body = json.loads(await r.text())
        assert r.status == 200 and body["total"] == 2, body
    r = await host.client.get(MODULE + "users_cache/get_users_cache.dspy", params={"_webbricks_": "1", "id": "o2"})
    assert json.loads(await r.text())["total"] == 1


async def test_code_tables_load_idempotently_and_cover_every_model_code(host):
    from billing_module.codes import load_code_tables, load_data
    from billing_module.db.schema import load_models
    data = load_data()
    kv = {(r["parentid"], r["k"]) for r in data["appcodes_kv"]}
    lists = {c["id"] for c in data["appcodes"]}
    for table, model in load_models().items():
        for code in model.get("codes") or []:
            m = re.fullmatch(r"parentid='(\w+)'", code.get("cond") or "")
            if code["table"] == "appcodes_kv":
                assert m and m.group(1) in lists, (table, code)
    for required in ("billing_mode", "resource_type", "accounting_status", "sync_status", "customer_status",
                     "handled_flg", "retry_state", "hold_status", "ledger_entry_type", "apikey_scope", "enabled_flg"):
        assert required in lists
    # the values the code writes are listed
    assert {("ledger_entry_type", t) for t in ("recharge", "usage", "settle", "refund", "adjust", "subscription",
                                                "overage")} <= kv
    assert {("retry_state", s) for s in ("waiting", "exhausted", "resolved")} <= kv
    db = host.core.db
    first = await load_code_tables(db)
    assert first == {"appcodes": len(data["appcodes"]), "appcodes_kv": len(data["appcodes_kv"])}
    async with db.transaction() as tx:     # an edited text comes back from the file
        await tx.execute("update appcodes_kv set v = 'edited' where parentid = 'handled_flg' and k = '1'")
    await load_code_tables(db)
    async with db.read() as tx:
        assert await tx.scalar("select count(*) as n from appcodes_kv") == len(data["appcodes_kv"])
        assert await tx.scalar("select v from appcodes_kv where parentid = 'handled_flg' and k = '1'") == "已处理"
    # a generated page shows the code texts
    await _login(host)
    async with db.transaction() as tx:
        await tx.insert("sync_state", {"id": "s1", "entity_type": "users", "entity_id": "", "sync_status": "failed",
                                       "retry_count": 1, "created_at": "2026-01-01 00:00:00",
                                       "updated_at": "2026-01-01 00:00:00"})
    r = await host.client.get(MODULE + "sync_state/get_sync_state.dspy", params={"_webbricks_": "1"})
    body = json.loads(await r.text())
    assert body["total"] == 1 and body["rows"][0]["sync_status_text"] == "失败"
