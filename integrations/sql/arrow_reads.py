"""A PostgreSQL read as Arrow: ADBC's driver runs the query as a binary `COPY … TO STDOUT` and
decodes the rows in C++, without a Python object per value until a frame needs one (strings).
It cost under half the CPU of psycopg's tuples made into a frame, and a full sync's reader held
the GIL, which every other stage waits for, through most of that.

It serves a query whose every column Arrow holds as psycopg's values would become in a frame:
integers, text, booleans, dates, times without a zone and (in a session in UTC) with one,
doubles, and numerics (the driver's text of each, made a Decimal as psycopg makes PostgreSQL's
own). Any other (a real, a range, an array, a uuid), or a query SQLAlchemy cannot write out
with its values, is read the classic way (see integrations/sql/source.py). So is a
batch holding a time Python cannot hold (±infinity, a year past 9999 or before Christ): the
classic read keeps those as PostgreSQL's text, for the contract to dead-letter; ADBC's driver
gives no such value.

The read runs on a connection of its own, outside SQLAlchemy's pool: one statement, so one
snapshot, as the classic read's one transaction is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import adbc_driver_manager
import adbc_driver_postgresql.dbapi as adbc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from psycopg.conninfo import make_conninfo
from psycopg.errors import lookup

from integrations.engine.source import SourceReadFailed, SourceUnavailable
from integrations.sql.connect import (
    postgresql_unavailable,
    redacted,
    without_values,
    zone_given,
)

# Arrow batches of about a megabyte, cut into frames: its default (16 MB) held about 40 MB more
# at the peak of a 1M-row read, at the same speed.
_BATCH_BYTES = "adbc.postgresql.batch_size_hint_bytes"
_EPOCH = datetime(1970, 1, 1)
# The microseconds since 1970 of the times Python holds, and of those pandas holds in nanoseconds.
_PYTHON_RANGE = (
    (datetime.min - _EPOCH) // timedelta(microseconds=1),
    (datetime.max - _EPOCH) // timedelta(microseconds=1),
)
_NANOSECOND_RANGE = (pd.Timestamp.min.value // 1000 + 1, pd.Timestamp.max.value // 1000)
_DATE_RANGE = (
    (date.min - _EPOCH.date()).days,
    (date.max - _EPOCH.date()).days,
)
_INTEGERS = (pa.int16(), pa.int32(), pa.int64())
_TEXT = (pa.string(), pa.large_string())


def arrow_readable(engine: sa.Engine) -> bool:
    """Whether `engine` reads PostgreSQL through psycopg, the reads this module stands in for."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


