"""Transactions for the billing core.

``Database.transaction()`` is one database transaction: BEGIN at entry, COMMIT when the block
ends, ROLLBACK and re-raise on any exception. It wraps sqlor ``SQLor`` objects (the host's
drivers, with sqlor's ``${name}$`` bound parameters), but owns the connection lifecycle,
because sqlor 2.1.2's ``DBPools.sqlorContext`` does three things a ledger cannot accept:
it swallows exceptions, commits *after* returning the connection to its pool (so another
task can run inside the same transaction), and opens a new connection per context.

SQLite has one writer: write transactions take an in-process lock and ``BEGIN IMMEDIATE``
(other processes wait on the busy timeout), so a transaction never fails half-way on a lock. Its
statements run on the connection's thread; ``Tx`` sends them in as few hand-offs as it can (the
BEGIN with the first statement, writes nobody reads a count of with the next one or the COMMIT).

MySQL/MariaDB may list several nodes (``database.hosts``: a Galera cluster). The pool uses one
node at a time and moves to the next that answers when a connection to it breaks. ``run``
starts a transaction again on the next node when it died before its COMMIT was sent (the server
rolls it back), or during the COMMIT when the caller says the work is idempotent by its key; it
raises ``DatabaseUnavailable`` (503) otherwise and when no node answers. A Galera certification
conflict is error 1213 at COMMIT, retried like a deadlock; the retry reads causally
(``wsrep_sync_wait``) so that it sees the transaction that won.

A node that stops answering (a stopped process, a network that drops packets, a Galera node
blocked without quorum) never breaks its connections: aiomysql would wait for its reply forever.
So every statement, COMMIT and ROLLBACK waits at most ``statement_timeout_seconds`` (a new
connection, handshake included, ``connect_timeout``); then the connection is closed, never pooled
again, and the node is failed like a broken one: ``NodeTimeout`` before COMMIT (``run`` runs the
work again on the next node), ``CommitUnknown`` during it. SQLite has no such bound
(``dialect.statement_timeout`` says why).
"""
import asyncio
import datetime
import functools
import logging
import operator
import random
import re
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from appPublic.dictObject import DictObject
from pymysql.constants import SERVER_STATUS
from pymysql.converters import escape_string

from ..errors import DatabaseUnavailable
from . import dialect as dialects
from .sqlite_driver import DRIVER_NAME as SQLITE_DRIVER
from .sqlite_driver import BillingSQLiteor

log = logging.getLogger("billing_module.db")

_PING_AFTER_IDLE_SECONDS = 30
_DEADLOCK_RETRIES = 10
_CONFLICT_RETRIES_GALERA = 30     # certification conflicts are frequent on a hot row across nodes
_CONNECT_TIMEOUT_SECONDS = 3
_STATEMENT_TIMEOUT_SECONDS = 30.0   # database.statement_timeout_seconds
_FAILOVER_SECONDS = 8             # how long run() keeps trying other nodes before answering 503
# statements written later on MySQL go in one text up to about this size (pymysql's executemany
# splits its multi-row INSERTs at the same size; the server refuses one past max_allowed_packet)
_MYSQL_SEND_BYTES = 1_000_000


class NodeFailed(DatabaseUnavailable):
    """The connection's node failed before COMMIT (the server rolled the transaction back)."""


class NodeTimeout(NodeFailed):
    """The node did not answer a statement in time; the connection was closed before any COMMIT
    (the server rolls the transaction back when it sees that, or never commits it)."""

    def __init__(self, seconds: float):
        super().__init__(f"the database node did not answer within {seconds:g} s; try again later")


class CommitUnknown(DatabaseUnavailable):
    """The connection broke while COMMIT was under way: the transaction may have committed."""

    def __init__(self):
        super().__init__("the database connection broke during a commit; send the request again")


_timeout = getattr(asyncio, "timeout", None)   # Python 3.11+; wait_for (a task per call) on 3.10


async def _answer(sor, aw, seconds):
    """``await aw``, a round trip on ``sor``'s connection, for at most ``seconds`` (None: no
    bound). Past it, the connection's state is unknown (the statement may still run, its reply
    may still come), so it is closed here, and ``NodeTimeout`` tells the pool its node failed."""
    if seconds is None:
        return await aw
    try:
        if _timeout is None:
            return await asyncio.wait_for(aw, seconds)
        async with _timeout(seconds):
            return await aw
    except asyncio.TimeoutError:
        conn = getattr(sor, "conn", None)
        if conn is not None:
            conn.close()
        raise NodeTimeout(seconds) from None


def _py_value(v):
    # isoformat, not strftime: '%Y' does not pad a year below 1000 to four digits
    if isinstance(v, datetime.datetime):
        return v.replace(microsecond=0).isoformat(sep=" ")
    if isinstance(v, datetime.date):
        return v.isoformat()
    return v


_PARAM = re.compile(r"\$\{([A-Za-z_][A-Za-z_0-9]*)\}\$")


