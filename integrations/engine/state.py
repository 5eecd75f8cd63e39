"""The state store: ledger, cursors, dead-letter queue and audit trail (SQLite or PostgreSQL).

Everything a batch changes in the state store is committed in one transaction, after the
destination accepted the batch: a crash before the commit means the batch is sent again
(upserts make that harmless), never that a record is forgotten.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import operator
import os
import re
import secrets
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.dialects import postgresql, sqlite

from integrations.engine.hashing import sorted_json
from integrations.sql.connect import (
    bulk_write,
    create_engine,
    raise_on_lost_connection,
    upsert_statement,
)
from integrations.sql.evolve import create_or_evolve

logger = logging.getLogger(__name__)
metadata = sa.MetaData()
# The columns a sync writes once per record and indexes (ledger, audit keys) compare byte by byte
# on PostgreSQL: under a locale's collation (the database default, even C.UTF-8) every index
# comparison calls strcoll, and a million ledger rows took 15% longer to COPY (their indexes a
# quarter longer). Keys are only matched, never ordered for people: nothing reads differently.
# A store made before keeps its collation (changing it rebuilds the indexes under a lock).
_FLOW = sa.String(120).with_variant(postgresql.VARCHAR(120, collation="C"), "postgresql")
_KEY = sa.String(255).with_variant(postgresql.VARCHAR(255, collation="C"), "postgresql")

_LEDGER_FILLFACTOR = 90
ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("flow", _FLOW, primary_key=True),
    sa.Column("record_key", _KEY, primary_key=True),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("destination_id", _KEY, nullable=True),
    sa.Column("archived", sa.Boolean, nullable=False, default=False),
    # A short hash of each field's value (engine/columns.py `field_hashes`): what a later write
    # changed, field by field, without keeping the values themselves (they can be PII).
    sa.Column("field_hashes", sa.Text, nullable=True),
    # What the destination linked the record to at its last write (Written.links: a CRM deal's
    # contact), handed back with the next one: it unlinks only what handoff linked.
    sa.Column("links", sa.Text, nullable=True),
    sa.Column("synced_at", sa.DateTime, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    # Who holds a destination id (StateStore.live_owners): one record per row of the destination.
    sa.Index("ix_ledger_destination", "flow", "destination_id"),
    # Room on each page for a row's next version: a write of a known record changes no indexed
    # column, so PostgreSQL keeps the new version beside the old one (a HOT update) and adds no
    # index entries (half the time of an incremental run's ledger upsert, for 9% more pages).
    postgresql_with={"fillfactor": _LEDGER_FILLFACTOR},
)

cursors = sa.Table(
    "cursors",
    metadata,
    sa.Column("flow", sa.String(120), primary_key=True),
    sa.Column("watermark_at", sa.DateTime, nullable=False),
    sa.Column("watermark_key", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
)

_STANDING = "resolved_at IS NULL OR resolution = 'discarded'"

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(120), nullable=False),
    sa.Column("record_key", sa.String(255), nullable=False),
    sa.Column("reason_kind", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=True),
    sa.Column("first_seen", sa.DateTime, nullable=False),
    sa.Column("last_seen", sa.DateTime, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("resolved_at", sa.DateTime, nullable=True),
    sa.Column("resolution", sa.String(32), nullable=True),
    sa.Column("correlation_id", sa.String(400), nullable=True),
    # The error-budget trip the letter is part of (budget_trips.id): a run stopped with it open.
    sa.Column("budget_trip_id", sa.Integer, nullable=True),
    sa.Index("ix_dead_letters_flow_key", "flow", "record_key"),
    # The flow's letters that stand (open, or discarded and so held): what a run looks for at
    # its start and end, found without reading the resolved ones a long-lived flow piles up
    # (a million of them made each look a scan of 0.3 s).
    sa.Index(
        "ix_dead_letters_standing",
        "flow",
        postgresql_where=sa.text(_STANDING),
        sqlite_where=sa.text(_STANDING),
    ),
)


def _standing() -> sa.ColumnElement[bool]:
    """A letter that stands: open, or discarded and so held (ix_dead_letters_standing's
    condition, `_STANDING`)."""
    return sa.or_(dead_letters.c.resolved_at.is_(None), dead_letters.c.resolution == "discarded")


# Runs the error budget stopped, kept until someone acknowledges them: the trip's dead letters
# all replayed or discarded (resolution `settled`), or going on approved (`approved`). While one
# stands, every run of its flow stops at its start (a replay does not).
budget_trips = sa.Table(
    "budget_trips",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(120), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("tripped_at", sa.DateTime, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("seen", sa.Integer, nullable=False),
    sa.Column("max_share", sa.Float, nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),  # the top reasons (no values) → their counts
    sa.Column("resolved_at", sa.DateTime, nullable=True),
    sa.Column("resolution", sa.String(32), nullable=True),
    sa.Index("ix_budget_trips_flow", "flow", "resolved_at"),
)

# Windows of a partitioned flow (a day, or a backfill's range [start, end)), or an unpartitioned
# flow's sync (SINCE_WATERMARK), whose run the error budget stopped: refused at its start while a
# trip stood, or tripped with the rest unread (or that gave up waiting for the flow). The schedule never reruns a failed partition and a sensor's run key is used once, so
# each is kept until a run of it goes through, and requested again once no trip stands.
stopped_windows = sa.Table(
    "stopped_windows",
    metadata,
    sa.Column("flow", sa.String(120), primary_key=True),
    sa.Column("window_start", sa.DateTime, primary_key=True),
    sa.Column("window_end", sa.DateTime, primary_key=True),
    sa.Column("stopped_at", sa.DateTime, nullable=False),  # the latest stop: a new request's key
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("stop", sa.String(16), nullable=False),  # refused or tripped
)

# Each flow's lock, as often as it was taken: a run's commits carry the number it took the lock
# as (`BatchCommit.fence`), and one the lock went from since (its session ended) is refused.
flow_fences = sa.Table(
    "flow_fences",
    metadata,
    sa.Column("flow", sa.String(120), primary_key=True),
    sa.Column("taken", sa.BigInteger, nullable=False),
)

# Who holds each unique value (as a digest of its lower-cased text: no PII in the clear).
unique_claims = sa.Table(
    "unique_claims",
    metadata,
    sa.Column("flow", sa.String(120), primary_key=True),
    sa.Column("field", sa.String(120), primary_key=True),
    sa.Column("value_digest", sa.String(64), primary_key=True),
    sa.Column("record_key", sa.String(255), nullable=False),
    sa.Index("ix_unique_claims_key", "flow", "record_key"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("flow", sa.String(120), nullable=True),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("why", sa.Text, nullable=False),
    # A hash chain: each entry seals the one before it, so an edit or a removal shows.
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("entry_hash", sa.String(64), nullable=False, unique=True),
)

# The records an audit entry covers (its digest seals them), as handoff kept them before their
# bodies below: one row per record and action. Read for the entries of then, no longer written
# (three indexes and the whole diff per row were a quarter of a first sync's time).
audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("audit_id", sa.Integer, nullable=False, index=True),
    sa.Column("flow", sa.String(120), nullable=False),
    sa.Column("record_key", sa.String(255), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("correlation_id", sa.String(400), nullable=False),
    sa.Column("diff", sa.Text, nullable=False),
    sa.Index("ix_audit_records_key", "record_key", "flow"),
)

# Since then: each entry's records in one body, the text its digest is taken over (zlib), and
# an index of the keys it covers, for a record's story.
audit_bodies = sa.Table(
    "audit_bodies",
    metadata,
    sa.Column("audit_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("records", sa.LargeBinary, nullable=False),
)

audit_keys = sa.Table(
    "audit_keys",
    metadata,
    sa.Column("record_key", _KEY, nullable=False),
    sa.Column("audit_id", sa.Integer, nullable=False),
    sa.Index("ix_audit_keys_key", "record_key", "audit_id"),
)

GENESIS = "0" * 64

# The audit trail is append-only: the database itself refuses to change or remove an entry.
AUDIT_TABLES = ("audit_log", "audit_records", "audit_bodies", "audit_keys")
_APPEND_ONLY = {
    "sqlite": [
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
        "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
        for table in AUDIT_TABLES
        for verb in ("UPDATE", "DELETE")
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$",
        *(
            statement
            for table in AUDIT_TABLES
            for statement in (
                f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}",
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
            )
        ),
    ],
}


def _append_only(connection) -> bool:
    """Whether every audit table has its append-only triggers already (PostgreSQL): then a
    store opens without replacing them, which takes each table's exclusive lock, so behind
    every commit under way, and ahead of every next one."""
    if connection.dialect.name != "postgresql":
        return False  # SQLite's are created only if missing
    standing = connection.exec_driver_sql(  # on this store's tables (its schema), enabled
        "SELECT count(*) FROM unnest(%(tables)s::text[]) AS audit(name) JOIN pg_trigger "
        "ON tgrelid = to_regclass(audit.name) AND tgname = audit.name || '_append_only' "
        "AND tgenabled <> 'D'",
        {"tables": list(AUDIT_TABLES)},
    ).scalar()
    return standing == len(AUDIT_TABLES)


def _settle(connection) -> None:
    """What the tables' metadata does not bring to a store: the audit tables' append-only
    triggers, and in a PostgreSQL store made before it the ledger's room for updates (see
    `ledger`; its pages from then on)."""
    _make_append_only(connection)
    if connection.dialect.name == "postgresql" and not _ledger_filled_so(connection):
        connection.exec_driver_sql(f"ALTER TABLE ledger SET (fillfactor = {_LEDGER_FILLFACTOR})")


def _make_append_only(connection) -> None:
    """The audit tables' append-only triggers, where any is missing."""
    if not _append_only(connection):
        for statement in _APPEND_ONLY[connection.dialect.name]:
            connection.exec_driver_sql(statement)


