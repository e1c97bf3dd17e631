"""``wwwroot/sync/<entity>.dspy``: the export side of the sync protocol as an HTTP edge. The
caller's signature is checked (an app or admin key), the page comes from ``sync/export.py`` and
the reply is signed with the caller's secret."""
import json
import logging

from aiohttp import web

from .. import auth
from ..catalog import ENTITIES
from ..errors import BillingError, Forbidden, NotFound
from ..sync.base import MAX_VERSION_DIGITS
from ..sync.export import export_page
from .params import Params
from .registry import reply

log = logging.getLogger("billing_module.sync")

EXPORT_SCOPES = ("app", "admin")


async def serve(core, request: web.Request, params_kw: dict, entity: str) -> web.Response:
    """``wwwroot/sync/<entity>.dspy``: a signed GET by an app or admin key -> a signed page."""
    try:
        if entity not in ENTITIES:
            raise NotFound(f"no sync entity {entity!r}")
        if request.method != "GET":
            raise BillingError("the sync export answers GET only", code="method_not_allowed", status=405)
        signed = await core.auth.verify(request)
        if signed.row.scope not in EXPORT_SCOPES:
            raise Forbidden("the sync export needs an app or admin key")
        p = Params(params_kw)
        max_limit = core.config.sync.export_max_limit
        since = p.int("since", default=0, minimum=0, maximum=10 ** MAX_VERSION_DIGITS - 1)
        limit = p.int("limit", default=min(500, max_limit), minimum=1, maximum=max_limit)
        page = await export_page(core.db, entity, since, limit)
    except BillingError as e:
        return reply(e.to_reply(), e.status)
    except Exception:
        log.exception("sync export of %s failed", entity)
        return reply({"success": False, "code": "internal_error",
                      "message": "internal error; the server log has the details"}, 500)
    body = json.dumps(page, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return web.Response(body=body, status=200, content_type="application/json", charset="utf-8",
                        headers=auth.sign_reply(signed.secret, 200, signed.nonce, body))
