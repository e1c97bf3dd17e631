"""The web sessions of the standalone host, kept on the server (table ``web_session``): the
cookie holds only a random key, stored here as its digest. ``sessions.py`` is the HTTP side."""
import hashlib

from . import clock
from .db import dialect as dialects
from .db.database import Database, Row


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class SessionStore:
    """The SQL of ``web_session``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def load(self, key: str) -> Row | None:
        async with self.db.read() as tx:
            return await tx.one("select data from web_session where id = ${id}$ and expires_at > ${now}$",
                                {"id": _digest(key), "now": clock.now_text()})

    async def save(self, key: str, data: str, lifetime_seconds: int) -> None:
        row = {"id": _digest(key), "data": data, "expires_at": clock.now_text(lifetime_seconds)}
        async with self.db.transaction() as tx:
            await tx.execute(dialects.upsert(self.db.dialect, "web_session", list(row)), row)

    async def delete(self, key: str) -> None:
        async with self.db.transaction() as tx:
            await tx.execute("delete from web_session where id = ${id}$", {"id": _digest(key)})

    async def purge(self) -> None:
        async with self.db.transaction() as tx:
            await tx.execute("delete from web_session where expires_at <= ${now}$", {"now": clock.now_text()})
