"""A central platform for the sync tests: a real aiohttp server on 127.0.0.1 that speaks the
protocol of docs/sync-protocol.md (its own in-memory data with versions and tombstones,
request signatures checked, replies signed) and can be told to misbehave."""
import asyncio
import json

from aiohttp import web

from billing_module import auth


class CentralServer:
    def __init__(self, app_key, secret, window=300):
        self.keys = {app_key: secret}
        self.window = window
        self.rows = {}           # entity -> {id: (version, item or None for a deletion)}
        self.versions = {}       # entity -> last version
        self.requests = []       # {"entity", "since", "limit", "status"}
        self.nonces = set()
        # faults
        self.fail_next = []      # statuses for the next requests (one each)
        self.fail_after_pages = None   # this many good pages, then every request fails
        self.fail_status = 500
        self.delay = 0.0
        self.malformed = False
        self.wrong_reply_signature = False
        self.unsigned_replies = False
        self.ignore_limit = False
        self.version_override = None
        self._good_pages = 0
        self._runner = None
        self.url = None

    # --- data -----------------------------------------------------------------------------------
    def put(self, entity, items):
        """All ``items`` get one new version (as one change set at the centre)."""
        v = self.versions.get(entity, 0) + 1
        self.versions[entity] = v
        rows = self.rows.setdefault(entity, {})
        for item in items:
            rows[item["id"]] = (v, dict(item))
        return v

    def delete(self, entity, ids):
        v = self.versions.get(entity, 0) + 1
        self.versions[entity] = v
        rows = self.rows.setdefault(entity, {})
        for i in ids:
            rows[i] = (v, None)
        return v

    def page(self, entity, since, limit):
        events = sorted((v, i, item) for i, (v, item) in self.rows.get(entity, {}).items() if v > since)
        if not self.ignore_limit and len(events) > limit:
            cut = events[limit - 1][0]
            # never split one version over two pages
            take = [e for e in events if e[0] <= cut]
            has_more = len(take) < len(events)
            events = take
        else:
            has_more = False
        version = events[-1][0] if events else self.versions.get(entity, 0)
        return {"entity": entity, "version": str(version),
                "items": [dict(item, version=str(v)) for v, i, item in events if item is not None],
                "deleted": [i for v, i, item in events if item is None], "has_more": has_more}

    # --- HTTP -----------------------------------------------------------------------------------
    async def start(self):
        app = web.Application()
        app.router.add_get("/billing_module/sync/{entity}.dspy", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self):
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _error(self, status, code, message):
        return web.json_response({"success": False, "code": code, "message": message}, status=status)

    async def _handle(self, request):
        entity = request.match_info["entity"]
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "500"))
        record = {"entity": entity, "since": since, "limit": limit, "status": 200}
        self.requests.append(record)
        resp = await self._answer(request, entity, since, limit)
        record["status"] = resp.status
        return resp

    async def _answer(self, request, entity, since, limit):
        if self.delay:
            await asyncio.sleep(self.delay)
        h = request.headers
        app_key = h.get(auth.HEADER_APP_KEY, "")
        secret = self.keys.get(app_key)
        if secret is None:
            return self._error(401, "unauthorized", "unknown app key")
        ts, nonce = h.get(auth.HEADER_TIMESTAMP, ""), h.get(auth.HEADER_NONCE, "")
        if not ts.isdigit() or abs(auth.unix_now() - int(ts)) > self.window:
            return self._error(401, "unauthorized", "signature expired")
        expected = auth.signature(secret, auth.string_to_sign(request.method, request.path, request.query.items(),
                                                              await request.read(), ts, nonce, app_key))
        if h.get(auth.HEADER_SIGNATURE) != expected:
            return self._error(401, "unauthorized", "bad signature")
        if nonce in self.nonces:
            return self._error(401, "unauthorized", "nonce replayed")
        self.nonces.add(nonce)
        if self.fail_next:
            status = self.fail_next.pop(0)
            return self._error(status, "unavailable", f"injected failure {status}")
        if self.fail_after_pages is not None and self._good_pages >= self.fail_after_pages:
            return self._error(self.fail_status, "unavailable", "injected failure after pages")
        self._good_pages += 1
        page = self.page(entity, since, limit)
        if self.version_override is not None:
            page["version"] = self.version_override
        body = json.dumps(page).encode("utf-8")
        if self.malformed:
            body = body[: len(body) // 2]
        headers = {} if self.unsigned_replies else auth.sign_reply(secret, 200, nonce, body)
        if self.wrong_reply_signature:
            headers = auth.sign_reply("not-the-secret", 200, nonce, body)
        return web.Response(body=body, status=200, content_type="application/json", headers=headers)
