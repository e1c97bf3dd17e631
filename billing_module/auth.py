"""Signed requests: ``uapi_sign`` (outbound: sign what we send) and ``dapi_auth`` (inbound:
verify what we receive), plus the encryption of signing secrets at rest.

A signed request carries four headers (docs/sync-protocol.md has the full text)::

    X-Billing-AppKey     the app key (``ak_...``), issued by ``ApiKeys.create(..., signed=True)``
    X-Billing-Timestamp  Unix seconds (UTC) when the request was signed
    X-Billing-Nonce      16-64 characters [A-Za-z0-9_-], never reused (compared case-insensitively)
    X-Billing-Signature  hex HMAC-SHA256(secret, string to sign)

The string to sign is these lines joined by ``\\n``::

    BILLING-HMAC-SHA256
    <METHOD>
    <path, percent-encoded except / - _ . ~>
    <query: decoded pairs sorted, each key=value percent-encoded, joined by &>
    <hex sha256 of the body (of b"" when there is none)>
    <timestamp>
    <nonce>
    <app key>

A reply is signed with the same secret over ``BILLING-HMAC-SHA256-REPLY``, the HTTP status,
the request's nonce, the reply timestamp and the body's sha256, so a client can tell a reply
of its own request from a replayed or altered one.

The verifier checks, in this order: headers present, timestamp inside
``auth.signature_window_seconds``, the key exists, the signature (``hmac.compare_digest``),
then the key's state (revoked / expired / IP) and last the nonce (stored in ``api_nonce``; a
unique index turns a replay into an error). Nothing is written for a request that fails.
"""
from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import logging
import os
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import clock
from .apikeys import ApiKeys
from .config import Config
from .datadir import secret_file
from .db import dialect as dialects
from .db.database import Database, Row
from .errors import Unauthorized
from .ids import new_id

log = logging.getLogger("billing_module.auth")

HEADER_APP_KEY = "X-Billing-AppKey"
HEADER_TIMESTAMP = "X-Billing-Timestamp"
HEADER_NONCE = "X-Billing-Nonce"
HEADER_SIGNATURE = "X-Billing-Signature"
SIGNED_HEADERS = (HEADER_APP_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
ALGORITHM = "BILLING-HMAC-SHA256"
REPLY_ALGORITHM = "BILLING-HMAC-SHA256-REPLY"
# where Auth.verify leaves the verified key for the handler (e.g. to sign its reply)
REQUEST_KEY = "billing_signed"

_NONCE_RE = re.compile(r"^[A-Za-z0-9_\-]{16,64}$")
_TIMESTAMP_RE = re.compile(r"^\d{1,12}$")
_SIGNATURE_RE = re.compile(r"^[0-9a-fA-F]{64}$")


# --- the signature itself ------------------------------------------------------------------------
def _quote(text, safe="-_.~"):
    return urllib.parse.quote(str(text), safe=safe)


def canonical_query(pairs: Iterable[tuple[Any, Any]]) -> str:
    """Decoded (key, value) pairs -> the canonical query line: order and encoding do not matter."""
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted((str(k), str(v)) for k, v in pairs))


def body_digest(body: bytes | None) -> str:
    return hashlib.sha256(body or b"").hexdigest()


def string_to_sign(method: str, path: str, query_pairs: Iterable[tuple[Any, Any]], body: bytes | None,
                   timestamp: int | str, nonce: str, app_key: str) -> str:
    return "\n".join([ALGORITHM, method.upper(), _quote(path or "/", safe="/-_.~"), canonical_query(query_pairs),
                      body_digest(body), str(timestamp), nonce, app_key])


def signature(secret: str, text: str) -> str:
    return hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()


def unix_now() -> int:
    return calendar.timegm(clock.utcnow().timetuple())


def new_nonce() -> str:
    return secrets.token_hex(16)


def sign_request(app_key: str, secret: str, method: str, path: str, query_pairs: Iterable[tuple[Any, Any]] = (),
                 body: bytes | None = b"", timestamp: int | str | None = None,
                 nonce: str | None = None) -> dict[str, str]:
    """uapi_sign: the four headers for one request (a fresh nonce each call)."""
    timestamp = unix_now() if timestamp is None else timestamp
    nonce = nonce or new_nonce()
    sig = signature(secret, string_to_sign(method, path, query_pairs, body, timestamp, nonce, app_key))
    return {HEADER_APP_KEY: app_key, HEADER_TIMESTAMP: str(timestamp), HEADER_NONCE: nonce,
            HEADER_SIGNATURE: sig}


def reply_string(status: int, nonce: str, timestamp: int | str, body: bytes | None) -> str:
    return "\n".join([REPLY_ALGORITHM, str(int(status)), nonce, str(timestamp), body_digest(body)])


def sign_reply(secret: str, status: int, nonce: str, body: bytes | None,
               timestamp: int | str | None = None) -> dict[str, str]:
    """Headers that bind a reply body and status to the request's nonce."""
    timestamp = unix_now() if timestamp is None else timestamp
    return {HEADER_TIMESTAMP: str(timestamp), HEADER_NONCE: nonce,
            HEADER_SIGNATURE: signature(secret, reply_string(status, nonce, timestamp, body))}


