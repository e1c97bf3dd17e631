"""HTTP API: every ``wwwroot/api/<name>.dspy`` is one line that calls ``handle``.

``handle`` checks the method, authenticates the caller, runs the named handler and shapes the
reply: ``{"success": true, ...}`` with 200, or ``{"success": false, "code", "message"}`` with
the error's 4xx status. An unexpected exception is logged and answered 500 with code
``internal_error``: nothing escapes to ahserver's generic 500 page.
"""
import asyncio
import json
import logging
import os

from aiohttp import web

from .. import auth
from ..errors import BillingError, Forbidden, Unauthorized
from ..resources import resource_path
from .params import Params

log = logging.getLogger("billing_module.api")

HANDLERS = {}


class Caller:
    def __init__(self, kind, customer_id=None, key_id=None, user=None):
        self.kind = kind              # "admin" or "customer"
        self.customer_id = customer_id
        self.key_id = key_id
        self.user = user

    @property
    def is_admin(self):
        return self.kind == "admin"

    @property
    def operator(self):
        return self.user or (f"key:{self.key_id}" if self.key_id else "system")

    def check_customer(self, customer_id):
        """A customer-scoped caller may only touch its own customer."""
        if not self.is_admin and customer_id != self.customer_id:
            raise Forbidden("this API key is limited to another customer")

    def require_admin(self):
        if not self.is_admin:
            raise Forbidden("this endpoint needs an admin key")


def endpoint(name, methods=("GET", "POST"), open=False, admin=False):
    """Register ``func(core, caller, params, request)`` as the handler of ``api/<name>.dspy``."""
    def register(func):
        HANDLERS[name] = (func, tuple(methods), open, admin)
        return func
    return register


def reply(data, status=200, headers=None):
    return web.Response(text=json.dumps(data, ensure_ascii=False, default=str), status=status,
                        content_type="application/json", charset="utf-8", headers=headers)


async def authenticate(core, request):
    if auth.is_signed(request):
        return await auth.verify_signed(core, request)
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization must be 'Bearer <API key>'")
        client_ip = request.get("client_ip") or request.remote
        row = await core.apikeys.verify(token.strip(), client_ip=client_ip)
        return Caller(row.scope, customer_id=row.customer_id, key_id=row.key_prefix)
    if core.config.auth.trust_host_session:
        from ahserver.auth_api import get_session_userinfo
        try:
            info = await get_session_userinfo(request)
        except Exception:   # no session middleware (a bare test app)
            info = None
        if info and info.get("userid"):
            _check_same_origin(request)
            return Caller("admin", user=info.userid)
    if not core.config.auth.require_api_key:
        return Caller("admin", user="anonymous")
    raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")


def _check_same_origin(request):
    """A session cookie rides along on requests other sites make (ahserver sets SameSite=None), so
    a write authorised by the session alone must come from this site's own pages: a browser says
    where a request comes from in Origin (or Referer), and a cross-site write is refused. A caller
    with an API key or a signature is not affected; a client that sends neither header is not a
    browser page."""
    if request.method in ("GET", "HEAD"):
        return
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source or source == "null":
        if source == "null":
            raise Forbidden("a write from an opaque origin needs an API key")
        return
    from urllib.parse import urlsplit
    given = urlsplit(source)
    host = request.headers.get("X-Forwarded-Host") or request.host
    if given.netloc.lower() != host.lower():
        raise Forbidden(f"cross-site write refused: the request comes from {given.scheme}://{given.netloc}")


async def handle(core, request, params_kw, name):
    from . import handlers, product_handlers, report_handlers, sync_handlers  # noqa: F401  (registers the endpoints)
    try:
        spec = HANDLERS.get(name)
        if spec is None:
            return reply({"success": False, "code": "not_found", "message": f"no API named {name}"}, 404)
        func, methods, is_open, admin_only = spec
        if request.method not in methods:
            return reply({"success": False, "code": "method_not_allowed",
                          "message": f"{name} accepts {', '.join(methods)}"}, 405)
        caller = None if is_open else await authenticate(core, request)
        if admin_only:
            caller.require_admin()
        result = await func(core, caller, Params(params_kw), request)
        if isinstance(result, web.StreamResponse):
            return result
        status = result.pop("_status", 200) if isinstance(result, dict) else 200
        return reply({"success": True, **result}, status)
    except BillingError as e:
        return reply(e.to_reply(), e.status, getattr(e, "headers", None))
    except Exception:
        log.exception("API %s failed", name)
        return reply({"success": False, "code": "internal_error",
                      "message": "internal error; the server log has the details"}, 500)


API_PREFIX = "/billing_module/api/"


@web.middleware
async def request_guard(request, handler):
    """What ahserver does with a request before the endpoint runs can fail: its body parser
    answers a bare 500 for a JSON array or number, invalid UTF-8 form data, an unknown charset
    or content encoding, multipart without a boundary, and a missing file is a 500 too. Our
    ``handle`` lets no exception escape, so one that does comes from there: answer it like the
    API answers everything else. Also a method other than GET/POST gets the API's 405. Only for
    this module's API paths."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    if request.method not in ("GET", "POST", "HEAD"):
        return reply({"success": False, "code": "method_not_allowed",
                      "message": f"{request.method} is not supported; use GET or POST"}, 405)
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as e:
        name = request.path[len(API_PREFIX):]
        if not (name.endswith(".dspy") and os.path.isfile(os.path.join(_WWWROOT_API, name))):
            return reply({"success": False, "code": "not_found", "message": f"no API at {request.path}"}, 404)
        log.info("refused an unparsable request to %s: %s: %s", request.path, type(e).__name__, e)
        return reply({"success": False, "code": "invalid_param",
                      "message": f"the request could not be parsed ({type(e).__name__}); send a JSON object "
                                 "or UTF-8 form data"}, 400)


_WWWROOT_API = str(resource_path("wwwroot", "api"))


def install_request_guard():
    """Add ``request_guard`` when ahserver builds the app ('ahapp_built' hook), keeping any hook
    the host registered (RegisterFunction holds one function per name)."""
    from appPublic.registerfunction import RegisterFunction
    rf = RegisterFunction()
    previous = rf.get("ahapp_built")
    if getattr(previous, "billing_guard", False):
        return

    async def ahapp_built(app, *args, **kwargs):
        if previous is not None:
            result = previous(app, *args, **kwargs)
            if asyncio.iscoroutine(result):
                await result
        if request_guard not in app.middlewares:
            app.middlewares.append(request_guard)
    ahapp_built.billing_guard = True
    rf.register("ahapp_built", ahapp_built)
