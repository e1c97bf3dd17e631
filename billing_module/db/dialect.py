"""Every difference between SQLite and MySQL/MariaDB that the module's SQL depends on."""
import functools
import sqlite3

import pymysql

SQLITE, MYSQL = "sqlite", "mysql"

# MySQL error numbers
_DUP_ENTRY = 1062
_RETRYABLE_MYSQL = {1213, 1205}          # deadlock, lock wait timeout
_CONNECTION_LOST_MYSQL = {2003, 2006, 2013, 2055}
_UNAVAILABLE_MYSQL = _CONNECTION_LOST_MYSQL | {1040, 2002}   # + too many connections, no socket
_UNAVAILABLE_SQLITE = ("unable to open database file", "database is locked", "disk i/o error")


def dialect_of(driver):
    return SQLITE if driver in ("billing_sqlite", "sqlite", "sqlite3", "aiosqlite") else MYSQL


def is_unique_violation(exc):
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc)
    if isinstance(exc, pymysql.err.IntegrityError):
        return exc.args and exc.args[0] == _DUP_ENTRY
    return False


def is_integer_overflow(exc):
    """SQLite's sum() of integers that leaves the signed 64-bit range raises (MySQL sums into DECIMAL)."""
    return isinstance(exc, sqlite3.OperationalError) and "integer overflow" in str(exc)


def is_retryable(exc):
    """A transaction that failed this way did nothing and may be run again as a whole."""
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    if isinstance(exc, pymysql.err.OperationalError):
        return bool(exc.args) and exc.args[0] in _RETRYABLE_MYSQL
    return False


def is_connection_lost(exc):
    if isinstance(exc, (pymysql.err.OperationalError, pymysql.err.InterfaceError)):
        return bool(exc.args) and exc.args[0] in _CONNECTION_LOST_MYSQL
    return isinstance(exc, (ConnectionError, BrokenPipeError))


def is_database_error(exc):
    """An error of the database or of the way to it (as opposed to one of the data)."""
    return isinstance(exc, (sqlite3.Error, pymysql.err.Error, ConnectionError, TimeoutError, OSError))


def is_unavailable(exc):
    """The database could not be reached or used at all (the caller may try again later):
    the error itself or any error it was raised from."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            if exc.args and exc.args[0] in _UNAVAILABLE_MYSQL:
                return True
        elif isinstance(exc, sqlite3.OperationalError):
            if str(exc).lower().startswith(_UNAVAILABLE_SQLITE):
                return True
        elif isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def for_update(dialect):
    """Row-lock suffix for a SELECT inside a write transaction (SQLite locks the whole
    database at BEGIN IMMEDIATE, so it needs none)."""
    return "" if dialect == SQLITE else " for update"


def skip_locked(dialect):
    """Claim rows without waiting on another instance's claim."""
    return "" if dialect == SQLITE else " for update skip locked"


def begin_statement(dialect, write):
    """What opens a transaction, or None. SQLite connections run in autocommit mode, so a write
    transaction opens with BEGIN IMMEDIATE (taking the write lock up front) and a read needs none
    (one statement is its own snapshot). MySQL connections have autocommit off: the first
    statement opens the transaction, so an explicit one would only cost a round trip."""
    if dialect == SQLITE:
        return "begin immediate" if write else None
    return None


def read_needs_commit(dialect):
    """A MySQL read ends its implicit transaction (and snapshot) with a commit."""
    return dialect != SQLITE


def substr_date(dialect, column, month=False):
    """The day part (``month``: the 'YYYY-MM' part) of a 'YYYY-MM-DD HH:MM:SS' column, as text."""
    if dialect == SQLITE:
        return f"substr({column}, 1, {7 if month else 10})"
    return f"date_format({column}, '{'%Y-%m' if month else '%Y-%m-%d'}')"


