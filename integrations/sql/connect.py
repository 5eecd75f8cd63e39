"""Engines with the settings every handoff database needs, whatever the dialect."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

DEFAULT_DRIVERS = {
    # psycopg 3: the driver with COPY.
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    # PyMySQL: pure Python, server-side cursors, multi-row executemany.
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def normalise_url(url: str) -> str:
    """A URL without a driver gets the one handoff is built on (psycopg 3, PyMySQL)."""
    parsed = make_url(url)
    if parsed.drivername in DEFAULT_DRIVERS:
        parsed = parsed.set(drivername=DEFAULT_DRIVERS[parsed.drivername])
    if parsed.get_backend_name() in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> sa.Engine:
    """An engine; SQLite files get WAL and a busy timeout so sync and sensors can share them."""
    engine = sa.create_engine(normalise_url(url), pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    return engine


def raise_on_lost_connection(engine: sa.Engine, error_type: type[Exception], what: str) -> None:
    """Turn the engine's connection failures (down, dropped, refused) into `error_type`, with a
    message that names `what` and the driver's complaint but no SQL and no parameters."""

    @sa.event.listens_for(engine, "handle_error")
    def _lost(context):
        if context.is_pre_ping:  # a stale pooled connection: the pool replaces it
            return
        original = context.original_exception
        if context.is_disconnect or isinstance(
            context.sqlalchemy_exception, sa.exc.OperationalError
        ):
            first_line = (str(original).strip().splitlines() or [""])[0]
            raise error_type(
                f"{what} ({redacted(str(engine.url))}) failed: {type(original).__name__}: {first_line}"
            ) from original


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


def copy_rows(
    connection: sa.Connection,
    table: str,
    columns: Sequence[str],
    rows: Iterable[Sequence],
    types: Sequence[str] | None = None,
) -> None:
    """PostgreSQL `COPY … FROM STDIN` of `rows` into `table`, inside the connection's transaction;
    in the binary format when `types` names each column's PostgreSQL type (less for the server
    to parse)."""
    quote = connection.dialect.identifier_preparer.quote
    names = ", ".join(quote(name) for name in columns)
    statement = f"COPY {quote(table)} ({names}) FROM STDIN"
    if types is not None:
        statement += " (FORMAT BINARY)"
    try:
        with (
            connection.connection.driver_connection.cursor() as cursor,
            cursor.copy(statement) as copy,
        ):
            if types is not None:
                copy.set_types(types)
            for row in rows:
                copy.write_row(row)
    except psycopg.Error as error:  # the driver's own: worded as SQLAlchemy words the others
        raise sa.exc.DBAPIError.instance(statement, None, error, psycopg.Error) from error


def binary_types(table: sa.Table, columns: Sequence[str]) -> list[str] | None:
    """The PostgreSQL type of each column for a binary COPY; None when one has no plain one."""
    found = []
    for name in columns:
        kind = table.c[name].type
        for sql_type, pg_type in _BINARY_TYPES:
            if isinstance(kind, sql_type):
                timezone = pg_type == "timestamp" and kind.timezone
                found.append("timestamptz" if timezone else pg_type)
                break
        else:
            return None
    return found


_BINARY_TYPES = (
    (sa.Boolean, "bool"),
    (sa.DateTime, "timestamp"),
    (sa.BigInteger, "int8"),
    (sa.Integer, "int4"),
    (sa.String, "text"),  # varchar travels as text
)


def copy_new_rows(
    connection: sa.Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence],
    types: Sequence[str] | None = None,
) -> bool:
    """COPY `rows` straight into `table` (PostgreSQL) if none of their keys is there yet: the
    common case of a first load, at COPY's speed. False, with nothing written, when one is (the
    caller upserts them instead): the attempt runs in a savepoint."""
    try:
        with connection.begin_nested():
            copy_rows(connection, table, columns, rows, types)
    except sa.exc.IntegrityError as error:
        if isinstance(error.orig, psycopg.errors.UniqueViolation):
            return False
        raise
    return True


def bulk_write(
    connection: sa.Connection,
    table: sa.Table,
    columns: Sequence[str],
    rows: Sequence[Sequence],
    key: Sequence[str] = (),
) -> None:
    """Insert many rows (tuples in `columns`' order), or upsert them by `key`: on PostgreSQL with
    COPY (for an upsert: straight into the table when all keys are new, else into a temporary
    table and then one `INSERT … ON CONFLICT`), elsewhere with one executemany."""
    if not rows:
        return
    dialect = connection.dialect.name
    if dialect != "postgresql":
        others = [name for name in columns if name not in key]
        statement = upsert_statement(dialect, table, list(key), others) if key else sa.insert(table)
        connection.execute(statement, [dict(zip(columns, row, strict=True)) for row in rows])
        return
    if not key:
        copy_rows(connection, table.name, columns, rows, binary_types(table, columns))
        return
    types = binary_types(table, columns)
    if copy_new_rows(connection, table.name, columns, rows, types):
        return
    quote = connection.dialect.identifier_preparer.quote
    names = ", ".join(quote(name) for name in columns)
    staging = f"staging_{uuid.uuid4().hex[:12]}"
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {staging} ON COMMIT DROP AS "
        f"SELECT {names} FROM {quote(table.name)} WITH NO DATA"
    )
    copy_rows(connection, staging, columns, rows, types)
    updates = ", ".join(
        f"{quote(name)} = EXCLUDED.{quote(name)}" for name in columns if name not in key
    )
    connection.exec_driver_sql(
        f"INSERT INTO {quote(table.name)} ({names}) SELECT {names} FROM {staging} "
        f"ON CONFLICT ({', '.join(quote(name) for name in key)}) DO UPDATE SET {updates}"
    )
