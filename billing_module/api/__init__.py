"""HTTP API: every ``wwwroot/api/<name>.dspy`` is one line that calls ``handle``.

``handle`` checks the method, authenticates the caller, runs the named handler and shapes the
reply: ``{"success": true, ...}`` with 200, or ``{"success": false, "code", "message"}`` with
the error's 4xx status. An unexpected exception is logged and answered 500 with code
``internal_error``: nothing escapes to ahserver's generic 500 page.
"""
import fnmatch
import json
import logging

from aiohttp import web

from .. import auth
from ..db.dialect import is_unavailable
from ..errors import BillingError, Forbidden, InvalidParam, Unauthorized
from .params import Params

log = logging.getLogger("billing_module.api")

HANDLERS = {}

# Idempotency keys a customer-scoped caller sends, and the longest value each may be once
# namespaced. A customer key's ``request_id`` X is stored as ``X@<its customer id>``: tenants share
# no key space, so no tenant can claim (or learn of) another's or the platform's ids, while the
# unique index on ``request_id`` keeps the platform's own ids as they are. An id a customer key sends
# may not contain '@' (so the stored form splits one way only); the platform's ids (nanoids) never do.
TENANT_SEPARATOR = "@"
TENANT_KEYS = {"request_id": 64, "source_ref_table": 64}


class Caller:
    def __init__(self, kind, customer_id=None, key_id=None, user=None, roles=()):
        self.kind = kind              # "admin", "customer" or "app" (refused by ``scope``)
        self.customer_id = customer_id
        self.key_id = key_id
        self.user = user
        self.roles = tuple(roles)     # a session's roles; empty for an API key

    @classmethod
    def for_session(cls, auth_config, user: str, roles, organisation: str | None) -> "Caller":
        """A logged-in user as a caller: a platform role (``auth.host_admin_roles``, shell-style
        patterns such as ``owner.*``) reaches every customer; a customer role
        (``auth.customer_roles``) is a customer caller of the user's organisation, held to the
        same ``scope`` rule as a customer API key. Anything else is Forbidden (fail closed)."""
        roles = tuple(r for r in roles or () if isinstance(r, str))
        if any(fnmatch.fnmatchcase(r, pattern) for r in roles for pattern in auth_config.host_admin_roles):
            return cls("admin", user=user, roles=roles)
        if set(roles) & set(auth_config.customer_roles):
            if not organisation:
                raise Forbidden("your user belongs to no organisation")
            return cls("customer", customer_id=organisation, user=user, roles=roles)
        raise Forbidden("your roles include no billing role")

    def has_role(self, role: str) -> bool:
        return role in self.roles

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def operator(self) -> str:
        return self.user or (f"key:{self.key_id}" if self.key_id else "system")

    def check_customer(self, customer_id: str) -> None:
        """A customer-scoped caller may only touch its own customer."""
        if not self.is_admin and (not self.customer_id or customer_id != self.customer_id):
            raise Forbidden("this caller is limited to another customer")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this endpoint needs an admin key or an admin login")

    def scope(self, params) -> dict:
        """The request's parameters as this caller may send them, or Forbidden: the one place
        where scope is enforced, so it fails closed for every endpoint. An admin's pass as they
        are; a customer key's always name its own customer (another one is refused) and its
        idempotency keys are put in its namespace (TENANT_KEYS); any other caller (an app key,
        which reaches only the sync export) is refused."""
        params = dict(params or {})
        if self.is_admin:
            return params
        if self.kind != "customer" or not self.customer_id:
            raise Forbidden("an app key reaches only the sync export (/billing_module/sync/), not the API")
        given = params.get("customer_id")
        if given not in (None, "") and given != self.customer_id:
            raise Forbidden("this caller is limited to another customer")
        params["customer_id"] = self.customer_id
        suffix = TENANT_SEPARATOR + self.customer_id
        for name, max_len in TENANT_KEYS.items():
            value = params.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or value == "":
                continue          # absent, or a wrong type the handler's reader refuses
            if TENANT_SEPARATOR in value:
                raise InvalidParam(f"{name}: must not contain '{TENANT_SEPARATOR}'")
            if len(value) + len(suffix) > max_len:
                raise InvalidParam(f"{name}: at most {max_len - len(suffix)} characters for this customer's key")
            params[name] = value + suffix
        return params

    def unscope(self, data):
        """The reply with this caller's namespace taken off the idempotency keys it sent."""
        if self.is_admin or not self.customer_id:
            return data
        suffix = TENANT_SEPARATOR + self.customer_id
        if isinstance(data, list):
            return [self.unscope(v) for v in data]
        if not isinstance(data, dict):
            return data
        return {k: (v[:-len(suffix)] if k in TENANT_KEYS and isinstance(v, str) and v.endswith(suffix)
                    else self.unscope(v)) for k, v in data.items()}


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
    from . import (handlers, key_handlers, product_handlers, report_handlers, statement_handlers,  # noqa: F401
                   sync_handlers)


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
        if caller is not None:
            params_kw = caller.scope(params_kw)
        result = await func(core, caller, Params(params_kw), request)
        if isinstance(result, web.StreamResponse):
            return result
        status = result.pop("_status", 200) if isinstance(result, dict) else 200
        if caller is not None:
            result = caller.unscope(result)
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
