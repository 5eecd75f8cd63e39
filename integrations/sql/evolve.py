"""handoff's own tables (state store, webhook inbox), created when missing and brought up to date
when an older handoff made them.

Between versions these tables only gain tables, columns and indexes. `create_or_evolve` makes
the missing tables, adds the columns an older table lacks (nullable or defaulted ones, in place:
existing rows get NULL or the default) and creates the missing indexes. A column it cannot add
by itself (NOT NULL without a default: existing rows would have no value) stops it with the
table, the column and what to do, before anything is changed.

On PostgreSQL the tables are in use while a new handoff upgrades them (runs, sensors and the
webserver of the old one, or of the new one starting beside it), and a ledger holds millions of
rows. So the upgrade never waits long for a lock, nor holds one long: each step is its own short
transaction that waits at most `LOCK_TIMEOUT` for its table's lock (an ALTER queued behind a long
read holds up every run queued behind it), adding a column changes only the catalog, and an index
is built concurrently, outside any transaction, without the table's write lock. A step that does
not get its lock stops the upgrade with the session that holds it and what to do; what was done
stays, and the next open goes on from there (an index an interrupted build left invalid is built
again).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa

logger = logging.getLogger(__name__)

LOCK_TIMEOUT = 5.0  # seconds a step of an upgrade waits for a lock (so every run behind it, too)
# The advisory lock processes take turns upgrading handoff's tables under (PostgreSQL).
_UPGRADE_TURN = 7260418
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout that expired


class SchemaOutdated(Exception):
    """A table an older handoff made lacks a column that cannot be added in place."""


class UpgradeBlocked(Exception):
    """A step of an upgrade did not get its table's lock within LOCK_TIMEOUT (PostgreSQL)."""


def create_or_evolve(
    engine: sa.Engine,
    metadata: sa.MetaData,
    owner: str,
    then: Callable[[sa.Connection], None] | None = None,
) -> list[str]:
    """Create or bring up to date `metadata`'s tables, then run `then` (say, triggers: on
    PostgreSQL a step of its own); returns what it added ("table.column", "index name").
    `owner` names the tables in an error ("the state store")."""
    if engine.dialect.name == "postgresql":
        return _evolve_in_steps(engine, metadata, owner, then)
    with engine.begin() as connection:  # SQLite: one writer at a time, a file no one waits on
        plan = _Plan.of(connection, metadata, owner)
        metadata.create_all(connection, tables=plan.new_tables)
        added = []
        for table, columns in plan.columns.items():
            for column in columns:  # SQLite adds one column per ALTER
                connection.exec_driver_sql(_add_columns(connection, table, [column]))
            added += [f"{table}.{column.name}" for column in columns]
        for index in plan.missing_indexes(sa.inspect(connection)):
            index.create(connection)
            added.append(index.name)
        if then is not None:
            then(connection)
    return added


class _Plan:
    """What `metadata`'s tables lack in the database: tables, and columns by table."""

    def __init__(
        self, metadata: sa.MetaData, present: set[str], columns: dict[str, list[sa.Column]]
    ):
        self.metadata, self.present = metadata, present
        self.columns = columns
        self.new_tables = [t for t in metadata.sorted_tables if t.name not in present]

    @classmethod
    def of(cls, connection: sa.Connection, metadata: sa.MetaData, owner: str) -> _Plan:
        """The plan, or SchemaOutdated naming the columns no upgrade can add."""
        inspector = sa.inspect(connection)
        present = {t.name for t in metadata.sorted_tables if inspector.has_table(t.name)}
        columns: dict[str, list[sa.Column]] = defaultdict(list)
        for table in metadata.sorted_tables:
            if table.name in present:
                have = {column["name"] for column in inspector.get_columns(table.name)}
                columns[table.name] += [c for c in table.columns if c.name not in have]
        missing = [column for table in columns.values() for column in table]
        blocking = [c for c in missing if not c.nullable and c.server_default is None]
        if blocking:
            names = ", ".join(f"{column.table.name}.{column.name}" for column in blocking)
            raise SchemaOutdated(
                f"{owner} at {_where(connection)} was made by an older handoff: {names} cannot "
                "be added to rows that exist (NOT NULL, no default). What to do: point handoff "
                "at a new database for it (the first run of each flow then compares every "
                "record again, and upserts make resending harmless), and keep the old one for "
                "its history"
            )
        return cls(metadata, present, {name: cols for name, cols in columns.items() if cols})

    def missing_indexes(self, inspector: sa.Inspector) -> list[sa.Index]:
        """The indexes of the tables that were there, missing on SQLite (new tables had theirs
        made with them)."""
        missing = []
        for table in self.metadata.sorted_tables:
            if table.name in self.present:
                have = {index["name"] for index in inspector.get_indexes(table.name)}
                missing += [index for index in table.indexes if index.name not in have]
        return missing


