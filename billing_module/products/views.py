"""The products' reply shapes: one view per table row, money as decimal strings, quantities as
plain decimal text. ``Row`` is any object with the table's columns as attributes (a database
row or a DictObject of a row just written)."""
from typing import Any

from ..money import from_micro
from .values import cost_text, int_from_db, q_from_db, qtext

Row = Any


def product_view(p: Row) -> dict:
    return {
        "product_id": p.id, "org_id": p.org_id, "code": p.code, "product_name": p.product_name,
        "product_type": p.product_type, "status": p.status, "currency": p.currency,
        "list_price": from_micro(int(p.list_price)), "included_quantity": qtext(p.included_quantity),
        "quantity_unit": p.quantity_unit, "period_months": int(p.period_months),
        "overage_price": None if p.overage_price is None else from_micro(int(p.overage_price)),
        "price_per": str(int(p.price_per)), "fractional": p.fractional, "period_anchor": p.period_anchor,
        "description": p.description,
        "created_at": p.created_at, "updated_at": p.updated_at,
    }


def binding_view(r: Row) -> dict:
    return {
        "product_resource_id": r.id, "product_id": r.product_id, "resource_type": r.resource_type,
        "resource_ref_id": r.resource_ref_id, "resource_name": r.resource_name, "enabled": r.enabled,
        "created_at": r.created_at, "updated_at": r.updated_at,
    }


def supplier_view(s: Row) -> dict:
    return {
        "supplier_id": s.id, "product_resource_id": s.product_resource_id, "supplier_org_id": s.supplier_org_id,
        "supplier_name": s.supplier_name, "unit_cost": cost_text(int(s.unit_cost)), "priority": int(s.priority),
        "weight": int(s.weight), "enabled": s.enabled, "created_at": s.created_at, "updated_at": s.updated_at,
    }


def subscription_view(s: Row, duplicate: bool = False) -> dict:
    included, used = int(s.included_quantity), int(s.used_quantity)
    return {
        "subscription_id": s.id, "customer_id": s.customer_id, "user_id": s.user_id, "product_id": s.product_id,
        "request_id": s.request_id, "status": s.status, "status_reason": s.status_reason,
        "included": qtext(included), "used": qtext(used), "remaining": qtext(max(0, included - used)),
        "unit": s.quantity_unit, "package_price": from_micro(int(s.package_price)), "currency": s.currency,
        "period_months": int(s.period_months), "started_at": s.started_at, "period_start": s.period_start,
        "period_end": s.period_end, "renewals": int(s.renewals), "skipped_periods": int(s.skipped_periods or 0),
        "auto_renew": s.auto_renew,
        "cancelled_at": s.cancelled_at, "ledger_entry_id": s.ledger_entry_id, "created_at": s.created_at,
        "duplicate": duplicate,
    }


# what a customer-scoped caller must not see of a usage row (supplier and cost data)
COST_FIELDS = ("product_resource_id", "supplier_org_id", "unit_cost", "total_cost")


def usage_view(r: Row, duplicate: bool = False) -> dict:
    return {
        "usage_id": r.id, "product_id": r.product_id, "subscription_id": r.subscription_id,
        "customer_id": r.user_org_id, "user_id": r.user_id, "billing_mode": r.billing_mode,
        "amount": qtext(q_from_db(r.used_amount)), "unit": r.used_unit,
        "included_amount": qtext(q_from_db(r.included_amount)),
        "overage_amount": qtext(q_from_db(r.overage_amount)),
        "sell_price": from_micro(int_from_db(r.sell_price)), "currency": r.currency,
        "ledger_entry_id": r.ledger_entry_id, "source_ref_table": r.source_ref_table, "source_ref_id": r.source_ref_id,
        "resource_type": r.resource_type, "resource_ref_id": r.resource_ref_id,
        "product_resource_id": r.product_resource_id, "supplier_org_id": r.supplier_org_id,
        "unit_cost": cost_text(int_from_db(r.unit_cost)), "total_cost": from_micro(int_from_db(r.total_cost)),
        "use_time": r.use_time, "created_at": r.created_at, "duplicate": duplicate,
    }
