"""Product endpoints (``api/product_*.dspy``): catalogue and suppliers for admins; subscriptions,
quota and usage for a customer's own organisation. The ProductManager validates every value
(amounts as decimal strings, quantities as numbers or strings); a handler reads the parameters,
checks who may act on which customer and calls one manager method."""
from ..errors import Forbidden, NotFound
from ..products import COST_FIELDS
from .callers import check_user_of
from .registry import endpoint
from .report_handlers import RANGE_ALIASES, usage_filter

READ, WRITE = ("GET",), ("POST",)


def _raw(p, name):
    return p.value(name)


def _customer(p, caller, required=True):
    """The customer the request is about; a customer key is limited to its own."""
    customer_id = p.ident("customer_id", required=required and caller.is_admin)
    if customer_id is None and not caller.is_admin:
        customer_id = caller.customer_id
    if customer_id is not None:
        caller.check_customer(customer_id)
    return customer_id


async def _user_of(core, caller, customer_id, user_id):
    await check_user_of(core, caller, customer_id, user_id)
    return user_id


def _usage_for(caller, view):
    """Supplier and cost data are for admins only."""
    if caller.is_admin:
        return view
    return {k: v for k, v in view.items() if k not in COST_FIELDS}


def _listing(caller, result):
    result["rows"] = [_usage_for(caller, r) for r in result["rows"]]
    return result


# --- catalogue (admin) ------------------------------------------------------------------------------
@endpoint("product_save", methods=WRITE, admin=True)
async def product_save(core, caller, p, request):
    """Create a product, or change the fields sent of the one named by product_id (``clear`` names
    the nullable fields to empty: overage_price, description)."""
    fields = {k: _raw(p, k) for k in ("code", "product_name", "quantity_unit", "list_price", "included_quantity",
                                      "period_months", "overage_price", "price_per", "fractional")}
    return await core.products.save_product(
        product_id=p.ident("product_id"), product_type=p.str("product_type", max_len=32),
        status=p.str("status", max_len=16), currency=p.str("currency", max_len=8), org_id=p.ident("org_id"),
        description=p.str("description", max_len=500), clear=p.str("clear", max_len=200) or (), **fields)


@endpoint("products", methods=READ)
async def products(core, caller, p, request):
    """The catalogue with each plan (price, period, included quantity and unit, overage price);
    a customer key sees the products it can subscribe to (active) only."""
    page, rows = p.page()
    status = p.str("status", max_len=16) if caller.is_admin else "active"
    return await core.products.products(status, p.str("resource_type", max_len=32),
                                        p.ident("resource_ref_id") or p.ident("resource"), page, rows)


@endpoint("product", methods=READ)
async def product(core, caller, p, request):
    """One product and its plan; a customer key reads active products only (others: 404)."""
    result = await core.products.product(p.ident("product_id", required=True))
    if not caller.is_admin and result["status"] != "active":
        raise NotFound(f"no product {result['product_id']}")
    return result


@endpoint("product_bind", methods=WRITE, admin=True)
async def product_bind(core, caller, p, request):
    return await core.products.bind(p.ident("product_id", required=True), p.str("resource_type", required=True),
                                     p.ident("resource_ref_id", required=True), p.str("resource_name", max_len=128))


@endpoint("product_unbind", methods=WRITE, admin=True)
async def product_unbind(core, caller, p, request):
    return await core.products.unbind(p.ident("product_resource_id"), p.ident("product_id"),
                                      p.str("resource_type", max_len=32), p.ident("resource_ref_id"),
                                      force=p.flag("force") == "1")


@endpoint("product_bindings", methods=READ)
async def product_bindings(core, caller, p, request):
    """What each product sells (no supplier or cost data): readable by any caller."""
    return await core.products.bindings(p.ident("product_id"), p.str("resource_type", max_len=32),
                                        p.ident("resource_ref_id"),
                                        include_disabled=caller.is_admin and p.flag("include_disabled") == "1")


@endpoint("product_supplier_add", methods=WRITE, admin=True)
async def product_supplier_add(core, caller, p, request):
    return await core.products.add_supplier(
        p.ident("product_resource_id", required=True), p.ident("supplier_org_id", required=True),
        _raw(p, "unit_cost"), priority=_raw(p, "priority"), weight=_raw(p, "weight"),
        supplier_name=p.str("supplier_name", max_len=128))


@endpoint("product_supplier_update", methods=WRITE, admin=True)
async def product_supplier_update(core, caller, p, request):
    return await core.products.update_supplier(
        p.ident("supplier_id", required=True), unit_cost=_raw(p, "unit_cost"), priority=_raw(p, "priority"),
        weight=_raw(p, "weight"), enabled=p.flag("enabled"), supplier_name=p.str("supplier_name", max_len=128))


@endpoint("product_supplier_disable", methods=WRITE, admin=True)
async def product_supplier_disable(core, caller, p, request):
    return await core.products.disable_supplier(p.ident("supplier_id", required=True))