def _ledger_filled_so(connection) -> bool:
    options = connection.exec_driver_sql(
        "SELECT reloptions FROM pg_class WHERE oid = to_regclass('ledger')"
    ).scalar()
    return f"fillfactor={_LEDGER_FILLFACTOR}" in (options or [])


_LETTERS_LOCK = 7260419  # the advisory lock space of a flow's dead letters (see _put_dead_letters)
_RUNS_LOCK = 7260420  # the advisory lock space of a flow's runs (see StateStore.flow_lock)
# Each lock session also holds a mark of its own (a random key in this space): a pid a new
# session reuses does not hold it, so the mark tells the lock's session from its successor
# without pg_stat_activity (whose start times a role may not see: a session under SET ROLE).
_SESSION_MARKS = 7260421
# Whether a session (pid) holds a flow's lock and its mark: a two-key advisory lock is
# (classid, objid) with objsubid 2, its second key an oid (an int4 read unsigned).
_HOLDS_LOCK = sa.text(
    "SELECT count(*) = 2 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = :pid "
    "AND objsubid = 2 AND ("
    "(classid = CAST(:space AS oid) "
    "AND CAST(objid AS bigint) = (CAST(hashtext(:flow) AS bigint) & 4294967295)) "
    "OR (classid = CAST(:marks AS oid) AND CAST(objid AS bigint) = :mark))"
)
_IN_CHUNK = 500  # keys per IN (...) list, well under every dialect's parameter limit
_ARRAY_CHUNK = 100_000  # keys per PostgreSQL array parameter
# PostgreSQL plans a batch's key lookups by its statistics. A first sync grows the ledger from
# nothing to millions of rows long before autovacuum looks; with stale statistics every lookup
# scans the flow's whole ledger (a 1M-row first sync spent 8 s of its 45 there). So the store
# analyses the key columns of the tables it looks keys up in each time its own writes doubled them.
_ANALYSE_AFTER = 10_000  # rows written, at least


