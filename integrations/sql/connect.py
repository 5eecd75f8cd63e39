"""Engines with the settings every handoff database needs, whatever the dialect."""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import date
from decimal import Decimal

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from pyarrow import csv as arrow_csv
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import make_url

DEFAULT_DRIVERS = {
    # psycopg 3: the driver with COPY.
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    # PyMySQL: pure Python, server-side cursors, multi-row executemany.
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


# A time zone set in libpq's `options` (`-c timezone=…`, `--TimeZone=…`, not `log_timezone`), or
# in a MariaDB `init_command` (`time_zone = …`).
_SETS_TIMEZONE = re.compile(r"(?<!log_)time_?zone\s*=", re.IGNORECASE)


def normalise_url(url: str) -> str:
    """A URL without a driver gets the one handoff is built on (psycopg 3, PyMySQL), and its
    sessions speak UTF-8 whatever the database's encoding: COPY text is sent as UTF-8, and the
    server converts it, refusing what the database's encoding cannot hold."""
    parsed = make_url(url)
    if parsed.drivername in DEFAULT_DRIVERS:
        parsed = parsed.set(drivername=DEFAULT_DRIVERS[parsed.drivername])
    if parsed.get_backend_name() in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    if parsed.get_backend_name() == "postgresql" and "client_encoding" not in parsed.query:
        parsed = parsed.update_query_dict({"client_encoding": "utf8"})
    return parsed.render_as_string(hide_password=False)


def zone_given(engine: sa.Engine) -> bool:
    """Whether whoever configured the connection chose its session time zone: in the URL (libpq
    `options`, a MariaDB `init_command`) or in libpq's environment (PGOPTIONS, PGTZ)."""
    said = [str(value) for value in engine.url.query.values()]
    if engine.dialect.name == "postgresql":
        if os.environ.get("PGTZ"):
            return True
        said.append(os.environ.get("PGOPTIONS", ""))
    return any(_SETS_TIMEZONE.search(text) for text in said)


def create_engine(url: str) -> sa.Engine:
    """An engine; SQLite files get WAL and a busy timeout so sync and sensors can share them,
    MariaDB/MySQL sessions strict SQL mode.

    PostgreSQL and MariaDB sessions run in UTC unless the connection's configuration chose a
    zone: handoff's times are UTC without a zone, which a `timestamptz` (or a MariaDB TIMESTAMP)
    would take as the session's local time. Set after connecting, not as a startup `options`
    (PgBouncer refuses those, and they would displace PGOPTIONS).

    Its errors never show a statement's parameters: SQLAlchemy's "[parameters: …]" repeated the
    keys a repair read and the records a write sent (emails, names) in the text of every error a
    statement raised, and of every error raised from one, into logs and Dagster's event log."""
    engine = sa.create_engine(normalise_url(url), pool_pre_ping=True, hide_parameters=True)
    in_utc = not zone_given(engine)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    if engine.dialect.name == "postgresql" and in_utc:

        @sa.event.listens_for(engine, "connect")
        def _utc_session(dbapi_connection, _record):
            dbapi_connection.execute("SET TIME ZONE 'UTC'")
            dbapi_connection.commit()

    if engine.dialect.name in ("mysql", "mariadb"):
        # A server configured lax (sql_mode without STRICT_*) cuts a too-long text, or turns a
        # bad value into 0, and only warns: handoff's sessions refuse instead, so the record is
        # dead-lettered with the reason rather than written wrong.
        @sa.event.listens_for(engine, "connect")
        def _strict_session(dbapi_connection, _record):
            with dbapi_connection.cursor() as cursor:
                cursor.execute(
                    "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), "
                    "'STRICT_ALL_TABLES')"
                )
                if in_utc:
                    cursor.execute("SET SESSION time_zone = '+00:00'")

    return engine


@contextmanager
def timestamps_in_utc(connection: sa.Connection, columns: Iterable[sa.Column]) -> Iterator[None]:
    """MariaDB reads, writes and compares a TIMESTAMP in the session's zone, and takes no offset
    in its text: under a zone the configuration chose (handoff's sessions run in UTC otherwise),
    handoff's naive UTC times were written, read and compared shifted by it, and by a DST
    change an hour more. So work on `columns`, when one is a TIMESTAMP, runs in UTC; the
    session's zone is set back after it."""
    if connection.dialect.name not in ("mysql", "mariadb") or not any(
        isinstance(column.type, mysql.TIMESTAMP) for column in columns
    ):
        yield
        return
    zone = connection.exec_driver_sql("SELECT @@session.time_zone").scalar_one()
    if zone in ("+00:00", "UTC"):
        yield
        return
    connection.exec_driver_sql("SET SESSION time_zone = '+00:00'")
    try:
        yield
    finally:
        # A connection lost meanwhile is discarded, zone and all: setting it back would only
        # raise "Can't reconnect until invalid transaction is rolled back" over the loss.
        if not connection.invalidated:
            with suppress(sa.exc.DBAPIError):
                connection.exec_driver_sql("SET SESSION time_zone = %s", (zone,))


def raise_on_lost_connection(engine: sa.Engine, error_type: type[Exception], what: str) -> None:
    """Turn the engine's connection failures (down, dropped, refused) into `error_type`, with a
    message that names `what` and the driver's complaint but no SQL, no parameters and no value
    it quotes. Other errors (a value the driver cannot read, a column gone) are left as they are:
    waiting for the database to answer would not cure them."""

    @sa.event.listens_for(engine, "handle_error")
    def _lost(context):
        if context.is_pre_ping:  # a stale pooled connection: the pool replaces it
            return
        original = context.original_exception
        if context.is_disconnect or unreachable(context.sqlalchemy_exception):
            raise error_type(
                f"{what} ({redacted(str(engine.url))}) failed: {driver_complaint(original)}"
            ) from original


def driver_complaint(original: BaseException | None) -> str:
    """What a driver's error says, as it may be shown: its class and first line, the values it
    quotes masked; no SQL, no parameters, none of PostgreSQL's DETAIL or CONTEXT lines."""
    first_line = without_values((str(original).strip().splitlines() or [""])[0])
    return f"{type(original).__name__}: {first_line}"


def unreachable(error: sa.exc.StatementError | None) -> bool:
    """Whether a database error says the database cannot be reached or used at all, whatever
    the statement: the drivers file a statement's own faults as OperationalError too (sqlite3
    its "no such column" and text it cannot decode, PyMySQL a server's data errors), which
    a rerun when the database answers would not cure."""
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    if error.connection_invalidated or isinstance(error, sa.exc.InterfaceError):
        return True
    original = error.orig
    sqlstate = getattr(original, "sqlstate", None)
    # PostgreSQL's, by its SQLSTATE (PyMySQL's errors carry one too, MariaDB's: codes tell more)
    if isinstance(original, psycopg.Error) and sqlstate is not None:
        return postgresql_unavailable(sqlstate)
    if not isinstance(error, sa.exc.OperationalError):
        return False
    if isinstance(original, sqlite3.Error):
        return getattr(original, "sqlite_errorname", "").startswith(_SQLITE_UNAVAILABLE)
    # PyMySQL's client codes (2000–2999) mean no connection; psycopg's error without a SQLSTATE
    # (a connection refused) has a message for its args.
    code = original.args[0] if original is not None and original.args else None
    return (
        not isinstance(code, int)
        or 2000 <= code < 3000
        or code in _MARIADB_BUSY
        or (sqlstate or "")[:2] in _MARIADB_UNAVAILABLE_CLASSES
    )


# PostgreSQL's classes: connection exception, transaction rollback (a serialization failure, a
# deadlock: a hot standby cancels reads so), insufficient resources, object not in prerequisite
# state (a lock not available, a table a publication keeps from updates), operator
# intervention, system error; and data or an index corrupted. None is one record's fault.
_PG_UNAVAILABLE_CLASSES = frozenset({"08", "40", "53", "55", "57", "58"})
# MariaDB's too many connections (1040), a user's connection or query limit (1203, 1226), a
# lock wait that timed out (1205, as PostgreSQL's 55P03), a query killed (1317: KILL QUERY, a
# server shutting down) or over max_statement_time (1969, as PostgreSQL's 57014): none is the
# statement's own fault.
_MARIADB_BUSY = frozenset({1040, 1203, 1205, 1226, 1317, 1969})
# And by the SQLSTATE MariaDB sends: a connection lost (08S01: a server shutting down, 1053; a
# connection aborted, 1152) or a transaction rolled back (40001: a deadlock, 1213).
_MARIADB_UNAVAILABLE_CLASSES = frozenset({"08", "40"})
_PG_CORRUPT = frozenset({"XX001", "XX002"})
# SQLite's result codes of a file it cannot open, read, write, lock or trust.
_SQLITE_UNAVAILABLE = (
    *("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CANTOPEN"),
    *("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_NOMEM"),
)

# Driver messages that repeat a value, which can be personal data: sqlite3's "… with text '…'",
# MariaDB's "Duplicate entry '…' for key" and "Incorrect date value: '…' for column" (the value
# may hold quotes itself), PostgreSQL's "invalid input syntax for type date: "…"" (at the end)
# and "value "…" is out of range for type integer".
_QUOTED_VALUE = re.compile(
    r"((?:entry|value|text):? )'.*?'(?= for |$)|(: )\".*\"$|(value )\".*\"(?= is out of range)",
    re.IGNORECASE,
)


def postgresql_unavailable(sqlstate: str) -> bool:
    """Whether PostgreSQL's SQLSTATE says the server cannot be used, whatever the statement."""
    return sqlstate[:2] in _PG_UNAVAILABLE_CLASSES or sqlstate in _PG_CORRUPT


def without_values(message: str) -> str:
    """A driver's message with the values it quotes masked ('…')."""
    return _QUOTED_VALUE.sub(_masked, message)


def _masked(found: re.Match) -> str:
    return f"{found[1]}'…'" if found[1] else f'{found[2] or found[3]}"…"'


def redacted(url: str) -> str:
    """The URL as it may appear in logs: never with its password."""
    return make_url(url).render_as_string(hide_password=True)


def upsert_statement(
    dialect_name: str, table: sa.Table, key_columns: list[str], update_columns: list[str]
):
    """`INSERT … ON CONFLICT (key) DO UPDATE` for SQLite and PostgreSQL, to run executemany."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect_name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"upsert is not implemented for the {dialect_name} dialect")
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=key_columns,
        set_={name: statement.excluded[name] for name in update_columns},
    )


Columns = Mapping[str, Sequence]  # column name → its values, every column as long


def copy_columns(connection: sa.Connection, table: str, columns: Columns | pa.Table) -> int:
    """PostgreSQL `COPY … FROM STDIN` of `columns` (or a `copy_table` of them) into `table`,
    inside the connection's transaction; the rows the table took (fewer when a trigger skipped
    some). Arrow writes the rows as CSV in C++, a part at a time: per-value Python (a driver's
    `write_row`, or text joined in Python) would cost more than the server's work."""
    batch = columns if isinstance(columns, pa.Table) else copy_table(columns)
    quote = connection.dialect.identifier_preparer.quote
    names = ", ".join(quote(name) for name in batch.column_names)
    statement = f"COPY {quote(table)} ({names}) FROM STDIN (FORMAT csv)"
    try:
        with connection.connection.driver_connection.cursor() as cursor:
            with cursor.copy(statement) as copy:
                for start in range(0, batch.num_rows, _COPY_ROWS):
                    part = pa.BufferOutputStream()
                    arrow_csv.write_csv(batch.slice(start, _COPY_ROWS), part, _COPY_CSV)
                    copy.write(part.getvalue())
            return cursor.rowcount
    except psycopg.Error as error:  # the driver's own: worded as SQLAlchemy words the others
        raise sa.exc.DBAPIError.instance(statement, None, error, psycopg.Error) from error