def local_date(dialect, column, segments, month=False):
    """The local day (``month``: 'YYYY-MM') of a UTC time column, for the offsets ``segments``
    (``clock.offset_segments``: ((until UTC text, minutes), ..., (None, minutes))). Both are
    computed by the module, never taken from a request, so they are written into the SQL."""
    def shifted(minutes):
        if minutes == 0:
            return substr_date(dialect, column, month)
        if dialect == SQLITE:
            return f"substr(datetime({column}, '{int(minutes):+d} minutes'), 1, {7 if month else 10})"
        return f"date_format(date_add({column}, interval {int(minutes)} minute), '{'%Y-%m' if month else '%Y-%m-%d'}')"
    if len(segments) == 1:
        return shifted(segments[0][1])
    whens = " ".join(f"when {column} < '{until}' then {shifted(minutes)}" for until, minutes in segments[:-1])
    return f"(case {whens} else {shifted(segments[-1][1])} end)"


def catalog_query(dialect, what, table=None):
    """(SQL, parameters) listing, as ``name`` in lower case, the database's ``tables``, or the
    ``indexes`` or ``columns`` of ``table`` (a model's name, never a caller's)."""
    if dialect == SQLITE:
        return {"tables": "select lower(name) as name from sqlite_master where type = 'table'",
                "indexes": f"select lower(name) as name from pragma_index_list('{table}')",
                "columns": f"select lower(name) as name from pragma_table_info('{table}')"}[what], {}
    return {"tables": "select lower(table_name) as name from information_schema.tables "
                      "where table_schema = database()",
            "indexes": "select distinct lower(index_name) as name from information_schema.statistics "
                       "where table_schema = database() and table_name = ${t}$",
            "columns": "select lower(column_name) as name from information_schema.columns "
                       "where table_schema = database() and table_name = ${t}$"}[what], {"t": table}


# SQLite's bound parameters per statement: 32766 from 3.32, 999 before
_SQLITE_MAX_PARAMS = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
_SQLITE_MAX_ROWS = 256


