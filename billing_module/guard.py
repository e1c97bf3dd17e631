"""The module's request guard: one middleware in front of everything under ``/billing_module/``.

It runs before ahserver's session and permission middlewares (it is added from the
'ahapp_built' hook, which fires before ``setupAuth``), so what it refuses costs no session
lookup, no authentication and no body buffering:

* **Body size** (issue 12, item 2): a body above ``server.max_body_bytes`` (or the path's entry
  in ``server.max_body_bytes_by_path``) is answered 413 ``payload_too_large``, from the
  Content-Length or while a chunked body streams in; at most the limit is ever held in memory.
* **Cross-site request forgery** (item 4): paths that change state (``api/`` writes, the
  generated CRUD ``add_*`` / ``update_*`` / ``delete_*``, login, logout) accept only POST (GET is
  405), and a POST that does not carry an API key or a signature must come from this server's
  own pages: a foreign Origin / Referer is 403, and so is a session cookie with neither header.
  ``X-Forwarded-Host`` counts as this server's host only with ``server.behind_proxy``.
* **Errors** (item 12): the database unreachable is 503 ``database_unavailable`` with
  Retry-After; anything else that escapes ahserver is a JSON error under ``api/`` and ``sync/``
  and a short HTML page elsewhere, 404 for a file that does not exist; never a plain-text 500.
"""
import asyncio
import html
import json
import logging
import os
import re
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.streams import StreamReader

from .core import MODULE_NAME
from .db import dialect as dialects
from .resources import resource_dir

log = logging.getLogger("billing_module.guard")

PREFIX = f"/{MODULE_NAME}/"
API_PREFIX = f"{PREFIX}api/"
FAST_PREFIX = f"{PREFIX}fast/"         # the native routes of the hot endpoints (api/native.py)
API_PREFIXES = (API_PREFIX, FAST_PREFIX)
JSON_PREFIXES = (API_PREFIX, FAST_PREFIX, f"{PREFIX}sync/")
WWWROOT = str(resource_dir("wwwroot"))
SAFE_METHODS = ("GET", "HEAD")
_CRUD_WRITE = re.compile(r"^(add|update|delete)_\w+\.dspy$")
_SESSION_WRITES = ("login.dspy", "logout.dspy")
_BODY_CHUNK = 64 * 1024


# --- replies ---------------------------------------------------------------------------------------
def _json(status, code, message, headers=None):
    return web.Response(text=json.dumps({"success": False, "code": code, "message": message}), status=status,
                        content_type="application/json", charset="utf-8", headers=headers)


def _page(status, title, message, headers=None):
    text = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{status} {html.escape(title)}</title>"
            f"</head><body><h1>{status} {html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>")
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=headers)


def error_reply(request, status, code, message, headers=None):
    """JSON for the API, the sync export and every other ``.dspy`` (they all answer JSON), a plain
    HTML page for the pages and files."""
    if request.path.startswith(JSON_PREFIXES) or request.path.endswith(".dspy"):
        return _json(status, code, message, headers)
    return _page(status, code.replace("_", " "), message, headers)


# --- what a path is ----------------------------------------------------------------------------------
def _api_methods(name):
    from .api import HANDLERS
    spec = HANDLERS.get(name)
    return spec[1] if spec else None


def writes_state(path):
    """True for a path that changes state and so accepts only POST."""
    rel = path[len(PREFIX):]
    base = rel.rsplit("/", 1)[-1]
    if path.startswith(API_PREFIXES):
        methods = _api_methods(base.removesuffix(".dspy"))
        return methods is not None and "GET" not in methods
    return bool(_CRUD_WRITE.match(base)) or rel in _SESSION_WRITES


def _file_exists(path):
    rel = os.path.normpath(path[len(PREFIX):]).lstrip("/")
    return not rel.startswith("..") and os.path.isfile(os.path.join(WWWROOT, rel))


def _is_native_route(request):
    """A route of its own (api/native.py), not a file of ahserver's."""
    return isinstance(request.match_info.route.resource, web.PlainResource)


# --- body size ---------------------------------------------------------------------------------------
def body_limit(config, path):
    return config.server.max_body_bytes_by_path.get(path, config.server.max_body_bytes)


