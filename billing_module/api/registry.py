"""The endpoint registry: what a handler module needs to declare an endpoint (``endpoint``), who
calls it (``Caller``) and the JSON reply. ``api/__init__.py`` imports the handler modules, which
import only this, so the registry and the handlers form no import cycle."""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import Forbidden

# a handler: (core, caller, params, request) -> reply dict (or a StreamResponse)
Handler = Callable[..., Awaitable[Any]]
HANDLERS: dict[str, tuple[Handler, tuple[str, ...], bool, bool]] = {}


class Caller:
    """Who calls an endpoint: an ``admin`` or a ``customer`` (limited to ``customer_id``)."""

    def __init__(self, kind: str, customer_id: str | None = None, key_id: str | None = None,
                 user: str | None = None) -> None:
        self.kind = kind              # "admin" or "customer"
        self.customer_id = customer_id
        self.key_id = key_id
        self.user = user

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def operator(self) -> str:
        return self.user or (f"key:{self.key_id}" if self.key_id else "system")

    def check_customer(self, customer_id: str | None) -> None:
        """A customer-scoped caller may only touch its own customer."""
        if not self.is_admin and customer_id != self.customer_id:
            raise Forbidden("this API key is limited to another customer")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this endpoint needs an admin key")


def endpoint(name: str, methods: tuple[str, ...] = ("GET", "POST"), open: bool = False,
             admin: bool = False) -> Callable[[Handler], Handler]:
    """Register ``func(core, caller, params, request)`` as the handler of ``api/<name>.dspy``."""
    def register(func: Handler) -> Handler:
        HANDLERS[name] = (func, tuple(methods), open, admin)
        return func
    return register


def reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, ensure_ascii=False, default=str), status=status,
                        content_type="application/json", charset="utf-8")
