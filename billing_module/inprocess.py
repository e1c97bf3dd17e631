"""The in-process API: the ``ServerEnv().billing_*`` functions other modules of the host call.

Each has the signature of the service method it calls (``billing_post_usage(event)`` is
``Accounting.post_usage``), and resolves the service on each call: in a host the database, and so
the services, exist only after the host's DBPools is built, which is after ``load_billing_module()``
registered these names.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from .accounting import Accounting
from .budgets import Budgets
from .core import BillingCore
from .ledger import Ledger
from .products import ProductManager
from .products.consumption import Consumption
from .products.subscriptions import Subscriptions
from .services import Services

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


def late_bound(core: BillingCore, service: Callable[[Services], S],
               method: Callable[Concatenate[S, P], Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``method`` of the service ``service(core.services)``, looked up at call time."""
    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return await method(service(core.services), *args, **kwargs)

    signature = inspect.signature(method)
    # what inspect.signature shows: the method's parameters without the service itself
    call.__dict__["__signature__"] = signature.replace(parameters=list(signature.parameters.values())[1:])
    call.__name__ = call.__qualname__ = f"billing_{method.__name__}"
    return call


class ProductManagerHandle:
    """``ServerEnv().billing_product_manager``: the core's ProductManager, reached on use (the
    services exist once the host's database does). ``.get()`` returns the manager itself."""

    def __init__(self, core: BillingCore) -> None:
        self._core = core

    def get(self) -> ProductManager:
        return self._core.products

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core.products, name)


def register_functions(core: BillingCore, env: Any) -> None:
    """Register the ``billing_*`` names (README, "In a host") in ServerEnv ``env``."""
    def accounting(s: Services) -> Accounting:
        return s.accounting

    def ledger(s: Services) -> Ledger:
        return s.ledger

    def budgets(s: Services) -> Budgets:
        return s.budgets

    def consumption(s: Services) -> Consumption:
        return s.products.consumption

    def subscriptions(s: Services) -> Subscriptions:
        return s.products.subscriptions_service

    env.billing_health = core.health
    env.billing_post_usage = late_bound(core, accounting, Accounting.post_usage)
    env.billing_submit_usage = late_bound(core, accounting, Accounting.submit_usage)
    env.billing_post_usage_batch = late_bound(core, accounting, Accounting.post_usage_batch)
    env.billing_quote = late_bound(core, accounting, Accounting.quote)
    env.billing_balance = late_bound(core, ledger, Ledger.balance)
    env.billing_recharge = late_bound(core, ledger, Ledger.recharge)
    env.billing_refund = late_bound(core, ledger, Ledger.refund)
    env.billing_adjust = late_bound(core, ledger, Ledger.adjust)
    env.billing_hold = late_bound(core, ledger, Ledger.hold)
    env.billing_settle = late_bound(core, ledger, Ledger.settle)
    env.billing_release = late_bound(core, ledger, Ledger.release)
    env.billing_reconcile = late_bound(core, ledger, Ledger.reconcile)
    env.billing_budget_set = late_bound(core, budgets, Budgets.set_budget)
    env.billing_budgets = late_bound(core, budgets, Budgets.list_budgets)
    env.billing_product_use = late_bound(core, consumption, Consumption.product_use)
    env.billing_check_quota = late_bound(core, subscriptions, Subscriptions.check_quota)
    env.billing_product_subscribe = late_bound(core, subscriptions, Subscriptions.subscribe)
    env.billing_product_manager = ProductManagerHandle(core)