def utcnow() -> datetime:
    """Naive UTC, the convention of every timestamp handoff stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def looked_back(moment: datetime, lookback: timedelta) -> datetime:
    """`moment` less a lookback, but no earlier than the first time Python holds: a cursor of
    year-1 placeholders (a legacy "no date") left nothing to subtract from."""
    try:
        return moment - lookback
    except OverflowError:
        return datetime.min.replace(tzinfo=moment.tzinfo)


def _naive_utc(moment: datetime) -> datetime:
    """`moment` as handoff stores time, naive UTC (a Dagster partition's window is aware)."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


@dataclass(frozen=True)
class Watermark:
    """How far a flow has synced: the last (cursor value, key) written or dead-lettered."""

    updated_at: datetime
    key: object

    def as_dict(self) -> dict[str, object]:
        return {"updated_at": self.updated_at.isoformat(), "key": self.key}


class LedgerEntry(NamedTuple):  # a tuple: cheap to make a batch of
    content_hash: str
    destination_id: str | None
    archived: bool
    field_hashes: str | None = None  # as stored; engine/columns.py `changed_fields` reads it
    links: str | None = None  # as the destination wrote it (Written.links)


class Empty(NamedTuple):
    """Which of a flow's tables hold nothing of it (StateStore.empty_of)."""

    ledger: bool
    letters: bool


class LedgerEntries(Mapping[str, LedgerEntry]):
    """A batch's ledger entries a column at a time, by record key: an entry is made only when
    one is looked up (a million-row sync makes a million, and reads a few)."""

    def __init__(self, keys: Sequence[str], columns: Sequence[Sequence]):
        self.keys, self.columns = list(keys), columns  # columns: LedgerEntry's fields in order
        self._at = dict(zip(self.keys, range(len(self.keys)), strict=True))

    @classmethod
    def of(cls, entries: Mapping[str, LedgerEntry]) -> LedgerEntries:
        if isinstance(entries, LedgerEntries):
            return entries
        columns = list(zip(*entries.values(), strict=True)) or [() for _ in LedgerEntry._fields]
        return cls(list(entries), columns)

    def __getitem__(self, key: str) -> LedgerEntry:
        at = self._at[key]
        return LedgerEntry(*(column[at] for column in self.columns))

    def __contains__(self, key: object) -> bool:
        return key in self._at

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


# Why a record was dead-lettered, in four kinds (the DLQ's filters and the assets' metadata).
REASON_KINDS = ("contract", "mapping", "destination-rejected", "transient-exhausted")


@dataclass(frozen=True)
class DeadLetter:
    flow: str
    record_key: str
    reason_kind: str
    reason: str
    payload: dict[str, object]
    content_hash: str | None = None
    id: int | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    attempts: int = 1
    resolved_at: datetime | None = None
    correlation_id: str | None = None
    resolution: str | None = None


@dataclass(frozen=True)
class BudgetTrip:
    """A run the error budget stopped: how many of the rows it judged failed, and why. Kept in
    the state store until acknowledged; `letters` are the dead letters the run left open,
    `open_letters` those of them still open."""

    flow: str
    run_id: str
    tripped_at: datetime
    failed: int
    seen: int
    max_share: float
    reasons: dict[str, int]  # the top reasons (they name rules, never values), by count
    letters: int = 0
    open_letters: int = 0
    id: int | None = None
    resolution: str | None = None  # settled or approved, once acknowledged

    @property
    def share(self) -> float:
        return self.failed / self.seen if self.seen else 0.0


class Discarded(NamedTuple):
    """What a discard did: the letters it closed (those still open when it came to them), and
    the error-budget trips that closing them settled."""

    letters: list[DeadLetter]
    settled: list[BudgetTrip]


@dataclass(frozen=True)
class StoppedWindow:
    """A window [start, end) of a partitioned flow whose run stopped: `refused` at its start
    while an error-budget trip stood, `tripped` in mid-run, or `busy`, given up waiting for
    another run of the flow; or SINCE_WATERMARK, an unpartitioned flow's run stopped in any of
    these ways. Kept until a run of it goes through."""

    flow: str
    start: datetime
    end: datetime
    run_id: str
    stop: str
    stopped_at: datetime | None = None


# The window an unpartitioned flow's run keeps (see StoppedWindow): it syncs everything from the
# flow's watermark on, so any run of the flow that goes through syncs it; kept as an empty window
# at the epoch, apart from every daily partition.
SINCE_WATERMARK = (datetime(1970, 1, 1), datetime(1970, 1, 1))


class AuditRecord(NamedTuple):  # a tuple: a batch makes one per record, cheaply
    """One record's part in an audit entry: what happened to it and which fields changed how
    (PII masked). `correlation_id` is the write's id in logs, the DLQ and the destination."""

    flow: str
    record_key: str
    action: str  # insert, update, archive, dead-letter, replay, discard, approve
    correlation_id: str
    diff: dict[str, object] | str = "{}"  # or its JSON text already


class StateStoreUnavailable(Exception):
    """The state database could not be reached, or dropped the connection."""


class FlowBusy(Exception):
    """Another run, repair or replay of the flow held its lock for longer than one waits."""


class LockTakenSince(Exception):
    """A commit of a run whose lock another run took since: refused, nothing of it written."""


class HeldLock:
    """A flow's lock, held: called, whether it still is (a PostgreSQL session can end under a
    run); `fence`, the number this holder took it as, for its commits to carry."""

    def __init__(self, still_held: Callable[[], bool], fence: int):
        self._still_held, self.fence = still_held, fence

    def __call__(self) -> bool:
        return self._still_held()


class MissingSecret(RuntimeError):
    """A secret handoff needs is not in the environment."""


@dataclass
class BatchCommit:
    """What one batch changes in the state store, written in a single transaction."""

    flow: str
    run_id: str
    synced: Mapping[str, LedgerEntry] = field(default_factory=dict)  # by record key
    dead_letters: list[DeadLetter] = field(default_factory=list)
    watermark: Watermark | None = None
    # (field, value digest, record key) now held by written records; archived keys release theirs.
    claims: list[tuple[str, str, str]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    # Keys whose open dead letters are settled: written, or found already in sync.
    resolved: list[str] = field(default_factory=list)
    # Of the synced and resolved keys, those that may have an open letter (None: any of them).
    lettered: Sequence[str] | None = None
    resolution: str = "synced"
    # AuditRecords, or plain tuples in their fields' order (a batch's writes make one each).
    audit_records: list[tuple] = field(default_factory=list)
    # The letters are earlier runs' letters a run retried at its end (see Sync._retried): one
    # refused again stays the letter of the run that refused it, which its trip holds it to.
    retried: bool = False
    # The fence its run took the flow's lock as (StateStore.flow_lock); None: no lock to check.
    fence: int | None = None
    # Of the dead letters' keys, those that may have an open letter to refresh (None: any).
    letters_open: Sequence[str] | None = None


def _chunks(items: Sequence[object], dialect: str) -> Iterator[Sequence[object]]:
    size = _ARRAY_CHUNK if dialect == "postgresql" else _IN_CHUNK
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _among(column: sa.Column, values: Sequence[object], dialect: str) -> sa.ColumnElement[bool]:
    """`column IN values`; on PostgreSQL `= ANY(…)` of one parameter: a batch's keys in one query
    that is cheap to compile and send (keys as one text split by the server when none holds the
    separator, which usable keys never do: it is a control character)."""
    if dialect != "postgresql":
        return column.in_(values)
    if all(isinstance(value, str) and _SEPARATOR not in value for value in values):
        joined = sa.literal(_SEPARATOR.join(values), sa.Text)
        return column == sa.any_(
            sa.func.string_to_array(joined, _SEPARATOR, type_=postgresql.ARRAY(sa.Text))
        )
    return column == sa.any_(sa.literal(list(values), postgresql.ARRAY(column.type)))


_SEPARATOR = "\x1f"


def _serial_plans(dbapi_connection, _record) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET max_parallel_workers_per_gather = 0")
    dbapi_connection.commit()


def _estimated_rows(connection, table: str) -> int:
    """PostgreSQL's own estimate of a table's rows (0 before its first analysis)."""
    rows = connection.execute(
        sa.text("SELECT reltuples FROM pg_class WHERE oid = CAST(:table AS regclass)"),
        {"table": table},
    ).scalar()
    return max(int(rows or 0), 0)


class StateStore:
    """handoff's own bookkeeping, in the database at `url`."""

    def __init__(self, url: str, dlq_key: str | None = None):
        """`dlq_key` (a Fernet key, from `HANDOFF_DLQ_KEY`) encrypts dead-letter payloads at
        rest; without it the store can read everything but a payload, and write no dead letter."""
        self.url = url
        try:
            self._fernet = Fernet(dlq_key) if dlq_key else None
        except ValueError:
            raise MissingSecret(
                "HANDOFF_DLQ_KEY is not a Fernet key (32 url-safe base64 bytes); "
                "`handoff dlq keygen` makes one"
            ) from None
        self.engine = create_engine(url)
        if self.engine.dialect.name not in _APPEND_ONLY:
            self.engine.dispose()
            raise ValueError(
                f"the state store runs on PostgreSQL or SQLite, not {self.engine.dialect.name} "
                "(its audit trail needs the database to refuse changes, its ledger COPY or "
                "upserts). What to do: point HANDOFF_STATE_URL at a PostgreSQL database, or a "
                "SQLite file"
            )
        if self.engine.dialect.name == "postgresql":
            # The store's queries look up one batch's keys: a parallel scan would only take
            # cores from the sync (and from the destination) that runs beside it.
            sa.event.listen(self.engine, "connect", _serial_plans)
        raise_on_lost_connection(self.engine, StateStoreUnavailable, "the state store")
        self._create_schema()
        # table → [its rows at this store's last analysis, rows written since]
        self._growth: dict[str, list[int]] = {}
        self._growth_lock = threading.Lock()
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        self._move_fence = (
            insert(flow_fences)
            .values(flow=sa.bindparam("flow"), taken=1)
            .on_conflict_do_update(index_elements=["flow"], set_={"taken": flow_fences.c.taken + 1})
            .returning(flow_fences.c.taken)
        )
        self._upsert_cursor = upsert_statement(
            self.engine.dialect.name,
            cursors,
            ["flow"],
            ["watermark_at", "watermark_key", "updated_at", "run_id"],
        )

    def _create_schema(self, attempts: int = 3) -> None:
        """Tables (or the columns and indexes an older handoff's lack) and append-only triggers.
        On PostgreSQL in short steps, each waiting a few seconds at most for its lock, while the
        store is in use (see integrations/sql/evolve.py); processes opening a new store at once
        take turns. On SQLite in one transaction; the one that loses the race (it creates what
        another just created) tries again."""
        for attempt in range(attempts):
            try:
                create_or_evolve(self.engine, metadata, "the state store", then=_settle)
                return
            except sa.exc.DBAPIError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def flow_lock(self, flow: str, wait: float) -> Iterator[HeldLock]:
        """Hold the flow's lock: one run, repair or replay of a flow at a time, whatever process
        runs it (two would diff against one ledger and write the same records, each a move the
        other does not see). Waits up to `wait` seconds for the holder, then raises FlowBusy.
        The lock is a PostgreSQL session's advisory lock, or an flock on a file beside a SQLite
        store: the holder's end releases it, and so does its death (a killed run holds nothing).
        Yields the lock held (HeldLock): whether it still is, and the fence its commits carry.

        Taking the lock moves the flow's fence on, once the commit of any earlier holder under
        way has ended: a commit that carries an older one is refused (`commit_batch`). So a run
        whose session ended mid-run (its lock taken by another run meanwhile) commits nothing
        more, and the new holder's first look at the flow's tables (`empty_of`) comes after the
        old holder's last commit."""
        take, release, still_held = (
            self._advisory_lock(flow)
            if self.engine.dialect.name == "postgresql"
            else self._file_lock(flow)
        )
        deadline = time.monotonic() + wait
        try:
            while not take():
                if time.monotonic() >= deadline:
                    raise FlowBusy(flow)
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            yield HeldLock(still_held, self._fence_on(flow))
        finally:
            release()

    def _fence_on(self, flow: str) -> int:
        """Move the flow's fence on; the new one. The row's update waits for a commit that
        holds it (`_check_fence`) to end."""
        with self.engine.begin() as connection:
            return connection.execute(self._move_fence, {"flow": flow}).scalar_one()

    @staticmethod
    def _check_fence(connection: sa.Connection, flow: str, fence: int) -> None:
        """Refuse, within a commit's transaction, a commit whose run the lock went from."""
        now = connection.execute(
            sa.select(flow_fences.c.taken)
            .where(flow_fences.c.flow == flow)
            .with_for_update(read=True)
        ).scalar_one_or_none()
        if now != fence:
            raise LockTakenSince(flow)

    def _advisory_lock(
        self, flow: str
    ) -> tuple[Callable[[], bool], Callable[[], None], Callable[[], bool]]:
        connection = self.engine.connect()  # its own session: the lock is the session's
        key = {"space": _RUNS_LOCK, "flow": flow}
        # The session is idle all run long: not a reason to end it; but a client gone silently
        # (a NAT that dropped the connection) is noticed within minutes, its lock let go.
        connection.exec_driver_sql("SET tcp_keepalives_idle = 60")
        if connection.dialect.server_version_info >= (14,):
            connection.exec_driver_sql("SET idle_session_timeout = 0")
        pid, mark = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one(), None
        while mark is None:  # a random key: another session holds it once in two billion
            candidate = secrets.randbelow(2**31)
            marked = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(CAST(:marks AS int), CAST(:mark AS int))"),
                {"marks": _SESSION_MARKS, "mark": candidate},
            ).scalar_one()
            mark = candidate if marked else None
        connection.commit()
        held = False

        def take() -> bool:
            nonlocal held
            held = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(CAST(:space AS int), hashtext(:flow))"), key
            ).scalar_one()
            connection.commit()  # no transaction stays open: the lock outlives it
            return held

        def release() -> None:
            """Let go, never raising (the run's own outcome stands): the session ends with it,
            never back to the pool, so no lock can outlive the run."""
            try:
                still = (
                    not held
                    or connection.execute(
                        sa.text("SELECT pg_advisory_unlock(CAST(:space AS int), hashtext(:flow))"),
                        key,
                    ).scalar_one()
                )
            except Exception:  # the session is gone: with it, the lock
                still = False
            finally:
                connection.invalidate()
                connection.close()
            if not still:
                logger.warning(
                    "%s: the flow's lock was lost during the run (its state store session "
                    "ended): another run of the flow may have run alongside; check "
                    "`handoff dlq list --flow %s` and the reconciliation check",
                    flow,
                    flow,
                )

        def still_held() -> bool:
            """Asked of the server, on a session of the pool's (the lock's own is not for
            sharing among a run's threads)."""
            with self.engine.connect() as asking:
                return asking.execute(
                    _HOLDS_LOCK, {**key, "pid": pid, "marks": _SESSION_MARKS, "mark": mark}
                ).scalar_one()

        return take, release, still_held

    def _file_lock(
        self, flow: str
    ) -> tuple[Callable[[], bool], Callable[[], None], Callable[[], bool]]:
        database = self.engine.url.database or ""
        if database.startswith("file:"):  # a URI (`?uri=true`): its path
            database = database.removeprefix("file:").split("?")[0]
        in_memory = database == ":memory:" or self.engine.url.query.get("mode") == "memory"
        if not database or in_memory:  # one process's store: nobody to wait for
            return (lambda: True), (lambda: None), (lambda: True)
        folder = Path(database).with_name(Path(database).name + ".locks")
        folder.mkdir(exist_ok=True)
        name = hashlib.sha256(flow.encode()).hexdigest()[:16]
        # Read-only: an flock needs no more, so another user who runs the flow can take it too.
        handle = os.open(folder / f"{name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)

        def take() -> bool:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        def release() -> None:
            os.close(handle)  # the flock goes with it

        return take, release, lambda: True  # held while its file is open: all run long

    # --- reads -------------------------------------------------------------------------------

    def watermark(self, flow: str) -> Watermark | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(cursors.c.watermark_at, cursors.c.watermark_key).where(
                    cursors.c.flow == flow
                )
            ).first()
        return Watermark(row.watermark_at, json.loads(row.watermark_key)) if row else None

    def ledger_entries(self, flow: str, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        found: dict[str, LedgerEntry] = {}
        dialect = self.engine.dialect.name
        with self.engine.connect() as connection:
            for chunk in _chunks(keys, dialect):
                rows = connection.execute(
                    sa.select(
                        ledger.c.record_key,
                        ledger.c.content_hash,
                        ledger.c.destination_id,
                        ledger.c.archived,
                        ledger.c.field_hashes,
                        ledger.c.links,
                    ).where(ledger.c.flow == flow, _among(ledger.c.record_key, chunk, dialect))
                )
                for row in rows:
                    found[row.record_key] = LedgerEntry(
                        row.content_hash,
                        row.destination_id,
                        row.archived,
                        row.field_hashes,
                        row.links,
                    )
        return found

    def live_owners(self, flow: str, destination_ids: Sequence[str]) -> dict[str, set[str]]:
        """The records the ledger holds live under each of these destination ids."""
        found: dict[str, set[str]] = defaultdict(set)
        dialect = self.engine.dialect.name
        with self.engine.connect() as connection:
            for chunk in _chunks(list(dict.fromkeys(destination_ids)), dialect):
                rows = connection.execute(
                    sa.select(ledger.c.destination_id, ledger.c.record_key).where(
                        ledger.c.flow == flow,
                        _among(ledger.c.destination_id, chunk, dialect),
                        ledger.c.archived.is_(False),
                    )
                )
                for destination_id, key in rows:
                    found[destination_id].add(key)
        return dict(found)

    def empty_of(self, flow: str) -> Empty:
        """Whether the ledger holds no record of the flow, live or archived (a first sync),
        and whether no letter of the flow is open or discarded."""
        letters = sa.select(dead_letters.c.id).where(
            dead_letters.c.flow == flow,
            _standing(),
        )
        with self.engine.connect() as connection:
            return Empty(
                connection.execute(
                    sa.select(ledger.c.record_key).where(ledger.c.flow == flow).limit(1)
                ).first()
                is None,
                connection.execute(letters.limit(1)).first() is None,
            )

    def count_synced(self, flow: str) -> int:
        """Records the flow holds live (not archived) in the destination."""
        with self.engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).where(
                    ledger.c.flow == flow, ledger.c.archived.is_(False)
                )
            ).scalar_one()

    def held_letter_hashes(
        self, flow: str, keys: Sequence[str]
    ) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """Content hash of each key's unresolved dead letter, for keys that have one; and, for
        keys without one, of its latest letter closed by a discard and not synced since (the
        record, as it was then, is not to be synced nor refused again)."""
        open_: dict[str, str | None] = {}
        discarded: dict[str, tuple[int, datetime, str | None]] = {}  # key → latest discard
        dialect = self.engine.dialect.name
        with self.engine.connect() as connection:
            for chunk in _chunks(keys, dialect):
                rows = connection.execute(
                    sa.select(
                        dead_letters.c.id,
                        dead_letters.c.record_key,
                        dead_letters.c.content_hash,
                        dead_letters.c.resolved_at,
                    ).where(
                        dead_letters.c.flow == flow,
                        _among(dead_letters.c.record_key, chunk, dialect),
                        _standing(),
                    )
                )
                for row in rows:
                    if row.resolved_at is None:
                        open_[row.record_key] = row.content_hash
                    elif row.id > discarded.get(row.record_key, (0,))[0]:
                        discarded[row.record_key] = (row.id, row.resolved_at, row.content_hash)
            closed = sorted(key for key in discarded if key not in open_)
            history: set[str] = set()  # synced since their discard
            for chunk in _chunks(closed, dialect):  # few: a discard is a person's decision
                synced = connection.execute(
                    sa.select(ledger.c.record_key, ledger.c.synced_at).where(
                        ledger.c.flow == flow, _among(ledger.c.record_key, chunk, dialect)
                    )
                )
                history.update(key for key, at in synced if at > discarded[key][1])
        return open_, {key: discarded[key][2] for key in closed if key not in history}

    def held_letter_keys(self, flow: str) -> list[str]:
        """Keys of the flow's records with an open letter or a discarded one: those a run may
        hold (`held_letter_hashes` tells which it does), without reading any payload."""
        query = (
            sa.select(dead_letters.c.record_key)
            .where(
                dead_letters.c.flow == flow,
                _standing(),
            )
            .distinct()
        )
        with self.engine.connect() as connection:
            return sorted(connection.execute(query).scalars())

    def unique_owners(self, flow: str, field_name: str, digests: Sequence[str]) -> dict[str, str]:
        """value digest → the record key that holds it, for digests already claimed."""
        found: dict[str, str] = {}
        dialect = self.engine.dialect.name
        with self.engine.connect() as connection:
            for chunk in _chunks(digests, dialect):
                rows = connection.execute(
                    sa.select(unique_claims.c.value_digest, unique_claims.c.record_key).where(
                        unique_claims.c.flow == flow,
                        unique_claims.c.field == field_name,
                        _among(unique_claims.c.value_digest, chunk, dialect),
                    )
                )
                found.update({row.value_digest: row.record_key for row in rows})
        return found

    def list_dead_letters(
        self,
        flow: str | None = None,
        include_resolved: bool = False,
        limit: int | None = 100,
        *,
        reason_kind: str | None = None,
        seen_before: datetime | None = None,
        ids: Sequence[int] = (),
        keys: Sequence[str] = (),
        reason_contains: str | None = None,
    ) -> list[DeadLetter]:
        """Dead letters, oldest first, filtered by flow, reason kind (and words of the reason),
        age, ids or record keys (any number of them: they are looked up a chunk at a time)."""
        query = sa.select(dead_letters).order_by(dead_letters.c.id).limit(limit)
        if flow:
            query = query.where(dead_letters.c.flow == flow)
        if not include_resolved:
            query = query.where(dead_letters.c.resolved_at.is_(None))
        if reason_kind:
            query = query.where(dead_letters.c.reason_kind == reason_kind)
        if reason_contains:
            query = query.where(dead_letters.c.reason.contains(reason_contains, autoescape=True))
        if seen_before:
            query = query.where(dead_letters.c.first_seen < seen_before)
        with self.engine.connect() as connection:
            dialect = connection.dialect.name
            conditions = [sa.true()]
            for column, wanted in ((dead_letters.c.id, ids), (dead_letters.c.record_key, keys)):
                if wanted:
                    conditions = [
                        sa.and_(condition, _among(column, chunk, dialect))
                        for condition in conditions
                        for chunk in _chunks(sorted(set(wanted)), dialect)
                    ]
            found = {
                row.id: row
                for condition in conditions
                for row in connection.execute(query.where(condition))
            }
        rows = [found[key] for key in sorted(found)]
        return [self._dead_letter(row) for row in rows[:limit]]

    def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        found = self.list_dead_letters(include_resolved=True, ids=[dead_letter_id])
        return found[0] if found else None

    def dead_letter_kinds(self, flow: str) -> dict[str, int]:
        """Open dead letters of a flow by reason kind."""
        query = (
            sa.select(dead_letters.c.reason_kind, sa.func.count())
            .where(dead_letters.c.flow == flow, dead_letters.c.resolved_at.is_(None))
            .group_by(dead_letters.c.reason_kind)
        )
        with self.engine.connect() as connection:
            return {kind: count for kind, count in connection.execute(query)}

    def record_history(self, record_key: str, flow: str | None = None) -> list[dict[str, object]]:
        """A record's story: every audit record about it, with its entry's time, run, trigger
        and actor, oldest first (by entry, then as the entry wrote them)."""
        entry = (
            audit_log.c.id,
            audit_log.c.at,
            audit_log.c.run_id,
            audit_log.c.why.label("trigger"),
            audit_log.c.actor,
        )
        rows = (  # entries of an older handoff: a row per record
            sa.select(*entry, audit_records.c.id.label("seq"), audit_records.c.flow)
            .add_columns(*(audit_records.c[name] for name in ("action", "correlation_id", "diff")))
            .join(audit_log, audit_log.c.id == audit_records.c.audit_id)
            .where(audit_records.c.record_key == record_key)
        )
        if flow:
            rows = rows.where(audit_records.c.flow == flow)
        bodies = (
            sa.select(*entry, audit_bodies.c.records)
            .select_from(audit_keys)
            .join(audit_log, audit_log.c.id == audit_keys.c.audit_id)
            .join(audit_bodies, audit_bodies.c.audit_id == audit_keys.c.audit_id)
            .where(audit_keys.c.record_key == record_key)
        )
        told: list[tuple[int, int, dict[str, object]]] = []  # (entry, place in it, what)
        with self.engine.connect() as connection:
            for row in connection.execute(rows):
                said = row._asdict()
                told.append((said.pop("id"), said.pop("seq"), said))
            for row in connection.execute(bodies):
                said = row._asdict()
                audit_id, records = said.pop("id"), said.pop("records")
                told += [
                    (audit_id, seq, {**said, "flow": record[0], "action": record[2],
                                     "correlation_id": record[3], "diff": record[4]})
                    for seq, record in enumerate(_unframed(zlib.decompress(records).decode()))
                    if record[1] == record_key and (not flow or record[0] == flow)
                ]  # fmt: skip
        told.sort(key=lambda item: item[:2])
        return [{**said, "diff": json.loads(said["diff"])} for _, _, said in told]

    def ledger_rows(self, record_key: str) -> list[dict[str, object]]:
        """Where a record stands in every flow that synced it."""
        query = sa.select(
            ledger.c.flow,
            ledger.c.destination_id,
            ledger.c.archived,
            ledger.c.synced_at,
            ledger.c.run_id,
        ).where(ledger.c.record_key == record_key)
        with self.engine.connect() as connection:
            return [row._asdict() for row in connection.execute(query)]

    def old_dead_letters(
        self,
        flow: str,
        seen_before: datetime,
        seen_since: datetime | None = None,
        after_id: int | None = 0,
    ) -> tuple[int, datetime | None, int | None]:
        """Open dead letters first seen before `seen_before` that are new to the looker: first
        seen at or after `seen_since`, or written after letter `after_id` (one written already
        old, by a host whose clock is behind); None for either leaves it out. Returns how many,
        the oldest first_seen, and the flow's highest letter id now (the next `after_id`)."""
        new = [
            *([dead_letters.c.first_seen >= seen_since] if seen_since is not None else []),
            *([dead_letters.c.id > after_id] if after_id is not None else []),
        ]
        highest = (
            sa.select(sa.func.max(dead_letters.c.id))
            .where(dead_letters.c.flow == flow)
            .scalar_subquery()
        )
        query = sa.select(sa.func.count(), sa.func.min(dead_letters.c.first_seen), highest).where(
            dead_letters.c.flow == flow,
            dead_letters.c.resolved_at.is_(None),
            dead_letters.c.first_seen < seen_before,
            sa.or_(*new) if new else sa.true(),
        )
        with self.engine.connect() as connection:
            count, oldest, top = connection.execute(query).one()
        return count, oldest, top

    def count_open_dead_letters(self, flow: str | None = None) -> int:
        query = sa.select(sa.func.count()).where(dead_letters.c.resolved_at.is_(None))
        if flow:
            query = query.where(dead_letters.c.flow == flow)
        with self.engine.connect() as connection:
            return connection.execute(query).scalar_one()

    def standing_budget_trips(self, flow: str | None = None) -> list[BudgetTrip]:
        """The error-budget trips that stand, one per flow (its latest, should two runs have
        tripped at once), with their dead letters counted."""
        query = sa.select(budget_trips).where(budget_trips.c.resolved_at.is_(None))
        if flow:
            query = query.where(budget_trips.c.flow == flow)
        with self.engine.connect() as connection:
            latest = {
                row.flow: row for row in connection.execute(query.order_by(budget_trips.c.id))
            }
            if not latest:
                return []
            # Letters of any of a flow's standing trips count: each keeps the flow stopped.
            counted = (
                sa.select(
                    budget_trips.c.flow,
                    sa.func.count(dead_letters.c.id),
                    sa.func.count(dead_letters.c.resolved_at),
                )
                .join(dead_letters, dead_letters.c.budget_trip_id == budget_trips.c.id)
                .where(
                    budget_trips.c.resolved_at.is_(None), dead_letters.c.flow.in_(sorted(latest))
                )
                .group_by(budget_trips.c.flow)
            )
            letters = {
                name: (total, total - closed) for name, total, closed in connection.execute(counted)
            }
        return [
            BudgetTrip(
                flow=name,
                run_id=row.run_id,
                tripped_at=row.tripped_at,
                failed=row.failed,
                seen=row.seen,
                max_share=row.max_share,
                reasons=json.loads(row.reasons),
                letters=letters.get(name, (0, 0))[0],
                open_letters=letters.get(name, (0, 0))[1],
                id=row.id,
            )
            for name, row in sorted(latest.items())
        ]

    def list_stopped_windows(self, flow: str) -> list[StoppedWindow]:
        """The flow's windows whose run the error budget stopped, not run through since."""
        query = (
            sa.select(stopped_windows)
            .where(stopped_windows.c.flow == flow)
            .order_by(stopped_windows.c.window_start, stopped_windows.c.window_end)
        )
        with self.engine.connect() as connection:
            return [
                StoppedWindow(
                    flow=row.flow,
                    start=row.window_start,
                    end=row.window_end,
                    run_id=row.run_id,
                    stop=row.stop,
                    stopped_at=row.stopped_at,
                )
                for row in connection.execute(query)
            ]

    def audit_entries(self, flow: str | None = None) -> list[dict[str, object]]:
        query = sa.select(audit_log).order_by(audit_log.c.id)
        if flow:
            query = query.where(audit_log.c.flow == flow)
        with self.engine.connect() as connection:
            return [
                {**row._asdict(), "detail": json.loads(row.detail)}
                for row in connection.execute(query)
            ]

    def audit_head(self) -> AuditHead | None:
        """The trail's newest entry (None: it has none). Recorded where the state store's owner
        cannot rewrite it (a Dagster materialization), it lets a cut trail be told."""
        query = sa.select(audit_log.c.id, audit_log.c.entry_hash).order_by(audit_log.c.id.desc())
        with self.engine.connect() as connection:
            newest = connection.execute(query.limit(1)).first()
        return AuditHead(*newest) if newest else None

    def audit_head_problem(self, head: AuditHead) -> str | None:
        """What became of entry `head.id`, recorded as the trail's head (None: it is there, as
        recorded), judged by that entry alone: cheap enough for every run (`verify_audit` walks
        the whole chain)."""
        query = (
            sa.select(audit_log).where(audit_log.c.id <= head.id).order_by(audit_log.c.id.desc())
        )
        with self.engine.connect() as connection:
            reached = connection.execute(query.limit(1)).first()
        return _head_problem(head, reached._asdict() if reached else None)

    def verify_audit(self, head: AuditHead | None = None) -> AuditVerdict:
        """Walk the hash chain from the first entry; report the first broken link. Given `head`,
        recorded earlier, the trail must still hold that entry as it was: a trail whose newest
        entries were removed is a shorter chain that verifies."""
        newest, reached, count = None, None, 0
        with self.engine.connect() as connection:
            indexed = _KeyIndex(connection)
            for position, row in enumerate(
                connection.execute(sa.select(audit_log).order_by(audit_log.c.id)), start=1
            ):
                entry = row._asdict()
                if entry["prev_hash"] != (newest.hash if newest else GENESIS):
                    problem = "the entry before it was removed or replaced"
                elif _seal(entry) != entry["entry_hash"]:
                    problem = "its content was changed after it was written"
                else:
                    sealed = json.loads(entry["detail"]).get("records_digest")
                    problem = _records_problem(
                        connection, entry["id"], sealed, indexed.keys_of(entry["id"])
                    )
                if problem:
                    return AuditVerdict(False, count, entry["id"], position, problem)
                newest, count = AuditHead(entry["id"], entry["entry_hash"]), position
                if head is not None and entry["id"] <= head.id:
                    reached = entry
        problem = _head_problem(head, reached) if head is not None else None
        if problem:  # the chain holds, but no longer reaches the head it had
            return AuditVerdict(False, count, head.id, None, problem, head=newest)
        return AuditVerdict(True, count, None, None, "intact", head=newest)

    # --- writes ------------------------------------------------------------------------------

    def commit_batch(self, batch: BatchCommit, audit: dict[str, object] | None = None) -> None:
        """Ledger, dead letters, resolutions, watermark and audit entry, all or nothing."""
        now = utcnow()
        with self.engine.begin() as connection:
            if batch.fence is not None:
                self._check_fence(connection, batch.flow, batch.fence)
            if batch.synced:
                entries = LedgerEntries.of(batch.synced)
                count = len(entries.keys)
                columns = dict(zip(LedgerEntry._fields, entries.columns, strict=True))
                columns |= {
                    "record_key": entries.keys,
                    "flow": [batch.flow] * count,
                    "synced_at": [now] * count,
                    "run_id": [batch.run_id] * count,
                }
                bulk_write(connection, ledger, columns, key=["flow", "record_key"])
            settled = batch.lettered
            if settled is None:
                settled = [*batch.synced, *batch.resolved]
            if settled:
                self._resolve(connection, batch.flow, settled, now, batch.resolution)
            if batch.claims or batch.released:
                self._claim(connection, batch)
            if batch.dead_letters:
                self._put_dead_letters(
                    connection,
                    batch.run_id,
                    batch.dead_letters,
                    now,
                    keep_runs=batch.retried,
                    may_be_open=batch.letters_open,
                )
            if batch.watermark is not None:
                connection.execute(
                    self._upsert_cursor,
                    {
                        "flow": batch.flow,
                        "watermark_at": batch.watermark.updated_at,
                        "watermark_key": json.dumps(batch.watermark.key),
                        "updated_at": now,
                        "run_id": batch.run_id,
                    },
                )
            if audit is not None:
                self._append_audit(
                    connection,
                    now=now,
                    run_id=batch.run_id,
                    flow=batch.flow,
                    records=batch.audit_records,
                    **audit,
                )
        self._grew(
            ledger=len(batch.synced),
            dead_letters=len(batch.dead_letters),
            unique_claims=len(batch.claims),
        )

    def _grew(self, **written: int) -> None:
        """Analyse the key columns of each of `written`'s tables (PostgreSQL) that this store's
        writes have doubled, by _ANALYSE_AFTER rows at least, since it last did."""
        if self.engine.dialect.name != "postgresql" or not any(written.values()):
            return
        with self._growth_lock, self.engine.connect() as connection:
            for table, rows in written.items():
                if table not in self._growth:
                    self._growth[table] = [_estimated_rows(connection, table), 0]
                growth = self._growth[table]
                growth[1] += rows
                if growth[1] >= max(_ANALYSE_AFTER, growth[0]):
                    connection.exec_driver_sql(f"ANALYZE {table} (flow, record_key)")
                    self._growth[table] = [_estimated_rows(connection, table), 0]
            connection.commit()

    def append_audit(self, records: Sequence[AuditRecord] = (), **entry) -> None:
        """An audit entry on its own (a discard, an approval), with the records it covers."""
        with self.engine.begin() as connection:
            self._append_audit(connection, now=utcnow(), records=records, **entry)

    def trip_budget(self, trip: BudgetTrip, *, actor: str, why: str) -> BudgetTrip:
        """Keep a run's error-budget trip until it is acknowledged, with the dead letters the run
        left open; kept already (`trip.id`: the run stopped, its last commits landed since), the
        run's letters join it. Audited once; the trip as kept."""
        with self.engine.begin() as connection:
            trip_id = trip.id
            if trip_id is None:
                trip_id = connection.execute(
                    sa.insert(budget_trips).values(
                        flow=trip.flow,
                        run_id=trip.run_id,
                        tripped_at=trip.tripped_at,
                        failed=trip.failed,
                        seen=trip.seen,
                        max_share=trip.max_share,
                        reasons=json.dumps(trip.reasons),
                    )
                ).inserted_primary_key[0]
            letters = connection.execute(
                sa.update(dead_letters)
                .where(
                    dead_letters.c.flow == trip.flow,
                    dead_letters.c.run_id == trip.run_id,
                    dead_letters.c.resolved_at.is_(None),
                )
                .values(budget_trip_id=trip_id)
            ).rowcount
            if trip.id is None:
                detail = {
                    "failed": trip.failed,
                    "seen": trip.seen,
                    "max_share": trip.max_share,
                    "top_reasons": trip.reasons,
                    "dead_letters": letters,
                }
                self._append_audit(
                    connection,
                    now=utcnow(),
                    actor=actor,
                    action="budget_trip",
                    why=why,
                    detail=detail,
                    run_id=trip.run_id,
                    flow=trip.flow,
                )
        return replace(trip, id=trip_id, letters=letters, open_letters=letters)

    def settle_budget_trip(
        self, flow: str, *, actor: str, why: str, run_id: str
    ) -> BudgetTrip | None:
        """The flow's standing error-budget trip; cleared (audited, resolution `settled`) when
        none of its dead letters is open any more: all replayed or discarded. None: no trip.
        Only a trip to clear takes a transaction (every run's start asks)."""
        standing = self.standing_budget_trips(flow)
        if not standing or standing[0].open_letters:
            return standing[0] if standing else None
        with self.engine.begin() as connection:
            return self._acknowledge(connection, standing[0], "settled", actor, why, run_id)

    def clear_budget_trip(
        self, flow: str, *, actor: str, why: str, run_id: str
    ) -> BudgetTrip | None:
        """Someone approved going on despite the flow's standing error-budget trip: its dead
        letters stay in the DLQ (held), runs go on. Audited with who and why; the trip cleared,
        or None when none stood."""
        standing = self.standing_budget_trips(flow)
        if not standing:
            return None
        with self.engine.begin() as connection:
            return self._acknowledge(connection, standing[0], "approved", actor, why, run_id)

    def _acknowledge(
        self, connection, trip: BudgetTrip, resolution: str, actor: str, why: str, run_id: str
    ) -> BudgetTrip | None:
        now = utcnow()
        cleared = connection.execute(
            sa.update(budget_trips)
            .where(
                budget_trips.c.flow == trip.flow,
                budget_trips.c.id <= trip.id,  # not a trip made since it was read
                budget_trips.c.resolved_at.is_(None),
            )
            .values(resolved_at=now, resolution=resolution)
        ).rowcount
        if not cleared:  # another process acknowledged it meanwhile
            return None
        detail = {
            "resolution": resolution,
            "tripped_by_run": trip.run_id,
            "tripped_at": trip.tripped_at.isoformat(timespec="seconds"),
            "dead_letters": trip.letters,
            "dead_letters_open": trip.open_letters,
        }
        self._append_audit(
            connection,
            now=now,
            actor=actor,
            action="budget_clear",
            why=why,
            detail=detail,
            run_id=run_id,
            flow=trip.flow,
        )
        return replace(trip, resolution=resolution)

    def keep_stopped_window(self, window: StoppedWindow) -> StoppedWindow:
        """Keep a window whose run the error budget stopped until a run of it goes through; a
        window stopped again gets its new stop (and so a new request once no trip stands)."""
        kept = replace(
            window,
            start=_naive_utc(window.start),
            end=_naive_utc(window.end),
            stopped_at=window.stopped_at or utcnow(),
        )
        statement = upsert_statement(
            self.engine.dialect.name,
            stopped_windows,
            ["flow", "window_start", "window_end"],
            ["stopped_at", "run_id", "stop"],
        )
        with self.engine.begin() as connection:
            connection.execute(
                statement,
                {
                    "flow": kept.flow,
                    "window_start": kept.start,
                    "window_end": kept.end,
                    "stopped_at": kept.stopped_at,
                    "run_id": kept.run_id,
                    "stop": kept.stop,
                },
            )
        return kept

    def forget_stopped_windows(
        self, flow: str, start: datetime, end: datetime, read_from: datetime
    ) -> int:
        """A run of [start, end) that read its rows from `read_from` on went through: the
        windows within it stopped before then are synced (one stopped since, say a run that
        gave up waiting for this one, may hold a change it did not read). How many were
        forgotten (a wider window stopped keeps waiting for a run of its own)."""
        with self.engine.begin() as connection:
            return connection.execute(
                sa.delete(stopped_windows).where(
                    stopped_windows.c.flow == flow,
                    stopped_windows.c.window_start >= _naive_utc(start),
                    stopped_windows.c.window_end <= _naive_utc(end),
                    stopped_windows.c.stopped_at <= read_from,
                )
            ).rowcount

    def discard_dead_letters(
        self, letters: Sequence[DeadLetter], *, actor: str, why: str, run_id: str
    ) -> Discarded:
        """Close dead letters without syncing them; the audit trail keeps who and why. A letter
        is discarded only if it is still open when its row is locked: one a replay or a run
        closed since it was chosen (it landed) is left as it is, and not audited as discarded.
        One transaction per flow, which resolves its letters before it takes the audit trail's
        lock, as a batch's commit does: with two flows in one, a commit of the second flow
        between them was a deadlock. Returns the letters discarded and the error-budget trips
        the discard settled."""
        now = utcnow()
        discarded: list[DeadLetter] = []
        settled: list[BudgetTrip] = []
        for flow in sorted({letter.flow for letter in letters}):
            chosen = [letter for letter in letters if letter.flow == flow]
            with self.engine.begin() as connection:
                closed = self._discard(connection, flow, [letter.id for letter in chosen], now)
                chosen = [letter for letter in chosen if letter.id in closed]
                if chosen:
                    self._append_audit(
                        connection,
                        now=now,
                        actor=actor,
                        action="discard",
                        why=why,
                        detail={"discarded": len(chosen)},
                        run_id=run_id,
                        flow=flow,
                        records=[
                            AuditRecord(
                                flow,
                                letter.record_key,
                                "discard",
                                letter.correlation_id or f"{run_id}:{flow}:{letter.record_key}",
                                {"reason": letter.reason, "kind": letter.reason_kind},
                            )
                            for letter in chosen
                        ],
                    )
            discarded += chosen
            # Its own transaction, after: a trip left standing is settled by the next run's start.
            trip = self.settle_budget_trip(flow, actor=actor, why=why, run_id=run_id)
            if trip is not None and trip.resolution:
                settled.append(trip)
        return Discarded(discarded, settled)

    @staticmethod
    def _discard(connection, flow: str, ids: Sequence[int | None], now: datetime) -> set[int]:
        """Close the flow's letters of these ids that are still open; the ids closed. The update
        locks each row and judges it as committed (a replay's commit that closed it under way is
        waited for), so the caller audits exactly the letters this discard closed."""
        dialect, closed = connection.dialect.name, set()
        for chunk in _chunks(sorted({i for i in ids if i is not None}), dialect):
            closed.update(
                connection.execute(
                    sa.update(dead_letters)
                    .where(
                        dead_letters.c.flow == flow,
                        _among(dead_letters.c.id, chunk, dialect),
                        dead_letters.c.resolved_at.is_(None),
                    )
                    .values(resolved_at=now, resolution="discarded")
                    .returning(dead_letters.c.id)
                ).scalars()
            )
        return closed

    @staticmethod
    def _append_audit(
        connection, *, now, actor, action, why, detail, run_id=None, flow=None, records=()
    ) -> None:
        # Writers take turns at the chain's head: no two entries may seal the same predecessor.
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")
        else:
            connection.exec_driver_sql(
                "UPDATE cursors SET flow = flow WHERE 0"
            )  # takes the write lock
        head = connection.execute(
            sa.select(audit_log.c.entry_hash).order_by(audit_log.c.id.desc()).limit(1)
        ).scalar()
        rows = [  # _RECORD_FIELDS; records are AuditRecords or plain tuples in their order
            record if isinstance(record[4], str) else (*record[:4], sorted_json(record[4]))
            for record in records
        ]
        body = _framed(rows) if rows else None
        if body is not None:
            detail = {**detail, "records": len(rows), "records_digest": _text_digest(body)}
        entry = {
            "at": now,
            "actor": actor,
            "run_id": run_id,
            "flow": flow,
            "action": action,
            "detail": json.dumps(detail, sort_keys=True, default=str),
            "why": why,
            "prev_hash": head or GENESIS,
        }
        audit_id = connection.execute(
            sa.insert(audit_log).values(**entry, entry_hash=_seal(entry))
        ).inserted_primary_key[0]
        if body is not None:
            connection.execute(
                sa.insert(audit_bodies).values(
                    audit_id=audit_id, records=zlib.compress(body.encode(), _ZLIB_LEVEL)
                )
            )
            keys = sorted({record[1] for record in rows})  # in order: the index fills leaf by leaf
            bulk_write(
                connection, audit_keys, {"record_key": keys, "audit_id": [audit_id] * len(keys)}
            )

    @staticmethod
    def _claim(connection, batch: BatchCommit) -> None:
        holders = sorted({key for _, _, key in batch.claims} | set(batch.released))
        dialect = connection.dialect.name
        for chunk in _chunks(holders, dialect):
            connection.execute(
                sa.delete(unique_claims).where(
                    unique_claims.c.flow == batch.flow,
                    _among(unique_claims.c.record_key, chunk, dialect),
                )
            )
        for name in {name for name, _, _ in batch.claims}:  # the latest writer holds a value
            digests = sorted({digest for field, digest, _ in batch.claims if field == name})
            for chunk in _chunks(digests, dialect):
                connection.execute(
                    sa.delete(unique_claims).where(
                        unique_claims.c.flow == batch.flow,
                        unique_claims.c.field == name,
                        _among(unique_claims.c.value_digest, chunk, dialect),
                    )
                )
        if batch.claims:
            connection.execute(
                sa.insert(unique_claims),
                [
                    {"flow": batch.flow, "field": name, "value_digest": digest, "record_key": key}
                    for name, digest, key in batch.claims
                ],
            )

    @staticmethod
    def _resolve(
        connection, flow: str, keys: Sequence[str], now: datetime, resolution: str
    ) -> None:
        dialect = connection.dialect.name
        for chunk in _chunks(keys, dialect):
            connection.execute(
                sa.update(dead_letters)
                .where(
                    dead_letters.c.flow == flow,
                    _among(dead_letters.c.record_key, chunk, dialect),
                    dead_letters.c.resolved_at.is_(None),
                )
                .values(resolved_at=now, resolution=resolution)
            )

    def _put_dead_letters(
        self,
        connection,
        run_id: str,
        letters: Iterable[DeadLetter],
        now: datetime,
        keep_runs: bool = False,
        may_be_open: Sequence[str] | None = None,
    ) -> None:
        """Open the letters, or refresh the open ones of their records; those keep their runs
        when `keep_runs` (see BatchCommit.retried). Open letters are looked for only under the
        keys `may_be_open` (None: under every key)."""
        letters = list(letters)
        flow_keys = {(letter.flow, letter.record_key) for letter in letters}
        flows = sorted({flow for flow, _ in flow_keys})
        if may_be_open is not None:
            maybe = set(may_be_open)
            flow_keys = {(flow, key) for flow, key in flow_keys if key in maybe}
        existing: dict[tuple[str, str], int] = {}
        dialect = connection.dialect.name
        if dialect == "postgresql":  # two runs of a flow (a backfill beside a schedule) take
            # turns from the lookup to the commit: else both found no open letter for a record
            # and each opened one.
            for flow in flows:
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(CAST(:space AS int), hashtext(:flow))"),
                    {"space": _LETTERS_LOCK, "flow": flow},
                )
        for flow in {flow for flow, _ in flow_keys}:
            keys = [key for f, key in flow_keys if f == flow]
            for chunk in _chunks(keys, dialect):
                rows = connection.execute(
                    sa.select(dead_letters.c.id, dead_letters.c.record_key).where(
                        dead_letters.c.flow == flow,
                        _among(dead_letters.c.record_key, chunk, dialect),
                        dead_letters.c.resolved_at.is_(None),
                    )
                )
                existing.update({(flow, row.record_key): row.id for row in rows})
        inserts, updates = [], []
        for letter in letters:
            values = {
                "reason_kind": letter.reason_kind,
                "reason": letter.reason,
                "payload": self._seal_payload(letter.payload),
                "content_hash": letter.content_hash,
                "correlation_id": letter.correlation_id,
                "last_seen": now,
                "run_id": run_id,
            }
            known = existing.get((letter.flow, letter.record_key))
            if known is None:
                inserts.append(
                    {
                        **values,
                        "flow": letter.flow,
                        "record_key": letter.record_key,
                        "first_seen": now,
                        "attempts": 1,
                    }
                )
            else:
                refreshed = {**values, "known": known}
                if keep_runs:  # the parameters name the columns set: the run is left out
                    del refreshed["run_id"]
                updates.append(refreshed)
        if inserts:
            bulk_write(
                connection,
                dead_letters,
                {name: [row[name] for row in inserts] for name in inserts[0]},
            )
        if updates:  # one executemany: the letters of records that failed again
            connection.execute(
                sa.update(dead_letters)
                .where(dead_letters.c.id == sa.bindparam("known"))
                .values(
                    {name: sa.bindparam(name) for name in updates[0] if name != "known"}
                    | {"attempts": dead_letters.c.attempts + 1}
                ),
                updates,
            )

    # --- dead-letter payloads, encrypted at rest ---------------------------------------------

    def _seal_payload(self, payload: dict[str, object]) -> str:
        if self._fernet is None:
            raise MissingSecret(
                "HANDOFF_DLQ_KEY is not set: dead-letter payloads are encrypted at rest with it. "
                "Set it to the key the flows run with (the demo keeps it in "
                "$HANDOFF_HOME/dlq_key); where there is none yet, make one with `handoff dlq "
                "keygen`: a new key cannot read the letters written under another"
            )
        text = json.dumps(payload, sort_keys=True, default=str)
        return self._fernet.encrypt(text.encode()).decode()

    def _open_payload(self, sealed: str) -> dict[str, object] | None:
        """The payload, or None when this store has no key (or another key) to read it."""
        if self._fernet is None:
            return None
        try:
            return json.loads(self._fernet.decrypt(sealed.encode()))
        except InvalidToken:
            return None

    def _dead_letter(self, row) -> DeadLetter:
        return DeadLetter(
            id=row.id,
            flow=row.flow,
            record_key=row.record_key,
            reason_kind=row.reason_kind,
            reason=row.reason,
            payload=self._open_payload(row.payload),
            content_hash=row.content_hash,
            first_seen=row.first_seen,
            last_seen=row.last_seen,
            attempts=row.attempts,
            resolved_at=row.resolved_at,
            correlation_id=row.correlation_id,
            resolution=row.resolution,
        )