async def _read_capped(request, limit):
    """The body, read chunk by chunk and given back to the request (so ahserver's parsers, the
    multipart reader included, see it unchanged); None when it grows past ``limit``."""
    chunks, size = [], 0
    while True:
        chunk = await request.content.read(_BODY_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    body = b"".join(chunks)
    # aiohttp keeps the body stream in a private attribute; a fresh reader holding the bytes
    # already read is the only way to hand them on to every parser
    replay = StreamReader(request.protocol, 2 ** 16, loop=asyncio.get_running_loop())
    replay.feed_data(body)
    replay.feed_eof()
    request._payload = replay
    return body


async def check_body(request, config):
    """A 413 reply, or None when the body is within the limit (then it is read already)."""
    limit = body_limit(config, request.path)
    too_large = error_reply(request, 413, "payload_too_large",
                            f"the request body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        return too_large
    if request.body_exists:
        body = await _read_capped(request, limit)
        if body is None:
            return too_large
        if request.content_type == "application/json" and _json_but_not_an_object(body):
            # ahserver makes params of a JSON array with dict(): [{"a": .., "b": ..}] becomes
            # {"a": "b"}, parameters the caller never sent
            return error_reply(request, 400, "invalid_param", "a JSON body must be one object")
    return None


def _json_but_not_an_object(body: bytes) -> bool:
    """Valid JSON that is not an object; what does not parse is left to the parser's refusal.
    A text that starts with ``{`` is an object or no JSON at all: not parsed here (a batch's
    body is parsed once, by the endpoint)."""
    if body.lstrip(b" \t\n\r")[:1] == b"{":
        return False
    try:
        return not isinstance(json.loads(body), dict)
    except ValueError:
        return False


# --- same origin -------------------------------------------------------------------------------------
def _has_api_credentials(request):
    """A bearer key or a signature: headers a cross-site page cannot make a browser send."""
    from .auth import is_signed
    return is_signed(request) or request.headers.get("Authorization", "").lower().startswith("bearer ")


def own_host(request, config):
    forwarded = request.headers.get("X-Forwarded-Host") if config.server.behind_proxy else None
    return (forwarded or request.host or "").split(",")[0].strip().lower()


def cross_site_problem(request, config):
    """Why a state-changing request is refused as cross-site, or "" when it may go on."""
    if request.method in SAFE_METHODS or _has_api_credentials(request) or not writes_state(request.path):
        return ""   # reading a page is a POST too for the bricks client: only writes are checked
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if source == "null":
        return "a write from an opaque origin needs an API key"
    if source:
        given = urlsplit(source).netloc.lower()
        if given != own_host(request, config):
            return f"cross-site request refused: it comes from {urlsplit(source).scheme}://{given}"
        return ""
    from .sessions import SESSION_COOKIE
    if SESSION_COOKIE in request.cookies:
        return "a write with a session must come from this server's pages (no Origin or Referer was sent)"
    return ""


# --- the middleware ----------------------------------------------------------------------------------
@web.middleware
async def module_guard(request, handler):
    if not request.path.startswith(PREFIX):
        return await handler(request)
    from ahserver.serverenv import ServerEnv
    core = ServerEnv().billing_core
    if core is None:
        return await handler(request)
    config = core.config
    try:
        refusal = await _refusal(request, config)
        if refusal is not None:
            return refusal
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 500:
            return _unexpected(request, config, e)
        if e.status < 400 or e.content_type != "text/plain":
            raise     # a redirect, or a refusal that already says what it is
        # ahserver's bare "404: Not Found" (a folder) and its like
        return error_reply(request, e.status, e.reason.lower().replace(" ", "_"), e.reason)
    except Exception as e:
        return _unexpected(request, config, e)


async def _refusal(request, config):
    if request.path.startswith(API_PREFIXES) and request.method not in ("GET", "POST", "HEAD"):
        return _json(405, "method_not_allowed", f"{request.method} is not supported; use GET or POST")
    if writes_state(request.path) and request.method != "POST":
        return error_reply(request, 405, "method_not_allowed", "this path changes data: send a POST",
                           {"Allow": "POST"})
    too_large = await check_body(request, config)
    if too_large is not None:
        return too_large
    problem = cross_site_problem(request, config)
    if problem:
        return error_reply(request, 403, "forbidden", problem)
    return None


def _unexpected(request, config, exc):
    """An exception ahserver would answer with a bare 500."""
    if dialects.is_unavailable(exc):
        log.error("database unavailable for %s: %s: %s", request.path, type(exc).__name__, exc)
        return error_reply(request, 503, "database_unavailable", "the database is not reachable; try again later",
                           {"Retry-After": str(config.server.retry_after_seconds)})
    if not _is_native_route(request) and not _file_exists(request.path):
        return error_reply(request, 404, "not_found", f"nothing at {request.path}")
    if request.path.startswith(API_PREFIXES):
        # what fails before our handler runs is ahserver's body parser (a JSON array, invalid
        # UTF-8 form data, an unknown charset or encoding, multipart without a boundary)
        log.info("refused an unparsable request to %s: %s: %s", request.path, type(exc).__name__, exc)
        return _json(400, "invalid_param", f"the request could not be parsed ({type(exc).__name__}); "
                                           "send a JSON object or UTF-8 form data")
    if request.path.endswith(".ui") and not _bricks_installed():
        # a full-page .ui is wrapped in /bricks/header.tmpl, which this host does not have
        return _page(404, "page not available", "this page needs the bricks front-end (/bricks/), which this "
                                                "server does not serve")
    log.error("%s %s failed: %s: %s", request.method, request.path, type(exc).__name__, exc, exc_info=exc)
    return error_reply(request, 400, "bad_request", "the request could not be served; the server log has details")


def _bricks_installed():
    from appPublic.jsonConfig import getConfig
    paths = getConfig().website.paths or []
    return any(os.path.isfile(os.path.join(root, "bricks", "header.tmpl")) for root, prefix in paths if prefix == "")


def install_request_guard():
    """Add ``module_guard`` and the start-up session check when ahserver builds the app
    ('ahapp_built' hook), keeping any hook the host registered (RegisterFunction holds one
    function per name)."""
    from appPublic.registerfunction import RegisterFunction

    from .sessions import check_host_sessions
    rf = RegisterFunction()
    previous = rf.get("ahapp_built")
    if getattr(previous, "billing_guard", False):
        return

    async def ahapp_built(app, *args, **kwargs):
        if previous is not None:
            result = previous(app, *args, **kwargs)
            if asyncio.iscoroutine(result):
                await result
        if module_guard not in app.middlewares:
            app.middlewares.append(module_guard)
            app.on_startup.append(check_host_sessions)
            from .api.native import add_native_routes
            add_native_routes(app, FAST_PREFIX)
    ahapp_built.__dict__["billing_guard"] = True
    rf.register("ahapp_built", ahapp_built)