def _add_columns(connection: sa.Connection, table: str, columns: Sequence[sa.Column]) -> str:
    quote = connection.dialect.identifier_preparer.quote
    specs = [sa.schema.CreateColumn(c).compile(dialect=connection.dialect) for c in columns]
    return f"ALTER TABLE {quote(table)} " + ", ".join(f"ADD COLUMN {spec}" for spec in specs)


def _where(connection: sa.Connection) -> str:
    return connection.engine.url.render_as_string(hide_password=True)


# --- PostgreSQL: in short steps, while the tables are in use ----------------------------------


def _evolve_in_steps(
    engine: sa.Engine,
    metadata: sa.MetaData,
    owner: str,
    then: Callable[[sa.Connection], None] | None,
) -> list[str]:
    """On one session, which holds the upgrade's turn: the new tables and the check of what is
    missing; each table's new columns (an ALTER of the catalog only); `then`; and the indexes,
    built concurrently. A session that failed is closed, never back to the pool: its turn and
    its settings go with it."""
    connection = engine.connect()
    try:
        _take_turn(connection)
        with _step(connection, owner, "creating its new tables", ()):
            plan = _Plan.of(connection, metadata, owner)
            metadata.create_all(connection, tables=plan.new_tables)
        added = []
        for table, columns in plan.columns.items():
            names = ", ".join(column.name for column in columns)
            with _step(connection, owner, f"adding {names} to {table}", [table]):
                connection.exec_driver_sql(_add_columns(connection, table, columns))
            added += [f"{table}.{column.name}" for column in columns]
        tables = [table.name for table in metadata.sorted_tables]
        if then is not None:
            with _step(connection, owner, "making its triggers", tables):
                then(connection)
        added += _build_indexes(connection, metadata, owner)
        connection.exec_driver_sql("RESET lock_timeout")
        connection.execute(_END_TURN, {"turn": _UPGRADE_TURN})
        return added
    except BaseException:
        connection.invalidate()  # its turn and settings go with the session
        raise
    finally:
        connection.close()  # back to the pool, as it was (SQLAlchemy resets its isolation level)


_END_TURN = sa.text("SELECT pg_advisory_unlock(CAST(:turn AS bigint))")


def _take_turn(connection: sa.Connection) -> None:
    """Wait for another process's upgrade to end, then hold the turn (a session's advisory lock).
    Asked again and again rather than waited for in one statement: a session waiting in a
    statement holds a snapshot, which the other's concurrent index build waits for in turn."""
    told = False
    while not connection.execute(
        sa.text("SELECT pg_try_advisory_lock(CAST(:turn AS bigint))"), {"turn": _UPGRADE_TURN}
    ).scalar_one():
        connection.commit()
        if not told:
            logger.info("waiting for another process's upgrade of handoff's tables to end")
            told = True
        time.sleep(0.2)
    connection.commit()


@contextmanager
def _step(
    connection: sa.Connection, owner: str, what: str, tables: Sequence[str]
) -> Iterator[None]:
    """A step of the upgrade in a transaction of its own that waits at most LOCK_TIMEOUT for a
    lock; one that did not get it raises UpgradeBlocked, naming who holds `tables`."""
    try:
        with connection.begin():
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT * 1000)}")
            yield
    except Exception as error:
        if not _lock_timed_out(error):
            raise
        raise UpgradeBlocked(_blocked(connection, owner, what, tables)) from None


def _lock_timed_out(error: BaseException) -> bool:
    """Whether `error` is PostgreSQL's lock timeout: SQLAlchemy's, or the one an engine's error
    hook raised from the driver's (the state store's says the store is unavailable)."""
    causes = (error, getattr(error, "orig", None), error.__cause__)
    return any(getattr(cause, "sqlstate", None) == _LOCK_NOT_AVAILABLE for cause in causes)


def _build_indexes(connection: sa.Connection, metadata: sa.MetaData, owner: str) -> list[str]:
    """Each missing index built concurrently (the table's reads and writes go on meanwhile), one
    an interrupted build left invalid dropped first; outside any transaction, as PostgreSQL
    builds them. Its waits for the table's writers are bounded by LOCK_TIMEOUT as well."""
    built, quote = [], connection.dialect.identifier_preparer.quote
    connection.execution_options(isolation_level="AUTOCOMMIT")
    connection.exec_driver_sql(f"SET lock_timeout = {int(LOCK_TIMEOUT * 1000)}")
    for table in metadata.sorted_tables:
        valid = dict(connection.execute(_INDEXES, {"table": table.name}).all())
        for index in table.indexes:
            if valid.get(index.name):
                continue
            try:
                if index.name in valid:  # a build that was interrupted: left invalid
                    connection.exec_driver_sql(
                        f"DROP INDEX CONCURRENTLY IF EXISTS {quote(index.name)}"
                    )
                connection.exec_driver_sql(_concurrently(connection, index))
            except Exception as error:
                if not _lock_timed_out(error):
                    raise
                what = f"building index {index.name} of {table.name}"
                raise UpgradeBlocked(
                    _blocked(connection, owner, what, [table.name], half_built=True)
                ) from None
            built.append(index.name)
    return built


