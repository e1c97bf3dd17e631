"""Alerts (``api/alerts|alert_webhook|alert_webhook_set|alert_redeliver.dspy``): the list, a
customer's webhook and low-balance override, sending a delivery again. A customer caller reads
its own alerts and settings (``Caller.scope`` names its customer); changes are the platform's."""
from typing import Any

from .. import validation
from ..alerts import ALERT_TYPES, SECRET_MAX_LEN, SECRET_MIN_LEN, STATUSES
from ..errors import InvalidParam
from .callers import named_customer
from .registry import endpoint

READ, WRITE = ("GET",), ("POST",)
_REMOVABLE = ("webhook", "low_balance", "all")


@endpoint("alerts", methods=READ)
async def alerts(core, caller, p, request):
    page, rows = p.page()
    customer_id = p.ident("customer_id")
    if not caller.is_admin:
        caller.check_customer(customer_id)
    return await core.alerts.search(customer_id=customer_id, type=p.str("type", choices=ALERT_TYPES),
                                    status=p.str("status", choices=STATUSES), page=page, rows=rows)


@endpoint("alert_webhook", methods=READ)
async def alert_webhook(core, caller, p, request):
    customer_id = named_customer(p, caller)
    return await core.alerts.webhook(customer_id)


@endpoint("alert_webhook_set", methods=WRITE, admin=True)
async def alert_webhook_set(core, caller, p, request):
    """Given fields change, absent ones stay; ``remove``: ``webhook`` (url and secret),
    ``low_balance`` (the override: the deployment's threshold applies again) or ``all``."""
    customer_id = p.ident("customer_id", required=True)
    changes: dict[str, Any] = {}
    remove = p.str("remove", choices=_REMOVABLE)
    if remove in ("webhook", "all"):
        changes["url"] = None
    if remove in ("low_balance", "all"):
        changes.update(low_balance_amount=None, low_balance_percent=None)
    if p.present("url"):
        changes["url"] = validation.webhook_url(p.value("url"), "url")
    if p.present("secret"):
        secret = p.str("secret", max_len=SECRET_MAX_LEN)
        if len(secret) < SECRET_MIN_LEN:
            raise InvalidParam(f"secret: at least {SECRET_MIN_LEN} characters")
        changes["secret"] = secret
    if p.present("low_balance_amount"):
        changes["low_balance_amount"] = validation.amount(p.value("low_balance_amount"), "low_balance_amount",
                                                          non_negative=True)
    if p.present("low_balance_percent"):
        changes["low_balance_percent"] = p.int("low_balance_percent", minimum=1, maximum=100)
    if not changes:
        raise InvalidParam("nothing to change: give url and secret, low_balance_amount, low_balance_percent "
                           "or remove")
    return await core.alerts.set_webhook(customer_id, changes, caller.operator)


@endpoint("alert_redeliver", methods=WRITE, admin=True)
async def alert_redeliver(core, caller, p, request):
    """``delivery_id``: that delivery; ``id``: every delivery of that alert that is not pending."""
    return await core.alerts.redeliver(delivery_id=p.ident("delivery_id"), alert_id=p.ident("id"))
