"""The native fast path: plain aiohttp routes for the hot endpoints.

``/billing_module/fast/<name>`` runs exactly what ``/billing_module/api/<name>.dspy`` runs
(``handle``: the same authentication, parameters, handler and reply) without ahserver's
processor: no file lookup, no script compilation per request, no template namespace. The
``.dspy`` files stay; both paths pass the same middlewares (the request guard's body cap, CSRF and
error replies; the host's session and rbac permission check, which sees these paths as they are:
grant them like the ``.dspy`` paths, scripts/setup_billing_perms.sh does).

Parameters are merged the way ahserver merges them for a ``.dspy``: the query, then for a POST
its form fields, or the JSON body when there are none.
"""
from aiohttp import web
from appPublic.dictObject import multiDict2Dict

from .. import jsontext

FAST_ENDPOINTS = ("accounting", "accounting_batch", "authorize", "settle", "release", "balance", "quote")


async def read_params(request: web.Request) -> dict:
    """The request's parameters as ahserver gives them to a ``.dspy`` (``getPostData`` and the
    query reader of ``ProcessorResource``); what it cannot merge (a JSON body that is not an
    object) raises as it does there, and the request guard answers 400."""
    params = multiDict2Dict(request.query)
    if request.method != "POST":
        return params
    posted = multiDict2Dict(await request.post())
    if not posted and request.can_read_body:
        try:
            posted = jsontext.loads(await request.read())     # json.loads's values, by orjson
        except ValueError:
            posted = {}          # not JSON: no parameters, as ahserver does
    params.update(posted)
    return params


async def native_endpoint(request: web.Request) -> web.StreamResponse:
    from ahserver.serverenv import ServerEnv

    from . import handle
    name = request.path.rsplit("/", 1)[-1]
    return await handle(ServerEnv().billing_core, request, await read_params(request), name)


def add_native_routes(app: web.Application, prefix: str) -> None:
    """Register the fast routes at ``prefix + name`` (from the 'ahapp_built' hook, with the
    guard's ``FAST_PREFIX``). Exact paths: aiohttp resolves them before the prefix resource that
    serves the ``.dspy`` files."""
    for name in FAST_ENDPOINTS:
        app.router.add_route("*", prefix + name, native_endpoint)