_COPY_ROWS = 10_000  # rows per message to the server
# Every value quoted, NULL unquoted and empty: PostgreSQL's CSV tells NULL from "" that way, and
# reads a quoted value's text as it is (no escapes; delimiters, quotes and line breaks inside).
_COPY_CSV = arrow_csv.WriteOptions(include_header=False, quoting_style="all_valid")


def copy_table(columns: Columns) -> pa.Table:
    """`columns` as an Arrow table whose CSV PostgreSQL's COPY reads as the values: a column of
    text or whole numbers is converted in C++, any other a value at a time (`_copy_texts`)."""
    return pa.table({name: _copy_array(values) for name, values in columns.items()})


def _copy_array(values: Sequence) -> pa.Array | pa.ChunkedArray:
    """One column as Arrow holds it faithfully (booleans as t/f), else as each value's text."""
    held = _held_by_arrow(values)
    if held is None:
        return pa.array(_copy_texts(values), pa.string())
    return pc.if_else(held, "t", "f") if pa.types.is_boolean(held.type) else held


def _held_by_arrow(values: Sequence) -> pa.Array | pa.ChunkedArray | None:
    """`values` converted in C++ if all are of a kind whose text Arrow writes as Python does:
    text, whole numbers of 64 bits, NULLs (and booleans, for t/f). Not floats, decimals nor
    times: Arrow's CSV of them is other text (1.0 as 1, -0.0 as -0, Decimal("2.5") at its
    column's scale 2.50, times with a space and six digits), which a text column would keep."""
    first = next((value for value in values if value is not None), None)
    if not (first is None or isinstance(first, str | int)):
        return None  # not converted only to be dropped: a column of times costs as much as text
    try:
        held = pa.array(values)  # the kind inferred in C++
    except (pa.ArrowException, ValueError, TypeError, OverflowError):  # mixed, beyond 64 bits
        return None
    return held if any(kind(held.type) for kind in _HELD_AS_THEY_ARE) else None