# The indexes a table has, valid or not (an interrupted concurrent build leaves one invalid).
_INDEXES = sa.text(
    "SELECT index.relname, pg_index.indisvalid FROM pg_index "
    "JOIN pg_class AS index ON index.oid = pg_index.indexrelid "
    "WHERE pg_index.indrelid = to_regclass(:table)"
)


def _concurrently(connection: sa.Connection, index: sa.Index) -> str:
    """`CREATE INDEX CONCURRENTLY IF NOT EXISTS …` of a metadata index (declared without it, so
    that a new table's indexes are made in the table's own transaction)."""
    ddl = str(sa.schema.CreateIndex(index, if_not_exists=True).compile(dialect=connection.dialect))
    concurrent, made = re.subn(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", ddl)
    if not made:
        raise ValueError(f"not an index's DDL: {ddl}")
    return concurrent


# Who holds a lock on these tables, or else (an index build waits for every transaction older
# than it, whatever it reads) who has a transaction open in this database.
_HOLDERS = sa.text(
    "SELECT activity.pid, activity.application_name, activity.usename, activity.client_addr, "
    "activity.state, activity.xact_start, string_agg(DISTINCT locks.mode, ', ') AS modes "
    "FROM pg_stat_activity AS activity "
    "LEFT JOIN pg_locks AS locks ON locks.pid = activity.pid AND locks.granted "
    "AND locks.relation IN (SELECT to_regclass(name) FROM unnest(CAST(:tables AS text[])) AS name) "
    "WHERE activity.pid <> pg_backend_pid() AND activity.datname = current_database() "
    "AND (locks.pid IS NOT NULL OR (NOT :held AND activity.xact_start IS NOT NULL "
    "AND activity.backend_type = 'client backend')) "
    "GROUP BY activity.pid, activity.application_name, activity.usename, activity.client_addr, "
    "activity.state, activity.xact_start ORDER BY activity.xact_start NULLS LAST LIMIT 5"
)


def _blocked(
    connection: sa.Connection,
    owner: str,
    what: str,
    tables: Sequence[str],
    half_built: bool = False,
) -> str:
    """Why the upgrade stopped: the step, the sessions that hold its tables (or, none holding
    them, those with a transaction open) and what to do. No query text: it may quote values."""
    connection.rollback()  # out of the failed step (no-op in autocommit)
    holders = connection.execute(_HOLDERS, {"tables": list(tables), "held": True}).all()
    if not holders:
        holders = connection.execute(_HOLDERS, {"tables": list(tables), "held": False}).all()
    connection.rollback()
    waited = f"{LOCK_TIMEOUT:g} s"
    head = (
        f"{owner} at {_where(connection)} was made by an older handoff, and its upgrade stopped "
        f"at {what}: it waited {waited} for a lock"
    )
    if half_built:
        head += " (the index is left invalid, and built again by the next upgrade)"
    if not holders:
        return (
            f"{head}, which no session holds any more. What to do: start handoff again; the "
            "upgrade goes on where it stopped"
        )
    sessions = "; ".join(_session(holder) for holder in holders)
    pids = ", ".join(str(holder.pid) for holder in holders)
    return (
        f"{head} that these sessions hold: {sessions}. Meanwhile no run waited more than "
        f"{waited} behind it, and what it did before stays. What to do: let them finish, or end "
        f"them (`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid IN ({pids})`; "
        "its `query` column says what they run), then start handoff again: the upgrade goes on "
        "where it stopped; or upgrade while no flow runs (the sensors and schedules stopped, "
        "the runs under way ended)"
    )


def _session(holder) -> str:
    said = [
        f"application {holder.application_name!r}" if holder.application_name else None,
        f"user {holder.usename}" if holder.usename else None,
        f"from {holder.client_addr}" if holder.client_addr else None,
        holder.state,
        f"its transaction begun {holder.xact_start:%Y-%m-%d %H:%M:%S %Z}".rstrip()
        if holder.xact_start
        else None,
        f"holding {holder.modes}" if holder.modes else None,
    ]
    return f"pid {holder.pid} ({', '.join(part for part in said if part)})"
