"""HTTP API: every ``wwwroot/api/<name>.dspy`` is one line that calls ``handle``.

``handle`` checks the method, authenticates the caller, runs the named handler and shapes the
reply: ``{"success": true, ...}`` with 200, or ``{"success": false, "code", "message"}`` with
the error's 4xx status. An unexpected exception is logged and answered 500 with code
``internal_error``: nothing escapes to ahserver's generic 500 page.
"""
import logging

from aiohttp import web

from ..db.dialect import is_unavailable
from ..errors import BillingError
from . import (  # noqa: F401  (each registers its endpoints)
    alert_handlers,
    handlers,
    key_handlers,
    product_handlers,
    report_handlers,
    statement_handlers,
    sync_handlers,
)
from .callers import authenticate, signed_caller
from .params import Params
from .registry import HANDLERS, PLAIN_REPLIES, Caller, endpoint, reply

__all__ = ["HANDLERS", "Caller", "Params", "authenticate", "endpoint", "handle", "reply", "signed_caller"]

log = logging.getLogger("billing_module.api")


async def handle(core, request, params_kw, name):
    try:
        spec = HANDLERS.get(name)
        if spec is None:
            return reply({"success": False, "code": "not_found", "message": f"no API named {name}"}, 404)
        func, methods, is_open, admin_only = spec
        if request.method not in methods:
            return reply({"success": False, "code": "method_not_allowed",
                          "message": f"{name} accepts {', '.join(methods)}"}, 405)
        caller = None if is_open else await authenticate(core, request)
        if admin_only and caller is not None:
            caller.require_admin()
        if caller is not None:
            params_kw = caller.scope(params_kw)
        result = await func(core, caller, Params(params_kw), request)
        if isinstance(result, web.StreamResponse):
            return result
        status = result.pop("_status", 200) if isinstance(result, dict) else 200
        if caller is not None:
            result = caller.unscope(result)
        return reply({"success": True, **result}, status, plain=name in PLAIN_REPLIES)
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
