"""PostgreSQL reads through Arrow (ADBC) give the frames the classic read (psycopg) gives."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import psycopg
import pytest
from pandas.testing import assert_frame_equal

from integrations.engine.spec import SourceTable
from integrations.sql.connect import create_engine
from integrations.sql.source import SourceReadFailed, SourceUnavailable, SqlSource
from tests.conftest import POSTGRES_ADMIN

pytestmark = pytest.mark.postgres

# Every kind of column the Arrow read serves, with NULLs, NaN beside NULL, times past pandas'
# nanoseconds (a sentinel 9999-12-31, a year 1500) that Python still holds, and numerics with
# their scale's zeros, NaN and ±Infinity, beyond a double's digits and a Decimal's exponent.
HELD = """
CREATE TABLE held (
    id int PRIMARY KEY, updated_at timestamp NOT NULL, small smallint, whole int, big bigint,
    double double precision, flag boolean, note text, code varchar(8), grade char(3),
    day date, moment timestamp, amount numeric(12, 2), exact numeric, instant timestamptz
);
INSERT INTO held
SELECT n, timestamp '2024-01-01' + n * interval '1 hour',
       CASE WHEN n % 3 > 0 THEN n END, CASE WHEN n > 4 THEN -n END, 9223372036854775807 - n,
       CASE n % 4 WHEN 0 THEN NULL WHEN 1 THEN 'NaN' WHEN 2 THEN 'Infinity' ELSE n / 7.0 END,
       CASE WHEN n % 5 > 0 THEN n % 2 = 0 END, CASE WHEN n > 2 THEN 'it''s é ' || n END,
       CASE WHEN n % 2 = 0 THEN 'c' || n END, CASE WHEN n > 1 THEN 'x' END,
       CASE WHEN n % 3 = 0 THEN date '0001-01-01' + n WHEN n % 3 = 1 THEN date '2024-02-29' END,
       CASE n WHEN 7 THEN timestamp '9999-12-31 23:59:59.999999' WHEN 8 THEN '1500-06-01'
              WHEN 1 THEN NULL ELSE timestamp '2024-03-01 01:02:03.456789' + n * interval '1 s'
       END,
       CASE WHEN n % 4 > 0 THEN (n - 6) * 1000.5 END,
       (ARRAY['NaN', 'Infinity', '-Infinity', '0', '0.000', '-10.50', '1e-40', '1e40',
              '123456789012345678901234567890.000000000123456789', NULL, '0.1', '100000000'])[n]
       ::numeric,
       CASE n WHEN 2 THEN timestamptz '9999-12-31 23:59:59.999999+00' WHEN 3 THEN NULL
              WHEN 5 THEN '1500-06-01 12:00+00'
              ELSE timestamptz '2024-03-31 00:30:00.5+01' + n * interval '1 hour' END
FROM generate_series(1, 12) AS n
"""
# Times Python cannot hold: the classic read keeps them as PostgreSQL's text.
BEYOND = """
CREATE TABLE beyond (id int PRIMARY KEY, updated_at timestamp NOT NULL, moment timestamp, day date);
INSERT INTO beyond VALUES
    (1, '2024-01-01', '2024-01-01 10:00', '2024-01-01'),
    (2, '2024-01-02', 'infinity', '-infinity'),
    (3, '2024-01-03', '10000-01-01', '0044-03-15 BC'),
    (4, '2024-01-04', NULL, NULL),
    (5, '2024-01-05', '2024-01-05 10:00', '2024-01-05')
"""


def _database_with(postgres_database, sql: str) -> str:
    """A fresh database, `sql` run in it."""
    url = postgres_database()
    with psycopg.connect(url) as connection:
        connection.execute(sql)
    return url


def _sources(url: str, table: str, key: str = "id") -> tuple[SqlSource, SqlSource]:
    """The table's source read through Arrow, and one read the classic way."""
    engine = create_engine(url)
    spec = SourceTable(table=table, key=key, deleted=None)
    arrow, classic = SqlSource(engine, spec), SqlSource(engine, spec, arrow=False)
    assert arrow._arrow is not None, "every column of the table is one Arrow serves"
    return arrow, classic


def _same_frames(arrow: SqlSource, classic: SqlSource, batch_size: int) -> list[pd.DataFrame]:
    through_arrow = list(arrow.batches(None, batch_size))
    expected = list(classic.batches(None, batch_size))
    assert len(through_arrow) == len(expected)
    for frame, wanted in zip(through_arrow, expected, strict=True):
        assert_frame_equal(frame, wanted, check_exact=True)
        for column in frame.columns:  # objects of the same class: datetime, date, str, None
            assert list(map(type, frame[column])) == list(map(type, wanted[column])), column
            # and the same digits: Decimal("10.5") equals Decimal("10.50"), and NaN no NaN
            assert list(map(repr, frame[column])) == list(map(repr, wanted[column])), column
    return through_arrow


@pytest.mark.parametrize("batch_size", [1, 4, 5, 100])
def test_frames_through_arrow_are_the_classic_reads(postgres_database, batch_size):
    """Batches of nulls alone, of values alone and of both, cut across ADBC's own batches."""
    url = _database_with(postgres_database, HELD)
    frames = _same_frames(*_sources(url, "held"), batch_size)
    assert sum(map(len, frames)) == 12


