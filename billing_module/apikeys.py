"""API keys: created once, shown once, stored only as a sha256 digest.

A key is ``bk_<prefix>_<secret>``; the prefix is kept in clear for lists and logs. Scopes:
``admin`` (every customer and the admin endpoints), ``customer`` (one customer's data) and
``app`` (a downstream application or edge deployment: the sync export, nothing else).

A signing key (``create(..., signed=True)``) is an app key ``ak_<prefix>_<hex>`` plus a secret
for HMAC request signatures (``auth.py``). HMAC needs the secret itself, so it is stored
encrypted (``secret_enc``, Fernet under ``auth.secret_key``); the app key's digest fills
``key_hash``, so it can never be used as a Bearer key.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets
from typing import Any, Protocol

from cachetools import TTLCache

from . import clock, validation
from .db.database import Database, Row
from .errors import InvalidParam, NotFound, Unauthorized
from .ids import new_id

SCOPES = ("admin", "customer", "app")
_APP_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

# what create(..., signed=True) returns once: the secret is not shown again
AppCredentials = collections.namedtuple("AppCredentials", "app_key secret")
# a verified key is trusted this long without a database read; revoking in this process
# clears it at once, another process sees a revocation within this many seconds
_VERIFIED_TTL_SECONDS = 5


class SecretSealer(Protocol):
    """Encrypts a signing secret for storage (``auth.SecretBox``)."""

    def encrypt(self, text: str) -> str: ...


def _digest(key):
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    def __init__(self, db: Database, secret_box: SecretSealer) -> None:
        self.db = db
        self._verified: TTLCache = TTLCache(maxsize=10000, ttl=_VERIFIED_TTL_SECONDS)
        self.secret_box = secret_box

    async def create(self, scope: str, customer_id: str | None = None, name: str = "", expires_at: str | None = None,
                     allowed_ips: str = "", signed: bool = False) -> tuple[Any, dict[str, Any]]:
        """A new key: ``(key, row)``; with ``signed=True`` ``(AppCredentials(app_key, secret), row)``.
        The key (or secret) is returned only here."""
        if scope not in SCOPES:
            raise InvalidParam(f"scope must be one of {', '.join(SCOPES)}")
        if scope == "customer" and not customer_id:
            raise InvalidParam("a customer key needs a customer_id")
        if scope == "admin" and customer_id:
            raise InvalidParam("an admin key is not limited to a customer")
        customer_id = validation.ident(customer_id, "customer_id")
        if scope == "app" and not signed:
            raise InvalidParam("an app key signs its requests: create it with signed=True")
        prefix = secrets.token_hex(4)
        if signed:
            # lower-case hex: MySQL compares this column case-insensitively
            key = f"ak_{prefix}_{secrets.token_hex(12)}"
            secret = secrets.token_urlsafe(32)
        else:
            key = f"bk_{prefix}_{secrets.token_urlsafe(32)}"
        row = {
            "id": new_id(), "key_hash": _digest(key), "key_prefix": prefix, "name": (name or "")[:64],
            "scope": scope, "customer_id": customer_id, "allowed_ips": allowed_ips or "",
            "enabled": "1", "expires_at": expires_at, "created_at": clock.now_text(),
        }
        if signed:
            row["app_id"] = key
            row["secret_enc"] = self.secret_box.encrypt(secret)
        async with self.db.transaction() as tx:
            await tx.insert("api_key", row)
        if signed:
            return AppCredentials(key, secret), {k: v for k, v in row.items() if k != "secret_enc"}
        return key, row

    async def list(self, customer_id: str | None = None) -> list[Row]:
        """Every key, or a customer's own keys (the scope ``customer`` keys limited to it)."""
        only = " where scope = 'customer' and customer_id = ${c}$" if customer_id else ""
        async with self.db.read() as tx:
            return await tx.select(
                "select id, key_prefix, app_id, name, scope, customer_id, enabled, expires_at, created_at, "
                f"revoked_at, last_used_at from api_key{only} order by created_at, id", {"c": customer_id})

    async def revoke(self, key_id_or_prefix: str, customer_id: str | None = None) -> int:
        """Revoke a key; with ``customer_id`` only a customer key of that customer (another's is
        not found)."""
        only = " and scope = 'customer' and customer_id = ${c}$" if customer_id else ""
        async with self.db.transaction() as tx:
            n = await tx.execute(
                "update api_key set enabled = '0', revoked_at = ${now}$ "
                f"where (id = ${{k}}$ or key_prefix = ${{k}}$) and enabled = '1'{only}",
                {"k": key_id_or_prefix, "now": clock.now_text(), "c": customer_id})
        if n == 0:
            raise NotFound(f"no enabled API key with id or prefix {key_id_or_prefix!r}")
        self._verified.clear()
        return n

    async def verify(self, key: str, client_ip: str | None = None) -> Row:
        """The key's row, or Unauthorized. Comparison is by digest in a unique index, and the
        digest itself is compared in constant time."""
        if key and key.startswith("ak_"):
            raise Unauthorized("an app key is not a Bearer key: sign the request (X-Billing-* headers)")
        if not key or not key.startswith("bk_") or len(key) > 200:
            raise Unauthorized("invalid API key")
        digest = _digest(key)
        row = self._verified.get(digest)
        if row is None:
            async with self.db.read() as tx:
                row = await tx.one("select * from api_key where key_hash = ${h}$", {"h": digest})
            if row is None or not hmac.compare_digest(row.key_hash, digest):
                raise Unauthorized("invalid API key")
            self._verified[digest] = row
        return self.check_usable(row, client_ip)

    async def signed_key(self, app_key: str) -> Row:
        """The row of a signing key (with ``secret_enc``), or Unauthorized. Not yet checked
        for revocation, expiry or IP: the caller verifies the signature first, then calls
        ``check_usable``, so an unsigned request learns nothing about the key's state."""
        if not isinstance(app_key, str) or not _APP_KEY_RE.match(app_key):
            raise Unauthorized("unknown app key")
        cache_key = ("app", app_key)
        row = self._verified.get(cache_key)
        if row is None:
            async with self.db.read() as tx:
                row = await tx.one("select * from api_key where app_id = ${a}$", {"a": app_key})
            # the column may compare case-insensitively (MySQL): demand the exact key
            if row is None or not row.secret_enc or not hmac.compare_digest(row.app_id, app_key):
                raise Unauthorized("unknown app key")
            self._verified[cache_key] = row
        return row

    def check_usable(self, row: Row, client_ip: str | None = None) -> Row:
        """Enabled, not expired, and (when the key lists IPs) called from one of them."""
        label = "app key" if row.get("app_id") else "API key"
        if row.enabled != "1":
            raise Unauthorized(f"{label} revoked")
        if row.expires_at and row.expires_at <= clock.now_text():
            raise Unauthorized(f"{label} expired")
        if row.allowed_ips and client_ip:
            allowed = {ip.strip() for ip in row.allowed_ips.split(",") if ip.strip()}
            if allowed and client_ip not in allowed:
                from .errors import Forbidden
                raise Forbidden(f"{label} not allowed from {client_ip}")
        return row