class AuditHead(NamedTuple):
    """An audit entry's id and hash, written `id:hash`: the trail's head as recorded elsewhere,
    which the trail must still hold."""

    id: int
    hash: str

    def __str__(self) -> str:
        return f"{self.id}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> AuditHead:
        """`id:hash`, as a materialization's `audit_head` shows it."""
        number, _, digest = text.strip().lower().partition(":")
        if not number.isdecimal() or not _HEX_DIGEST.fullmatch(digest):
            raise ValueError(
                f"{text!r} is not an audit head: ID:HASH, an entry's id and its 64 hex digits"
            )
        return cls(int(number), digest)


_HEX_DIGEST = re.compile("[0-9a-f]{64}")


@dataclass(frozen=True)
class AuditVerdict:
    intact: bool
    entries: int  # entries verified before the first broken link (all of them when intact)
    broken_id: int | None  # or the head it was given, when the trail no longer holds it
    broken_position: int | None  # None: the chain holds, but was cut (`problem` says where)
    problem: str
    head: AuditHead | None = None  # the newest entry of a chain that holds


def _head_problem(head: AuditHead, reached: Mapping[str, object] | None) -> str | None:
    """What became of entry `head.id`, recorded as the trail's head, given `reached`: the trail's
    last entry up to that id (None: there is none)."""
    if reached is None or reached["id"] != head.id:
        # Or earlier: SQLite gives a removed entry's id to the next, and the trail may regrow.
        cut = f"cut after entry {reached['id']} or earlier" if reached else "emptied"
        return f"the trail was {cut}: entry {head.id}, recorded as its head, is gone"
    if reached["entry_hash"] != head.hash or _seal(reached) != head.hash:
        return (
            f"entry {head.id} is not the one recorded as the trail's head (its hash differs): "
            "the trail was cut before it and written again, or it was changed"
        )
    return None