_HELD_AS_THEY_ARE = (
    pa.types.is_string,
    pa.types.is_integer,
    pa.types.is_boolean,
    pa.types.is_null,
)


def _copy_texts(values: Sequence) -> list[str | None]:
    """Values as text (None stays NULL), a column of few distinct values (a sync's time, a
    flag) converted once per value."""
    kinds = set(map(type, values)) - {type(None)}
    # Not floats nor decimals: -0.0 == 0.0 and Decimal("1.0") == Decimal("1"), written apart.
    distinct = set(values) if len(kinds) == 1 and not kinds & {float, Decimal} else ()
    # Nor aware times: 10:00+02:00 == 08:00+00:00, which a timestamp without zone reads apart.
    if 0 < len(distinct) <= _FEW and not any(map(_zoned, distinct)):
        text = {value: _copy_text(value) for value in distinct}
        return list(map(text.__getitem__, values))
    return [_copy_text(value) for value in values]


_FEW = 64


def _zoned(value: object) -> bool:
    return getattr(value, "tzinfo", None) is not None


def _copy_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, date):  # datetimes too
        return value.isoformat()
    return str(value)


def in_key_order(batch: pa.Table, key: str) -> pa.Table:
    """`batch` sorted by `key`'s values: a batch's keys then land in the key's index leaf by
    leaf, not at random (a quarter less server time for a COPY into a big table). Sorted by
    Arrow, one take of the whole table; a key Arrow holds as neither text nor whole numbers is
    left as it is."""
    values = batch[key]
    if batch.num_rows < 2 or not (
        pa.types.is_string(values.type) or pa.types.is_integer(values.type)
    ):
        return batch
    return batch.take(pc.sort_indices(values))