@functools.lru_cache(maxsize=2048)
def _compile(sql, dialect):
    """sqlor's ``${name}$`` placeholders -> the driver's (``?`` / ``%s``) and the parameter
    names in order. sqlor's own converter (``maskingSQL``) costs about 30 us per parameter
    (measured: 1 ms for a 35-column insert), so the module compiles each statement once."""
    names = []
    mark = "?" if dialect == dialects.SQLITE else "%s"
    parts = []
    pos = 0
    for m in _PARAM.finditer(sql):
        text = sql[pos:m.start()]
        parts.append(text if dialect == dialects.SQLITE else text.replace("%", "%%"))
        parts.append(mark)
        names.append(m.group(1))
        pos = m.end()
    tail = sql[pos:]
    parts.append(tail if dialect == dialects.SQLITE else tail.replace("%", "%%"))
    return "".join(parts), tuple(names)


@functools.lru_cache(maxsize=256)
def _picker(names):
    """row dict -> the tuple of its values for ``names`` (a statement's parameters, in order),
    in C: ``execute_many`` builds a thousand of these per batch."""
    if len(names) == 1:
        name = names[0]
        return lambda row: (row[name],)
    if not names:
        return lambda row: ()
    return operator.itemgetter(*names)


class AssumptionRefuted(Exception):
    """A statement written ``later`` with an ``expect``ed count changed another number of rows
    (a debit that assumed it would pass, see ``Tx.assumes``). Raised before the COMMIT, so the
    transaction rolls back; ``Database.run`` runs the work again without assumptions."""

    def __init__(self, expected: int, changed: int) -> None:
        super().__init__(f"a statement assumed to change {expected} row(s) changed {changed}")


def _check(expect, changed):
    if expect is not None and changed != expect:
        raise AssumptionRefuted(expect, changed)


def _check_all(later, changed):
    """Each count in ``changed`` against the expectation of its statement in ``later``."""
    for (_, _, _, expect), count in zip(later, changed, strict=False):
        _check(expect, count)


def _send(conn, statements):
    """Run statements written ``later`` on the sqlite3 connection (on its thread), in order;
    one whose count is not the one it expects stops there."""
    for sql, params, many, expect in statements:
        _check(expect, (conn.executemany if many else conn.execute)(sql, params).rowcount)


# the characters pymysql's escape_string escapes (with backslash escapes, the server's default)
_NEEDS_ESCAPE = re.compile("[\0\\\\\n\r\x1a'\"]").search


def _unused(marked: str, values: Any) -> str:
    raise AssertionError("SQLite binds parameters: no statement text is written")


def _mogrifier(conn):
    """``mogrify(marked, values)``: the statement text with its values as SQL literals, exactly
    as pymysql writes them (``Cursor.mogrify``). Escaping is most of the driver's own cost per
    row, so the common values are written here without its per-value calls: a string with
    nothing to escape is only quoted, an int is its digits; anything else, and every value on a
    server in NO_BACKSLASH_ESCAPES mode, is escaped by pymysql itself."""
    escape = conn.escape
    if conn.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
        return lambda marked, values: marked % tuple([escape(v) for v in values])

    def mogrify(marked, values):
        return marked % tuple([
            ("'" + escape_string(v) + "'" if _NEEDS_ESCAPE(v) else "'" + v + "'") if type(v) is str
            else str(v) if type(v) is int else "NULL" if v is None else escape(v)
            for v in values])
    return mogrify


def _mysql_texts(mogrify, marked, rows):
    """The statement texts that run ``marked`` (``%s`` placeholders) once per parameter tuple in
    ``rows``: an INSERT as multi-row INSERTs of up to ``_MYSQL_SEND_BYTES`` each (what pymysql's
    executemany sends), any other statement once per row."""
    m = _INSERT_VALUES.match(marked)
    if m is None:
        return [mogrify(marked, row) for row in rows]
    head, values, tail = m.group(1) % (), m.group(2), m.group(3) % ()
    texts: list[str] = []
    parts: list[str] = []
    size = len(head) + len(tail)
    for row in rows:
        part = mogrify(values, row)
        if parts and size + len(part) + 1 > _MYSQL_SEND_BYTES:
            texts.append(head + ",".join(parts) + tail)
            parts, size = [], len(head) + len(tail)
        parts.append(part)
        size += len(part) + 1
    texts.append(head + ",".join(parts) + tail)
    return texts


# the statements insert_many / update_many write: "insert into t (...) values (%s, ...)" and an
# optional "on duplicate key update ..." with no parameters of its own
_INSERT_VALUES = re.compile(r"(insert into .+? values )(\((?:%s, )*%s\))(( on duplicate key update .*)?)\Z",
                            re.IGNORECASE | re.DOTALL)


@functools.lru_cache(maxsize=256)
def _multi_row(single, rows):
    """``single`` (a compiled INSERT of one row: ``... values (?, ?)``) for ``rows`` rows."""
    values = single[single.rindex(" values ") + len(" values "):]
    return single + (", " + values) * (rows - 1)


class Row(dict):
    """A result row: a dict whose columns also read as attributes (``row.balance``). appPublic's
    DictObject does the same but re-wraps every value on construction (tens of microseconds a row)."""
    __slots__ = ()

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any: ...
    else:
        # dict.get itself, not a Python method calling it. Still, Python calls __getattr__ only
        # after the usual lookup failed and raised (on 3.11 ~0.7 us a read, ``row["x"]`` 0.04):
        # hot paths read their rows by key
        __getattr__ = dict.get

    def __setattr__(self, name, value):
        self[name] = value


