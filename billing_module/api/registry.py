"""The endpoint registry: what a handler module needs to declare an endpoint (``endpoint``), who
calls it (``Caller``) and the JSON reply. ``api/__init__.py`` imports the handler modules, which
import only this, so the registry and the handlers form no import cycle."""
from __future__ import annotations

import fnmatch
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import jsontext
from ..errors import Forbidden, InvalidParam

# a handler: (core, caller, params, request) -> reply dict (or a StreamResponse)
Handler = Callable[..., Awaitable[Any]]
HANDLERS: dict[str, tuple[Handler, tuple[str, ...], bool, bool]] = {}
# endpoints whose replies hold only strings, whole numbers, booleans, nulls, lists and objects
# (money as decimal strings): written by orjson, which parses back to the same values as
# json.dumps's text (a reply of 1,000 batch results: ~1 ms instead of ~20 ms)
PLAIN_REPLIES: set[str] = set()


# Idempotency keys a customer-scoped caller sends, and the longest value each may be once
# namespaced. A customer key's ``request_id`` X is stored as ``X@<its customer id>``: tenants share
# no key space, so no tenant can claim (or learn of) another's or the platform's ids, while the
# unique index on ``request_id`` keeps the platform's own ids as they are. An id a customer key sends
# may not contain '@' (so the stored form splits one way only); the platform's ids (nanoids) never do.
TENANT_SEPARATOR = "@"
TENANT_KEYS = {"request_id": 64, "source_ref_table": 64}


class Caller:
    """Who calls an endpoint: an ``admin``, a ``customer`` (limited to ``customer_id``) or an app."""

    def __init__(self, kind: str, customer_id: str | None = None, key_id: str | None = None,
                 user: str | None = None, roles: tuple[str, ...] = ()) -> None:
        self.kind = kind              # "admin", "customer" or "app" (refused by ``scope``)
        self.customer_id = customer_id
        self.key_id = key_id
        self.user = user
        self.roles = tuple(roles)     # a session's roles; empty for an API key

    @classmethod
    def for_session(cls, auth_config: Any, user: str, roles: Any, organisation: str | None) -> Caller:
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

    def check_customer(self, customer_id: str | None) -> None:
        """A customer-scoped caller may only touch its own customer."""
        if not self.is_admin and (not self.customer_id or customer_id != self.customer_id):
            raise Forbidden("this caller is limited to another customer")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this endpoint needs an admin key or an admin login")

    def scope(self, params: dict[str, Any] | None) -> dict[str, Any]:
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

    def unscope(self, data: Any) -> Any:
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


def endpoint(name: str, methods: tuple[str, ...] = ("GET", "POST"), open: bool = False,
             admin: bool = False, plain: bool = False) -> Callable[[Handler], Handler]:
    """Register ``func(core, caller, params, request)`` as the handler of ``api/<name>.dspy``;
    ``plain``: its replies are plain data (``PLAIN_REPLIES``)."""
    def register(func: Handler) -> Handler:
        HANDLERS[name] = (func, tuple(methods), open, admin)
        if plain:
            PLAIN_REPLIES.add(name)
        return func
    return register


def reply(data: Any, status: int = 200, headers: dict[str, str] | None = None, plain: bool = False) -> web.Response:
    """The JSON reply; ``plain``: ``data`` is plain data (``jsontext.plain``)."""
    body = jsontext.plain(data) if plain else None
    if body is not None:
        return web.Response(body=body, status=status, content_type="application/json", charset="utf-8",
                            headers=headers)
    return web.Response(text=json.dumps(data, ensure_ascii=False, default=str), status=status,
                        content_type="application/json", charset="utf-8", headers=headers)
