"""The standalone host serves bricks (issue 14): a build or the source folder (concatenated in
build.sh's order), header/footer.tmpl around a ``.ui`` opened by a browser, ``/bricks/`` and the
favicon open without login, missing files 404, and without bricks a short HTML page saying how to
configure it (never a 500)."""
import os

import pytest

from billing_module import bricks
from billing_module.errors import ConfigError
from tests.conftest import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENDORED = os.environ.get("BILLING_BRICKS_DIR") or os.path.join(os.path.dirname(REPO), "shared", "vendor", "bricks")


def _fake_source(tmp_path):
    """A bricks source folder of three files, listed in build.sh in an order that is not alphabetical."""
    src = tmp_path / "src" / "bricks"
    (src / "css").mkdir(parents=True)
    (src / "imgs").mkdir()
    (src / "css" / "bricks.css").write_text("body {}")
    (src / "imgs" / "add.png").write_bytes(b"\x89PNG")
    for name in ("c.js", "a.js", "b.js"):
        (src / name).write_text(f"// {name}")
    (src / "build.sh").write_text('SOURCES="c.js \\\n\ta.js b.js "\necho ${SOURCES}\ncat ${SOURCES} > ../dist/bricks.js\n')
    return tmp_path / "src"


def test_a_source_folder_is_concatenated_in_build_order(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    target = bricks.install(str(www), str(_fake_source(tmp_path)))
    with open(os.path.join(target, "bricks.js"), encoding="utf-8") as f:
        assert f.read() == "// c.js\n// a.js\n// b.js\n"
    assert os.path.isfile(os.path.join(target, "css", "bricks.css"))
    assert os.path.isfile(os.path.join(target, "imgs", "add.png"))
    with open(os.path.join(target, "header.tmpl"), encoding="utf-8") as f:
        header = f.read()
    assert header.rstrip().endswith('const opts = {"widget":') and "/bricks/bricks.js" in header
    with open(os.path.join(target, "footer.tmpl"), encoding="utf-8") as f:
        assert "new BricksApp(opts).run();" in f.read()


def test_a_built_bricks_is_linked_and_a_restart_replaces_the_layout(tmp_path):
    built = tmp_path / "dist"
    (built / "css").mkdir(parents=True)
    (built / "bricks.js").write_text("// built")
    (built / "css" / "bricks.css").write_text("")
    www = tmp_path / "www"
    www.mkdir()
    bricks.install(str(www), str(_fake_source(tmp_path)))
    target = bricks.install(str(www), str(built))
    assert os.path.realpath(os.path.join(target, "bricks.js")) == str(built / "bricks.js")
    assert not os.path.exists(os.path.join(target, "imgs"))     # nothing left of the previous layout


def test_a_folder_that_is_not_bricks_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither a bricks build"):
        bricks.locate(str(tmp_path))
    (tmp_path / "build.sh").write_text("echo no list here\n")
    with pytest.raises(ConfigError, match="SOURCES"):
        bricks.install(str(tmp_path / "www"), str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(VENDORED), reason=f"no bricks at {VENDORED}")
def test_the_vendored_bricks_builds_with_every_listed_source(tmp_path):
    kind, folder = bricks.locate(VENDORED)
    assert kind == "source"
    names = bricks.build_order(os.path.join(folder, "build.sh"))
    assert names[:3] == ["uitypesdef.js", "utils.js", "i18n.js"] and "bricks.js" in names
    target = bricks.install(str(tmp_path), VENDORED)
    assert os.path.getsize(os.path.join(target, "bricks.js")) == sum(
        os.path.getsize(os.path.join(folder, n)) + 1 for n in names)


@pytest.fixture
def config(tmp_path):
    if not os.path.isdir(VENDORED):
        pytest.skip(f"no bricks at {VENDORED}")
    return make_config(tmp_path, server={"bricks_dir": VENDORED})


async def test_bricks_and_favicon_are_open_and_missing_files_are_404(http):
    for path, kind in (("/bricks/bricks.js", "javascript"), ("/bricks/css/bricks.css", "css"),
                       ("/bricks/imgs/add.png", "png"), ("/favicon.ico", "svg")):
        r = await http.client.get(path)
        assert r.status == 200 and kind in r.headers["Content-Type"], path
    for path in ("/bricks/imgs/cancel.png", "/bricks/nothing.js", "/billing_module/nothing.png", "/nothing.ui",
                 "/bricks/../conf/config.json", "/bricks/%2e%2e/conf/config.json"):
        r = await http.client.get(path)
        assert r.status == 404, path
    # the templates are for ahserver, not for the browser; pages still need the login
    assert (await http.client.get("/bricks/header.tmpl")).status in (401, 403)
    # a page the browser opens before logging in leads to the login page; bricks' own requests
    # (with _webbricks_) still get the 401
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    r = await http.client.get("/billing_module/index.ui", headers=html, allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/billing_module/login.ui"
    r = await http.client.get("/billing_module/index.ui", params={"_webbricks_": "1"}, headers=html,
                              allow_redirects=False)
    assert r.status == 401
    assert (await http.client.get("/billing_module/index.ui", allow_redirects=False)).status == 401
    # the login page is a bricks page a browser can open
    r = await http.client.get("/billing_module/login.ui")
    text = await r.text()
    assert r.status == 200 and '<script src="/bricks/bricks.js">' in text and "new BricksApp(opts).run();" in text


async def test_without_bricks_a_page_says_how_to_configure_it(tmp_path, db_desc, mysql_database):
    from aiohttp.test_utils import TestClient, TestServer

    from billing_module.server import build_app, close_host_pools, reset_host_singletons
    from tests.conftest import _mark_ready
    app, core = await build_app(make_config(tmp_path), str(tmp_path / "host"), db_desc=db_desc, background=False)
    _mark_ready(db_desc, mysql_database)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        r = await client.get("/billing_module/login.ui")
        text = await r.text()
        assert r.status == 200 and "serve --bricks-dir" in text and "server.bricks_dir" in text
        assert (await client.get("/bricks/bricks.js")).status == 404
        # the JSON description a bricks client asks for is unchanged
        r = await client.get("/billing_module/login.ui", params={"_webbricks_": "1"})
        assert r.status == 200 and (await r.json(content_type=None))["id"] == "billing_login"
    finally:
        await client.close()
        await close_host_pools()
        reset_host_singletons()