class Tx:
    """One open transaction. All SQL uses sqlor's ``${name}$`` placeholders.

    Each wait for the database (a hand-off to SQLite's thread, a round trip to MySQL) costs more
    than a short statement. So a statement written ``later`` (a write whose count nobody reads
    and whose failure fails the transaction) is not sent on its own: it goes with the next
    statement, or with the COMMIT, in the same wait, and its error (a duplicate key) is raised
    there. On MySQL they travel as one multi-statement text (aiomysql's connections allow
    them); the server runs the statements in order and stops at the first that fails. The
    COMMIT is sent on its own on MySQL (``before_commit`` says why): a transaction that writes a
    few rows takes two waits on SQLite (the first statement whose answer is read, the rest with
    the COMMIT) and three on MySQL.

    A write whose count is read can still go later when the count is only checked: ``execute``
    with ``expect`` (only in a transaction that ``assumes``, see ``Database.run``). A debit that
    assumes it passes is sent with its ledger entry and record, so a charge takes one wait on
    SQLite and two on MySQL; when the count is another, ``AssumptionRefuted`` rolls the whole
    transaction back before its COMMIT and it runs again the careful way."""

    def __init__(self, sor, dialect, timeout_seconds=None, assumes=False):
        self.sor = sor
        self.dialect = dialect
        self.timeout_seconds = timeout_seconds     # per wait; None on SQLite
        # a statement may be written later with an expected count (``execute(expect=)``)
        self.assumes = assumes
        # not sent yet: SQLite (sql, parameters, many, expected count or None); MySQL (the
        # statement's text, None, False, expected count or None)
        self._later: list[tuple[str, Any, bool, int | None]] = []
        self._later_bytes = 0     # MySQL: the length of those texts
        self._sent = False        # a statement has gone to the database (the BEGIN, if any, has run)
        # MySQL: (statement, parameters) -> its text; unused on SQLite, which binds parameters
        self._mogrify: Callable[[str, Any], str] = _unused if dialect == dialects.SQLITE else _mogrifier(sor.conn)

    async def begin(self, statement):
        """Open the transaction: the BEGIN goes with the first statement, in its wait (on SQLite
        the write lock is still taken before that statement runs); a transaction that sends
        none costs no wait at all."""
        self._later.append((statement, (), False, None))

    async def _sqlite(self, final=None):
        """One hand-off: the statements written later, then ``final(connection)``'s result."""
        later, self._later = self._later, []
        self._sent = True

        def work(conn):
            _send(conn, later)
            return None if final is None else final(conn)
        return await self.sor.call(work)

    async def _mysql(self, texts):
        """One round trip: the statements written later, then ``texts``; the rows each of
        ``texts`` changed (a SELECT's rows are then the cursor's: the last statement's). The
        first error raises here (the server stops there, but for a Galera abort: never send a
        COMMIT in this text, ``before_commit``); then a later statement's count that is not
        the one it expected (the server ran the rest: they are rolled back with it). A count
        refuted before the statement that failed is the answer, as on SQLite, which checks each
        statement before the next runs."""
        later, self._later, self._later_bytes = self._later, [], 0
        self._sent = True
        cur = self.sor.cur
        sent = [text for text, _, _, _ in later]
        sent.extend(texts)
        changed: list[int] = []

        async def trip():
            await cur.execute(";\n".join(sent))      # no parameters: the texts are escaped already
            changed.append(cur.rowcount)
            for _ in sent[1:]:
                await cur.nextset()
                changed.append(cur.rowcount)
        try:
            await self._answer(trip())
        except Exception as e:
            if isinstance(e, DatabaseUnavailable) or dialects.is_node_unavailable(e):
                raise                 # not a statement's answer: the node is the news
            try:
                _check_all(later, changed)
            except AssumptionRefuted as refuted:
                raise refuted from e
            raise
        _check_all(later, changed)
        return changed[len(later):]

    async def _defer(self, texts, expect=None):
        """MySQL: write ``texts`` later; a queue grown past ``_MYSQL_SEND_BYTES`` goes now."""
        for text in texts:
            self._later.append((text, None, False, expect))
            self._later_bytes += len(text)
        if self._later_bytes > _MYSQL_SEND_BYTES:
            await self._mysql([])

    def _nothing_sent(self):
        """No statement has gone, and none but the BEGIN waits: the transaction has done nothing."""
        return not self._sent and all(sql == self._begin for sql, _, _, _ in self._later)

    @property
    def _begin(self):
        return dialects.begin_statement(self.dialect, True)

    async def flush(self):
        """Send the statements written ``later`` now (their errors raise here)."""
        if not self._later:
            return
        if self.dialect == dialects.SQLITE:
            await self._sqlite()
        else:
            await self._mysql([])

    async def before_commit(self):
        """Send what must be answered before the COMMIT. On MySQL, the statements written later,
        in their own round trip: a COMMIT never travels with other statements. On a Galera node
        a transaction aborted by a conflicting replicated one (a brute-force abort) can let the
        statements behind the failing one run on, in a new transaction, which a COMMIT in the
        same text would commit: records without their ledger entries, seen under load with a
        node killed (test_galera.py). On SQLite nothing: the COMMIT hand-off runs them in order
        in this module's own code and stops at the first that fails (``commit``)."""
        if self.dialect != dialects.SQLITE:
            await self.flush()

    async def commit(self):
        """COMMIT; on SQLite with the statements written later in the same hand-off, one of them
        failing rolls the transaction back there and raises."""
        if self._nothing_sent():
            self._later = []
            return None       # nothing was written: nothing to commit
        if self.dialect != dialects.SQLITE:
            await self.before_commit()
            return await self._answer(self.sor.conn.commit())
        later, self._later = self._later, []

        def work(conn):
            try:
                _send(conn, later)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        return await self.sor.call(work)

    async def rollback(self):
        sent, self._later, self._later_bytes = self._sent, [], 0     # never sent: nothing to undo
        if not sent:
            return None        # not even the BEGIN ran
        if self.dialect != dialects.SQLITE:
            return await self._answer(self.sor.conn.rollback())
        return await self.sor.call(lambda conn: conn.rollback())

    async def savepoint(self, name):
        """Mark a point ``rollback_to(name)`` returns to (written later: it goes with the next
        statement)."""
        await self.execute(f"savepoint {name}", later=True)

    async def rollback_to(self, name):
        """Undo what the transaction did since ``savepoint(name)``. Statements still waiting to
        be sent were written after the savepoint (or with it): they are dropped, never run."""
        mark = f"savepoint {name}"
        for i, (sql, _, _, _) in enumerate(self._later):
            if sql == mark:               # the savepoint itself was not sent: nothing after it ran
                del self._later[i:]
                self._later_bytes = sum(len(text) for text, _, _, _ in self._later)
                return
        self._later, self._later_bytes = [], 0
        await self.execute(f"rollback to savepoint {name}")

    async def _answer(self, aw):
        return await _answer(self.sor, aw, self.timeout_seconds)

    def _mask(self, sql, ns):
        marked, names = _compile(sql, self.dialect)
        try:
            return marked, tuple([ns[n] for n in names])
        except KeyError as e:
            # sqlor would silently bind a Python builtin of that name (e.g. id); refuse instead
            raise KeyError(f"SQL parameter ${{{e.args[0]}}}$ has no value") from None

    async def select(self, sql, ns=None):
        return (await self.execute_then_select(None, None, sql, ns))[1]

    async def execute_then_select(self, statement, ns, sql, select_ns=None):
        """``(rows changed, rows read)``: ``statement`` (None: nothing) and then the SELECT
        ``sql``, in one wait (its answer is read only once both have run)."""
        first = None if statement is None else self._mask(statement, ns or {})
        marked, data = self._mask(sql, select_ns or {})
        if self.dialect == dialects.SQLITE:
            # one hand-off to the connection's thread (execute and fetch, after what was written
            # later); SQLite returns only int / float / str / bytes / None, nothing to convert
            def both(conn):
                changed = None if first is None else conn.execute(*first).rowcount
                return changed, conn.execute(marked, data).fetchall()
            changed, rows = await self._sqlite(both)
            if not rows:
                return changed, []
            names = rows[0].keys()      # one result set: the same columns in every row
            return changed, [Row(zip(names, r, strict=True)) for r in rows]
        cur = self.sor.cur
        texts = [self._mogrify(marked, data)]
        if first is not None:
            texts.insert(0, self._mogrify(*first))
        counts = await self._mysql(texts)
        changed = counts[0] if first is not None else None
        rows = await cur.fetchall()
        names = [d[0].lower() for d in cur.description]
        return changed, [Row({n: _py_value(v) for n, v in zip(names, row, strict=True)}) for row in rows]

    async def one(self, sql, ns=None):
        rows = await self.select(sql, ns)
        return rows[0] if rows else None

    async def scalar(self, sql, ns=None):
        row = await self.one(sql, ns)
        return None if row is None else next(iter(row.values()))

    async def execute(self, sql, ns=None, later=False, expect=None):
        """Run one statement; returns the number of rows it changed (matched, for UPDATE on
        MySQL, because the connection is opened with CLIENT.FOUND_ROWS). ``later``: no count;
        sent with the next statement or the COMMIT (the class says when). ``expect``: written
        later, and the count it must have (``AssumptionRefuted`` when it has another); only
        in a transaction that ``assumes``."""
        if expect is not None and not (later and self.assumes):
            raise AssertionError("an expected count is for a statement written later, in a transaction that assumes")
        marked, data = self._mask(sql, ns or {})
        if self.dialect == dialects.SQLITE:
            if later:
                self._later.append((marked, data, False, expect))
                return None
            return await self._sqlite(lambda conn: conn.execute(marked, data).rowcount)
        text = self._mogrify(marked, data)
        if later:
            return await self._defer([text], expect)
        return (await self._mysql([text]))[0]

    async def execute_many(self, sql, rows, later=False):
        """One statement for many parameter sets (a list of dicts with the same keys); ``later``
        as for ``execute``."""
        if not rows:
            return 0
        marked, names = _compile(sql, self.dialect)
        pick = _picker(names)
        try:
            params = [pick(r) for r in rows]
        except KeyError as e:
            raise KeyError(f"SQL parameter ${{{e.args[0]}}}$ has no value") from None
        if self.dialect == dialects.SQLITE:
            if later:
                self._later.append((marked, params, True, None))
                return None
            return await self._sqlite(lambda conn: conn.executemany(marked, params).rowcount)
        texts = _mysql_texts(self._mogrify, marked, params)
        if later:
            return await self._defer(texts)
        return sum(await self._mysql(texts))

    async def insert(self, table, record, later=False):
        cols = list(record)
        sql = (f"insert into {table} ({', '.join(cols)}) values "
               f"({', '.join('${' + c + '}$' for c in cols)})")
        return await self.execute(sql, record, later=later)

    async def insert_many(self, table, records, later=False):
        """Insert ``records`` (dicts with the same keys) with multi-row INSERTs
        (``dialect.row_chunks`` says how many rows each); on SQLite all of them in one
        hand-off, or with the next one when written ``later`` (then no count)."""
        if not records:
            return 0
        cols = list(records[0])
        sql = f"insert into {table} ({', '.join(cols)}) values ({', '.join('${' + c + '}$' for c in cols)})"
        sizes = dialects.row_chunks(self.dialect, len(records), len(cols))
        if sizes is None:
            return await self.execute_many(sql, records, later=later)
        marked, names = _compile(sql, self.dialect)
        return await self._chunked(records, names, sizes, lambda size: _multi_row(marked, size), later)

    async def update_many(self, table, rows, key="id", keep=(), later=False):
        """Update many rows by key: on SQLite multi-row UPDATE ... FROM (VALUES ...) statements
        (``dialect.row_chunks``), all in one hand-off; on MySQL a multi-row INSERT ... ON DUPLICATE
        KEY UPDATE (one round trip; pymysql sends an UPDATE executemany row by row). Rows must exist
        and, for MySQL, carry the table's NOT NULL columns; ``keep``: columns the rows carry only for
        that, never set (SQLite rewrites the index entries of every column it sets, even to the same
        value). ``later`` as for ``execute``."""
        if not rows:
            return 0
        cols = list(rows[0])
        if self.dialect != dialects.SQLITE:
            return await self.execute_many(dialects.upsert(self.dialect, table, cols, key, keep), rows, later=later)
        sets = tuple(c for c in cols if c != key and c not in keep)
        if dialects.sqlite_update_rows(table, key, sets, 1) is None:     # an SQLite before 3.33
            assign = ", ".join(f"{c} = ${{{c}}}$" for c in sets)
            return await self.execute_many(f"update {table} set {assign} where {key} = ${{{key}}}$", rows, later=later)
        sizes = dialects.row_chunks(self.dialect, len(rows), 1 + len(sets))
        return await self._chunked(rows, (key,) + sets, sizes,
                                   lambda size: dialects.sqlite_update_rows(table, key, sets, size), later)

    async def _chunked(self, rows, names, sizes, text_for, later):
        """SQLite: ``rows`` as multi-row statements of ``sizes`` rows each (``text_for(size)``, whose
        parameters are each row's ``names`` in order), all in one hand-off, or written ``later``;
        the rows changed (None when later)."""
        pick = _picker(tuple(names))
        chunks, start = [], 0
        try:
            for size in sizes:
                params = [v for r in rows[start:start + size] for v in pick(r)]
                chunks.append((text_for(size), params, False, None))
                start += size
        except KeyError as e:
            raise KeyError(f"SQL parameter ${{{e.args[0]}}}$ has no value") from None
        if later:
            self._later.extend(chunks)
            return None
        return await self._sqlite(lambda conn: sum(conn.execute(chunk[0], chunk[1]).rowcount for chunk in chunks))

    async def page(self, sql, ns, order_by, page, rows):
        """``{"total", "rows"}`` for one page; ``order_by`` is code-controlled text."""
        total = await self.scalar(f"select count(*) as n from ({sql}) counted_", ns)
        ns = dict(ns, page_limit_=rows, page_offset_=(page - 1) * rows)
        data = await self.select(f"{sql} order by {order_by} limit ${{page_limit_}}$ "
                                 f"offset ${{page_offset_}}$", ns)
        return {"total": int(total or 0), "rows": data}

    @staticmethod
    def in_list(values, ns, prefix="v"):
        """``(${v0}$, ${v1}$, ...)`` for ``values``, filling ``ns`` (sqlor cannot bind a list)."""
        if not values:
            return "(null)"
        names = []
        for i, v in enumerate(values):
            ns[f"{prefix}{i}"] = v
            names.append(f"${{{prefix}{i}}}$")
        return "(" + ", ".join(names) + ")"

    async def lock_by_key(self, table, column, value):
        """The row whose unique ``column`` is ``value``, locked for this transaction, or None.
        The lookup itself does not lock: on MySQL a locking read of a missing key takes a gap
        lock, and two transactions that then insert into that gap deadlock. Callers insert a
        missing row and let the unique index turn a concurrent insert into a duplicate-key error."""
        row = await self.one(f"select id from {table} where {column} = ${{v}}$", {"v": value})
        if row is None:
            return None
        return await self.one(f"select * from {table} where id = ${{i}}${self.for_update()}", {"i": row.id})

    def for_update(self):
        return dialects.for_update(self.dialect)

    def skip_locked(self):
        return dialects.skip_locked(self.dialect)


