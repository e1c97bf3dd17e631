"""Who is calling: an API key, a signed request or a host session, as a ``Caller``. Apart from
``handle`` so that a handler that authenticates for itself (``metrics``) imports no cycle."""
from .. import auth
from ..errors import Unauthorized
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
