"""The standalone host's page users (``page_user``): admins, and customer users who see only
their organisation. A host with rbac has its own users; this table is for the standalone host.

Passwords are hashed with argon2id (argon2-cffi); the password itself is never stored. A user
is looked up on every request (``find``), so ``disable`` ends its sessions at once.
"""
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from . import clock, validation
from .db.database import Database
from .errors import Conflict, InvalidParam, NotFound
from .ids import new_id

ADMIN_ROLE = "admin"
CUSTOMER_ROLES = ("customer.admin", "customer.user")
ROLES = (ADMIN_ROLE,) + CUSTOMER_ROLES
NAME_MAX_LEN, PASSWORD_MAX_LEN, GENERATED_PASSWORD_BYTES = 64, 256, 12

_hasher = PasswordHasher()
# verified against when the user does not exist, so an unknown name costs the same time
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def generate_password() -> str:
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def _password(given: str) -> str:
    value = str(validation.text(given, "password", required=True, max_len=PASSWORD_MAX_LEN))
    if len(value) < 8:
        raise InvalidParam("password: at least 8 characters")
    return value


class PageUsers:
    """The SQL of ``page_user``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, name: str, role: str, customer_id: str | None, password: str) -> dict:
        name = str(validation.ident(name, "name", required=True, max_len=NAME_MAX_LEN))
        role = str(validation.text(role, "role", required=True, choices=ROLES))
        customer_id = validation.ident(customer_id, "customer_id")
        if (role == ADMIN_ROLE) == bool(customer_id):
            raise InvalidParam("an admin belongs to no customer; a customer user needs --customer")
        now = clock.now_text()
        row = {"id": new_id(), "name": name, "password_hash": _hasher.hash(_password(password)), "role": role,
               "customer_id": customer_id, "enabled": "1", "created_at": now, "updated_at": now}
        if await self.find(name, enabled_only=False) is not None:
            raise Conflict(f"a page user named {name} exists already")
        async with self.db.transaction() as tx:   # the unique name index decides a race
            await tx.insert("page_user", row)
        return {k: v for k, v in row.items() if k != "password_hash"}

    async def find(self, name: str, enabled_only: bool = True):
        async with self.db.read() as tx:
            row = await tx.one("select id, name, password_hash, role, customer_id, enabled from page_user "
                               "where name = ${name}$", {"name": name})
        if row is None or (enabled_only and row.enabled != "1"):
            return None
        return row

    async def list(self) -> list:
        async with self.db.read() as tx:
            return await tx.select("select name, role, customer_id, enabled, created_at, updated_at "
                                   "from page_user order by name", {})

    async def verify(self, name: str, password: str):
        """The enabled user with this name and password, or None (the same work either way)."""
        row = await self.find(name)
        try:
            _hasher.verify(row.password_hash if row else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        return row

    async def _update(self, name: str, fields: dict) -> None:
        fields = dict(fields, updated_at=clock.now_text(), name=name)
        sets = ", ".join(f"{k} = ${{{k}}}$" for k in fields if k != "name")
        async with self.db.transaction() as tx:
            n = await tx.execute(f"update page_user set {sets} where name = ${{name}}$", fields)
        if not n:
            raise NotFound(f"no page user named {name}")

    async def disable(self, name: str) -> None:
        await self._update(name, {"enabled": "0"})

    async def set_password(self, name: str, password: str) -> None:
        await self._update(name, {"password_hash": _hasher.hash(_password(password))})
