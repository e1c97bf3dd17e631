"""A customer organisation's own API keys (``api/customer_keys|customer_key_create|
customer_key_revoke.dspy``): listed, created (the key shown once) and revoked by the
organisation's ``customer.admin`` (a session) or by the platform; a customer API key cannot
mint keys. ``Caller.scope`` has put the caller's own customer in the parameters."""
from ..errors import Forbidden
from .callers import named_customer
from .registry import endpoint

KEY_ADMIN_ROLE = "customer.admin"


def _key_admin_customer(caller, p) -> str:
    if not (caller.is_admin or (caller.kind == "customer" and caller.has_role(KEY_ADMIN_ROLE))):
        raise Forbidden(f"managing an organisation's API keys needs the {KEY_ADMIN_ROLE} role")
    return named_customer(p, caller)


def _key_view(row) -> dict:
    return {"key_id": row["id"], "key_prefix": row["key_prefix"], "name": row["name"], "enabled": row["enabled"],
            "created_at": row["created_at"], "revoked_at": row.get("revoked_at"),
            "last_used_at": row.get("last_used_at"), "expires_at": row.get("expires_at")}


@endpoint("customer_keys", methods=("GET",))
async def customer_keys(core, caller, p, request):
    rows = await core.apikeys.list(customer_id=_key_admin_customer(caller, p))
    return {"total": len(rows), "rows": [_key_view(r) for r in rows]}


@endpoint("customer_key_create", methods=("POST",))
async def customer_key_create(core, caller, p, request):
    """A new customer key: the key itself is in this reply only."""
    customer_id = _key_admin_customer(caller, p)
    key, row = await core.apikeys.create("customer", customer_id=customer_id, name=p.str("name", max_len=64) or "")
    return {"key": key, **_key_view(row)}


@endpoint("customer_key_revoke", methods=("POST",))
async def customer_key_revoke(core, caller, p, request):
    customer_id = _key_admin_customer(caller, p)
    key_id = p.ident("key_id", required=True)
    await core.apikeys.revoke(key_id, customer_id=customer_id)
    return {"key_id": key_id, "revoked": True}
