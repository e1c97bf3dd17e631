"""API keys: created once, shown once, stored only as a sha256 digest.

A key is ``bk_<prefix>_<secret>``; the prefix is kept in clear for lists and logs. Scopes:
``admin`` (every customer and the admin endpoints) and ``customer`` (one customer's data).
"""
import hashlib
import hmac
import secrets

from cachetools import TTLCache

from . import clock
from .errors import InvalidParam, NotFound, Unauthorized
from .ids import new_id

SCOPES = ("admin", "customer")
# a verified key is trusted this long without a database read; revoking in this process
# clears it at once, another process sees a revocation within this many seconds
_VERIFIED_TTL_SECONDS = 5


def _digest(key):
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    def __init__(self, db):
        self.db = db
        self._verified = TTLCache(maxsize=10000, ttl=_VERIFIED_TTL_SECONDS)

    async def create(self, scope, customer_id=None, name="", expires_at=None, allowed_ips=""):
        if scope not in SCOPES:
            raise InvalidParam(f"scope must be one of {', '.join(SCOPES)}")
        if scope == "customer" and not customer_id:
            raise InvalidParam("a customer key needs a customer_id")
        if scope == "admin" and customer_id:
            raise InvalidParam("an admin key is not limited to a customer")
        if customer_id is not None and (not isinstance(customer_id, str) or len(customer_id) > 32):
            raise InvalidParam("customer_id: at most 32 characters")
        prefix = secrets.token_hex(4)
        key = f"bk_{prefix}_{secrets.token_urlsafe(32)}"
        row = {
            "id": new_id(), "key_hash": _digest(key), "key_prefix": prefix, "name": (name or "")[:64],
            "scope": scope, "customer_id": customer_id, "allowed_ips": allowed_ips or "",
            "enabled": "1", "expires_at": expires_at, "created_at": clock.now_text(),
        }
        async with self.db.transaction() as tx:
            await tx.insert("api_key", row)
        return key, row

    async def list(self):
        async with self.db.read() as tx:
            return await tx.select(
                "select id, key_prefix, name, scope, customer_id, enabled, expires_at, created_at, "
                "revoked_at, last_used_at from api_key order by created_at, id")

    async def revoke(self, key_id_or_prefix):
        async with self.db.transaction() as tx:
            n = await tx.execute(
                "update api_key set enabled = '0', revoked_at = ${now}$ "
                "where (id = ${k}$ or key_prefix = ${k}$) and enabled = '1'",
                {"k": key_id_or_prefix, "now": clock.now_text()})
        if n == 0:
            raise NotFound(f"no enabled API key with id or prefix {key_id_or_prefix!r}")
        self._verified.clear()
        return n

    async def verify(self, key, client_ip=None):
        """The key's row, or Unauthorized. Comparison is by digest in a unique index, and the
        digest itself is compared in constant time."""
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
        if row.enabled != "1":
            raise Unauthorized("API key revoked")
        if row.expires_at and row.expires_at <= clock.now_text():
            raise Unauthorized("API key expired")
        if row.allowed_ips and client_ip:
            allowed = {ip.strip() for ip in row.allowed_ips.split(",") if ip.strip()}
            if allowed and client_ip not in allowed:
                from .errors import Forbidden
                raise Forbidden(f"API key not allowed from {client_ip}")
        return row