def reply_problem(secret: str, status: int, headers: Mapping[str, str], body: bytes | None, nonce: str,
                  window_seconds: float) -> str | None:
    """Why a reply's signature is not acceptable, or None when it is."""
    ts, echo, sig = (headers.get(h) for h in (HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE))
    if not (ts and echo and sig):
        return "reply is not signed"
    if echo != nonce:
        return "reply is for another request (nonce differs)"
    if not _TIMESTAMP_RE.match(ts) or abs(unix_now() - int(ts)) > window_seconds:
        return "reply signature expired"
    if not hmac.compare_digest(sig.lower(), signature(secret, reply_string(status, nonce, ts, body))):
        return "bad reply signature"
    return None


# --- secrets at rest -------------------------------------------------------------------------------
def load_secret_key(config: Config, data_dir: str) -> str:
    """``auth.secret_key``, else a key generated once into ``<data_dir>/.secret_key`` (mode 600).
    The standalone host calls this at start so the file exists before the first key is made."""
    if config.auth.secret_key:
        return config.auth.secret_key
    os.makedirs(data_dir, exist_ok=True)
    return secret_file(data_dir, ".secret_key", 32)


class SecretBox:
    """Fernet encryption of signing secrets; the Fernet key is derived (HKDF-SHA256) from the
    configured secret key, so any text of enough entropy works as ``auth.secret_key``."""

    def __init__(self, config: Config, data_dir: str) -> None:
        self._config, self._data_dir = config, data_dir
        self._fernet: Fernet | None = None

    def _box(self):
        if self._fernet is None:
            material = load_secret_key(self._config, self._data_dir).encode("utf-8")
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"billing_module",
                       info=b"api_key.secret_enc").derive(material)
            self._fernet = Fernet(base64.urlsafe_b64encode(key))
        return self._fernet

    def encrypt(self, text: str) -> str:
        return self._box().encrypt(text.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._box().decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError, AttributeError):
            raise ValueError("signing secret cannot be decrypted (was auth.secret_key changed?)") from None


class SignedKey:
    """The verified key of a request, for its handler (``request[REQUEST_KEY]``)."""

    def __init__(self, row: Row, secret: str, nonce: str) -> None:
        self.row, self.secret, self.nonce = row, secret, nonce

    @property
    def app_key(self) -> str:
        return self.row.app_id


# --- dapi_auth: verifying inbound requests -----------------------------------------------------------
class Auth:
    def __init__(self, db: Database, config: Config, apikeys: ApiKeys, secret_box: SecretBox) -> None:
        self.db = db
        self.config = config
        self.apikeys = apikeys
        self.secret_box = secret_box

    @property
    def window(self) -> int:
        return self.config.auth.signature_window_seconds

    async def verify(self, request: web.Request) -> SignedKey:
        """The verified ``SignedKey`` of an aiohttp request, or Unauthorized / Forbidden."""
        h = request.headers
        missing = [name for name in SIGNED_HEADERS if not h.get(name)]
        if missing:
            raise Unauthorized(f"missing signature headers: {', '.join(missing)}")
        app_key, ts, nonce, sig = (h[name].strip() for name in SIGNED_HEADERS)
        if not _TIMESTAMP_RE.match(ts):
            raise Unauthorized(f"{HEADER_TIMESTAMP} must be Unix seconds")
        skew = abs(unix_now() - int(ts))
        if skew > self.window:
            raise Unauthorized(f"signature expired: timestamp is {skew}s from server time "
                               f"(allowed {self.window}s)")
        if not _NONCE_RE.match(nonce):
            raise Unauthorized(f"{HEADER_NONCE} must be 16-64 characters of A-Z a-z 0-9 _ -")
        if not _SIGNATURE_RE.match(sig):
            raise Unauthorized("bad signature")
        keys = self.apikeys
        row = await keys.signed_key(app_key)
        try:
            secret = self.secret_box.decrypt(row.secret_enc)
        except ValueError as e:
            log.error("app key %s: %s", row.key_prefix, e)
            raise Unauthorized("app key cannot be used: its secret is unreadable on this server") from None
        # read() returns the bytes already read for params_kw (can_read_body is False by then)
        body = await request.read()
        expected = signature(secret, string_to_sign(request.method, request.path, request.query.items(),
                                                    body, ts, nonce, app_key))
        if not hmac.compare_digest(sig.lower(), expected):
            raise Unauthorized("bad signature")
        keys.check_usable(row, request.get("client_ip") or request.remote)
        await self._remember_nonce(app_key, nonce)
        signed = SignedKey(row, secret, nonce)
        request[REQUEST_KEY] = signed
        return signed

    async def _remember_nonce(self, app_key, nonce):
        row = {"id": new_id(), "nonce": nonce.lower(), "app_key": app_key, "seen_at": clock.now_text()}
        try:
            async with self.db.transaction() as tx:
                await tx.insert("api_nonce", row)
        except Exception as e:
            if dialects.is_unique_violation(e):
                raise Unauthorized("nonce replayed") from None
            raise

    async def purge_nonces(self) -> int:
        """Forget nonces older than two windows: a request signed at t is accepted until
        t + window, and a nonce first seen at t - window may carry a timestamp up to t, so
        after 2 windows any replay already fails the timestamp check."""
        async with self.db.transaction() as tx:
            return await tx.execute("delete from api_nonce where seen_at < ${cut}$",
                                    {"cut": clock.now_text(-2 * self.window)})

    def background_jobs(self) -> list[tuple[str, Callable[[], Awaitable[int]], float]]:
        return [("nonce-purge", self.purge_nonces, self.config.auth.nonce_purge_seconds)]


def is_signed(request: web.Request) -> bool:
    """The request carries signature headers (then it must verify; no fallback to others)."""
    return bool(request.headers.get(HEADER_APP_KEY))