def test_times_python_cannot_hold_are_read_again_as_text(postgres_database):
    """±infinity, a year past 9999 or before Christ: ADBC gives no such time, so their batch
    is read the classic way, which keeps PostgreSQL's text for the contract to refuse."""
    url = _database_with(postgres_database, BEYOND)
    frames = _same_frames(*_sources(url, "beyond"), 2)
    assert frames[0]["moment"].tolist()[1] == "infinity"
    assert frames[1]["day"].tolist()[0] == "0044-03-15 BC"
    assert frames[2]["moment"].dtype == "datetime64[ns]", "the batches without are Arrow's"


def test_a_column_arrow_does_not_serve_is_read_the_classic_way(postgres_database):
    """A real is the digits of its text (Arrow's float32 of 0.1 is not), and a timestamptz an
    instant in the session's zone where the URL chose one (the driver's are in UTC): such a
    table is read as it was."""
    url = postgres_database()
    with psycopg.connect(url) as connection:
        for kind in ("real", "timestamptz"):
            connection.execute(
                f"CREATE TABLE {kind} (id int PRIMARY KEY, updated_at timestamp, v {kind})"
            )
    zoned = create_engine(f"{url}?options=-c%20timezone%3DEurope/Paris")
    for engine, table in ((create_engine(url), "real"), (zoned, "timestamptz")):
        source = SqlSource(engine, SourceTable(table=table, key="id", deleted=None))
        assert source._arrow is None, table
    in_utc = SqlSource(create_engine(url), SourceTable(table="timestamptz", key="id", deleted=None))
    assert in_utc._arrow is not None


def test_a_key_with_a_quote_is_found_through_arrow(postgres_database):
    """The keys of a repair are written into the SQL by SQLAlchemy's literal rendering."""
    url = _database_with(
        postgres_database,
        "CREATE TABLE quoted (id text PRIMARY KEY, updated_at timestamp);"
        "INSERT INTO quoted VALUES ('O''Brien', now()), ('back\\slash', now()), ('x', now())",
    )
    arrow, _ = _sources(url, "quoted")
    (frame,) = arrow.rows_with_keys(["O'Brien", "back\\slash", "not a key"], 10)
    assert sorted(frame["id"]) == ["O'Brien", "back\\slash"]


def test_a_refused_read_names_the_table_but_no_value(postgres_database):
    url = _database_with(
        postgres_database,
        "CREATE TABLE people (id int PRIMARY KEY, updated_at timestamp, email text);"
        "INSERT INTO people VALUES (1, now(), 'ann@example.com');"
        "CREATE VIEW numbered AS SELECT id, updated_at, email::int AS email FROM people",
    )
    arrow, _ = _sources(url, "numbered")
    with pytest.raises(SourceReadFailed, match="refused a read of numbered") as refused:
        list(arrow.batches(None, 10))
    assert "ann@example.com" not in str(refused.value)
    assert "SELECT" not in str(refused.value), "no SQL (it holds a read's values)"


def _streaming(postgres_database, rows: int) -> tuple[str, SqlSource, Iterator[pd.DataFrame]]:
    """A read through Arrow of `rows` wide rows, its first batch taken, the stream still open."""
    url = _database_with(
        postgres_database,
        "CREATE TABLE wide (id int PRIMARY KEY, updated_at timestamp, note text);"
        f"INSERT INTO wide SELECT n, now(), repeat('x', 200) FROM generate_series(1, {rows}) n",
    )
    arrow, _ = _sources(url, "wide")
    batches = arrow.batches(None, 1000)
    next(batches)
    return url, arrow, batches


@pytest.mark.parametrize(
    "stop, condition",
    [("pg_terminate_backend", ""), ("pg_cancel_backend", "QueryCanceled: canceling statement")],
)
def test_a_read_lost_or_cancelled_mid_stream_is_unavailable(postgres_database, stop, condition):
    """A session ended, or a statement cancelled (a timeout, an administrator, a standby's
    recovery conflict), mid-stream: the server, not a record or the query; a later run reads.
    A cancel came as pyarrow's OSError with libpq's words alone, read as a refusal (the flow
    failed as if its query were wrong); with its SQLSTATE now, as the classic read has it."""
    url, arrow, batches = _streaming(postgres_database, 200000)
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(
            f"SELECT {stop}(pid) FROM pg_stat_activity WHERE datname = %s AND query LIKE 'COPY%%'",
            (url.rsplit("/", 1)[1],),
        )
    with pytest.raises(SourceUnavailable, match=r"the source database of wide .* failed") as lost:
        list(batches)
    assert condition in str(lost.value)
    assert sum(len(batch) for batch in arrow.batches(None, 50000)) == 200000


def test_a_read_through_arrow_stopped_early_leaves_no_session(postgres_database):
    url, _, batches = _streaming(postgres_database, 50000)
    batches.close()  # what a run that fails on its first batch does
    with psycopg.connect(url, autocommit=True) as connection:
        copying = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%' "
            "AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert copying == 0