def row_chunks(dialect, rows, columns):
    """How ``insert_many`` and ``update_many`` split ``rows`` rows of ``columns`` values into
    multi-row statements: None on MySQL (pymysql's executemany writes one multi-row INSERT itself).
    On SQLite, row counts that are powers of two up to 256 (within its parameter limit), largest
    first: a few statement texts, each prepared once and cached by the connection (preparing one
    costs more than running it), instead of executemany, which needs the GIL back for every row:
    its thread then waits a switch interval (5 ms) per row while the event loop is busy."""
    if dialect != SQLITE:
        return None
    cap = min(_SQLITE_MAX_ROWS, max(1, _SQLITE_MAX_PARAMS // max(1, columns)))
    cap = 1 << (cap.bit_length() - 1)
    sizes = []
    while rows:
        size = min(cap, 1 << (rows.bit_length() - 1))
        sizes.append(size)
        rows -= size
    return sizes


_SQLITE_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33)


@functools.lru_cache(maxsize=256)
def sqlite_update_rows(table, key, sets, rows):
    """SQLite's UPDATE of ``rows`` rows by ``key`` in one statement (UPDATE ... FROM, SQLite
    3.33+): the parameters are each row's key, then its values of ``sets``. None before 3.33
    (then executemany)."""
    if not _SQLITE_UPDATE_FROM:
        return None
    row = "(" + ", ".join("?" * (1 + len(sets))) + ")"
    assign = ", ".join(f"{c} = v.column{i + 2}" for i, c in enumerate(sets))
    return (f"update {table} set {assign} from (values {', '.join([row] * rows)}) as v "
            f"where {table}.{key} = v.column1")


def insert_ignore(dialect):
    """INSERT that does nothing when the row's unique key exists."""
    return "insert or ignore" if dialect == SQLITE else "insert ignore"


def upsert(dialect, table, columns, key="id", keep=()):
    """INSERT ... that updates the non-key columns when the key exists (but those in ``keep``)."""
    cols = ", ".join(columns)
    values = ", ".join("${" + c + "}$" for c in columns)
    rest = [c for c in columns if c != key and c not in keep]
    if dialect == SQLITE:
        sets = ", ".join(f"{c} = excluded.{c}" for c in rest)
        return f"insert into {table} ({cols}) values ({values}) on conflict({key}) do update set {sets}"
    sets = ", ".join(f"{c} = values({c})" for c in rest)
    return f"insert into {table} ({cols}) values ({values}) on duplicate key update {sets}"


def as_integer(dialect, column):
    """A text column holding a decimal integer, as a number to compare and sort by (the sync
    versions are integers stored as text; text order would put '10' before '9')."""
    return f"cast({column} as integer)" if dialect == SQLITE else f"cast({column} as unsigned)"


def not_integer_text(dialect, column):
    """True where a text column is empty, NULL or not made of decimal digits only."""
    bad = f"{column} glob '*[^0-9]*'" if dialect == SQLITE else f"{column} regexp '[^0-9]'"
    return f"({column} is null or {column} = '' or {bad})"


# --- clusters (MariaDB Galera) and failover ----------------------------------------------------
# The node cannot serve now, but another may: the connection broke or was refused (2002-2055),
# the server is shutting down or killed the connection (1053, 1927), or it is a Galera node
# outside the primary component or not yet synced ("WSREP has not yet prepared node", 1047).
_NODE_UNAVAILABLE_MYSQL = {2002, 2003, 2006, 2013, 2055, 1040, 1047, 1053, 1927}
# A COMMIT refused (1180, "error during commit") by a Galera node that lost the primary component
# while the transaction ran: the node failed, not the work. Like any node failure at COMMIT it is
# handled as an unknown outcome (``CommitUnknown``: idempotent work runs again on another node, the
# caller of any other gets DatabaseUnavailable, 503), not passed on as an internal error. 1180 for
# any other reason (a full disk) stays the statement's error.
_ERROR_DURING_COMMIT = 1180
_OUTSIDE_PRIMARY = "Not connected to Primary Component"


def is_node_unavailable(exc: BaseException) -> bool:
    """The node this connection talks to failed (not the statement): try another node."""
    if isinstance(exc, (pymysql.err.OperationalError, pymysql.err.InterfaceError)):
        if not exc.args or exc.args[0] in _NODE_UNAVAILABLE_MYSQL or exc.args[0] == 0:
            return True
        return exc.args[0] == _ERROR_DURING_COMMIT and _OUTSIDE_PRIMARY in str(exc.args[1:])
    return isinstance(exc, ConnectionError)   # a timeout may be anyone's: not taken as the node's


def sync_wait(on: bool) -> str:
    """Galera: make this session's reads wait until the node has applied every transaction the
    cluster committed before them (a causal read), or stop waiting."""
    return f"set session wsrep_sync_wait = {1 if on else 0}"


def statement_timeout(dialect: str, seconds: float | None) -> float | None:
    """How long a statement or a COMMIT waits for the server's answer before its node is taken as
    failed (None: no bound). None on SQLite: it runs in this process on a local file, so there is
    no node to stop or network to cut; a statement waits on another writer only up to the busy
    timeout (then "database is locked", which run() retries), by design; and aiosqlite cannot stop
    a statement its thread runs, so a timeout would abandon it there, still holding the write lock."""
    return None if dialect == SQLITE else seconds


def lock_wait_timeout(statement_timeout_seconds: float) -> str:
    """MySQL: a row-lock wait ends with error 1205 (retried like a deadlock) well before the
    statement timeout, so a long lock wait on a healthy node is never taken for a node that
    stopped answering."""
    return f"set session innodb_lock_wait_timeout = {max(1, int(statement_timeout_seconds // 2))}"


# Galera: a node serves only when it is in the primary component (wsrep_ready ON) and Synced
# (wsrep_local_state 4). A Joiner, a Joined node still applying its backlog, or a Donor (an
# rsync SST blocks its writes) is taken as failed, as the usual clustercheck script does.
GALERA_NODE_STATE = "show status where variable_name in ('wsrep_ready', 'wsrep_local_state')"
_GALERA_SYNCED = "4"


def galera_node_ready(status: dict[str, str]) -> bool:
    """``status``: the rows of GALERA_NODE_STATE as {name: value}."""
    state = {str(k).lower(): str(v) for k, v in status.items()}
    return state.get("wsrep_ready", "").upper() == "ON" and state.get("wsrep_local_state") == _GALERA_SYNCED
