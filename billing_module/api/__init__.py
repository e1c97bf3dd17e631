"""HTTP API: every ``wwwroot/api/<name>.dspy`` is one line that calls ``handle``.

``handle`` checks the method, authenticates the caller, runs the named handler and shapes the
reply: ``{"success": true, ...}`` with 200, or ``{"success": false, "code", "message"}`` with
the error's 4xx status. An unexpected exception is logged and answered 500 with code
``internal_error``: nothing escapes to ahserver's generic 500 page.
"""
import json
import logging

from aiohttp import web

from .. import auth
from ..db.dialect import is_unavailable
from ..errors import BillingError, Forbidden, Unauthorized
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
        from ..sessions import session_caller
        caller = await session_caller(core, request)
        if caller is not None:
            return caller
    if not core.config.auth.require_api_key:
        return Caller("admin", user="anonymous")
    raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")


def load_handlers():
    """Import the handler modules: each registers its endpoints in HANDLERS."""
    from . import handlers, product_handlers, report_handlers, sync_handlers  # noqa: F401


async def handle(core, request, params_kw, name):
    load_handlers()
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
    except Exception as e:
        if is_unavailable(e):
            log.error("API %s: database unavailable: %s: %s", name, type(e).__name__, e)
            return reply({"success": False, "code": "database_unavailable",
                          "message": "the database is not reachable; try again later"}, 503,
                         {"Retry-After": str(core.config.server.retry_after_seconds)})
        log.exception("API %s failed", name)
        return reply({"success": False, "code": "internal_error",
                      "message": "internal error; the server log has the details"}, 500)
