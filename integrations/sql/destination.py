"""A table in a SQL database as a sync destination: upsert by key, archive by `archived_at`.

One transaction per upsert call (the engine's chunk), by dialect:
- PostgreSQL: COPY the chunk into a temporary table, then one `INSERT … SELECT … ON CONFLICT (key)
  DO UPDATE … WHERE (columns) IS DISTINCT FROM (excluded)`: rows already equal are not rewritten
  (but noted, to tell them from rows a trigger skipped: neither is returned).
- MariaDB/MySQL: new keys by a plain `INSERT`, known ones by one `UPDATE … JOIN` with a temporary
  table of the chunk (multi-row statements by PyMySQL). Not `ON DUPLICATE KEY UPDATE`: it fires on
  any unique index, so a new record holding another row's unique value would write over that row.
- SQLite: `INSERT … ON CONFLICT (key) DO UPDATE`, executemany.
The table must fit the flow (see integrations/sql/fit.py), checked by `prepare` before any write.
A value a fixed-point column would store rounded (or cannot hold), or a time finer than its
column's fraction of a second, refuses its record, alone, with the column and what to do: the
database would round or cut it without a word (and reconciliation then find it drifted for good).
So does text a DATE column would cut (a time of day, no ISO date) or a timestamp column would read
its own way (no ISO 8601 time), or a UUID column would store changed (no canonical UUID text);
text with an offset into a column without a zone is sent as the UTC time it names, as handoff's
times are. So does, on MariaDB, a record larger than the server's max_allowed_packet (it closes
the connection on one). A row a BEFORE trigger skips without an error is its record's refusal,
not counted written.
A transaction that loses a lock conflict (deadlock, lock wait timeout, serialization failure), or
on MariaDB a race for a new key, is run again, a few times, after a growing pause: it is never
taken for a refusal of its records.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from integrations.contracts.contract import kind_of
from integrations.engine.destination import (
    DestinationMismatch,
    DestinationUnavailable,
    OutboundBatch,
    OutboundRecord,
    RecordsRejected,
    Refusal,
    Upserted,
    WrittenColumns,
)
from integrations.engine.spec import FlowSpec, Target
from integrations.sql.connect import (
    Columns,
    copy_columns,
    copy_new_rows,
    copy_table,
    in_key_order,
    timestamps_in_utc,
    unreachable,
    without_values,
)
from integrations.sql.fit import (
    ARCHIVED_AT,
    beyond_exact_floats,
    beyond_fixed_point,
    beyond_packet,
    beyond_time_precision,
    bounded_text_columns,
    coarse_time_columns,
    create_table,
    fixed_point_columns,
    float_columns_of_integers,
    holds_bools,
    infinite_numbers,
    python_type,
    reflect_fitting_table,
)

_IN_CHUNK = 500
_TEMP_TABLE = "handoff_upsert_batch"
_HELD = "handoff_upsert_held"  # PostgreSQL: keys of the rows an upsert found held as sent
_NOTE_HELD = "handoff_note_held"  # and the function that notes one
_SAVEPOINT = "handoff_chunk"
LOCK_ATTEMPTS = 5  # a chunk's transaction, run again after each lost lock conflict
LOCK_PAUSE_SECONDS = 0.2  # before the second attempt; doubled before each next one
T = TypeVar("T")


class SqlTable:
    """One table of a SQL database, keyed by the target's `id_property`."""

    max_batch = 50_000
    ids_ignore_case = False  # its key compares exactly (a loose one is refused by the fit)

    def __init__(self, engine: sa.Engine, target: Target, create_missing: bool = False):
        self.engine, self.target, self.create_missing = engine, target, create_missing
        self.dialect = engine.dialect.name
        self.name = f"{self.dialect} table {target.dataset}"
        self._table: sa.Table | None = None
        self._fields: list[str] = []
        self._fixed_point: dict[str, tuple[int, int]] = {}  # name: (precision, scale)
        self._coarse_times: dict[str, int] = {}  # name: digits of a second's fraction kept
        self._text_lengths: dict[str, int] = {}  # name: characters a VARCHAR(n)/CHAR(n) holds
        self._float_integers: list[str] = []  # int fields in floating-point columns
        self._finite_floats: list[str] = []  # float fields of a database without ±Infinity
        self._bools_as_integers: list[str] = []  # bool fields in integer columns
        self._zoned: list[str] = []  # PostgreSQL timestamptz columns
        self._text_dates: list[str] = []  # str fields in DATE columns
        self._text_times: list[str] = []  # str fields in timestamp columns without a zone
        self._texts: list[str] = []  # str fields
        self._text_uuids: list[str] = []  # str fields in UUID columns
        self._packet: int | None = None  # MariaDB/MySQL's max_allowed_packet, in bytes

    # --- before the first write -------------------------------------------------------------

    def prepare(self, spec: FlowSpec) -> None:
        """Create the table from the contract if allowed and missing; check that it fits."""
        if self.create_missing and not sa.inspect(self.engine).has_table(spec.target.dataset):
            create_table(self.engine, spec)
        self._table = reflect_fitting_table(self.engine, spec)
        self._fields = list(spec.target_contract.schema.columns)
        contract = spec.target_contract
        self._fixed_point = fixed_point_columns(self._table, contract)
        self._coarse_times = coarse_time_columns(self._table, contract)
        if self.dialect != "sqlite":  # SQLite keeps text of any length in a VARCHAR(n)
            self._text_lengths = bounded_text_columns(self._table, contract)
        self._float_integers = float_columns_of_integers(self._table, contract)
        self._finite_floats = [
            name
            for name in self._fields
            if self.dialect in ("mysql", "mariadb") and kind_of(contract, name) == "float"
        ]
        self._bools_as_integers = [
            name
            for name in self._fields
            if kind_of(contract, name) == "bool" and python_type(self._table.c[name]) is int
        ]
        self._zoned = [
            name
            for name in self._fields
            if self.dialect == "postgresql"
            and isinstance(self._table.c[name].type, sa.DateTime)
            and self._table.c[name].type.timezone
        ]
        text_into = {
            name: python_type(self._table.c[name])
            for name in self._fields
            if kind_of(contract, name) == "str"
        }
        self._texts = list(text_into)
        self._text_uuids = [name for name, kind in text_into.items() if kind is uuid.UUID]
        self._packet = self._max_allowed_packet()
        self._text_dates = [name for name, kind in text_into.items() if kind is date]
        self._text_times = [
            name for name, kind in text_into.items() if kind is datetime and name not in self._zoned
        ]

    def _max_allowed_packet(self) -> int | None:
        """The largest statement a MariaDB/MySQL server takes: on a larger one it closes the
        connection, and a record too large for it would stop every run as unavailable."""
        if self.dialect not in ("mysql", "mariadb"):
            return None
        with self.engine.connect() as connection:
            return int(connection.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())

    @property
    def table(self) -> sa.Table:
        if self._table is None:  # reads (snapshot, archive) need no contract
            try:
                self._table = sa.Table(
                    self.target.dataset, sa.MetaData(), autoload_with=self.engine
                )
            except sa.exc.NoSuchTableError:
                raise DestinationMismatch(
                    f"the destination has no table {self.target.dataset!r}. What to do: create "
                    "it as the flow's contract says (or let handoff create it: "
                    "create_missing_tables), then rerun"
                ) from None
        return self._table

    def ids_of(self, keys: Sequence[object]) -> list[str]:
        """The destination ids that records with these key values are written under (a row's
        id is its key's text): the engine checks no two records hold one."""
        return list(map(self._key_text, keys))

    @property
    def _key_text(self) -> Callable[[object], str]:
        """A key as the ledger and reconciliation know it: as text, a number column's by value
        (a NUMERIC(12, 2) key written as 1 reads back as Decimal('1.00')), a CHAR(n) column's
        without the spaces PostgreSQL pads it with."""
        column = self.table.c[self.target.id_property]
        if python_type(column) in (Decimal, float):
            return _number_text
        return _unpadded if self._padded_key else str

    @property
    def _padded_key(self) -> bool:
        """A CHAR(n) key, which PostgreSQL pads with spaces and MariaDB compares without them
        (SQLite keeps the text as sent)."""
        return self._pads(self.table.c[self.target.id_property])

    def _pads(self, column: sa.Column) -> bool:
        """A CHAR(n) column: PostgreSQL reads its text padded with spaces, MariaDB without the
        spaces it ended in (SQLite keeps the text as sent)."""
        return isinstance(column.type, sa.CHAR) and self.dialect != "sqlite"

    # --- writes ------------------------------------------------------------------------------

    def upsert(self, records: Sequence[OutboundRecord], whole: bool = False) -> Upserted:
        """One transaction: the database takes the chunk whole or refuses it whole. Records a
        fixed-point column would not keep as sent are refused before it, one by one, and rows a
        trigger skips after it; unless the chunk goes `whole` (records taking each other's ids:
        written in part, one would land on a row another kept): then any such refusal refuses
        the whole chunk (RecordsRejected), nothing written."""
        if not records:
            return Upserted([])
        fields = self._fields or list(records[0].properties)
        batch = records if isinstance(records, OutboundBatch) else OutboundBatch.of(records)
        columns = {name: batch.column(name) for name in fields}
        for name in self._bools_as_integers:  # COPY would send t/f, which INTEGER refuses
            columns[name] = [int(v) if isinstance(v, bool) else v for v in columns[name]]
        for name in self._zoned:  # naive UTC text would be read in the session's zone
            columns[name] = list(map(_said_utc, columns[name]))
        for name in self._text_times:  # a column without a zone would drop the text's
            columns[name] = list(map(_naive_utc, columns[name]))
        keys, not_kept = batch.keys, self._not_kept(columns)
        if whole and not_kept:
            at, why = min(not_kept.items())
            raise RecordsRejected(f"record {keys[at]}: {why}")
        refused = [Refusal(keys[at], why) for at, why in sorted(not_kept.items())]
        if not_kept:
            kept = [at for at in range(len(keys)) if at not in not_kept]
            keys = [keys[at] for at in kept]
            columns = {name: [values[at] for at in kept] for name, values in columns.items()}
            if not keys:
                return Upserted([], refused)

        def write(connection: sa.Connection) -> _Written:
            if self.dialect == "postgresql":
                written = self._upsert_postgresql(connection, columns)
            else:
                rows = list(zip(*columns.values(), strict=True))
                written = self._upsert_executemany(connection, fields, rows)
            if whole and written.skipped:
                raise RecordsRejected(_SKIPPED)  # raised in the transaction: it rolls back
            return written

        created, skipped = self._transaction(write)
        ids = list(map(self._key_text, columns[self.target.id_property]))
        # PostgreSQL returns no row it found equal: None, unchanged. Unless a key it returned
        # reads otherwise than sent: then it cannot tell, and calls the others updated.
        told = created.keys() <= set(ids)
        if skipped:  # written nowhere, though the database said no word: refused
            refused += [Refusal(keys[at], _SKIPPED) for at, id_ in enumerate(ids) if id_ in skipped]
            landed = [at for at, id_ in enumerate(ids) if id_ not in skipped]
            keys, ids = [keys[at] for at in landed], [ids[at] for at in landed]
        flags = [created.get(id_, None if told else False) for id_ in ids]
        return Upserted(WrittenColumns(keys, ids, flags), refused)

    def _declared(self, name: str) -> str:
        """The column's type as the database declares it: NUMERIC(8, 2), DOUBLE(8, 2)."""
        return self.table.c[name].type.compile(dialect=self.engine.dialect)

    def _not_kept(self, columns: Columns) -> dict[int, str]:
        """The records a fixed-point, floating-point or coarse time column would not keep as
        sent, or a MariaDB server would not take in one statement, by position, with why."""
        found: dict[int, str] = {}
        for name in self._float_integers:
            for at, why in beyond_exact_floats(columns[name]).items():
                found.setdefault(
                    at,
                    f"column {name!r} is floating-point and the value {why}. What to do: make "
                    "the column BIGINT or NUMERIC, or bound the field in the contract",
                )
        for name in self._finite_floats:
            for at in infinite_numbers(columns[name]):
                found.setdefault(
                    at,
                    f"column {name!r} cannot hold the value, which is infinite: MariaDB and "
                    "MySQL have no infinity. What to do: bound the field in the contract (or "
                    "map the value to one the column holds)",
                )
        for name, (precision, scale) in self._fixed_point.items():
            for at, why in beyond_fixed_point(columns[name], precision, scale).items():
                found.setdefault(
                    at,
                    f"column {name!r} is {self._declared(name)} and the value {why}. "
                    "What to do: bound the field in the contract (or round it in the flow's "
                    "mapping) to what the column holds, or widen the column",
                )
        key = self.table.c[self.target.id_property]
        if self._padded_key:
            for at, value in enumerate(columns[key.name]):
                if isinstance(value, str) and value.endswith(" "):
                    found.setdefault(
                        at,
                        f"the key column {key.name!r} is {key.type}, which pads keys with "
                        "spaces: a key ending in one would be another record's. What to do: "
                        "trim the key in the flow's mapping, or make the column varchar",
                    )
        for name in self._fields:
            if name == key.name or not self._pads(self.table.c[name]):
                continue
            for at, value in enumerate(columns[name]):
                if isinstance(value, str) and value.endswith(" "):
                    found.setdefault(
                        at,
                        f"column {name!r} is {self._declared(name)}, which reads text without "
                        "the spaces it ends in: the record would drift for good. What to do: "
                        "trim the field in the flow's mapping, or make the column varchar",
                    )
        endless = _ENDLESS if self.dialect == "postgresql" else frozenset()  # as lowered
        for name in self._text_dates:
            for at, value in enumerate(columns[name]):
                if str(value).lower() not in endless and (why := _not_a_date(value)):
                    found.setdefault(
                        at,
                        f"column {name!r} is a DATE and the text {why}. What to do: send the "
                        "date alone (YYYY-MM-DD), or make the column a timestamp or text",
                    )
        for name in self._text_uuids:
            for at, value in enumerate(columns[name]):
                if isinstance(value, str) and not _CANONICAL_UUID.fullmatch(value):
                    found.setdefault(
                        at,
                        f"column {name!r} is a UUID and the text is no UUID in its canonical form "
                        "(lower case, with hyphens), which the column would store changed, or "
                        "refuse. What to do: send str(uuid.UUID(text)) from the flow's mapping, "
                        "or make the column text",
                    )
        for name in self._text_times:
            for at, value in enumerate(columns[name]):
                if (
                    isinstance(value, str)
                    and value.lower() not in endless
                    and not _ISO_TIME.fullmatch(value)
                ):
                    found.setdefault(
                        at,
                        f"column {name!r} is a timestamp and the text is no ISO 8601 date and "
                        "time, which each database reads its own way (a zone named in it "
                        "dropped). What to do: send ISO 8601 text, or make the field a datetime",
                    )
        if self._packet is not None:
            for at, why in beyond_packet(columns, self._texts, self._packet).items():
                found.setdefault(
                    at,
                    f"the record {why}. What to do: raise max_allowed_packet on the server (up "
                    "to 1 GiB), or bound the field's length in the contract",
                )
        for name, length in self._text_lengths.items():
            if _longest(columns[name]) <= length:  # the common case, measured in C
                continue
            for at, value in enumerate(columns[name]):
                if isinstance(value, str) and len(value) > length:
                    found.setdefault(
                        at,
                        f"column {name!r} is {self._declared(name)} and the text has "
                        f"{len(value):,} characters, which the database would refuse, or cut "
                        "(trailing spaces) without a word. What to do: widen the column, or "
                        "bound the field's length in the contract (or trim it in the flow's "
                        "mapping)",
                    )
        for name, digits in self._coarse_times.items():
            for at, why in beyond_time_precision(columns[name], digits).items():
                found.setdefault(
                    at,
                    f"column {name!r} {why}: it would store the time changed. What to do: "
                    "declare the column with microseconds (MariaDB DATETIME(6), PostgreSQL "
                    "timestamp), or round the field in the flow's mapping",
                )
        return found

    def health(self) -> dict[str, object]:
        """A database connection has no API transport to report on."""
        return {}

    def _transaction(self, work: Callable[[sa.Connection], T]) -> T:
        """`work` in one transaction. A transaction that lost a lock conflict (a deadlock, a lock
        wait that timed out, a serialization failure) is rolled back and run again, after a
        growing pause: the conflict is another transaction's, not the records'. Still losing
        after the last attempt, the database is unavailable for now (the run stops, nothing of
        the chunk is marked synced); any other refusal is the records' (RecordsRejected)."""
        attempt = 1
        while True:
            try:
                with (
                    self.engine.begin() as connection,
                    timestamps_in_utc(connection, self.table.columns),
                ):
                    return work(connection)
            except UnicodeEncodeError as error:
                if error.reason == "surrogates not allowed":  # from JSON's "\ud800", say
                    raise RecordsRejected(
                        "text that is no valid Unicode (a lone surrogate), which no database takes"
                    ) from None
                raise DestinationMismatch(  # the connection's, not the records' fault
                    f"the connection's character set ({error.encoding}) cannot carry the text "
                    "sent. What to do: connect in UTF-8 (handoff's default; drop the URL's "
                    "charset or client_encoding)"
                ) from None
            except OverflowError:  # sqlite3's, binding an int beyond 64 bits: no DBAPIError
                raise RecordsRejected(
                    "a whole number beyond 64 bits, which SQLite's INTEGER cannot hold. What to "
                    "do: bound the field in the contract, or map it to text"
                ) from None
            except (sa.exc.DBAPIError, _KeyRace) as error:
                if isinstance(error, sa.exc.DBAPIError) and not _lock_conflict(error):
                    raise _classified(error) from error
                if attempt == LOCK_ATTEMPTS:
                    raise DestinationUnavailable(
                        f"{LOCK_ATTEMPTS} attempts lost lock conflicts or races with other "
                        f"transactions on the table (the last: {_conflict_name(error)})"
                    ) from error
            time.sleep(LOCK_PAUSE_SECONDS * 2 ** (attempt - 1))
            attempt += 1

    def _upsert_postgresql(self, connection: sa.Connection, columns: Columns) -> _Written:
        fields, sent = list(columns), columns[self.target.id_property]
        batch = in_key_order(copy_table(columns), self.target.id_property)  # for either COPY
        stored = copy_new_rows(connection, self.table.name, batch)
        if stored is not None:  # a first load: all new, and all there unless a trigger skipped
            ids = set(map(self._key_text, sent))
            skipped = ids - self._present(connection, sent) if stored < len(sent) else set()
            return _Written(dict.fromkeys(ids, True), frozenset(skipped))
        quote = self.engine.dialect.identifier_preparer.quote
        table, key = quote(self.table.name), quote(self.target.id_property)
        quoted = ", ".join(quote(name) for name in fields)
        others = [quote(name) for name in fields if name != self.target.id_property]
        archived = quote(ARCHIVED_AT)
        connection.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {_TEMP_TABLE} ON COMMIT DROP AS "
            f"SELECT {quoted} FROM {table} WITH NO DATA"
        )
        copy_columns(connection, _TEMP_TABLE, batch)
        self._note_rows_held(connection)
        mine = ", ".join([*(f"{table}.{name}" for name in others), f"{table}.{archived}"])
        theirs = ", ".join([*(f"EXCLUDED.{name}" for name in others), "NULL"])
        updates = ", ".join(
            [*(f"{name} = EXCLUDED.{name}" for name in others), f"{archived} = NULL"]
        )
        # A row found equal is noted held (and not rewritten): every other one is returned,
        # unless a BEFORE trigger skipped it, of the INSERT (before the conflict) or the UPDATE.
        returned = connection.exec_driver_sql(
            f"INSERT INTO {table} ({quoted}) SELECT {quoted} FROM {_TEMP_TABLE} "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates} "
            f"WHERE CASE WHEN ({mine}) IS DISTINCT FROM ({theirs}) THEN true "
            f"ELSE pg_temp.{_NOTE_HELD}({table}.{key}) END "
            f"RETURNING {key}, (xmax = 0)"
        )
        created = {self._key_text(value): inserted for value, inserted in returned}
        if len(created) == len(sent):
            return _Written(created)
        # Neither returned nor held: skipped. (Not compared with the batch: a trigger that
        # normalises values, lower(email), made rows the upsert found equal differ from it.)
        unaccounted = connection.exec_driver_sql(
            f"SELECT batch.{key} FROM {_TEMP_TABLE} AS batch WHERE NOT EXISTS "
            f"(SELECT FROM {_HELD} WHERE {_HELD}.{key} = batch.{key})"
        ).scalars()
        skipped = [value for value in unaccounted if self._key_text(value) not in created]
        held = self._skips_that_hold_the_record(connection, fields, skipped)
        return _Written(created, frozenset(map(self._key_text, skipped)) - held)

    def _skips_that_hold_the_record(
        self, connection: sa.Connection, fields: list[str], keys: list[object]
    ) -> set[str]:
        """Of the rows of `keys` (the upsert wrote none of them), those that already hold what
        the table's triggers make of the record sent, as key texts. An update-only normaliser
        (lower(email)) left a row differing from its record, so a resend updated it, and
        `suppress_redundant_updates_trigger` then skipped the update, which changed nothing: no
        refusal. A guard's skip (RETURN NULL: a closed period) is one. Told apart by sending the
        updates again in a savepoint, ARCHIVED_AT set so that no suppressor skips them: a row
        returned equal to the one stored (which is live) holds its record; a row skipped again,
        or a probe that fails, stays refused. Rolled back either way, AFTER triggers' work too."""
        if not keys:
            return set()
        quote = self.engine.dialect.identifier_preparer.quote
        table, key, archived = (
            quote(name) for name in (self.table.name, self.target.id_property, ARCHIVED_AT)
        )
        others = [quote(name) for name in fields if name != self.target.id_property]
        updates = ", ".join([*(f"{name} = batch.{name}" for name in others), f"{archived} = now()"])
        after = ", ".join(f"{table}.{name}" for name in others)
        before = ", ".join(f"stored.{name}" for name in others)
        probe = sa.text(
            f"UPDATE {table} SET {updates} FROM {_TEMP_TABLE} AS batch, {table} AS stored "
            f"WHERE {table}.{key} = batch.{key} AND stored.{key} = batch.{key} "
            f"AND batch.{key} IN :keys AND stored.{archived} IS NULL "
            f"RETURNING {table}.{key}, ROW({after}) IS NOT DISTINCT FROM ROW({before})"
        ).bindparams(
            sa.bindparam("keys", expanding=True, type_=self.table.c[self.target.id_property].type)
        )
        held: set[str] = set()
        savepoint = connection.begin_nested()
        try:
            for start in range(0, len(keys), _IN_CHUNK):
                returned = connection.execute(probe, {"keys": keys[start : start + _IN_CHUNK]})
                held.update(self._key_text(value) for value, holds in returned if holds)
        except sa.exc.DBAPIError as error:
            if unreachable(error):
                raise
        savepoint.rollback()
        return held

    def _note_rows_held(self, connection: sa.Connection) -> None:
        """A temporary table for the keys of the rows the upsert finds held as sent, and the
        function its `WHERE` notes one with (false: the row is not rewritten). RETURNING leaves
        out both such rows and rows a trigger skipped: only this tells them apart. Called for
        rows found equal alone, so a chunk of changes pays nothing per row."""
        quote = self.engine.dialect.identifier_preparer.quote
        connection.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {_HELD} ON COMMIT DROP AS "
            f"SELECT {quote(self.target.id_property)} FROM {quote(self.table.name)} WITH NO DATA"
        )
        connection.exec_driver_sql(
            f"CREATE OR REPLACE FUNCTION pg_temp.{_NOTE_HELD}(anyelement) RETURNS boolean "
            f"LANGUAGE sql AS 'INSERT INTO pg_temp.{_HELD} VALUES ($1) RETURNING false'"
        )

    def _upsert_executemany(
        self, connection: sa.Connection, fields: list[str], rows: list[tuple]
    ) -> dict[str, bool]:
        table, key, text = self.table, self.target.id_property, self._key_text
        position = fields.index(key)
        keys = [row[position] for row in rows]
        existing = self._present(connection, keys)
        converters = {
            index: convert
            for index, name in enumerate(fields)
            if (convert := _converter(table.c[name])) is not None
        }
        if converters:
            rows = [
                tuple(converters[i](v) if i in converters else v for i, v in enumerate(row))
                for row in rows
            ]
        # The driver's executemany with one prepared text: SQLAlchemy's per-row binding would cost
        # more than the database's work (PyMySQL sends it as multi-row INSERTs).
        skipped: frozenset[str] = frozenset()
        if self.dialect == "sqlite":
            skipped = self._upsert_sqlite(connection, fields, rows)
        else:
            known = [text(row[position]) in existing for row in rows]
            self._insert_or_update(connection, fields, rows, known)
        return _Written({text(value): text(value) not in existing for value in keys}, skipped)

    def _present(self, connection: sa.Connection, keys: Sequence[object]) -> set[str]:
        """Which of `keys` the table holds, as key texts."""
        column, found = self.table.c[self.target.id_property], set()
        for start in range(0, len(keys), _IN_CHUNK):
            query = sa.select(column).where(column.in_(keys[start : start + _IN_CHUNK]))
            found.update(map(self._key_text, connection.execute(query).scalars()))
        return found

    def _upsert_sqlite(
        self, connection: sa.Connection, fields: list[str], rows: list[tuple]
    ) -> frozenset[str]:
        """SQLite's upsert, one executemany; the keys a BEFORE trigger skipped (RAISE(IGNORE)),
        which only the count of rows changed tells. When it falls short, the chunk is undone to
        a savepoint and written row by row, to find which."""
        statement = self._sqlite_upsert(fields)
        connection.exec_driver_sql(f"SAVEPOINT {_SAVEPOINT}")
        if connection.exec_driver_sql(statement, rows).rowcount == len(rows):
            return frozenset()
        connection.exec_driver_sql(f"ROLLBACK TO {_SAVEPOINT}")
        position = fields.index(self.target.id_property)
        return frozenset(
            self._key_text(row[position])
            for row in rows
            if connection.exec_driver_sql(statement, row).rowcount == 0
        )

    def _sqlite_upsert(self, fields: list[str]) -> str:
        quote = self.engine.dialect.identifier_preparer.quote
        table, key = quote(self.table.name), quote(self.target.id_property)
        columns = ", ".join(quote(name) for name in fields)
        others = [quote(name) for name in fields if name != self.target.id_property]
        updates = ", ".join(
            [*(f"{name} = excluded.{name}" for name in others), f"{quote(ARCHIVED_AT)} = NULL"]
        )
        values = ", ".join("?" for _ in fields)
        return (
            f"INSERT INTO {table} ({columns}) VALUES ({values}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
        )

    def _insert_or_update(
        self, connection: sa.Connection, fields: list[str], rows: list[tuple], known: list[bool]
    ) -> None:
        """MariaDB/MySQL: INSERT the new rows; UPDATE the known ones through a temporary table
        joined on the key. A clash on any other unique index is an error: the chunk is refused.
        The keys are not locked between the lookup and the writes (gap locks would make runs
        that insert into one table at once, a backfill's partitions, deadlock each other): when
        the INSERT finds a key another run inserted meanwhile, a locking read (it sees the latest
        rows, not the transaction's snapshot) confirms it, and the chunk is run again: its
        lookup then finds the key, and updates it."""
        quote = self.engine.dialect.identifier_preparer.quote
        table, key = quote(self.table.name), quote(self.target.id_property)
        columns = ", ".join(quote(name) for name in fields)
        values = ", ".join("%s" for _ in fields)
        new = [row for row, old in zip(rows, known, strict=True) if not old]
        if new:
            try:
                connection.exec_driver_sql(
                    f"INSERT INTO {table} ({columns}) VALUES ({values})", new
                )
            except sa.exc.IntegrityError:
                position = fields.index(self.target.id_property)
                if self._any_there(connection, [row[position] for row in new]):
                    raise _KeyRace() from None
                raise
        updated = [row for row, old in zip(rows, known, strict=True) if old]
        if not updated:
            return
        connection.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {_TEMP_TABLE}")
        connection.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {_TEMP_TABLE} SELECT {columns} FROM {table} LIMIT 0"
        )
        connection.exec_driver_sql(
            f"INSERT INTO {_TEMP_TABLE} ({columns}) VALUES ({values})", updated
        )
        sets = [
            *(
                f"{table}.{quote(name)} = batch.{quote(name)}"
                for name in fields
                if name != self.target.id_property
            ),
            f"{table}.{quote(ARCHIVED_AT)} = NULL",
        ]
        # The chunk drives the join (STRAIGHT_JOIN): one key lookup per row, never a table scan.
        connection.exec_driver_sql(
            f"UPDATE {_TEMP_TABLE} AS batch STRAIGHT_JOIN {table} "
            f"ON {table}.{key} = batch.{key} SET {', '.join(sets)}"
        )
        connection.exec_driver_sql(f"DROP TEMPORARY TABLE {_TEMP_TABLE}")

    def _any_there(self, connection: sa.Connection, keys: list[object]) -> bool:
        """Whether a row holds one of `keys` now, exactly (a locking read: committed rows,
        whatever the transaction's snapshot). Exactly: under a case- or space-insensitive
        collation 'abc' matches 'ABC ', a different key, which is refused, not retried."""
        column = self.table.c[self.target.id_property]
        for start in range(0, len(keys), _IN_CHUNK):
            wanted = keys[start : start + _IN_CHUNK]
            query = sa.select(column).where(column.in_(wanted)).with_for_update(read=True)
            found = set(map(self._key_text, connection.execute(query).scalars()))
            if found & set(map(self._key_text, wanted)):
                return True
        return False

    def archive(self, destination_ids: Sequence[str]) -> None:
        """Mark records archived (`archived_at` = now); archived ones keep their first time."""
        column = self.table.c[self.target.id_property]
        native = python_type(column)
        # The ledger keeps ids as text; PostgreSQL compares a number column with numbers only.
        numbers = native in (int, Decimal, float)
        ids = [native(value) for value in destination_ids] if numbers else list(destination_ids)
        if native is date:  # nor dates with text
            ids = [date.fromisoformat(value) for value in destination_ids]
        now = datetime.now(UTC)
        if not getattr(self.table.c[ARCHIVED_AT].type, "timezone", False):
            now = now.replace(tzinfo=None)  # naive UTC, but a zoned column is told the zone

        def mark(connection: sa.Connection) -> None:
            for start in range(0, len(ids), _IN_CHUNK):
                connection.execute(
                    sa.update(self.table)
                    .where(
                        column.in_(ids[start : start + _IN_CHUNK]),
                        self.table.c[ARCHIVED_AT].is_(None),
                    )
                    .values({ARCHIVED_AT: now})
                )

        self._transaction(mark)

    # --- reads -------------------------------------------------------------------------------

    def snapshot(self, fields: Sequence[str]) -> Iterator[tuple[str, str, dict[str, object]]]:
        """Every live record, with values as the engine sends them (ISO text, floats); none
        while a table handoff may create is missing (no run made it yet)."""
        if self.create_missing and not sa.inspect(self.engine).has_table(self.target.dataset):
            return
        table, key, text = self.table, self.target.id_property, self._key_text
        wanted = [name for name in fields if name in table.c]
        padded = {name for name in wanted if self._pads(table.c[name])}  # read as sent
        query = sa.select(table.c[key], *(_read(table.c[name]) for name in wanted)).where(
            table.c[ARCHIVED_AT].is_(None)
        )
        try:
            with (
                self.engine.connect() as connection,
                timestamps_in_utc(connection, self.table.columns),
            ):
                result = connection.execution_options(stream_results=True, yield_per=10_000)
                for row in result.execute(query):
                    values = {
                        name: _unpadded(value)
                        if name in padded and value is not None
                        else _as_sent(value)
                        for name, value in zip(wanted, row[1:], strict=True)
                    }
                    yield text(row[0]), text(row[0]), values
        except sa.exc.DBAPIError as error:
            raise _classified(error) from error