class ArrowRead:
    """Reads of one SQLAlchemy engine's PostgreSQL through ADBC, on connections of its own."""

    def __init__(self, engine: sa.Engine, what: str):
        self.url = engine.url
        self.dialect = engine.dialect
        self.what = what
        _, arguments = engine.dialect.create_connect_args(engine.url)
        # What psycopg connects with (the URL's libpq options too), as libpq's key=value text.
        self._conninfo = make_conninfo(
            "", **{name: value for name, value in arguments.items() if isinstance(value, str | int)}
        )
        self._in_utc = not zone_given(engine)  # as create_engine's sessions

    def holds(self, query: sa.Select) -> bool:
        """Whether each of the query's columns comes as the classic read would give it (its
        result's schema, from the server, without running it)."""
        sql = _written_out(query, self.dialect)
        if sql is None:
            return False
        with self._reading() as cursor:
            schema = cursor.adbc_execute_schema(sql)
        return all(_held(field.type, self._in_utc) for field in schema)

    def frames(
        self, query: sa.Select, batch_size: int, names: list[str]
    ) -> Iterator[pd.DataFrame | pa.Table] | None:
        """The query's rows as frames of `batch_size` rows, their columns named `names`; a
        batch holding a time Python cannot hold as its Arrow table, for the caller to read
        again. None when SQLAlchemy cannot write a value of the query into its SQL."""
        sql = _written_out(query, self.dialect)
        return None if sql is None else self._frames(sql, batch_size, names)

    def _frames(self, sql: str, batch_size: int, names: list[str]) -> Iterator:
        with self._reading() as cursor:
            cursor.adbc_statement.set_options(**{_BATCH_BYTES: str(1 << 20)})
            cursor.execute(sql)
            with closing(_stream(cursor)) as reader:
                for table in _rechunked(reader, batch_size):
                    table = table.rename_columns(names)
                    yield _frame(table) if _within_python(table) else table

    @contextmanager
    def _reading(self) -> Iterator[adbc.Cursor]:
        """A cursor on a connection of its own; the driver's errors as the source's: a lost
        server is SourceUnavailable, any other refusal SourceReadFailed, neither quoting the
        SQL (its values) nor the values the server quotes."""
        try:
            with closing(adbc.connect(self._conninfo)) as link, closing(link.cursor()) as cursor:
                if self._in_utc:
                    cursor.execute("SET TIME ZONE 'UTC'")
                yield cursor
        except adbc_driver_manager.Error as error:
            sqlstate = getattr(error, "sqlstate", None) or ""
            if sqlstate:
                lost = postgresql_unavailable(sqlstate)
            else:  # a connection refused, closed or reset
                lost = isinstance(error, adbc_driver_manager.OperationalError)
            raise self._failed(_complaint(error, sqlstate), sqlstate, lost) from None
        except OSError as error:  # a stream's ADBC could not tell: libpq's message alone
            raise self._failed(_complaint(error), "", _lost_in_stream(str(error))) from None

    def _failed(self, complaint: str, sqlstate: str, lost: bool) -> Exception:
        if lost:
            return SourceUnavailable(
                f"the source database of {self.what} ({redacted(str(self.url))}) failed: "
                f"{complaint}"
            )
        code = f" (SQLSTATE {sqlstate})" if sqlstate else ""
        return SourceReadFailed(
            f"the source database refused a read of {self.what}: {complaint}{code}"
        )


def _stream(cursor: adbc.Cursor) -> pa.RecordBatchReader:
    """The cursor's result as ADBC's own reader (what its `fetch_record_batch` unwraps): a
    refusal mid-stream (a statement timeout, a cancel, a standby's recovery conflict) is then
    the driver's error, with its SQLSTATE, not pyarrow's OSError with libpq's words alone."""
    return cursor._results.reader


def _lost_in_stream(message: str) -> bool:
    """Whether libpq's message of a stream that failed says the server was lost (a FATAL
    error ends the session; a connection closed or reset), not that it refused the query."""
    return "FATAL:" in message or "ERROR:" not in message


def _complaint(error: Exception, sqlstate: str = "") -> str:
    """The server's complaint, its first line without ADBC's and libpq's prefixes, the values
    it quotes masked, after the name of its condition (as psycopg's error class names it)."""
    line = (str(error).strip().splitlines() or [""])[0]
    for marker in ("ERROR:", "FATAL:"):
        if marker in line:
            line = line.rsplit(marker, 1)[1].strip()
            break
    try:
        return f"{lookup(sqlstate).__name__}: {without_values(line)}"
    except KeyError:  # no SQLSTATE (a stream's error), or one psycopg does not know
        return without_values(line)


def _written_out(query: sa.Select, dialect: sa.Dialect) -> str | None:
    """The query's SQL with its values written in by SQLAlchemy's own literal rendering, or
    None for a value it cannot write (the classic read binds it)."""
    try:
        compiled = query.compile(
            dialect=dialect, compile_kwargs={"literal_binds": True, "render_postcompile": True}
        )
    except (sa.exc.CompileError, NotImplementedError):
        return None
    return str(compiled)


def _held(kind: pa.DataType, in_utc: bool) -> bool:
    """Whether the classic read's frame holds the type's values as Arrow does. A timestamptz
    only in a session in UTC: the classic read gives its instants in the session's zone, the
    driver in UTC whatever the zone."""
    return (
        kind in _INTEGERS
        or _numeric(kind)
        or kind in _TEXT
        or kind == pa.float64()  # a real's float32 is no text's digits (0.1)
        or kind == pa.bool_()
        or kind == pa.date32()
        or (
            pa.types.is_timestamp(kind)
            and kind.unit == "us"
            and (kind.tz is None or (in_utc and kind.tz == "UTC"))
        )
    )


