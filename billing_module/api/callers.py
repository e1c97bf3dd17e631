"""Who is calling: an API key, a signed request or a host session, as a ``Caller``. Apart from
``handle`` so that a handler that authenticates for itself (``metrics``) imports no cycle."""
from typing import Any, Literal, overload

from .. import auth
from ..errors import Forbidden, Unauthorized
from .registry import Caller


async def authenticate(core, request):
    if auth.is_signed(request):
        return await signed_caller(core, request)
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


async def signed_caller(core, request):
    """dapi_auth: the ``Caller`` of a signed request (its key verified by ``core.auth``)."""
    row = (await core.auth.verify(request)).row
    return Caller(row.scope, customer_id=row.customer_id, key_id=row.key_prefix)


async def check_user_of(core, caller: Caller, customer_id: str | None, user_id: str | None) -> None:
    """A customer-scoped caller names only users of its own organisation (when the users cache
    knows the user; an id it does not know is the caller's own label, as on the platform)."""
    if user_id is None or caller.is_admin:
        return
    org = await core.catalog.user_org(user_id)
    if org is not None and org != customer_id:
        raise Forbidden(f"user {user_id} is not a user of {customer_id}")


@overload
def named_customer(p: Any, caller: Caller, required: Literal[True] = True) -> str: ...
@overload
def named_customer(p: Any, caller: Caller, required: bool) -> str | None: ...
def named_customer(p: Any, caller: Caller, required: bool = True) -> str | None:
    """The ``customer_id`` a request names, checked against what this caller may touch. Not
    ``required``: a platform caller may leave it out (every customer); a customer caller not."""
    customer_id = p.ident("customer_id", required=required or not caller.is_admin)
    if customer_id is not None:
        caller.check_customer(customer_id)
    return customer_id