def _read(column: sa.Column) -> sa.ColumnElement:
    """MariaDB/MySQL keep a BOOLEAN as TINYINT(1): it is read as the bool it was written from."""
    if isinstance(column.type, mysql.TINYINT) and holds_bools(column):
        return sa.type_coerce(column, sa.Boolean).label(column.name)
    return column


def _converter(column: sa.Column) -> Callable[[object], object] | None:
    """Records carry timestamps as ISO text ("…T…"); SQLite (as SQLAlchemy stores them) and
    MariaDB take them with a space. Dates are ISO already."""
    kind = python_type(column)
    if kind is datetime:
        return lambda value: value.replace("T", " ") if isinstance(value, str) else value
    if kind is date:
        return lambda value: value[:10] if isinstance(value, str) else value
    return None


def _said_utc(value: object) -> object:
    """Records carry times as naive UTC text: such text is said to be UTC ("+00:00"). Any other
    (a zone named by offset or by name, a date, "infinity") is sent as it is."""
    if isinstance(value, str) and _NAIVE_TIME.fullmatch(value):
        return value + "+00:00"
    return value


_NAIVE_TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d{1,9})?)?")


# PostgreSQL's dates and times without end, which it keeps as they are.
_ENDLESS = frozenset({"infinity", "+infinity", "-infinity"})