class Database:
    """A pool of sqlor connections to one database, and transactions on it.

    ``desc`` is a sqlor database description: ``{"driver": ..., "kwargs": {...}}``.
    """

    def __init__(self, desc, pool_size=10, statement_timeout_seconds=_STATEMENT_TIMEOUT_SECONDS,
                 on_run_again: Callable[[str], None] | None = None):
        self.desc = DictObject(**desc)
        # told each time ``run`` runs a transaction again, with why: "assumption" (an assumed
        # count was not met), "conflict" (a deadlock, a lock timeout, a Galera certification
        # conflict), "node" (the node failed or did not answer)
        self.on_run_again = on_run_again
        self.driver = self.desc.driver
        self.dialect = dialects.dialect_of(self.driver)
        self.statement_timeout_seconds = dialects.statement_timeout(self.dialect, statement_timeout_seconds)
        self.nodes = _nodes_of(desc) if self.dialect == dialects.MYSQL else []
        self._node = 0            # index in nodes of the node new connections go to
        self.failover_seconds = _FAILOVER_SECONDS
        self.galera = False       # learnt from the first connection
        self.pool_size = pool_size if self.dialect != dialects.SQLITE else max(2, min(pool_size, 4))
        self._idle: list[tuple[Any, float]] = []     # [(sor, last_used_monotonic)]
        self._all: set[Any] = set()
        self._slots: asyncio.Semaphore = asyncio.Semaphore(1)   # replaced per event loop
        self._write_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def _ensure_loop_state(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:     # first use, or a test's new event loop
            self._loop = loop
            self._slots = asyncio.Semaphore(self.pool_size)
            self._write_lock = asyncio.Lock()
            self._idle = []
            self._all = set()

    @property
    def node(self) -> str | None:
        """``host:port`` of the node new connections go to (None on SQLite): health shows it."""
        if not self.nodes:
            return None
        host, port = self.nodes[self._node]
        return f"{host}:{port}"

    async def _connect(self):
        if self.dialect == dialects.SQLITE:
            sor = BillingSQLiteor(dbdesc=DictObject(**dict(self.desc.kwargs or {})))
            await sor.connect()
            self._all.add(sor)
            return sor
        last_error = None
        for step in range(len(self.nodes)):
            index = (self._node + step) % len(self.nodes)
            try:
                sor = await self._connect_node(index)
            except Exception as e:
                if not (isinstance(e, NodeFailed) or dialects.is_node_unavailable(e)):
                    raise
                log.warning("database node %s:%s does not answer: %s", *self.nodes[index], e)
                last_error = e
                continue
            if index != self._node:
                log.warning("database: now using node %s:%s", *self.nodes[index])
                self._node = index
            self._all.add(sor)
            return sor
        raise DatabaseUnavailable() from last_error

    async def _connect_node(self, index):
        import pymysql
        from sqlor.aiomysqlor import AioMysqlor
        kwargs = DictObject(**dict(self.desc.kwargs or {}))
        kwargs["host"], kwargs["port"] = self.nodes[index]
        plain_password = kwargs.pop("plain_password", None)
        kwargs.setdefault("charset", "utf8mb4")
        kwargs.setdefault("connect_timeout", _CONNECT_TIMEOUT_SECONDS)
        kwargs["autocommit"] = False
        # UPDATE row counts must mean "rows matched", not "rows whose value changed".
        kwargs["client_flag"] = int(kwargs.get("client_flag") or 0) | pymysql.constants.CLIENT.FOUND_ROWS
        sor = AioMysqlor(dbdesc=kwargs)
        if plain_password is not None:
            sor.dbdesc["password"] = plain_password
        sor.dbdesc.pop("plain_password", None)
        sor.billing_node = index
        try:
            # aiomysql's connect_timeout bounds the TCP connect only: a stopped node's kernel
            # still accepts it, and the handshake would then wait forever
            await _answer(sor, self._open(sor), float(kwargs["connect_timeout"]))
        except BaseException:
            if getattr(sor, "conn", None) is not None:
                sor.conn.close()
            raise
        return sor

    async def _open(self, sor):
        await sor.connect()
        await self._check_node(sor)

    async def _check_node(self, sor):
        """Learn whether the server is a Galera node; a node that is not ready (outside the
        primary component, joining, a donor) refuses here, as it would refuse the first query
        or block it. A connection that is already open finds out at its next statement: 1047
        outside the primary component, the statement timeout when the node blocks."""
        import pymysql
        async with sor.conn.cursor() as cur:
            await cur.execute("show variables like 'wsrep_on'")
            row = await cur.fetchone()
            self.galera = bool(row) and str(row[1]).upper() == "ON"
            if self.galera:
                await cur.execute(dialects.GALERA_NODE_STATE)
                if not dialects.galera_node_ready(dict(await cur.fetchall())):
                    raise pymysql.err.OperationalError(1047, "WSREP has not yet prepared node for application use")
            if self.statement_timeout_seconds is not None:
                await cur.execute(dialects.lock_wait_timeout(self.statement_timeout_seconds))
        await sor.conn.commit()

    async def _node_failed(self, index):
        """The node behind a broken connection: new connections go to the next node, and the
        idle connections to the failed one are closed (they are broken too)."""
        if index is None or index != self._node:
            return
        self._node = (index + 1) % len(self.nodes)
        log.warning("database node %s:%s failed; new connections go to %s", *self.nodes[index], self.node)
        keep = []
        for sor, last in self._idle:
            if getattr(sor, "billing_node", None) == index:
                await self._discard(sor)
            else:
                keep.append((sor, last))
        self._idle = keep

    async def _discard(self, sor):
        self._all.discard(sor)
        try:
            await sor.exit()
        except Exception:
            pass
        try:
            if self.dialect == dialects.SQLITE:
                await sor.close()
            else:
                sor.conn.close()
        except Exception:
            pass

    async def _checkout(self):
        while self._idle:
            sor, last = self._idle.pop()
            if self.dialect == dialects.MYSQL and time.monotonic() - last > _PING_AFTER_IDLE_SECONDS:
                try:
                    await _answer(sor, sor.conn.ping(reconnect=False), self.statement_timeout_seconds)
                except Exception as e:
                    await self._discard(sor)
                    if isinstance(e, NodeTimeout):     # its other idle connections would hang too
                        await self._node_failed(sor.billing_node)
                    continue
            return sor
        return await self._connect()

    @asynccontextmanager
    async def _connection(self):
        self._ensure_loop_state()
        if self.closed:
            raise RuntimeError("database is closed")
        async with self._slots:
            sor = await self._checkout()
            healthy = False
            try:
                await sor.enter()
                yield sor
                healthy = True
            except BaseException as e:
                # a connection a timeout closed fails whatever the work did next with it (a caller
                # that caught NodeTimeout gets "not connected" from its next statement)
                lost = isinstance(e, Exception) and self.nodes and sor.conn.closed
                if not self.nodes or not (lost or isinstance(e, (NodeFailed, CommitUnknown))
                                          or dialects.is_node_unavailable(e)):
                    raise
                # the node failed, not the statement: move the pool on, and let every caller see
                # one error (503 at the API), which run() answers by running the work again
                await self._node_failed(getattr(sor, "billing_node", None))
                if isinstance(e, DatabaseUnavailable):
                    raise
                raise NodeFailed() from e
            finally:
                if healthy and not self.closed and getattr(sor, "billing_node", None) in (None, self._node):
                    # a connection to a node the pool has left (it failed meanwhile) is not kept:
                    # the next caller would wait a statement timeout to learn that again
                    try:
                        await sor.exit()
                        self._idle.append((sor, time.monotonic()))
                    except Exception:
                        await self._discard(sor)
                else:
                    await self._discard(sor)

    @asynccontextmanager
    async def transaction(self, write: bool = True, latest: bool = False, bounded: bool = True,
                          assumes: bool = False):
        """One transaction. Exceptions roll back and propagate; nothing is swallowed.
        ``latest``: on Galera, its reads see every transaction committed anywhere in the cluster
        before they run (``wsrep_sync_wait``); elsewhere one server is always up to date.
        A connection that breaks during COMMIT, or whose COMMIT gets no answer within the
        statement timeout, raises ``CommitUnknown``. ``bounded=False``: no statement timeout,
        for DDL (an index built on a large table takes as long as it takes). ``assumes``: see
        ``Tx`` (``run`` opens such transactions: it runs the work again when an assumption fails)."""
        self._ensure_loop_state()
        lock = self._write_lock if (write and self.dialect == dialects.SQLITE) else None
        if lock is not None:
            await lock.acquire()
        try:
            async with self._connection() as sor:
                tx = Tx(sor, self.dialect, self.statement_timeout_seconds if bounded else None, assumes)
                causal = latest and self.galera
                if getattr(sor, "billing_sync_wait", False) != causal:
                    # set here, not reset after COMMIT: nothing may fail after a COMMIT succeeded
                    await tx._answer(sor.cur.execute(dialects.sync_wait(causal)))
                    sor.billing_sync_wait = causal
                begin = dialects.begin_statement(self.dialect, write)
                if begin:
                    await tx.begin(begin)
                try:
                    yield tx
                    # a failure here is before the COMMIT was sent: the transaction did not commit
                    await tx.before_commit()
                except BaseException as e:
                    if not isinstance(e, NodeTimeout):    # its connection is closed: nothing to roll back
                        try:
                            await tx.rollback()
                        except Exception as rollback_error:
                            # e.g. a statement cancelled mid-flight closes an aiomysql connection; the
                            # connection is discarded (the server rolls back) and the original
                            # exception, a cancellation included, goes on
                            log.warning("rollback failed (%s); the connection is discarded", rollback_error)
                    raise
                if write or dialects.read_needs_commit(self.dialect):
                    try:
                        await tx.commit()
                    except Exception as e:
                        # no answer to the COMMIT is no more an answer than a broken connection
                        if isinstance(e, NodeTimeout) or (dialects.is_node_unavailable(e)
                                                          and self.dialect == dialects.MYSQL):
                            raise CommitUnknown() from e
                        raise
        finally:
            if lock is not None:
                lock.release()

    def read(self, latest: bool = False):
        return self.transaction(write=False, latest=latest)

    async def run(self, work, write: bool = True, retries: int | None = None, idempotent: bool = False,
                  latest: bool = False):
        """``await work(tx)`` in a transaction, run again from the start when the database
        aborted it for a deadlock, a lock timeout or a Galera certification conflict (nothing
        of a failed attempt remains), and on the next node when the connection broke before
        COMMIT. A COMMIT cut off leaves its outcome unknown: the work runs again only when it is
        ``idempotent`` (its unique key turns a second run into a duplicate), else the caller
        gets ``DatabaseUnavailable``, like when no node answers for ``_FAILOVER_SECONDS``.

        The work may assume (``Tx.assumes``); when an assumption fails, nothing of that attempt
        remains and the work runs again at once, making none."""
        if retries is None:
            retries = _DEADLOCK_RETRIES
        attempt, give_up_at, assumes = 0, None, write
        while True:
            try:
                async with self.transaction(write=write, latest=latest or attempt > 0, assumes=assumes) as tx:
                    return await work(tx)
            except AssumptionRefuted:
                if not assumes:
                    raise
                assumes = False
                self._ran_again("assumption")
            except DatabaseUnavailable as e:
                give_up_at = give_up_at or time.monotonic() + self.failover_seconds
                if (isinstance(e, CommitUnknown) and not idempotent) or time.monotonic() > give_up_at:
                    raise
                self._ran_again("node")
                log.warning("database: %s (%s); running the transaction again", e.message, e.__cause__)
                # a node that broke: the next one is tried at once; none answering: wait a little
                await asyncio.sleep(0.05 if isinstance(e, (NodeFailed, CommitUnknown)) else 0.5)
            except Exception as e:
                attempt += 1
                if not dialects.is_retryable(e):
                    raise
                if attempt > max(retries, _CONFLICT_RETRIES_GALERA if self.galera else 0):
                    raise DatabaseUnavailable("the transaction kept colliding with others; try again") from e
                self._ran_again("conflict")
                await asyncio.sleep(random.uniform(0.001, 0.004) * min(attempt, 10))

    def _ran_again(self, why: str) -> None:
        if self.on_run_again is not None:
            self.on_run_again(why)

    async def run_or_existing(self, work, find, collided="request collided with another request; send it again",
                              refused_check=False):
        """``(run(work), None)``; or, when a unique key shows that the same request committed
        concurrently, ``(None, row)`` with the row ``find(tx)`` reads (Conflict when there is none).
        Idempotent operations use this: the database's unique index, not a prior read, decides
        which request won.

        ``refused_check``: a refusal (a BillingError such as insufficient_balance) is also checked
        against ``find``. On MySQL a second copy of a request waits on the row lock the first one
        holds; once it runs, its earlier snapshot read cannot see the first copy's committed row,
        and the balance the first copy used looks short. The answer to that copy is the first
        copy's result, not a refusal.

        The work is idempotent by its key, so ``run`` may run it again on another node after a
        COMMIT cut off. ``find`` reads causally: on Galera the first copy may have committed
        on another node that this one has not applied yet."""
        from ..errors import BillingError, Conflict
        try:
            return await self.run(work, idempotent=True), None
        except DatabaseUnavailable:
            raise
        except BillingError:
            if not refused_check:
                raise
            existing = await self.run(find, write=False, latest=True)
            if existing is None:
                raise
            return None, existing
        except Exception as e:
            if not dialects.is_unique_violation(e):
                raise
        existing = await self.run(find, write=False, latest=True)
        if existing is None:
            raise collided if isinstance(collided, Exception) else Conflict(collided)
        return None, existing

    async def close(self):
        self.closed = True
        idle, self._idle = self._idle, []
        for sor, _ in idle:
            await self._discard(sor)
        for sor in list(self._all):
            await self._discard(sor)


def where(*conditions):
    """``(sql, ns)`` for the filters a caller gave: each condition is ``(fragment, name, value)``
    with ``${name}$`` in the fragment, and is left out when its value is None or empty. The
    list endpoints build their WHERE clause with this."""
    parts, ns = ["1 = 1"], {}
    for fragment, name, value in conditions:
        if value is not None and value != "":
            parts.append(fragment)
            ns[name] = value
    return " and ".join(parts), ns


def sqlite_desc(path, busy_timeout_ms=10000):
    return {"driver": SQLITE_DRIVER, "kwargs": {"dbname": path, "busy_timeout_ms": busy_timeout_ms}}


def mysql_desc(host: str, port: int, user: str, password: str, name: str,
               hosts: list[str] | None = None) -> dict:
    """``hosts``: ``["h1:p1", "h2:p2", ...]`` the nodes to use in order (a Galera cluster);
    host/port when empty."""
    kwargs = {"host": host, "port": int(port), "user": user, "db": name}
    if password:
        kwargs["plain_password"] = password
    desc = {"driver": "aiomysql", "kwargs": kwargs}
    if hosts:
        desc["hosts"] = list(hosts)
    return desc


def _nodes_of(desc: dict) -> list[tuple[str, int]]:
    """[(host, port)] of a MySQL description: its ``hosts``, else its one host and port."""
    hosts = desc.get("hosts") or []
    if not hosts:
        kwargs = desc.get("kwargs") or {}
        return [(kwargs.get("host") or "127.0.0.1", int(kwargs.get("port") or 3306))]
    nodes = []
    for item in hosts:
        host, _, port = str(item).rpartition(":")
        nodes.append((host, int(port)))
    return nodes


def desc_from_config(cfg, data_dir):
    import os
    db = cfg.database
    if db.driver == "sqlite":
        path = db.path or os.path.join(data_dir, "billing.db")
        return sqlite_desc(os.path.abspath(path), db.busy_timeout_ms)
    return mysql_desc(db.host, db.port, db.user, db.password, db.name, db.get("hosts"))