def _seal(entry: dict[str, object]) -> str:
    """sha256 over the entry's fields and its predecessor's hash, canonically encoded."""
    fields = [
        entry[name]
        for name in ("prev_hash", "at", "actor", "run_id", "flow", "action", "detail", "why")
    ]
    fields[1] = fields[1].isoformat(timespec="microseconds")
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


_RECORD_FIELDS = ("flow", "record_key", "action", "correlation_id", "diff")


_ZLIB_LEVEL = 1  # a 1M-record body compresses in half a second, to a tenth or less
_RECORD, _FIELD = "\x1e", "\x1f"


def _framed(rows: Sequence[Sequence[str]]) -> str:
    """An entry's records (each its `_RECORD_FIELDS`) as one text, framed by separators no field
    can hold (usable keys have no control characters, JSON escapes them)."""
    text = _RECORD.join(map(_FIELD.join, rows))
    if rows and (
        text.count(_RECORD) != len(rows) - 1
        or text.count(_FIELD) != len(rows) * (len(_RECORD_FIELDS) - 1)
    ):
        raise ValueError("an audit record's field holds a control character \\x1e or \\x1f")
    return text


def _unframed(text: str) -> list[list[str]]:
    return [record.split(_FIELD) for record in text.split(_RECORD)] if text else []