def _naive_utc(value: object) -> object:
    """ISO 8601 text with an offset ("…10:00+05:00", "…Z") as the UTC time it names, without a
    zone, as handoff's times are; any other value as it is."""
    if not isinstance(value, str) or not _ISO_TIME.fullmatch(value):
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        return value
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def _not_a_date(value: object) -> str | None:
    """Why text would not be kept whole by a DATE column: a time of day (dropped), or no ISO
    date (each database reads it its own way, SQLite and MariaDB cut to ten characters)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return "is no ISO 8601 date"
    if moment.tzinfo is not None or moment.time() != datetime.min.time():
        return "holds a time of day, which the column would drop"
    return None


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Whole (`$` took a final newline) and in ASCII digits (`\d` took "２０２５", which SQLite stored
# as it was and the others refused, naming no column).
_ISO_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?)?"
    r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)?"
)


def _unpadded(value: object) -> str:
    return str(value).rstrip(" ")


def _number_text(value: object) -> str:
    """A number as plain text without trailing zeros: 1, 1.0 and Decimal('1.00') are all "1"."""
    text = format(Decimal(str(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _as_sent(value: object) -> object:
    if isinstance(value, datetime):
        if value.tzinfo is not None:  # a zoned column, read in the session's zone: sent as UTC
            value = value.astimezone(UTC)
        # isoformat, not strftime: its %Y leaves a year before 1000 unpadded ("1-01-01").
        return value.replace(tzinfo=None).isoformat(timespec="microseconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):  # a UUID column's: its canonical text, as sent
        return str(value)
    return float(value) if isinstance(value, Decimal) else value


# PostgreSQL's SQLSTATEs: serialization failure, deadlock, lock not available (lock_timeout).
_PG_LOCK_CONFLICTS = frozenset({"40001", "40P01", "55P03"})
# MariaDB/MySQL: lock wait timeout, deadlock, a row changed since the transaction read it. (SQLite
# waited out its busy timeout already.)
_MARIADB_LOCK_CONFLICTS = frozenset({1020, 1205, 1213})


class _Written(NamedTuple):
    """A chunk's write: by key text, True created, False updated (absent: held as sent); and
    the keys a BEFORE trigger skipped (PostgreSQL's RETURN NULL, SQLite's RAISE(IGNORE)),
    written nowhere though the database said no word."""

    created: dict[str, bool]
    skipped: frozenset[str] = frozenset()


_SKIPPED = (
    "a trigger on the table skipped the row: the database wrote nothing, and said nothing. "
    "What to do: ask the table's owners what their trigger lets through; change the record "
    "in the source, or the trigger, then replay"
)


class _KeyRace(Exception):
    """A new key of the chunk was inserted by another transaction after the chunk's lookup."""


