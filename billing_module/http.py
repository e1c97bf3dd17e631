"""Outbound HTTP to the central platform: aiohttp with a total timeout per attempt, retries
with exponential backoff and jitter (tenacity) for what may pass (timeouts, refused
connections, 5xx, 429), and every request signed (``auth.sign_request``, a fresh nonce per
attempt). Replies are read up to a size limit and, when asked, must carry a valid reply
signature. Failures are ``RemoteError``s whose message says what happened and how often it
was tried.
"""
import asyncio
import json
import logging

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from yarl import URL

from . import auth

log = logging.getLogger("billing_module.http")


class RemoteError(Exception):
    """The central platform could not be used; ``transient`` ones are retried."""
    transient = False

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class RemoteUnavailable(RemoteError):
    transient = True


class RemoteRejected(RemoteError):
    """A 4xx: our request (or our key) is refused; trying again will not help."""


class RemoteProtocolError(RemoteError):
    """The reply is unusable: not JSON, too large, or not signed by the right secret."""


class SignedClient:
    """``async with SignedClient(...) as c: data = await c.get_json(path, params)``."""

    def __init__(self, base_url, app_key, secret, timeout=10.0, retries=3, retry_base=0.5,
                 retry_max=10.0, max_bytes=64 * 1024 * 1024, verify_replies=True, reply_window=300):
        if not base_url:
            raise ValueError("no central URL configured")
        self.base = URL(base_url.rstrip("/"))
        if not self.base.is_absolute() or self.base.scheme not in ("http", "https"):
            raise ValueError(f"central URL {base_url!r} is not an http(s) URL")
        if not app_key or not secret:
            raise ValueError("no app key / secret configured for signing")
        self.app_key, self.secret = app_key, secret
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.timeout_seconds = timeout
        self.attempts = retries + 1
        self.retry_base, self.retry_max = retry_base, retry_max
        self.max_bytes = max_bytes
        self.verify_replies = verify_replies
        self.reply_window = reply_window
        self._session = None

    @classmethod
    def from_config(cls, config):
        s = config.sync
        return cls(s.central_url, s.app_key, s.app_secret, timeout=s.timeout_seconds, retries=s.retries,
                   retry_base=s.retry_base_seconds, retry_max=s.retry_max_seconds, max_bytes=s.max_page_bytes,
                   verify_replies=s.verify_replies, reply_window=config.auth.signature_window_seconds)

    async def __aenter__(self):
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_json(self, path, params=None):
        return await self.request_json("GET", path, params=params)

    async def request_json(self, method, path, params=None, json_body=None):
        """The decoded JSON reply of a 2xx answer, after up to ``retries`` more attempts."""
        body = b"" if json_body is None else json.dumps(json_body, ensure_ascii=False).encode("utf-8")
        query = [(str(k), str(v)) for k, v in (params or {}).items()]
        url = self.base.with_path(self.base.path.rstrip("/") + path).with_query(query)
        attempt = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(multiplier=self.retry_base, max=self.retry_max, jitter=self.retry_base),
            retry=retry_if_exception(lambda e: isinstance(e, RemoteError) and e.transient),
            reraise=True)
        try:
            async for try_ in retrying:
                with try_:
                    attempt += 1
                    return await self._once(method, url, query, body)
        except RemoteUnavailable as e:
            tries = f" (tried {attempt} times)" if attempt > 1 else ""
            raise RemoteUnavailable(f"{e}{tries}", e.status) from None

    async def _once(self, method, url, query, body):
        headers = auth.sign_request(self.app_key, self.secret, method, url.path, query, body)
        if body:
            headers["Content-Type"] = "application/json"
        where = f"{method} {url.with_query(None)}"
        assert self._session is not None, "SignedClient is used inside 'async with'"
        try:
            async with self._session.request(method, url, data=body or None, headers=headers) as resp:
                data = await self._read(resp, where)
                status = resp.status
                reply_headers = resp.headers
        except asyncio.TimeoutError:
            raise RemoteUnavailable(f"{where}: no answer within {self.timeout_seconds:g}s") from None
        except aiohttp.ClientError as e:
            raise RemoteUnavailable(f"{where}: {type(e).__name__}: {e}") from None
        if status >= 500 or status == 429:
            raise RemoteUnavailable(f"{where}: answered {status} {_snippet(data)}", status)
        if status >= 400:
            raise RemoteRejected(f"{where}: answered {status} {_snippet(data)}", status)
        if self.verify_replies:
            problem = auth.reply_problem(self.secret, status, reply_headers, data,
                                         headers[auth.HEADER_NONCE], self.reply_window)
            if problem:
                raise RemoteProtocolError(f"{where}: {problem}", status)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RemoteProtocolError(f"{where}: reply is not valid JSON ({e}): {_snippet(data)}", status) from None

    async def _read(self, resp, where):
        declared = resp.content_length
        if declared is not None and declared > self.max_bytes:
            raise RemoteProtocolError(f"{where}: reply of {declared} bytes exceeds the limit of {self.max_bytes}")
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self.max_bytes:
                raise RemoteProtocolError(f"{where}: reply exceeds the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _snippet(data, n=200):
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    text = " ".join(text.split())
    return text[:n] + ("..." if len(text) > n else "")
