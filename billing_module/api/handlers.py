"""The endpoint handlers. Each validates its parameters, calls one core function and returns
the reply's data; ``billing_module.api.handle`` checks the method and the caller and shapes
the reply."""
from typing import Any

from .. import clock
from ..accounting import BATCH_MODES, batch_refusal, check_batch, in_turns
from ..budgets import PERIODS, SCOPES
from ..errors import BillingError, Forbidden, InvalidParam
from .callers import check_user_of, named_customer
from .params import Params
from .registry import endpoint

READ, WRITE = ("GET",), ("POST",)


async def _event(core, p, caller):
    """A usage event's fields as sent, for the customer (and user) this caller may name."""
    raw = {k: v for k, v in p.raw.items() if not k.startswith("_")}
    for k, v in raw.items():
        if isinstance(v, list):
            raise InvalidParam(f"{k}: given more than once")
    ev_customer = p.ident("customer_id", required=True)
    caller.check_customer(ev_customer)
    await check_user_of(core, caller, ev_customer, p.ident("user_id"))
    key_id = _key_of(p, caller)
    if key_id is not None:
        raw["key_id"] = key_id
    return raw


def _key_of(p, caller):
    """The API key a debit is charged to (its budget): a customer key's own by default, and a
    customer caller may not name another key; an admin names any key, or none."""
    key_id = p.ident("key_id")
    if caller.is_admin or not caller.key_id:
        if key_id is not None and not caller.is_admin:
            raise Forbidden("key_id: only an admin or the key itself may charge a key")
        return key_id
    if key_id is not None and key_id != caller.key_id:
        raise Forbidden("key_id: a customer key charges its own budget only")
    return caller.key_id


@endpoint("health", methods=READ, open=True)
async def health(core, caller, p, request):
    result = await core.health()
    result["caches"] = core.caches.stats()
    if result["db"] != "ok":
        result["_status"] = 503
    return result


# --- balances and money movements ---------------------------------------------------------------
@endpoint("balance", methods=READ)
async def balance(core, caller, p, request):
    customer_id = named_customer(p, caller)
    return await core.ledger.balance(customer_id)


@endpoint("recharge", methods=WRITE, admin=True)
async def recharge(core, caller, p, request):
    return await core.ledger.recharge(p.ident("customer_id", required=True), p.amount(),
                                      p.ident("request_id", required=True, max_len=64),
                                      operator=caller.operator, note=p.str("note"))


@endpoint("adjust", methods=WRITE, admin=True)
async def adjust(core, caller, p, request):
    return await core.ledger.adjust(p.ident("customer_id", required=True), p.amount(),
                                    p.ident("request_id", required=True, max_len=64),
                                    reason=p.str("reason", required=True), operator=caller.operator)


@endpoint("refund", methods=WRITE, admin=True)
async def refund(core, caller, p, request):
    return await core.ledger.refund(p.ident("customer_id", required=True), p.amount(),
                                    p.ident("request_id", required=True, max_len=64),
                                    reason=p.str("reason", required=True), operator=caller.operator,
                                    ref_id=p.ident("record_id"))


@endpoint("account_update", methods=WRITE, admin=True)
async def account_update(core, caller, p, request):
    credit = p.amount("credit_limit", required=False)
    status = p.str("status", choices=("active", "suspended"))
    if credit is None and status is None:
        raise InvalidParam("give credit_limit and/or status")
    return await core.ledger.update_account(p.ident("customer_id", required=True), credit_limit=credit, status=status)


@endpoint("balances", methods=READ, admin=True)
async def balances(core, caller, p, request):
    page, rows = p.page()
    return await core.ledger.balances(page, rows, customer_id=p.ident("customer_id"),
                                      status=p.str("status", choices=("active", "suspended", "arrears")))


@endpoint("transactions", methods=READ)
async def transactions(core, caller, p, request):
    customer_id = named_customer(p, caller, required=False)
    page, rows = p.page()
    return await core.ledger.entries(customer_id, page, rows, entry_type=p.ident("entry_type"))