def _conflict_name(error: Exception) -> str:
    if isinstance(error, _KeyRace):
        return "a key inserted by another transaction meanwhile"
    return type(getattr(error, "orig", error)).__name__


def _lock_conflict(error: sa.exc.DBAPIError) -> bool:
    return _sqlstate(error) in _PG_LOCK_CONFLICTS or _mariadb_code(error) in _MARIADB_LOCK_CONFLICTS


def _sqlstate(error: sa.exc.DBAPIError) -> str | None:
    """A PostgreSQL error's SQLSTATE (psycopg's args hold the message); None for the others'."""
    return getattr(error.orig, "sqlstate", None)


def _mariadb_code(error: sa.exc.DBAPIError) -> object:
    """A MariaDB/MySQL error's number, PyMySQL's first arg (others': a message, or nothing)."""
    return error.orig.args[0] if error.orig is not None and error.orig.args else None


def _read_only(error: sa.exc.DBAPIError) -> bool:
    """A server that takes no writes: a PostgreSQL hot standby or a database or session set
    read-only (25006), MariaDB's --read-only (1290) or a read-only replica (1836)."""
    return _sqlstate(error) == "25006" or _mariadb_code(error) in (1290, 1836)


def _not_permitted(error: sa.exc.DBAPIError) -> bool:
    """The database refused handoff's user a right, whatever the records: PostgreSQL's
    insufficient privilege (42501) or invalid authorization (class 28); MariaDB's access denied
    to a database (1044), for the user (1045), to a right (1227), a command on a table (1142),
    a column (1143) or a routine a trigger calls (1370)."""
    sqlstate = _sqlstate(error) or ""
    return (
        sqlstate == "42501"
        or sqlstate.startswith("28")
        or _mariadb_code(error) in _MARIADB_NOT_PERMITTED
    )