def _text_digest(text: str) -> str:
    return "v2:" + hashlib.sha256(text.encode()).hexdigest()


def _records_digest(rows: Sequence[Sequence[str]], sealed: str = "v2:") -> str:
    """sha256 over an entry's records, in the order they were written: version 2 (`v2:…`) over
    their framed text; entries sealed before it, a bare hex digest, are checked the way they
    were sealed."""
    if not sealed.startswith("v2:"):
        fields = [list(row) for row in rows]
        return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()
    return _text_digest(_RECORD.join(map(_FIELD.join, rows)))


def _records_problem(
    connection, audit_id: int, sealed: str | None, indexed: list[str]
) -> str | None:
    """What is wrong with the records of entry `audit_id`, sealed by digest `sealed` (None: they
    are as written). They are in its body, or (entries of an older handoff) rows of their own,
    never both; `indexed`, the keys the key index gives it, must be the body's, no more, no
    fewer. An entry without a digest has no records anywhere."""
    changed = "a record of it was changed, removed or added after it was written"
    misindexed = "its index of record keys was changed: a record's story would miss it or show it"
    body = connection.execute(
        sa.select(audit_bodies.c.records).where(audit_bodies.c.audit_id == audit_id)
    ).scalar()
    stored = _stored_records(connection, audit_id)
    if sealed is None:
        return changed if body is not None or stored or indexed else None
    if body is None:
        if sealed != _records_digest(stored, sealed):
            return changed
        return misindexed if indexed else None
    if stored:
        return changed
    try:
        text = zlib.decompress(body).decode()
    except (zlib.error, UnicodeDecodeError):
        return changed
    if _text_digest(text) != sealed:
        return changed
    if sorted(indexed) != sorted({record[1] for record in _unframed(text)}):
        return misindexed
    return None


