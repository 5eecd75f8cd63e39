"""A table in a system of record (SQLite, PostgreSQL or MariaDB), streamed in batches.

A read is one query ordered by `(cursor, key)`, streamed through a server-side cursor and cut
into DataFrames of `batch_size` rows: memory is bounded by the batch, never by the table, and
each row is read once. A crashed sync resumes from its last committed batch's watermark.

A row whose cursor is NULL (a nullable `updated_at` never filled) has no place after a watermark:
every run reads it again, and the engine's diff against the ledger writes it only when it changed.
It never moves the watermark, and a sensor watching the newest cursor does not see it change: the
flow's schedule does.

Times at this boundary are UTC without a zone, as the state store keeps watermarks: a cursor in a
zoned column (`timestamptz`) is compared with `since` as that instant, and the newest cursor value
comes back in UTC; a window's bounds become UTC wall-clock times for a column without a zone, so
the session's time zone does not move a partition.

On PostgreSQL, a query whose columns Arrow holds as psycopg's values would be (integers, text,
dates and times without a zone, floats, booleans) is read through ADBC, as binary COPY decoded
in C++ (see integrations/sql/arrow_reads.py). For any other, SQLAlchemy declares the cursor and
psycopg streams `FETCH ALL` from it in chunks of a batch: the server sends rows as it produces
them, with no round trip per batch, and they arrive as plain tuples, without SQLAlchemy's
per-row objects (a third less time than SQLAlchemy's own streaming). Elsewhere (PyMySQL's
SSCursor, SQLite's stepping) SQLAlchemy streams the rows.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta

import numpy as np
import pandas as pd
import psycopg
import sqlalchemy as sa
from psycopg.pq import Format
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from integrations.engine.source import FAR_FUTURE, SourceReadFailed, SourceUnavailable
from integrations.engine.spec import RecentTotal, SourceTable
from integrations.engine.state import looked_back
from integrations.sql.arrow_reads import ArrowRead, arrow_readable
from integrations.sql.connect import driver_complaint, raise_on_lost_connection, timestamps_in_utc


class SourceSchemaError(Exception):
    """The configured table or columns are not in the source database."""


__all__ = ["SourceReadFailed", "SourceSchemaError", "SourceUnavailable", "SqlSource"]

# The rows fingerprinted for the sensor's change counter: a bulk stamp's first, by key.
SAME_SECOND_ROWS = 1000

# The server-side cursor of one read; each read has its own connection and transaction.
EXTRACT_CURSOR = "handoff_extract"


class _DeclareCursor(Executable, ClauseElement):
    """`DECLARE <name> NO SCROLL CURSOR FOR <query>`, run through SQLAlchemy so the query keeps
    its bound parameters, the engine's events and error handling, and the plan PostgreSQL picks
    for a cursor (the one SQLAlchemy's own streaming got)."""

    inherit_cache = False  # built once per read: nothing to gain from the compiled cache

    def __init__(self, name: str, query: sa.Select):
        self.name = name
        self.query = query


@compiles(_DeclareCursor, "postgresql")
def _compile_declare(element: _DeclareCursor, compiler, **kw) -> str:
    return f"DECLARE {element.name} NO SCROLL CURSOR FOR {compiler.process(element.query, **kw)}"


class SqlSource:
    def __init__(self, engine: sa.Engine, spec: SourceTable, arrow: bool = True):
        """`arrow=False` reads PostgreSQL through psycopg's cursor alone, never through Arrow."""
        self.engine = engine
        self.spec = spec
        self._through_arrow = arrow
        raise_on_lost_connection(engine, SourceUnavailable, f"the source database of {spec.table}")
        # Identifiers from configuration are checked against the reflected schema, never interpolated.
        try:
            self.table = sa.Table(spec.table, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError as error:
            raise SourceSchemaError(
                f"table {spec.table!r} is not in the source database"
            ) from error
        wanted = [name for name in (spec.key, spec.cursor, spec.deleted) if name]
        missing = [name for name in wanted if name not in self.table.c]
        if missing:
            raise SourceSchemaError(f"table {spec.table!r} has no column(s) {missing}")
        for column in self.table.c:  # MariaDB's DOUBLE reflects as Decimal-returning: floats
            if isinstance(column.type, sa.Float) and column.type.asdecimal:
                column.type.asdecimal = False
        self.key = self.table.c[spec.key]
        # A table without a change cursor is read whole; the ledger's diff finds what changed.
        self.cursor = self.table.c[spec.cursor] if spec.cursor else None
        if self.cursor is not None and isinstance(self.cursor.type, sa.Numeric | sa.Integer):
            raise SourceSchemaError(self._numbers_as_cursor(self.cursor.type))
        self.order = [self.key] if self.cursor is None else [self.cursor, self.key]
        # MariaDB keeps zero dates ('0000-00-00'), which PyMySQL hands over as text.
        self._zero_dates = engine.dialect.name in ("mysql", "mariadb")
        self._zero_dates_as_null = self._no_date_when_zero(spec.cursor, spec.deleted)
        self._tables_read = [self.table]  # and the lookups' and totals' tables, as reflected
        self.select, self.columns = self._with_lookups()
        self._integers = [
            at
            for at, column in enumerate(self.select.selected_columns)
            if isinstance(column.type, sa.Integer)
        ]
        self._floats = [  # PostgreSQL's alone hold a NaN (SQLite stores it as NULL)
            at
            for at, column in enumerate(self.select.selected_columns)
            if isinstance(column.type, sa.Float) and engine.dialect.name == "postgresql"
        ]

    def _no_date_when_zero(self, *names: str | None) -> list[str]:
        """The columns among `names` whose MariaDB zero dates are read as NULL. PyMySQL hands a
        zero date over as text: in the change cursor it made the watermark's time unreadable
        (the run died after its first batch, on every rerun), in the soft-delete column a row
        never deleted looked deleted. For these columns, handoff's own bookkeeping, a zero date
        is NULL: the row is read by every run, as a NULL cursor's is, and is not deleted. In any
        other column a zero date stays the text it is, which a contract taking the field as a
        date refuses: what a placeholder means there (unknown, not yet, never) is the data's
        owner's to say (NULLIF in a view), not handoff's to guess into a destination."""
        if not self._zero_dates:
            return []
        return [
            name
            for name in names
            if name and isinstance(self.table.c[name].type, sa.Date | sa.DateTime)
        ]

    def _numbers_as_cursor(self, kind: object) -> str:
        cursor = f"{self.spec.table}.{self.spec.cursor}"
        return (
            f"the change cursor {cursor} holds numbers ({kind}), not times: handoff keeps a "
            "cursor as a UTC time, and a number (epoch seconds?) compared with one would skip "
            f"changes. What to do: make the cursor a column of times (a view with "
            f"datetime({self.spec.cursor}, 'unixepoch') on SQLite, to_timestamp(…) on "
            "PostgreSQL, FROM_UNIXTIME(…) on MariaDB), or set cursor=None to read it whole"
        )

    def _reflect(self, table: str, role: str) -> sa.Table:
        try:
            reflected = sa.Table(table, sa.MetaData(), autoload_with=self.engine)
        except sa.exc.NoSuchTableError as error:
            raise SourceSchemaError(f"{role} table {table!r} is not in the source") from error
        self._tables_read.append(reflected)
        return reflected

    def _total(self, total: RecentTotal) -> sa.Label:
        """A correlated subquery per row; the child's `via` column should be indexed. The window
        ends at the run's present (for a DATE column, today inclusive): a row dated in the
        future (an invoice dated ahead) is not yet paid within the window, and was summed."""
        child = self._reflect(total.table, "total")
        wanted = [total.via, total.value, total.dated, *(column for column, _ in total.where)]
        if any(name not in child.c for name in wanted):
            raise SourceSchemaError(
                f"total {total.name!r} names unknown columns of {total.table!r}"
            )
        dated = child.c[total.dated]
        now = datetime.now(UTC).replace(tzinfo=None)
        since = now - total.window
        if isinstance(dated.type, sa.Date):
            since, now = since.date(), now.date()
        else:
            since, now = _bound(dated, since), _bound(dated, now)
        conditions = [
            child.c[total.via] == self.key,
            dated >= since,
            dated <= now,
            *(child.c[column] == value for column, value in total.where),
        ]
        if self.spec.deleted and self.spec.deleted in child.c:
            conditions.append(child.c[self.spec.deleted].is_(None))
        summed = sa.func.coalesce(sa.func.sum(child.c[total.value]), 0)
        return sa.select(summed).where(*conditions).scalar_subquery().label(total.name)

    def _with_lookups(self) -> tuple[sa.Select, list[str]]:
        joined, extra = self.table, []
        for lookup in self.spec.lookups:
            # An alias per lookup: two into one parent (billing and shipping customer), or one
            # into the table itself (an employee's manager), named one table twice and failed.
            parent = self._reflect(lookup.table, "lookup").alias()
            missing = [c for c in (lookup.key, lookup.value) if c not in parent.c]
            if missing or lookup.via not in self.table.c:
                raise SourceSchemaError(f"lookup {lookup.name!r} names unknown columns")
            joined = joined.outerjoin(parent, self.table.c[lookup.via] == parent.c[lookup.key])
            extra.append(_document_text(parent.c[lookup.value]).label(lookup.name))
        extra += [self._total(total) for total in self.spec.totals]
        own: list[sa.ColumnElement] = [_document_text(column) for column in self.table.c]
        if self.engine.dialect.name == "sqlite":
            own = [_lenient_times(column) for column in own]
        columns = [
            *self.table.c.keys(),
            *(lookup.name for lookup in self.spec.lookups),
            *(total.name for total in self.spec.totals),
        ]
        return sa.select(*own, *extra).select_from(joined), columns

    def in_window(
        self, column: str, start: datetime | None, end: datetime | None
    ) -> sa.ColumnElement[bool]:
        """`start <= column < end` (None: no such bound), as dates when the column is a date; or
        no date at all (NULL, a MariaDB zero date): no window holds such a row, so each window's
        run reads it and the engine dead-letters it (held, once dead-lettered, until its content
        changes)."""
        if column not in self.table.c:
            raise SourceSchemaError(f"table {self.spec.table!r} has no column {column!r}")
        target = self.table.c[column]
        undated = sa.or_(self._no_date(target), sa.not_(self._within_python(target)))
        compared, bounds = target, [start, end]
        if isinstance(target.type, sa.Date | sa.DateTime) and self.engine.dialect.name == "sqlite":
            # SQLite keeps dates and timestamps as text, written by whoever filled the file
            # ("2021-01-01 00:00:00" in Chinook, with microseconds by SQLAlchemy): compare them
            # normalised. Text SQLite reads as no time ("2021-01-32", "15/01/2025", a number)
            # has no date either: each window's run reads it, for the contract to dead-letter
            # (it was read by none).
            compared = _as_sqlite_reads(target, "%Y-%m-%d %H:%M:%S")
            undated = compared.is_(None)
            bounds = [b and _sqlite_text(b) for b in bounds]
        elif isinstance(target.type, sa.Date):
            bounds = [b and b.date() for b in bounds]
        else:
            bounds = [b and _bound(target, b) for b in bounds]
        low, high = bounds
        dated = sa.and_(
            compared >= low if low is not None else sa.true(),
            compared < high if high is not None else sa.true(),
        )
        return sa.or_(dated, undated)

    def batches(
        self,
        since: datetime | None,
        batch_size: int,
        within: sa.ColumnElement[bool] | None = None,
    ) -> Iterator[pd.DataFrame]:
        """Rows with cursor ≥ `since` (all rows when None or without a cursor) and `within`
        (a partition window), in (cursor, key) order."""
        query = self.select.order_by(*self.order)
        if within is not None:
            query = query.where(within)
        if since is not None and self.cursor is not None:
            query = query.where(self._since(since))
        yield from self._frames(query, batch_size)

    def _since(self, since: datetime) -> sa.ColumnElement[bool]:
        """Cursor ≥ `since`, or no cursor value at all (such a row is read by every run).

        SQLite keeps timestamps as text, and compares them as text: "… 10:00:00" (as
        CURRENT_TIMESTAMP and most writers other than SQLAlchemy store it) sorts before the
        bound's "… 10:00:00.000000", so a row at exactly `since` was never read. The bound is
        the whole second, as text without a fraction: it reads a few rows more, never fewer
        (the ledger skips what is unchanged), and the cursor's index still serves the query."""
        return sa.or_(self._from(since), self._no_date(self.cursor))

    def _from(self, since: datetime) -> sa.ColumnElement[bool]:
        """Cursor ≥ `since`. On SQLite, also a time written with a UTC offset west of Greenwich:
        "… 09:00:00-05:00" is 14:00 UTC, yet sorts as text before a bound of 11:55, and was
        never read. The index's range starts a day early (no zone is a day off UTC); within it,
        SQLite's `datetime()` reads such a time as the instant it is."""
        bound = self._compared(since)
        if not self._text_times:
            return self.cursor >= bound
        early = _sqlite_text(looked_back(as_utc(since), timedelta(days=1)))
        return sa.and_(
            self.cursor >= sa.literal(early, sa.String),
            sa.or_(self.cursor >= bound, sa.func.datetime(self.cursor) >= bound),
        )

    @property
    def _text_times(self) -> bool:
        """Whether the cursor is a time SQLite keeps as text (and compares as text)."""
        return self.engine.dialect.name == "sqlite" and isinstance(self.cursor.type, sa.DateTime)

    def _within_python(self, column: sa.Column) -> sa.ColumnElement[bool]:
        """A PostgreSQL date or time Python can hold: not ±infinity, nor a year past 9999 or
        before Christ. Those are read as text (see `_times_beyond_python_as_text`); no window
        holds them (each window's run reads them, for the contract to dead-letter), and they
        are no mark for the sensor (a query's own read of one failed)."""
        if self.engine.dialect.name != "postgresql" or not isinstance(
            column.type, sa.Date | sa.DateTime
        ):
            return sa.true()
        if isinstance(column.type, sa.DateTime):
            return column.between(_bound(column, datetime.min), _bound(column, datetime.max))
        return column.between(date.min, date.max)

    def _no_date(self, column: sa.Column) -> sa.ColumnElement[bool]:
        """`column` holds no date: NULL, or MariaDB's zero date ('0000-00-00', a legacy
        schema's placeholder in a NOT NULL column, before every real date)."""
        undated = [column.is_(None)] if column.nullable else []
        if self._zero_dates and isinstance(column.type, sa.Date | sa.DateTime):
            undated.append(column < BEFORE_EVERY_DATE)
        return sa.or_(*undated) if undated else sa.false()

    def _before(self, moment: datetime) -> sa.ColumnElement[bool]:
        """Cursor ≤ `moment` (to the second, on SQLite)."""
        return self.cursor <= self._compared(moment)

    def _compared(self, moment: datetime) -> object:
        """`moment` as the cursor compares with it: on SQLite, the whole second as text."""
        if self._text_times:
            return sa.literal(_sqlite_text(as_utc(moment)), sa.String)
        return _bound(self.cursor, moment)

    def rows_with_keys(self, keys: Sequence[object], batch_size: int) -> Iterator[pd.DataFrame]:
        """The rows with these keys (a repair), in (cursor, key) order within each batch. A
        PostgreSQL domain's keys are its base type's; a key column whose type has no Python type
        (inet, a SQLite column declared without one) is given the keys' text, bound as the
        column's type for the database to read (they were all dropped, and nothing repaired)."""
        key_type = getattr(self.key.type, "data_type", self.key.type)  # a domain's base type
        try:
            native_type = key_type.python_type
        except NotImplementedError:
            native_type = object
        native = []
        for key in keys:
            try:
                native.append(key if native_type is object else native_type(key))
            except (TypeError, ValueError):
                continue  # a key of the wrong type names no row of this table
            if native_type is object and _whole_number(key):
                # A SQLite column without a type keeps 1 as a number, which the text '1' does
                # not match: such a row was taken for gone (replayed as deleted, archived).
                native.append(int(key))
        for start in range(0, len(native), batch_size):
            chunk = sa.bindparam(
                "keys", native[start : start + batch_size], expanding=True, type_=key_type
            )
            wanted = sa.type_coerce(self.key, key_type).in_(chunk)
            yield from self._frames(self.select.where(wanted).order_by(*self.order), batch_size)

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        """A connection to read with. SQLite keeps whatever bytes a program wrote as TEXT, and
        Python's sqlite3 failed the whole read on text that is not UTF-8 (Latin-1, say), on
        every run, with the text in its message. Such bytes are kept, as lone surrogates
        (surrogateescape) rather than replaced by U+FFFD, which would write the damaged text on
        as if it were the source's: the contract refuses text holding them, so the row is
        dead-lettered, its payload keeping the original bytes for a replay once it is fixed.

        A MariaDB TIMESTAMP is read and compared in UTC, whatever zone the URL chose: read in
        that zone, its wall time was taken for UTC (a watermark hours off, and a change after
        the clocks went back fell before it and was never read).

        A read the database refuses (a lost database is SourceUnavailable already) is
        SourceReadFailed, which says why without the SQL, its parameters or the values the
        driver quotes: SQLAlchemy's error repeated a row's value that a view failed to cast
        (an email as a number) into the run's failure. It is raised from none of them."""
        try:
            with self.engine.connect() as connection:
                if connection.dialect.name != "sqlite":
                    columns = [column for table in self._tables_read for column in table.columns]
                    with timestamps_in_utc(connection, columns):
                        yield connection
                    return
                driver = connection.connection.driver_connection
                decode, driver.text_factory = driver.text_factory, _BYTES_KEPT
                try:
                    yield connection
                finally:
                    driver.text_factory = decode
        except sa.exc.DBAPIError as error:
            raise SourceReadFailed(self._refused(error)) from None

    def _refused(self, error: sa.exc.DBAPIError) -> str:
        sqlstate = getattr(error.orig, "sqlstate", None)
        code = f" (SQLSTATE {sqlstate})" if sqlstate else ""
        return (
            f"the source database refused a read of {self.spec.table}: "
            f"{driver_complaint(error.orig)}{code}"
        )

    def _frames(self, query: sa.Select, batch_size: int) -> Iterator[pd.DataFrame]:
        """The rows of `query`, streamed, as frames of `batch_size` rows (none when empty)."""
        arrow = self._arrow and self._arrow.frames(query, batch_size, self.columns)
        if arrow:
            yield from self._arrow_frames(arrow, batch_size)
            return
        yield from self._classic_frames(query, batch_size)

    @functools.cached_property
    def _arrow(self) -> ArrowRead | None:
        """The reads through Arrow (see integrations/sql/arrow_reads.py), when the table's
        columns (its lookups' and totals' too) all come through it as they would without."""
        if not (self._through_arrow and arrow_readable(self.engine)):
            return None
        arrow = ArrowRead(self.engine, self.spec.table)
        try:
            return arrow if arrow.holds(self.select) else None
        except SourceReadFailed:  # a type the driver cannot describe: the classic read may
            return None

    def _arrow_frames(self, frames: Iterator, batch_size: int) -> Iterator[pd.DataFrame]:
        for frame in frames:
            if isinstance(frame, pd.DataFrame):
                yield frame
                continue
            # A time Python cannot hold: these rows again, read the classic way, which keeps it
            # as PostgreSQL's text for the contract to dead-letter.
            keys = frame.column(self.spec.key).to_pylist()
            again = self.select.where(self.key.in_(keys)).order_by(*self.order)
            yield from self._classic_frames(again, batch_size)

    def _classic_frames(self, query: sa.Select, batch_size: int) -> Iterator[pd.DataFrame]:
        with self._reading() as connection:
            if connection.dialect.driver == "psycopg":
                yield from self._psycopg_frames(connection, query, batch_size)
                return
            result = connection.execution_options(
                stream_results=True, yield_per=batch_size
            ).execute(query)
            for rows in result.partitions(batch_size):
                yield self._frame(rows)

    def _psycopg_frames(
        self, connection: sa.Connection, query: sa.Select, batch_size: int
    ) -> Iterator[pd.DataFrame]:
        """Frames of what SQLAlchemy's rows would be, from psycopg's tuples."""
        connection.execute(_DeclareCursor(EXTRACT_CURSOR, query))
        # A batch per FETCH, its rows made by the driver in C (a stream yields them one by one).
        fetch = f"FETCH FORWARD {int(batch_size)} FROM {EXTRACT_CURSOR}"
        processors = None
        with connection.connection.driver_connection.cursor() as cursor:
            _times_beyond_python_as_text(cursor.adapters)
            while True:
                try:
                    rows = cursor.execute(fetch).fetchall()
                except connection.dialect.loaded_dbapi.Error as error:
                    # What SQLAlchemy does when a fetch of its own fails: the engine's
                    # handle_error listeners (a lost connection is SourceUnavailable),
                    # invalidating a dropped connection, wrapping the driver's error.
                    connection._handle_dbapi_exception(error, fetch, None, cursor, None)
                if not rows:
                    return
                if processors is None:
                    processors = _result_processors(connection.dialect, query, cursor.description)
                if any(processors):
                    rows = [_processed(row, processors) for row in rows]
                yield self._frame(rows)

    def _frame(self, rows: Sequence[Sequence]) -> pd.DataFrame:
        """The rows as a frame; integer columns keep their exact values, with or without nulls."""
        frame = pd.DataFrame.from_records(rows, columns=self.columns)
        dtypes = frame.dtypes
        if self.cursor is not None:  # a SQLite column without a type of times may hold numbers
            self._no_numbers(frame[self.spec.cursor])
        for name in self._zero_dates_as_null:
            values = frame[name]
            if values.dtype == object:  # but a partial date ('2025-03-00') is a date still
                zero = values.map(lambda value: isinstance(value, str) and value < "0001")
                frame[name] = values.where(~zero, None).infer_objects()
        for at in self._integers:
            # A NULL makes pandas store the column as float64: values beyond 2**53 rounded, and
            # 12345 becomes "12345.0" as text. Rebuilt from the rows, only in such a batch.
            if dtypes.iloc[at].kind == "f":
                frame.isetitem(at, _exact_integers([row[at] for row in rows]))
        for at in self._floats:
            # float64 has one NaN for NULL and for PostgreSQL's 'NaN': told apart, only in a
            # batch holding both kinds of NaN, for the contract to refuse the value NaN.
            if dtypes.iloc[at].kind == "f" and frame.iloc[:, at].hasnans:
                frame.isetitem(at, _nan_apart_from_null([row[at] for row in rows]))
        return frame

    def _no_numbers(self, cursor: pd.Series) -> None:
        """Refuse cursor values that are numbers (SQLite keeps what it is given)."""
        if cursor.dtype.kind in "iuf" and cursor.notna().any():
            raise SourceSchemaError(self._numbers_as_cursor(cursor.dtype))
        if cursor.dtype == object:
            number = next((value for value in cursor if _is_number(value)), None)
            if number is not None:
                raise SourceSchemaError(self._numbers_as_cursor(type(number).__name__))

    def deleted_keys(
        self, since: datetime | None, within: sa.ColumnElement[bool] | None = None
    ) -> list[object]:
        """Keys of soft-deleted rows with cursor ≥ `since` and `within` (a partition window):
        what a run would archive at most."""
        if not self.spec.deleted:
            return []
        deleted = self.table.c[self.spec.deleted]
        query = sa.select(self.key).where(deleted.is_not(None))
        if deleted.name in self._zero_dates_as_null:
            query = query.where(deleted >= BEFORE_EVERY_DATE)  # a zero date: never deleted
        if within is not None:
            query = query.where(within)
        if since is not None and self.cursor is not None:
            query = query.where(self._since(since))
        with self._reading() as connection:
            return list(connection.execute(query).scalars())

    def change_counter(self, high_water_mark: datetime) -> int | None:
        """A fingerprint of the table's own columns in the rows at the high-water mark's second:
        a cursor kept in whole seconds (MariaDB's DATETIME, PostgreSQL's timestamp(0), SQLite's
        text of seconds, a DATE) keeps a row changed again within that second, or moved into
        it, at the mark, which then tells the sensor nothing. A row count and the greatest key
        there miss a row changed twice; the rows' values move with every change but one undone
        within the second (which leaves nothing to sync, unless a run read between). One query
        on the cursor's index, of the rows at that second, the first SAME_SECOND_ROWS by key:
        a change past those in a bulk stamp waits for the next change or the schedule. None
        for a mark with a fraction: such a cursor tells two changes apart by their values."""
        if self.cursor is None or high_water_mark.microsecond:
            return None
        # Each value as the database writes it as text: no driver reads a time it cannot hold
        # (PostgreSQL's 'infinity' in any column failed the tick).
        query = (
            sa.select(*(sa.cast(column, sa.String) for column in self.table.c))
            .where(self._at_second(high_water_mark))
            .order_by(self.key)
            .limit(SAME_SECOND_ROWS)
        )
        with self._reading() as connection:
            rows = connection.execute(query).all()
        digest = hashlib.sha256(repr([tuple(row) for row in rows]).encode("utf-8", "replace"))
        return int.from_bytes(digest.digest()[:8])

    def _at_second(self, moment: datetime) -> sa.ColumnElement[bool]:
        """Cursor within `moment`'s second (on its day, for a cursor of days). SQLite's text
        times are read as the instants they are (a UTC offset, a "T"), within a text range of
        a day either side, which the cursor's index serves."""
        if not isinstance(self.cursor.type, sa.DateTime):
            return self.cursor == moment.date()
        if not self._text_times:
            return sa.and_(
                self.cursor >= self._compared(moment),
                self.cursor < self._compared(moment + timedelta(seconds=1)),
            )
        day = timedelta(days=1)
        return sa.and_(
            self.cursor >= sa.literal(_sqlite_text(looked_back(as_utc(moment), day)), sa.String),
            self.cursor < sa.literal(_sqlite_text(as_utc(moment) + 2 * day), sa.String),
            _as_sqlite_reads(self.cursor, "%Y-%m-%d %H:%M:%S") == _sqlite_text(as_utc(moment)),
        )

    def high_water_mark(self) -> datetime | None:
        """The newest cursor value in the table: the sensor's cheap 'did anything change?'
        (None for an empty table or one without a cursor)."""
        if self.cursor is None:
            return None
        latest = datetime.now(UTC) + FAR_FUTURE  # a cursor in 2099 would blind the sensor
        if self._text_times:
            # Text times compared as text: "…-02T09:00" sorts after "…-02 23:00". Normalised to
            # the millisecond, as SQLite reads them (what it reads as no time is left out).
            normalised = _as_sqlite_reads(self.cursor, "%Y-%m-%d %H:%M:%f")
            query = sa.select(sa.func.max(normalised)).where(
                normalised <= as_utc(latest).strftime("%Y-%m-%d %H:%M:%S.999")
            )
            with self._reading() as connection:
                newest = connection.execute(query).scalar_one()
            return datetime.fromisoformat(newest) if newest else None
        query = sa.select(sa.func.max(self.cursor))
        if isinstance(self.cursor.type, sa.DateTime):
            query = query.where(self._before(latest))
        if self.engine.dialect.name == "postgresql":
            query = query.where(self._within_python(self.cursor))
        with self._reading() as connection:
            newest = connection.execute(query).scalar_one()
        if isinstance(newest, datetime):
            return as_utc(newest)
        if isinstance(newest, date):  # a cursor of days: its start, compared with watermarks
            return datetime.combine(newest, time())
        return None  # all zero dates: no mark

    def changed_days(self, since: datetime, column: str) -> list[date]:
        """The days of `column` (a partitioned flow's business date) of the rows whose cursor is
        ≥ `since` (but those FAR_FUTURE past now): the partitions a change since reached, in
        order. A day is the UTC day, as a partition's window is; a row without a cursor value or
        a date names no day (none at all without a cursor)."""
        if self.cursor is None:
            return []
        if column not in self.table.c:
            raise SourceSchemaError(f"table {self.spec.table!r} has no column {column!r}")
        day = self._day_of(self.table.c[column])
        query = (
            sa.select(day)
            .distinct()
            .where(
                self._from(since),
                self._before(datetime.now(UTC) + FAR_FUTURE),
                self._within_python(self.cursor),
                self._within_python(self.table.c[column]),
                sa.not_(self._no_date(self.table.c[column])),  # a MariaDB zero date: no day
                day.is_not(None),
            )
        )
        with self._reading() as connection:
            days = connection.execute(query).scalars().all()
        return sorted({_a_date(value) for value in days})

    def _day_of(self, target: sa.Column) -> sa.ColumnElement:
        """The UTC day of a date or time column, computed by the database (one row per day)."""
        if self.engine.dialect.name == "sqlite":
            # Text, normalised as in_window reads it; text SQLite reads as no date is NULL.
            return _as_sqlite_reads(target, "%Y-%m-%d")
        if isinstance(target.type, sa.Date):
            return target
        if getattr(target.type, "timezone", False) and self.engine.dialect.name == "postgresql":
            return sa.cast(sa.func.timezone("UTC", target), sa.Date)
        return sa.cast(target, sa.Date)


def _a_date(value: object) -> date:
    """The day the database gave, as a date or as text. A MariaDB partial date ('2025-03-00',
    '2025-00-00', a legacy schema's) has no day of its own: it is the day MariaDB sorts it
    after, whose window reads it (read as a day, it failed the sensor's every tick)."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    year, month, day = map(int, str(value)[:10].split("-"))
    if month == 0:
        return date(year - 1, 12, 31)
    if day == 0:
        return date(year, month, 1) - timedelta(days=1)
    return date(year, month, day)


class _LenientTimes(sa.types.TypeDecorator):
    """A SQLite date or time column read as SQLAlchemy reads it, but for a value that is no
    time (SQLite keeps whatever it is given: "2025-02-30", a number): that is passed on as it
    is, for the contract to dead-letter its row, instead of failing the whole read."""

    impl = sa.types.NullType
    cache_ok = True

    def __init__(self, kind: sa.types.TypeEngine):
        super().__init__()
        self.kind = kind

    def result_processor(self, dialect: sa.Dialect, coltype: object):
        parse = self.kind.dialect_impl(dialect).result_processor(dialect, coltype)
        if parse is None:
            return None

        def lenient(value: object) -> object:
            try:
                return parse(value)
            except (ValueError, TypeError):
                return value

        return lenient


def _as_sqlite_reads(column: sa.ColumnElement, form: str) -> sa.ColumnElement[str]:
    """`strftime(form, column)`: SQLite's reading of a text time, NULL for text that is no time.
    SQLite keeps a day past its month's end ("2025-02-30") as written, which Python holds no
    time for (the sensors' mark and days failed on it, every tick); read with a modifier, it is
    carried into the next month, so such text is the one whose two readings differ."""
    read = sa.func.strftime(form, column, type_=sa.String)
    return sa.case((read == sa.func.strftime(form, column, "+0 days"), read))


def _lenient_times(column: sa.Column) -> sa.ColumnElement:
    if not isinstance(column.type, sa.Date | sa.DateTime | sa.Time):
        return column
    return sa.type_coerce(column, _LenientTimes(column.type)).label(column.name)


# PostgreSQL's dates and timestamps Python has no value for: 'infinity' and '-infinity' (the
# idiomatic "valid forever"), years past 9999 or before Christ.
_TIME_TYPES = ("date", "timestamp", "timestamptz")


def _times_beyond_python_as_text(adapters: psycopg.adapt.AdaptersMap) -> None:
    """Read the times Python cannot hold as PostgreSQL's text of them ('infinity'), not as a
    DataError that failed the whole read on every run. Such text is no time: a contract that
    takes the column as a date or time dead-letters its row, a mapping that ignores the column
    passes it, and as a cursor it moves no watermark (the engine skips what is no time)."""
    for name in _TIME_TYPES:
        oid = adapters.types[name].oid
        adapters.register_loader(oid, _as_text_beyond_python(adapters.get_loader(oid, Format.TEXT)))


@functools.cache
def _as_text_beyond_python(loader: type[psycopg.adapt.Loader]) -> type[psycopg.adapt.Loader]:
    """`loader` (psycopg's own, in C: it cannot be subclassed), but for the text it refuses."""

    class TextBeyondPython(psycopg.adapt.Loader):
        def __init__(self, oid: int, context: psycopg.adapt.AdaptContext | None = None):
            super().__init__(oid, context)
            self.parse = loader(oid, context).load

        def load(self, data: bytes) -> object:
            try:
                return self.parse(data)
            except psycopg.DataError:
                return bytes(data).decode()

    return TextBeyondPython


# SQLite text as str, bytes that are not UTF-8 kept as lone surrogates (C only, no Python call).
_BYTES_KEPT = functools.partial(str, encoding="utf-8", errors="surrogateescape")

# Below every date MariaDB reads, above its zero dates.
BEFORE_EVERY_DATE = datetime(1, 1, 1)


def _whole_number(key: object) -> bool:
    text = str(key)
    return text.lstrip("-").isdecimal() and str(int(text)) == text


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _sqlite_text(moment: datetime) -> str:
    """A time as SQLite keeps it as text, to the second, its wall time (strftime's %Y left year
    1 unpadded, "1-01-01", which sorts after every padded time: a bound that read nothing)."""
    return moment.replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


def as_utc(moment: datetime) -> datetime:
    """`moment` as UTC wall-clock time without a zone (a naive one is taken as UTC already)."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def _bound(column: sa.ColumnElement, moment: datetime) -> datetime:
    """`moment` as the column compares it: an instant (UTC) for a zoned timestamp column, UTC
    wall-clock time for any other."""
    zoned = isinstance(column.type, sa.DateTime) and column.type.timezone
    return as_utc(moment).replace(tzinfo=UTC) if zoned else as_utc(moment)


def _document_text(column: sa.Column) -> sa.ColumnElement:
    """A JSON or array column as the server's JSON text: the drivers gave dicts and lists,
    which reached a destination's text field as Python's repr ({'a': None}), not JSON; and the
    server's text keeps a numeric's digits and writes NaN as a string (Python's own encoding
    made numbers of a numeric[] strings, and NaN no JSON at all)."""
    if isinstance(column.type, sa.ARRAY):
        return sa.cast(sa.func.array_to_json(column), sa.Text).label(column.name)
    if isinstance(column.type, sa.JSON):
        return sa.cast(column, sa.Text).label(column.name)
    return column


def _exact_integers(values: list) -> pd.api.extensions.ExtensionArray | np.ndarray:
    """Integers and nulls as pandas' nullable Int64; beyond int64 (BIGINT UNSIGNED), or not all
    integers (SQLite keeps a fractional REAL as it is given), as the Python values themselves."""
    try:
        return pd.array(values, dtype="Int64")
    except (TypeError, ValueError, OverflowError):
        exact = np.empty(len(values), dtype=object)
        exact[:] = values
        return exact


def _nan_apart_from_null(values: list) -> pd.api.extensions.ExtensionArray | np.ndarray:
    """Floats and nulls as float64; when some value is NaN itself, as pandas' nullable Float64,
    whose NA (a NULL) is no NaN (the value)."""
    numbers = np.array(values, dtype="float64")  # None becomes NaN
    nulls = np.fromiter((value is None for value in values), bool, len(values))
    if (np.isnan(numbers) == nulls).all():
        return numbers
    return pd.arrays.FloatingArray(numbers, nulls)


def _result_processors(dialect: sa.Dialect, query: sa.Select, description) -> list:
    """SQLAlchemy's conversions of the driver's values, per column (None for most types; ranges,
    for one, become SQLAlchemy's `Range`): what it would apply to these rows."""
    return [
        column.type.dialect_impl(dialect).result_processor(dialect, described.type_code)
        for column, described in zip(query.selected_columns, description, strict=True)
    ]


def _processed(row: tuple, processors: list) -> tuple:
    return tuple(
        value if process is None else process(value)
        for process, value in zip(processors, row, strict=True)
    )