def copy_new_rows(connection: sa.Connection, table: str, columns: Columns | pa.Table) -> int | None:
    """COPY `columns` straight into `table` (PostgreSQL) if none of their keys is there yet: the
    common case of a first load, at COPY's speed; the rows the table took. None, with nothing
    written, when one is (the caller upserts them instead): the attempt runs in a savepoint."""
    try:
        with connection.begin_nested():
            return copy_columns(connection, table, columns)
    except sa.exc.IntegrityError as error:
        if isinstance(error.orig, psycopg.errors.UniqueViolation):
            return None
        raise


def bulk_write(
    connection: sa.Connection, table: sa.Table, columns: Columns, key: Sequence[str] = ()
) -> None:
    """Insert many rows, or upsert them by `key`: on PostgreSQL with COPY (for an upsert:
    straight into the table when all keys are new, else into a temporary table and then one
    `INSERT … ON CONFLICT`), elsewhere with one executemany."""
    names = list(columns)
    if not names or not len(columns[names[0]]):
        return
    dialect = connection.dialect.name
    if dialect != "postgresql":
        others = [name for name in names if name not in key]
        statement = upsert_statement(dialect, table, list(key), others) if key else sa.insert(table)
        rows = zip(*columns.values(), strict=True)
        connection.execute(statement, [dict(zip(names, row, strict=True)) for row in rows])
        return
    if not key:
        copy_columns(connection, table.name, columns)
        return
    batch = in_key_order(copy_table(columns), key[-1])  # converted once, for either COPY
    if copy_new_rows(connection, table.name, batch) is not None:
        return
    quote = connection.dialect.identifier_preparer.quote
    quoted = ", ".join(quote(name) for name in names)
    staging = f"staging_{uuid.uuid4().hex[:12]}"
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {staging} ON COMMIT DROP AS "
        f"SELECT {quoted} FROM {quote(table.name)} WITH NO DATA"
    )
    copy_columns(connection, staging, batch)
    updates = ", ".join(
        f"{quote(name)} = EXCLUDED.{quote(name)}" for name in names if name not in key
    )
    connection.exec_driver_sql(
        f"INSERT INTO {quote(table.name)} ({quoted}) SELECT {quoted} FROM {staging} "
        f"ON CONFLICT ({', '.join(quote(name) for name in key)}) DO UPDATE SET {updates}"
    )
