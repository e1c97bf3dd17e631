"""The standalone host's bricks: the front-end library that turns a ``.ui`` description into a page.

A platform host serves bricks itself at ``/bricks/``. The standalone host serves the folder given
by ``server.bricks_dir`` (``serve --bricks-dir``) there, laid out in ``<data_dir>/wwwroot/bricks``:

* a built bricks (``bricks.js`` next to ``css/``), linked as it is;
* the source folder (``build.sh`` with its ``SOURCES=`` list, or a folder holding ``bricks/build.sh``):
  the sources are concatenated in that order into ``bricks.js``, as bricks' own build does, and
  ``css/`` and ``imgs/`` are linked.

It also writes ``header.tmpl`` / ``footer.tmpl``, which ahserver wraps around a ``.ui`` opened by a
browser (without ``_webbricks_``). With no bricks configured they make that page a short HTML note
saying how to configure it.

``static_middleware`` answers ``/bricks/*`` and ``/favicon.ico`` before the login check (the login
page needs them), a GET for a file that does not exist with 404 (ahserver answers 500), and sends a
browser that opens a page before logging in to the login page.
"""
import contextlib
import os
import re
import shutil
from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import ConfigError
from .guard import FAST_PREFIX, error_reply

BRICKS_URL = "/bricks/"

HEADER = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Billing console</title>
<link rel="icon" href="data:,">
<link href="/bricks/css/bricks.css" rel="stylesheet">
<style>
/* a form's fields flow in CSS columns (bricks' .multicolumns): keep each label with its input */
.multicolumns > .inputbox { break-inside: avoid; }
/* a button in a column is as wide as its label, not the whole page */
.vcontainer > button { align-self: flex-start; min-width: 8em; }
</style>
</head>
<body>
<script src="/bricks/bricks.js"></script>
<script>
// bricks 2023 keeps one parameter object for all its requests (HttpText.params): the filters of
// one request ride along on the next. Each request starts from its own parameters here.
if (typeof HttpText !== "undefined" && typeof jc !== "undefined" && typeof hc !== "undefined") {
  for (const c of [jc, hc]) {
    c.url_parse = function (url) {
      this.params = {"_webbricks_": 1}; return HttpText.prototype.url_parse.call(this, url);
    };
  }
}
</script>
<script>
const opts = {"widget":"""

FOOTER = """};
new BricksApp(opts).run();
</script>
</body>
</html>
"""

# With no bricks: the description stays in the page as inert text under a note.
HEADER_UNCONFIGURED = """<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>Billing console: bricks not configured</title>
<link rel="icon" href="data:,"></head>
<body>
<h1>This page needs the bricks front end</h1>
<p>The standalone host serves bricks (github.com/yumoqing/bricks, MIT) from a folder you give it:
start it with <code>billing-module serve --bricks-dir PATH</code> or set <code>server.bricks_dir</code>
(environment <code>BILLING_SERVER_BRICKS_DIR</code>). PATH is a built bricks (<code>bricks.js</code> and
<code>css/</code>) or its source folder. A platform host serves its own bricks at <code>/bricks/</code>.</p>
<p>The JSON APIs under <code>/billing_module/api/</code> work without it.</p>
<script type="application/json" id="page-description">"""

FOOTER_UNCONFIGURED = """</script>
</body>
</html>
"""

# a favicon, so browsers asking for one get an answer rather than an error in their console
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
               '<rect width="16" height="16" rx="3" fill="#2f5d8a"/>'
               '<text x="8" y="12" font-size="11" text-anchor="middle" fill="#fff" font-family="sans-serif">B</text>'
               '</svg>')


def build_order(build_sh: str) -> list[str]:
    """The source files named by ``SOURCES="..."`` in bricks' build.sh, in order."""
    with open(build_sh, encoding="utf-8") as f:
        m = re.search(r'SOURCES="([^"]*)"', f.read())
    if not m:
        raise ConfigError(f"bricks: no SOURCES=\"...\" list in {build_sh}")
    return m.group(1).replace("\\", " ").split()