@endpoint("product_suppliers", methods=READ, admin=True)
async def product_suppliers(core, caller, p, request):
    result = await core.products.suppliers(p.ident("product_resource_id"), p.ident("product_id"))
    product_id = p.ident("product_id")
    if product_id:
        result["route"] = await core.products.route(product_id, p.ident("product_resource_id"))
    return result


# --- subscriptions ---------------------------------------------------------------------------------
@endpoint("product_subscribe", methods=WRITE)
async def product_subscribe(core, caller, p, request):
    """Subscribe at the product's plan; a custom plan (quantity, price, months) needs an admin key."""
    customer_id = _customer(p, caller)
    plan = {k: _raw(p, k) for k in ("included_quantity", "package_price", "period_months")}
    if not caller.is_admin and any(v not in (None, "") for v in plan.values()):
        raise Forbidden("a custom plan (included_quantity, package_price, period_months) needs an admin key")
    return await core.products.subscribe(
        customer_id, p.ident("product_id", required=True), p.ident("request_id", required=True, max_len=60),
        user_id=await _user_of(core, caller, customer_id, p.ident("user_id")),
        auto_renew=p.flag("auto_renew", default="1"), operator=caller.operator, **plan)


@endpoint("product_subscription_cancel", methods=WRITE)
async def product_subscription_cancel(core, caller, p, request):
    sub_id = p.ident("subscription_id", required=True)
    caller.check_customer((await core.products.subscription(sub_id))["customer_id"])
    return await core.products.cancel(sub_id, at_period_end=p.flag("at_period_end") == "1",
                                      reason=p.str("reason", max_len=255))


@endpoint("product_subscription_resume", methods=WRITE)
async def product_subscription_resume(core, caller, p, request):
    """Undo a cancel at the period end before the period ends."""
    sub_id = p.ident("subscription_id", required=True)
    caller.check_customer((await core.products.subscription(sub_id))["customer_id"])
    return await core.products.resume(sub_id)


@endpoint("product_subscriptions", methods=READ)
async def product_subscriptions(core, caller, p, request):
    page, rows = p.page()
    return await core.products.subscriptions(_customer(p, caller, required=False), p.ident("product_id"),
                                             p.str("status", max_len=16), page, rows)


@endpoint("product_quota", methods=READ)
async def product_quota(core, caller, p, request):
    return await core.products.check_quota(_customer(p, caller), p.ident("product_id", required=True))


# --- usage ---------------------------------------------------------------------------------------------
@endpoint("product_use", methods=WRITE)
async def product_use(core, caller, p, request):
    customer_id = _customer(p, caller)
    result = await core.products.product_use(
        customer_id, await _user_of(core, caller, customer_id, p.ident("user_id", required=True)),
        p.ident("product_id", required=True), _raw(p, "amount"),
        unit=p.ident("unit"), source_ref_table=p.ident("source_ref_table", required=True, max_len=64),
        source_ref_id=p.ident("source_ref_id", required=True), product_resource_id=p.ident("product_resource_id"))
    return _usage_for(caller, result)


def _report_filters(core, p, caller, names):
    """The product report's filters (the usage reports' vocabulary, ``start_date`` / ``end_date``
    with ``start`` / ``end`` still accepted) as the ProductManager's keywords: ``names`` of them,
    the customer limited to the caller's own and the supplier filter for admins only."""
    f = usage_filter(core, p, source="product", aliases=True)   # checks every filter, the range included
    # the range as sent: the manager reads it in the deployment's time zone itself
    start, end = (p.value(name) if p.present(name) else p.value(alias) for name, alias in RANGE_ALIASES)
    filters = {"customer_id": _customer(p, caller, required=False), "start": start, "end": end,
               **{name: getattr(f, name) for name in names}}
    if not caller.is_admin:
        filters.pop("supplier_org_id", None)
    return filters


@endpoint("product_usage_list", methods=READ)
async def product_usage_list(core, caller, p, request):
    page, rows = p.page()
    filters = _report_filters(core, p, caller, ("product_id", "user_id", "subscription_id", "billing_mode",
                                          "supplier_org_id"))
    return _listing(caller, await core.products.usage_list(page, rows, **filters))


@endpoint("product_overage", methods=READ)
async def product_overage(core, caller, p, request):
    """Usage charged past a quota (or without one), its total, and the product's overage price."""
    page, rows = p.page()
    filters = _report_filters(core, p, caller, ("product_id",))
    return _listing(caller, await core.products.overage(page=page, rows=rows, **filters))


@endpoint("product_stats", methods=READ, admin=True)
async def product_stats(core, caller, p, request):
    filters = _report_filters(core, p, caller, ("product_id", "supplier_org_id"))
    return await core.products.stats(p.str("group_by", max_len=16) or "product", **filters)
