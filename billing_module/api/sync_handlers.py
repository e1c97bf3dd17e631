"""Admin endpoints of the sync: its state per entity (with the cache counters) and a run now.
``wwwroot/api/sync_status.dspy`` and ``sync_run.dspy``; importing this module registers them."""
from ..errors import BillingError
from ..sync.base import ENTITY_ORDER
from .registry import endpoint


@endpoint("sync_status", methods=("GET",), admin=True)
async def sync_status(core, caller, p, request):
    return {"entities": await core.sync.status(), "caches": core.caches.stats()}


@endpoint("sync_run", methods=("POST",), admin=True)
async def sync_run(core, caller, p, request):
    """Runs in the request (the CLI suits long first syncs better). 502 sync_failed when an
    entity failed; its error is also in sync_state."""
    entity = p.str("entity", choices=ENTITY_ORDER)
    full = p.flag("full", default="0") == "1"
    results = await core.sync.sync(entity, full=full)
    failed = [r for r in results if r["status"] != "success"]
    if failed:
        raise BillingError("; ".join(r["error"] for r in failed), code="sync_failed", status=502, results=results)
    return {"results": results}