def locate(bricks_dir: str) -> tuple[str, str]:
    """('source', folder with build.sh) or ('built', folder with bricks.js); ConfigError otherwise."""
    path = os.path.abspath(os.path.expanduser(bricks_dir))
    for folder in (path, os.path.join(path, "bricks")):
        if os.path.isfile(os.path.join(folder, "build.sh")):
            return "source", folder
    for folder in (path, os.path.join(path, "dist")):
        if os.path.isfile(os.path.join(folder, "bricks.js")):
            return "built", folder
    raise ConfigError(f"server.bricks_dir {bricks_dir!r}: neither a bricks build (bricks.js) "
                      "nor its source folder (build.sh)")


def _concatenated(source: str) -> str:
    parts = []
    for name in build_order(os.path.join(source, "build.sh")):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise ConfigError(f"bricks: {name} is listed in build.sh but missing in {source}")
        with open(path, encoding="utf-8") as f:
            parts.append(f.read() + "\n")
    return "".join(parts)


def _put(path: str, text: str | None = None, link_to: str | None = None) -> None:
    """Write a file or a symlink by renaming a fresh one over it: server processes starting at the
    same time on one data dir (``serve --workers``) each lay out the folder, and none may see it
    half written or missing."""
    tmp = f"{path}.{os.getpid()}.tmp"
    if link_to is not None:
        os.symlink(link_to, tmp)
    else:
        assert text is not None, "a file is written from its text, a link from its target"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    os.replace(tmp, path)


def install(www: str, bricks_dir: str | None) -> str:
    """Lay out ``<www>/bricks``: links and generated files only, replaced at each start."""
    target = os.path.join(www, "bricks")
    if os.path.islink(target) or os.path.isfile(target):
        os.unlink(target)
    os.makedirs(target, exist_ok=True)
    files = {"header.tmpl": HEADER_UNCONFIGURED, "footer.tmpl": FOOTER_UNCONFIGURED}
    links = {}
    if bricks_dir:
        kind, folder = locate(bricks_dir)
        files = {"header.tmpl": HEADER, "footer.tmpl": FOOTER}
        if kind == "source":
            files["bricks.js"] = _concatenated(folder)
            names = [e for e in ("css", "imgs") if os.path.isdir(os.path.join(folder, e))]
        else:
            names = [e for e in os.listdir(folder) if not e.endswith(".tmpl")]
        links = {name: os.path.join(folder, name) for name in names}
    for name in os.listdir(target):
        if name not in files and name not in links and not name.endswith(".tmp"):
            path = os.path.join(target, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    for name, text in files.items():
        _put(os.path.join(target, name), text=text)
    for name, folder_entry in links.items():
        _put(os.path.join(target, name), link_to=folder_entry)
    return target


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def static_middleware(www: str, login_page: str):
    """Serve bricks and the favicon without login; 404 for a missing file (not ahserver's 500), in
    the path's kind (JSON for a ``.dspy``, a page otherwise); a page a browser opens before logging
    in goes to ``login_page``."""
    root = os.path.abspath(www)

    @web.middleware
    async def serve_static(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD") or request.path.startswith(FAST_PREFIX):
            return await handler(request)     # the native routes are no files
        if request.path == "/favicon.ico":
            return web.Response(text=FAVICON_SVG, content_type="image/svg+xml")
        path = os.path.normpath(os.path.join(root, request.path.lstrip("/")))
        inside = path == root or path.startswith(root + os.sep)
        if not inside or not os.path.exists(path):
            return error_reply(request, 404, "not_found", f"{request.path}: not found")
        if request.path.startswith(BRICKS_URL) and not path.endswith(".tmpl"):
            if os.path.isfile(path):
                return web.FileResponse(path)
            raise web.HTTPNotFound(text=f"{request.path}: not found")
        navigation = "text/html" in request.headers.get("Accept", "") and "_webbricks_" not in request.query
        if not (request.path.endswith(".ui") and navigation):
            return await handler(request)
        try:
            return await handler(request)
        except web.HTTPUnauthorized:
            # the browser opened the page itself (bricks' own requests carry _webbricks_, API
            # clients do not ask for HTML: both keep the 401): show the login page
            raise web.HTTPFound(login_page) from None

    return serve_static
