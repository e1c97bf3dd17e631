"""A sqlor driver for SQLite on aiosqlite.

sqlor 2.1.2 ships no working SQLite driver (its classes have no ``connect()``, metadata uses
PRAGMA statements its SELECT-only reader rejects, and table names get the file path as schema).
Importing this module registers driver ``billing_sqlite``: sqlor finds drivers by scanning
``SQLor`` subclasses, so ``DBPools`` and ``get_sor_context`` of a host can use it too.

Database description: ``{"driver": "billing_sqlite", "kwargs": {"dbname": "/path/file.db"}}``.
"""
import sqlite3
from typing import Any

import aiosqlite
from sqlor.sor import SQLor

DRIVER_NAME = "billing_sqlite"


class BillingSQLiteor(SQLor):
    # sqlor's base class defines test_sqlstr as a method, so its pool health check always fails
    # and opens a new connection per context; a string makes the check work.
    test_sqlstr = "select 1"
    busy_timeout_ms = 10000
    conn: Any = None          # an aiosqlite.Connection once connected (the SQLor base keeps it untyped)
    _cursor: aiosqlite.Cursor | None = None

    db2modelTypeMapping = {
        "text": "str", "blob": "file", "int": "long", "integer": "long", "bigint": "long",
        "real": "float", "numeric": "float",
    }

    @classmethod
    def isMe(cls, name):
        return name == DRIVER_NAME

    def unpassword(self):
        pass  # no password on an SQLite file

    def placeHolder(self, varname, pos=None):
        return "" if varname == "__mainsql__" else "?"

    def dataConvert(self, dataList):
        if isinstance(dataList, dict):
            return tuple(dataList.values())
        return tuple(i["value"] for i in dataList)

    def pagingSQLmodel(self):
        # sqlor's own paging template (its MySQL driver writes the same): sqlor fills it from the
        # integers it computes and the sort the generated .dspy sets to a fixed column (the
        # client's sort is dropped there, json/build.sh), never from a request's text
        return "select * from (%s) paged_ order by $[sort]$ limit $[rows]$ offset $[from_line]$"

    def tablesSQL(self):
        return ("select lower(name) as name, name as title from sqlite_master "
                "where type = 'table' and name not like 'sqlite_%'")

    def fieldsSQL(self, tablename=None):
        t = _ident(tablename)
        return (f"select lower(name) as name, lower(type) as type, 0 as length, 0 as dec, "
                f"case when \"notnull\" = 1 then 'no' else 'yes' end as nullable, name as title "
                f"from pragma_table_info('{t}')")

    def pkSQL(self, tablename=None):
        t = _ident(tablename)
        return f"select name from pragma_table_info('{t}') where pk > 0 order by pk"

    def indexesSQL(self, tablename=None):
        t = _ident(tablename)
        return ("select lower(il.name) as index_name, "
                "case when il.\"unique\" = 1 then 'unique' else '' end as is_unique, "
                "lower(ii.name) as column_name "
                f"from pragma_index_list('{t}') il, pragma_index_info(il.name) ii "
                "where il.origin = 'c' order by il.name, ii.seqno")

    async def fields(self, tablename=None):
        recs = await super().fields(tablename)
        for r in recs:
            r["type"] = r["type"] if r["type"] != "unknown" else "str"
        return recs

    async def connect(self):
        path = self.dbdesc.get("dbname") or self.dbdesc.get("path")
        timeout_ms = int(self.dbdesc.get("busy_timeout_ms") or self.busy_timeout_ms)
        # isolation_level=None: no implicit BEGIN; billing transactions issue BEGIN IMMEDIATE
        # themselves so the write lock is taken up front, never upgraded mid-transaction.
        self.conn = await aiosqlite.connect(path, isolation_level=None, timeout=timeout_ms / 1000)
        self.conn.row_factory = sqlite3.Row       # rows carry their column names
        await self.conn.execute("pragma journal_mode=WAL")
        await self.conn.execute(f"pragma busy_timeout={timeout_ms}")
        await self.conn.execute("pragma synchronous=NORMAL")
        self.dbname = "main"

    async def call(self, fn):
        """``fn(connection)`` on the connection's own thread, with the ``sqlite3`` connection, in
        one hand-off: several statements cost one thread wake-up and one event-loop wake-up instead
        of one each (about 100 us of a transaction's time each). Through aiosqlite's own queue
        (``Connection._execute``, what its public methods use): the one place the module reaches
        into aiosqlite."""
        conn = self.conn
        return await conn._execute(fn, conn._conn)

    async def enter(self):
        # one cursor per connection for its whole life: opening and closing a cursor per
        # transaction costs two thread hand-offs in aiosqlite
        if self._cursor is None:
            self._cursor = await self.conn.cursor()
        self.cur = self._cursor

    async def exit(self):
        self.cur = None

    async def execute(self, sql, value):
        if self.cur is None:
            await self.enter()
        cur = await super().execute(sql, value)
        if self.getSqlType(sql) == "dml":
            return cur.rowcount
        return cur

    async def commit(self):
        if self.conn.in_transaction:
            await self.conn.commit()
        self.dataChanged = False

    async def rollback(self):
        if self.conn.in_transaction:
            await self.conn.rollback()
        self.dataChanged = False

    async def close(self):
        await self.exit()
        if self._cursor is not None:
            await self._cursor.close()
            self._cursor = None
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


def _ident(name):
    name = (name or "").lower()
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a table name: {name!r}")
    return name