# --- holds -------------------------------------------------------------------------------------
@endpoint("authorize", methods=WRITE)
async def authorize(core, caller, p, request):
    """Hold an amount, or the price of an estimated usage event (same fields as accounting)."""
    customer_id = named_customer(p, caller)
    amount = p.amount(required=False)
    if amount is None:
        amount = await core.accounting.hold_amount(await _event(core, p, caller))
        if amount == 0:
            raise InvalidParam("the estimated usage prices at zero; send an amount to hold")
    ttl = p.int("ttl_seconds", minimum=1)
    return await core.ledger.hold(customer_id, amount, p.ident("request_id", required=True, max_len=64),
                                  ttl_seconds=ttl, note=p.str("note"), scope=caller.kind, created_by=caller.operator,
                                  user_id=p.ident("user_id"), key_id=_key_of(p, caller))


def _hold_ref(p):
    hold_id, request_id = p.ident("hold_id"), p.ident("request_id", max_len=64)
    if not (hold_id or request_id):
        raise InvalidParam("hold_id or request_id (of the hold): required")
    return hold_id, request_id


@endpoint("settle", methods=WRITE)
async def settle(core, caller, p, request):
    hold_id, request_id = _hold_ref(p)
    return await core.ledger.settle(p.amount(), hold_id=hold_id, request_id=request_id, operator=caller.operator,
                                    scope=caller.kind, customer_id=caller.customer_id)


@endpoint("release", methods=WRITE)
async def release(core, caller, p, request):
    hold_id, request_id = _hold_ref(p)
    return await core.ledger.release(hold_id=hold_id, request_id=request_id, scope=caller.kind,
                                     customer_id=caller.customer_id)


# --- usage --------------------------------------------------------------------------------------
@endpoint("accounting", methods=WRITE)
async def accounting(core, caller, p, request):
    return await core.accounting.post_usage(await _event(core, p, caller))


@endpoint("accounting_submit", methods=WRITE)
async def accounting_submit(core, caller, p, request):
    result = await core.accounting.submit_usage(await _event(core, p, caller))
    result["_status"] = 202 if not result.get("duplicate") else 200
    return result


@endpoint("accounting_batch", methods=WRITE, plain=True)
async def accounting_batch(core, caller, p, request):
    """Many usage events (``events``, a JSON list) in one request; ``mode`` ``now`` or ``queue``.
    Each event is read as the single endpoint reads it, with the caller's scope applied to it
    (a customer key's customer forced, its request_id namespaced); one refused event is a
    refused result, never a failed request."""
    events = p.raw.get("events")      # a JSON list, which every Params reader refuses as "given twice"
    mode = p.str("mode", choices=BATCH_MODES, default="now")
    check_batch(events, core.config.accounting.batch_max_events)
    results: list[dict[str, Any] | None] = [None] * len(events)
    accepted = []
    async for i, raw in in_turns(enumerate(events)):
        try:
            if not isinstance(raw, dict):
                raise InvalidParam("event: must be an object")
            accepted.append((i, await _event(core, Params(caller.scope(raw)), caller)))
        except BillingError as e:
            results[i] = batch_refusal(e)
    if accepted:
        done = await core.accounting.post_usage_batch([raw for _, raw in accepted], mode)
        for (i, _), result in zip(accepted, done, strict=True):
            results[i] = result
    counts = {k: 0 for k in ("accounted", "duplicate", "queued", "refused")}
    replies = []
    for i, result in enumerate(results):
        assert result is not None, "every event has its result"
        counts[result["outcome"]] += 1
        result["index"] = i       # each result is this request's own: no copy
        replies.append(result)
    return {"mode": mode, "total": len(replies), "counts": counts, "results": replies}


@endpoint("quote", methods=READ + WRITE)
async def quote(core, caller, p, request):
    return await core.accounting.quote(await _event(core, p, caller))


@endpoint("pricing", methods=READ)
async def pricing(core, caller, p, request):
    rows = await core.catalog.priced_models()
    return {"total": len(rows), "rows": rows}


@endpoint("users", methods=READ, admin=True)
async def users(core, caller, p, request):
    page, rows = p.page()
    return await core.catalog.users(page, rows, kind=p.str("kind", choices=("user", "org")),
                                    org_id=p.ident("org_id"), name=p.str("name", max_len=128))