_MARIADB_NOT_PERMITTED = frozenset({1044, 1045, 1142, 1143, 1227, 1370})


# A table or column gone since the run checked the table: PostgreSQL's SQLSTATEs, MariaDB's
# codes, SQLite's words. The run stops; the records are not at fault.
_PG_SCHEMA_GONE = frozenset({"42P01", "42703"})
_MARIADB_SCHEMA_GONE = frozenset({1146, 1054})
_SQLITE_SCHEMA_GONE = ("no such table", "no such column", "has no column named")


def _schema_gone(error: sa.exc.DBAPIError) -> bool:
    if isinstance(error.orig, sqlite3.Error):
        return any(words in str(error.orig) for words in _SQLITE_SCHEMA_GONE)
    return _sqlstate(error) in _PG_SCHEMA_GONE or _mariadb_code(error) in _MARIADB_SCHEMA_GONE


def _classified(error: sa.exc.DBAPIError) -> Exception:
    """A refused write (constraint, type, length), or a fault of no record (a database
    unreachable or read-only, a right refused, a table changed), worded without the offending
    values."""
    original = error.orig
    said = without_values((str(original).strip().splitlines() or [""])[0])
    if _read_only(error):
        return DestinationUnavailable(
            f"the database takes no writes ({said}): a standby or read-only replica, or a "
            "server or database set read-only. What to do: point the flow's URL at the "
            "primary, or make the database writable, and rerun"
        )
    if unreachable(error):
        return DestinationUnavailable(
            f"{type(original).__name__}: the database is unreachable or cannot write ({said})"
        )
    if _not_permitted(error):
        return DestinationMismatch(
            f"the database refused handoff's user a right ({said}). What to do: check the "
            "URL's user, and grant it SELECT, INSERT and UPDATE on the table and the right to "
            "create temporary tables (PostgreSQL TEMPORARY on the database, MariaDB CREATE "
            "TEMPORARY TABLES), then rerun"
        )
    if _schema_gone(error):
        return DestinationMismatch(
            f"the table changed since the run checked it ({said}). What to do: restore the "
            "table or column, or the flow's contract, and rerun"
        )
    diagnostic = getattr(original, "diag", None)
    message = getattr(diagnostic, "message_primary", None) or (
        original.args[-1] if original is not None and original.args else str(error)
    )
    return RecordsRejected(without_values(str(message)))


def _longest(values: Sequence[object]) -> float:
    """The length of the longest text among `values` (None and empty text aside); infinite when
    one is no text, for the caller to look value by value."""
    try:
        return max(map(len, filter(None, values)), default=0)
    except TypeError:
        return math.inf
