"""The endpoint handlers. Each validates its parameters, calls one core function and returns
the reply's data; ``billing_module.api.handle`` does the rest."""
from . import endpoint


@endpoint("health", methods=("GET",), open=True)
async def health(core, caller, p, request):
    result = await core.health()
    if result["db"] != "ok":
        result["_status"] = 503
    return result