# --- failed accounting ------------------------------------------------------------------------------
@endpoint("failed_accounting_list", methods=READ, admin=True)
async def failed_accounting_list(core, caller, p, request):
    page, rows = p.page()
    customer = p.ident("customer_id") or p.ident("userorgid")
    # the page asks "failed before" a day, a day of the deployment's time zone
    start, end = p.bounds(end_day_inclusive=False, zone=clock.zone(core.config.timezone))
    return await core.failures.search(
        customer_id=customer, user_id=p.ident("user_id") or p.ident("userid"), llmid=p.ident("llmid"),
        handled=p.flag("handled"), retry_state=p.str("retry_state", choices=("waiting", "exhausted", "resolved")),
        start_date=start, end_date=end, page=page, rows=rows)


@endpoint("failed_accounting_retry", methods=WRITE, admin=True)
async def failed_accounting_retry(core, caller, p, request):
    return await core.retries.retry(p.ident("id", required=True), operator=caller.operator)


@endpoint("failed_accounting_handle", methods=WRITE, admin=True)
async def failed_accounting_handle(core, caller, p, request):
    return await core.failures.mark_handled(p.ident("id", required=True), p.str("note", required=True, max_len=2000),
                                            operator=caller.operator)





# --- the standalone host's login: its admin and its page users (a host with rbac has its own) ---------
@endpoint("admin_login", methods=WRITE, open=True)
async def admin_login(core, caller, p, request):
    """The standalone host's login (``login.dspy``): the configured admin or a page user
    (``billing-module user add``); throttled per user name and per address; the guard has
    refused a cross-site POST already."""
    import hmac

    from ..errors import NotFound, Unauthorized
    from ..sessions import start_session
    password = getattr(core, "admin_password", None)
    if not password:
        raise NotFound("this server uses the host's login")
    user = p.str("username", required=True, max_len=64)
    given = p.str("password", required=True, max_len=256)
    keys = core.login_throttle.keys(user, request.get("client_ip") or request.remote or "")
    core.login_throttle.check(keys)
    if hmac.compare_digest(user.encode(), core.config.server.admin_user.encode()):
        ok, orgid, home = hmac.compare_digest(given.encode(), password.encode()), "", "index.ui"
    else:
        page_user = await core.page_users.verify(user, given)
        ok, orgid = page_user is not None, (page_user.customer_id if page_user else "") or ""
        home = "my/index.ui" if orgid else "index.ui"
    if not ok:
        core.login_throttle.failed(keys)
        raise Unauthorized("wrong user name or password")
    core.login_throttle.succeeded(keys)
    await start_session(request, user, orgid)
    return {"user": user, "home": home}     # the page to open: the console, or the customer area


@endpoint("admin_logout", methods=WRITE, open=True)
async def admin_logout(core, caller, p, request):
    """Ends the session on the server: the old cookie no longer names a session."""
    from ..sessions import end_session
    await end_session(request)
    return {}


# --- metrics --------------------------------------------------------------------------------------
@endpoint("metrics", methods=READ, open=True)
async def metrics(core, caller, p, request):
    """Prometheus text format, for an admin key or the configured scrape token."""
    import hmac

    from aiohttp import web

    from .. import metrics as metrics_module
    from .callers import authenticate
    token = core.config.metrics.scrape_token
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not (token and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
        (await authenticate(core, request)).require_admin()
    core.caches.flush()     # this process's cache counts (other workers flush on their own)
    body = metrics_module.render(await metrics_module.database_families(core.db))
    return web.Response(body=body, headers={"Content-Type": metrics_module.CONTENT_TYPE})


# --- budgets ------------------------------------------------------------------------------------
@endpoint("budget_set", methods=WRITE, admin=True)
async def budget_set(core, caller, p, request):
    """Set (or with an empty or zero ``limit``, remove) the budget of an organisation, a user or a key."""
    scope = p.str("scope", required=True, choices=SCOPES)
    customer_id = p.ident("customer_id", required=True)
    subject = {"org": customer_id, "user": p.ident("user_id", required=scope == "user"),
               "key": p.ident("key_id", required=scope == "key")}[scope]
    return await core.budgets.set_budget(customer_id, scope, subject, p.str("period", required=True, choices=PERIODS),
                                         p.amount("limit", required=False), operator=caller.operator)


@endpoint("budgets", methods=READ)
async def budgets(core, caller, p, request):
    """Budgets with their spend in the current period; a customer caller sees its organisation's."""
    customer_id = named_customer(p, caller, required=False)
    page, rows = p.page()
    return await core.budgets.list_budgets(customer_id, p.str("scope", choices=SCOPES), page, rows)