class _KeyIndex:
    """The audit trail's key index read once, in entry order, as the chain's walk asks for each
    entry's keys (the index is by key: one query per entry would read all of it each time)."""

    def __init__(self, connection):
        query = sa.select(audit_keys.c.audit_id, audit_keys.c.record_key).order_by(
            audit_keys.c.audit_id
        )
        rows = connection.execution_options(stream_results=True, yield_per=10_000).execute(query)
        self._groups = itertools.groupby(rows, key=operator.itemgetter(0))
        self._next = next(self._groups, None)

    def keys_of(self, audit_id: int) -> list[str]:
        """Entry `audit_id`'s keys, in no particular order: the database's collation is not
        Python's (entries are asked for in increasing order; keys of ids that are no entry are
        passed over: no story reaches them)."""
        while self._next is not None and self._next[0] < audit_id:
            self._next = next(self._groups, None)
        if self._next is None or self._next[0] != audit_id:
            return []
        keys = [key for _, key in self._next[1]]
        self._next = next(self._groups, None)
        return keys


def _stored_records(connection, audit_id: int) -> list[tuple[str, ...]]:
    query = (
        sa.select(*(audit_records.c[name] for name in _RECORD_FIELDS))
        .where(audit_records.c.audit_id == audit_id)
        .order_by(audit_records.c.id)
    )
    return [tuple(row) for row in connection.execute(query)]