def _numeric(kind: pa.DataType) -> bool:
    """PostgreSQL's numeric, as the driver gives it: an opaque type over the value's text."""
    return isinstance(kind, pa.OpaqueType) and kind.type_name == "numeric"


def _decimals(values: pa.ChunkedArray) -> np.ndarray:
    """A numeric column's values as Decimals (None for NULL). The driver writes each value's
    digits as PostgreSQL does, its scale's zeros too ("10.50"), but for NaN and ±Infinity
    ("nan", "inf"), which Decimal reads alike."""
    texts = pa.chunked_array([chunk.storage for chunk in values.chunks], pa.string())
    decimals = np.full(len(texts), None, dtype=object)
    decimals[texts.is_valid().to_numpy(zero_copy_only=False)] = list(
        map(Decimal, texts.drop_null().to_pylist())
    )
    return decimals


def _rechunked(reader: pa.RecordBatchReader, size: int) -> Iterator[pa.Table]:
    """The reader's rows as tables of `size` rows (the last one fewer), none when empty."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        pending.append(batch)
        count += batch.num_rows
        while count >= size:
            table = pa.Table.from_batches(pending, reader.schema)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending, reader.schema)


def _bounds(values: pa.ChunkedArray, as_int: pa.DataType) -> tuple[int, int] | None:
    extremes = pc.min_max(values.cast(as_int))
    low, high = extremes["min"].as_py(), extremes["max"].as_py()
    return None if low is None else (low, high)


def _within(bounds: tuple[int, int] | None, limits: tuple[int, int]) -> bool:
    return bounds is None or (limits[0] <= bounds[0] and bounds[1] <= limits[1])


def _within_python(table: pa.Table) -> bool:
    """Whether each of the table's dates and times is one Python holds. ADBC gives ±infinity
    and years past 9999 or before Christ as microseconds (or days) Python has no time for."""
    for values in table.columns:
        if pa.types.is_timestamp(values.type):
            if not _within(_bounds(values, pa.int64()), _PYTHON_RANGE):
                return False
        elif values.type == pa.date32() and not _within(_bounds(values, pa.int32()), _DATE_RANGE):
            return False
    return True


def _frame(table: pa.Table) -> pd.DataFrame:
    """The table as the classic read's frame: integers int64 (Int64 with nulls), text, dates
    and numerics (Decimals) as Python objects, times in nanoseconds (Python's datetimes beyond
    them), floats float64 (Float64 when one is the value NaN, kept apart from NULL), booleans
    bool (objects with nulls), and a column of nulls alone as None. The columns pandas' own
    conversion of the table gets right go through it at once (a third of the time, column by
    column)."""
    odd = {at: _odd(values) for at, values in enumerate(table.columns)}
    odd = {at: column for at, column in odd.items() if column is not None}
    plain = table.select([at for at in range(table.num_columns) if at not in odd])
    wider = [
        field.with_type(pa.int64()) if field.type in _INTEGERS else field for field in plain.schema
    ]
    frame = plain.cast(pa.schema(wider)).to_pandas(
        deduplicate_objects=False, coerce_temporal_nanoseconds=True
    )
    for at, column in sorted(odd.items()):
        frame.insert(at, table.column_names[at], column)
    return frame


def _odd(values: pa.ChunkedArray) -> object | None:
    """The column as the classic read has it, where pandas' conversion of the table differs
    (None where it does not)."""
    kind = values.type
    if values.null_count == len(values):
        return np.full(len(values), None, dtype=object)
    if _numeric(kind):
        return _decimals(values)
    if kind in _INTEGERS and values.null_count:
        return (
            values.cast(pa.int64()).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).array
        )
    if kind == pa.float64() and pc.any(pc.is_nan(values)).as_py():
        return pd.arrays.FloatingArray(values.to_numpy(), values.is_null().to_numpy())
    if pa.types.is_timestamp(kind) and not _within(_bounds(values, pa.int64()), _NANOSECOND_RANGE):
        moments = values.to_pandas(timestamp_as_object=True).to_numpy()
        if kind.tz is None:
            return moments
        # psycopg's instants are in datetime's own UTC (Arrow's: a zoneinfo of that name)
        return np.array([m and m.replace(tzinfo=UTC) for m in moments], dtype=object)
    return None
