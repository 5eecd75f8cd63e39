"""Values that must cross a SQL boundary unchanged, whatever stands next to them or the session's
time zone: integers beside NULLs in a source batch, zoned timestamps in a PostgreSQL destination
and MariaDB windows, number-typed destination keys. Real SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import dataclasses
import math
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pandas as pd
import pandera.pandas as pa
import psycopg
import pytest
import sqlalchemy as sa
from pandera.typing import Series
from sqlalchemy.dialects import mysql

from integrations.contracts import Contract
from integrations.engine.destination import DestinationMismatch
from integrations.engine.reconcile import _as_stored, reconcile
from integrations.engine.spec import FlowSpec, SourceTable, Target
from integrations.engine.sync import Sync, SyncResult
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.fit import MICROSECOND_DATETIME
from integrations.sql.source import SqlSource
from tests.conftest import POSTGRES_ADMIN

BIG = 1234567890123456789  # a snowflake-style id: fits BIGINT, not a float64
T0 = datetime(2025, 1, 1)


@pytest.fixture
def state(own_state):
    return own_state


def source_table(engine: sa.Engine, name: str, *columns: sa.Column, rows=()) -> sa.Table:
    """A source table keyed by `id`, with a change cursor and a soft delete, holding `rows`."""
    table = sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        *columns,
        sa.Column("updated_at", sa.DateTime),
        sa.Column("deleted_at", sa.DateTime, nullable=True),
    )
    table.create(engine)
    if rows:
        with engine.begin() as connection:
            connection.execute(table.insert(), list(rows))
    return table


class SourceRowV1(pa.DataFrameModel):
    id: Series[int]  # the rest as read: the target contract judges it


def flow(name: str, source: str, target: Target, model: type[pa.DataFrameModel]) -> FlowSpec:
    """A flow whose target record is the source row, its `id` as the target's key."""
    key = target.id_property
    return FlowSpec(
        name=f"test_{name}",
        source=SourceTable(table=source, key="id"),
        source_contract=Contract(f"test.{name}_row", 1, SourceRowV1),
        target=target,
        target_contract=Contract(f"test.{name}", 1, model),
        mapping=lambda rows: rows.rename(columns={"id": key})[list(model.to_schema().columns)],
        batch_size=2,
    )


def sync(
    spec: FlowSpec, source: sa.Engine, destination: sa.Engine, state, full=False
) -> SyncResult:
    table = SqlTable(destination, spec.target, create_missing=True)
    return Sync(
        spec, SqlSource(source, spec.source), table, state, run_id="r", actor="test", why="test"
    ).run(full=full)


def rows_of(engine: sa.Engine, table: str) -> dict[object, tuple]:
    with engine.connect() as connection:
        found = connection.execute(sa.text(f"SELECT * FROM {table}")).all()
    return {row[0]: tuple(row[1:]) for row in found}


# --- integers beside NULLs in a source batch ------------------------------------------------


class AccountV1(pa.DataFrameModel):
    account_id: Series[int]
    external_id: Series[int] = pa.Field(nullable=True)
    zip_code: Series[str] = pa.Field(nullable=True)  # an INTEGER column, taken as text

    class Config:
        coerce = True


ACCOUNTS = flow("accounts", "accounts", Target("crm", "accounts_out", "account_id"), AccountV1)


def test_integers_beside_a_null_arrive_exact_whatever_the_batch(sql_database, state):
    """A NULL in a batch made pandas turn the batch's integers into floats: a BIGINT beyond 2**53
    was stored rounded, an INTEGER taken as text became "12345.0", and a record's content hash
    depended on which rows shared its batch."""
    engine = create_engine(sql_database())
    source_table(
        engine,
        "accounts",
        sa.Column("external_id", sa.BigInteger, nullable=True),
        sa.Column("zip_code", sa.Integer, nullable=True),
        rows=[  # batches of 2: rows 1 and 2 together, 3 alone
            {"id": 1, "external_id": BIG, "zip_code": 12345, "updated_at": T0},
            {"id": 2, "external_id": None, "zip_code": None, "updated_at": T0 + timedelta(hours=1)},
            {"id": 3, "external_id": BIG + 2, "zip_code": 54321, "updated_at": T0 + timedelta(2)},
        ],
    )
    assert sync(ACCOUNTS, engine, engine, state).written == 3
    assert rows_of(engine, "accounts_out") == {
        1: (BIG, "12345", None),
        2: (None, None, None),
        3: (BIG + 2, "54321", None),
    }
    alone = dataclasses.replace(ACCOUNTS, batch_size=1)  # no row beside a NULL now
    assert sync(alone, engine, engine, state, full=True).written == 0, "the same hashes"
    engine.dispose()


def test_a_null_integer_key_or_scope_value_beside_others_is_no_value(tmp_path, state):
    """Such columns are nullable Int64 now: a NULL key became the key "<NA>" (and was written
    under it), and a scope comparing a NULL gave pd.NA, which stopped every run."""
    engine = create_engine(f"sqlite:///{tmp_path / 'erp.sqlite'}")
    source_table(
        engine,
        "accounts",
        sa.Column("external_id", sa.BigInteger, nullable=True),
        sa.Column("zip_code", sa.Integer, nullable=True),
        rows=[
            {"id": n, "external_id": ext, "zip_code": 1, "updated_at": T0 + timedelta(hours=n)}
            for n, ext in ((1, 7), (2, None), (3, 8))
        ],
    )
    by_external = dataclasses.replace(
        ACCOUNTS,
        source=SourceTable(table="accounts", key="external_id"),
        mapping=lambda rows: rows.assign(account_id=rows["id"])[
            ["account_id", "external_id", "zip_code"]
        ],
        in_scope=lambda rows: rows["external_id"] > 7,
    )
    result = sync(by_external, engine, engine, state)
    assert (result.written, result.counts["rejected"]) == (1, 1)  # 7 out of scope, never synced
    (letter,) = state.list_dead_letters(flow=by_external.name)
    assert letter.record_key.startswith("!unkeyed:") and "missing" in letter.reason
    assert list(rows_of(engine, "accounts_out")) == [3]
    engine.dispose()


@pytest.mark.mariadb
def test_an_unsigned_bigint_beyond_int64_beside_a_null_is_read_exact(mariadb_database):
    engine = create_engine(mariadb_database())
    largest = 2**64 - 1
    source_table(
        engine,
        "counters",
        sa.Column("total", mysql.BIGINT(unsigned=True), nullable=True),
        rows=[
            {"id": 1, "total": largest, "updated_at": T0},
            {"id": 2, "total": None, "updated_at": T0},
        ],
    )
    source = SqlSource(engine, SourceTable(table="counters", key="id"))
    [batch] = source.batches(None, 10)
    assert batch["total"].tolist() == [largest, None]
    engine.dispose()


class CounterV1(pa.DataFrameModel):
    counter_id: Series[int]
    total: Series[pa.UInt64]

    class Config:
        coerce = True


COUNTERS = flow("counters", "counters", Target("books", "counters_out", "counter_id"), CounterV1)


@pytest.mark.mariadb
def test_a_number_beyond_sqlite_integer_is_its_records_dead_letter(
    mariadb_database, tmp_path, state
):
    """sqlite3 raises an OverflowError, no database error, for an int beyond 64 bits (a MariaDB
    BIGINT UNSIGNED read exactly): it ended the whole run, every rerun too. Now it is the
    record's refusal: its chunk is bisected, and it alone is dead-lettered."""
    source = create_engine(mariadb_database())
    source_table(
        source,
        "counters",
        sa.Column("total", mysql.BIGINT(unsigned=True)),
        rows=[
            {"id": 1, "total": 42, "updated_at": T0},
            {"id": 2, "total": 2**64 - 1, "updated_at": T0},
        ],
    )
    destination = create_engine(f"sqlite:///{tmp_path / 'books.sqlite'}")
    assert sync(COUNTERS, source, destination, state).written == 1
    (letter,) = state.list_dead_letters(flow=COUNTERS.name)
    assert letter.record_key == "2" and "beyond 64 bits" in letter.reason
    assert rows_of(destination, "counters_out") == {1: (42, None)}
    source.dispose()
    destination.dispose()


class StockV1(pa.DataFrameModel):
    stock_id: Series[int]
    quantity: Series[int]
    due_on: Series[pa.Date]

    class Config:
        coerce = True


STOCK = flow("stock", "stock", Target("books", "stock_out", "stock_id"), StockV1)


@pytest.mark.postgres
@pytest.mark.parametrize("number", ["NUMERIC(12, 0)", "DOUBLE PRECISION"])
def test_whole_numbers_in_a_numeric_column_and_days_in_a_timestamp_reconcile(
    postgres_database, state, number
):
    """The fit takes an int field into a NUMERIC or floating-point column, and a date field into
    a timestamp column; they read back as 42.0 and midnight, which reconciliation compared with
    "42" and "2025-03-01": every record drifted, for good, and each repair rewrote it."""
    engine = create_engine(postgres_database())
    source_table(
        engine,
        "stock",
        sa.Column("quantity", sa.Integer),
        sa.Column("due_on", sa.Date),
        rows=[{"id": 1, "quantity": 42, "due_on": date(2025, 3, 1), "updated_at": T0}],
    )
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TABLE stock_out (stock_id BIGINT PRIMARY KEY, quantity {number} NOT NULL, "
            "due_on TIMESTAMP NOT NULL, archived_at TIMESTAMP)"
        )
    assert sync(STOCK, engine, engine, state).written == 1
    table = SqlTable(engine, STOCK.target)
    drift = reconcile(STOCK, SqlSource(engine, STOCK.source), table, state)
    assert drift.in_sync, drift.summary()
    with engine.begin() as connection:  # a real drift is still one
        connection.exec_driver_sql("UPDATE stock_out SET quantity = 41.5, due_on = due_on + '1h'")
    assert reconcile(STOCK, SqlSource(engine, STOCK.source), table, state).differing == ["1"]
    engine.dispose()


# --- zoned timestamps -----------------------------------------------------------------------


class EventV1(pa.DataFrameModel):
    event_id: Series[int]
    happened_at: Series[pa.DateTime]

    class Config:
        coerce = True


EVENTS = flow("events", "events", Target("books", "events_out", "event_id"), EventV1)


def in_new_york(url: str) -> str:
    """`url`'s database, its sessions by default in New York (a server not set to UTC)."""
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        name = url.rsplit("/", 1)[1]
        admin.execute(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'")
    return url


def in_new_york_by_url(url: str) -> str:
    """`url` choosing New York for its sessions itself (handoff leaves such a zone alone)."""
    return url + "?options=-c%20timezone%3DAmerica/New_York"


def zoned_events_out(engine: sa.Engine) -> None:
    """The events' destination table, its time a `timestamptz`."""
    sa.Table(
        "events_out",
        sa.MetaData(),
        sa.Column("event_id", sa.BigInteger, primary_key=True),
        sa.Column("happened_at", sa.DateTime(timezone=True)),
        sa.Column("archived_at", sa.DateTime, nullable=True),
    ).create(engine)


@pytest.mark.postgres
@pytest.mark.parametrize("zoned", [in_new_york, in_new_york_by_url], ids=["database", "url"])
def test_a_timestamptz_destination_in_another_zone_keeps_the_instant(
    tmp_path, postgres_database, state, zoned
):
    """Naive UTC text into a `timestamptz` was read in the session's zone (10:00 UTC stored as
    15:00 UTC in New York), and the snapshot read back local wall time: reconciliation saw
    nothing wrong. handoff's sessions run in UTC, unless the URL chose a zone: the times it
    sends say they are UTC."""
    source = create_engine(f"sqlite:///{tmp_path / 'source.sqlite'}")
    happened = datetime(2025, 1, 3, 10)
    source_table(
        source,
        "events",
        sa.Column("happened_at", sa.DateTime),
        rows=[{"id": 1, "happened_at": happened, "updated_at": T0}],
    )
    destination = create_engine(zoned(postgres_database()))
    zoned_events_out(destination)

    assert sync(EVENTS, source, destination, state).written == 1
    with destination.connect() as connection:
        stored = connection.execute(sa.text("SELECT happened_at FROM events_out")).scalar_one()
    assert stored == happened.replace(tzinfo=UTC), "the same instant, in whichever zone"
    snapshot = list(SqlTable(destination, EVENTS.target).snapshot(["happened_at"]))
    assert snapshot == [("1", "1", {"happened_at": "2025-01-03T10:00:00.000000"})]
    source.dispose()
    destination.dispose()


class TextEventV1(pa.DataFrameModel):
    event_id: Series[int]
    happened_at: Series[str]  # time text as the source gives it, zone and all


@pytest.mark.postgres
def test_time_text_that_names_its_zone_keeps_it_in_a_timestamptz(
    tmp_path, postgres_database, state
):
    """Only the engine's own naive text is said to be UTC: a zone named by offset or by name is
    the value's own (an appended "+00:00" stored 10:00 EST as 10:00 UTC)."""
    given = {
        1: ("2025-01-03T10:00:00.000000", "2025-01-03 10:00:00"),
        2: ("2025-01-03 10:00:00 EST", "2025-01-03 15:00:00"),
        3: ("2025-01-03 10:00:00 America/Los_Angeles", "2025-01-03 18:00:00"),
        4: ("2025-01-03T10:00:00+05:30", "2025-01-03 04:30:00"),
        5: ("1850-06-01T10:00:00-04:56:02", "1850-06-01 14:56:02"),
        6: ("2025-01-03", "2025-01-03 00:00:00"),
    }
    source = create_engine(f"sqlite:///{tmp_path / 'source.sqlite'}")
    rows = [{"id": n, "happened_at": text, "updated_at": T0} for n, (text, _) in given.items()]
    source_table(source, "events", sa.Column("happened_at", sa.Text), rows=rows)
    destination = create_engine(postgres_database())
    zoned_events_out(destination)
    spec = flow("text_events", "events", Target("books", "events_out", "event_id"), TextEventV1)
    assert sync(spec, source, destination, state).written == len(given)
    with destination.connect() as connection:
        stored = dict(
            connection.execute(
                sa.text("SELECT event_id, (happened_at AT TIME ZONE 'UTC')::text FROM events_out")
            ).all()
        )
    assert stored == {n: utc for n, (_, utc) in given.items()}
    source.dispose()
    destination.dispose()


@pytest.mark.postgres
def test_a_snapshot_gives_zoned_values_in_utc_whatever_the_session_zone(postgres_database):
    """A URL may set its sessions' zone itself (`options`): handoff keeps it, and the snapshot
    still gives the instant in UTC, as the engine sent it."""
    engine = create_engine(in_new_york_by_url(postgres_database()))
    zoned_events_out(engine)
    with engine.begin() as connection:
        assert connection.execute(sa.text("SHOW timezone")).scalar_one() == "America/New_York"
        connection.execute(
            sa.text("INSERT INTO events_out VALUES (1, '2025-01-03 10:00:00+00', NULL)")
        )
    snapshot = list(SqlTable(engine, EVENTS.target).snapshot(["happened_at"]))
    assert snapshot == [("1", "1", {"happened_at": "2025-01-03T10:00:00.000000"})]
    engine.dispose()


@pytest.mark.postgres
def test_an_archive_time_in_a_zoned_column_is_the_instant(postgres_database):
    engine = create_engine(in_new_york_by_url(postgres_database()))
    sa.Table(
        "events_out",
        sa.MetaData(),
        sa.Column("event_id", sa.BigInteger, primary_key=True),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
    ).create(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO events_out VALUES (1, NULL)"))
    SqlTable(engine, EVENTS.target).archive(["1"])
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT archived_at FROM events_out")).scalar_one()
    assert abs(stored - datetime.now(UTC)) < timedelta(minutes=1)
    engine.dispose()


@pytest.mark.postgres
def test_postgres_sessions_run_in_utc_and_keep_libpq_settings(postgres_database, monkeypatch):
    """Set after connecting: a startup `options` would have displaced PGOPTIONS (a search_path
    there was lost, and the source's tables with it), and PgBouncer refuses it."""
    monkeypatch.setenv("PGOPTIONS", "-c search_path=erp,public")
    engine = create_engine(postgres_database())
    with engine.connect() as connection:
        assert connection.execute(sa.text("SHOW search_path")).scalar_one() == "erp,public"
        assert connection.execute(sa.text("SHOW timezone")).scalar_one() == "UTC"
    engine.dispose()


@pytest.mark.mariadb
def test_a_day_window_over_a_mariadb_timestamp_is_the_utc_day(mariadb_database):
    """A TIMESTAMP keeps an instant and shows it in the session's zone: on a server whose zone is
    not UTC, UTC bounds were compared with local wall time. A zone the URL chose is kept."""
    url = mariadb_database()
    utc = create_engine(url + "?init_command=SET+time_zone%3D%27%2B00%3A00%27")
    events = source_table(utc, "events", sa.Column("happened", mysql.TIMESTAMP(fsp=6)))
    with utc.begin() as connection:  # written in UTC: these are UTC instants
        connection.execute(
            events.insert(),
            [
                {"id": 1, "happened": datetime(2024, 1, 1, 0, 30)},
                {"id": 2, "happened": datetime(2024, 1, 1, 22, 30)},
                {"id": 3, "happened": datetime(2024, 1, 2, 0, 30)},
            ],
        )
    utc.dispose()
    chosen = create_engine(url + "?init_command=SET+time_zone%3D%27%2B05%3A00%27")
    with chosen.connect() as connection:
        assert connection.execute(sa.text("SELECT @@session.time_zone")).scalar_one() == "+05:00"
    chosen.dispose()
    engine = create_engine(url)

    @sa.event.listens_for(engine, "connect", insert=True)
    def _server_zone(dbapi_connection, _record):  # what a server in +05:00 starts sessions in
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET SESSION time_zone = '+05:00'")

    source = SqlSource(engine, SourceTable(table="events", key="id", cursor="happened"))

    def day(start: datetime) -> list[int]:
        within = source.in_window("happened", start, start + timedelta(days=1))
        return [n for batch in source.batches(None, 10, within=within) for n in batch["id"]]

    assert day(datetime(2024, 1, 1, tzinfo=UTC)) == [1, 2]
    assert day(datetime(2024, 1, 2, tzinfo=UTC)) == [3]
    assert source.high_water_mark() == datetime(2024, 1, 2, 0, 30)
    engine.dispose()


@pytest.mark.mariadb
def test_a_mariadb_timestamp_destination_under_a_chosen_zone_keeps_the_instant(
    tmp_path, mariadb_database, state
):
    """MariaDB takes a TIMESTAMP's text in the session's zone: under a zone the URL chose,
    10:00 UTC was stored as 05:00 UTC, and read back as 10:00, so reconciliation saw nothing.
    The table's reads and writes run in UTC; the session keeps its zone."""
    source = create_engine(f"sqlite:///{tmp_path / 'source.sqlite'}")
    happened = datetime(2025, 1, 3, 10)
    source_table(
        source,
        "events",
        sa.Column("happened_at", sa.DateTime),
        rows=[{"id": 1, "happened_at": happened, "updated_at": T0}],
    )
    destination = create_engine(
        mariadb_database() + "?init_command=SET+time_zone%3D%27%2B05%3A00%27"
    )
    sa.Table(
        "events_out",
        sa.MetaData(),
        sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("happened_at", mysql.TIMESTAMP(fsp=6), nullable=True),
        sa.Column("archived_at", mysql.TIMESTAMP(fsp=6), nullable=True),
    ).create(destination)

    assert sync(EVENTS, source, destination, state).written == 1
    table = SqlTable(destination, EVENTS.target)
    assert list(table.snapshot(["happened_at"])) == [
        ("1", "1", {"happened_at": "2025-01-03T10:00:00.000000"})
    ]
    assert reconcile(EVENTS, SqlSource(source, EVENTS.source), table, state).in_sync
    with destination.begin() as connection:  # as an earlier handoff wrote it: shifted
        connection.execute(sa.text("UPDATE events_out SET happened_at = '2025-01-03 10:00:00'"))
    drift = reconcile(EVENTS, SqlSource(source, EVENTS.source), table, state)
    assert drift.differing == ["1"], drift.summary()
    with destination.begin() as connection:
        connection.execute(sa.text("UPDATE events_out SET happened_at = '2025-01-03 15:00:00'"))
    table.archive(["1"])
    with destination.connect() as connection:
        assert connection.execute(sa.text("SELECT @@session.time_zone")).scalar_one() == "+05:00"
        stored, archived = connection.execute(
            sa.text(
                "SELECT UNIX_TIMESTAMP(happened_at), UNIX_TIMESTAMP(archived_at) FROM events_out"
            )
        ).one()
    assert stored == happened.replace(tzinfo=UTC).timestamp(), "the instant named, not 05:00"
    assert abs(float(archived) - datetime.now(UTC).timestamp()) < 60
    source.dispose()
    destination.dispose()


class FlaggedV1(pa.DataFrameModel):
    flag_id: Series[int]
    flag: Series[bool]

    class Config:
        coerce = True


FLAGS = flow("flags", "flags", Target("books", "flags_out", "flag_id"), FlaggedV1)


def test_bools_in_an_integer_column_reconcile(sql_database, state):
    """A bool field lands in an INTEGER column as 1 or 0, and reads back so: reconciliation
    compared "True" with "1", and found every record drifted, for good."""
    engine = create_engine(sql_database())
    source_table(
        engine,
        "flags",
        sa.Column("flag", sa.Boolean),
        rows=[
            {"id": 1, "flag": True, "updated_at": T0},
            {"id": 2, "flag": False, "updated_at": T0},
        ],
    )
    sa.Table(
        "flags_out",
        sa.MetaData(),
        sa.Column("flag_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("flag", sa.Integer),
        sa.Column("archived_at", sa.DateTime, nullable=True),
    ).create(engine)
    assert sync(FLAGS, engine, engine, state).written == 2
    assert rows_of(engine, "flags_out") == {1: (1, None), 2: (0, None)}
    table = SqlTable(engine, FLAGS.target)
    drift = reconcile(FLAGS, SqlSource(engine, FLAGS.source), table, state)
    assert drift.in_sync, drift.summary()
    engine.dispose()
    # A CRM gives the text back ("True" from the sandbox, "true" from HubSpot): the same flag.
    said = [_as_stored({"flag": held}, ["flag"], {"flag": "bool"}) for held in HELD_TRUE]
    assert said == [{"flag": "true"}] * len(HELD_TRUE)


HELD_TRUE = [True, 1, "1", "True", "true", "t"]


class CurrencyV1(pa.DataFrameModel):
    currency_id: Series[int]
    code: Series[str] = pa.Field(nullable=True)

    class Config:
        coerce = True


CURRENCIES = flow(
    "currencies", "currencies", Target("books", "currencies_out", "currency_id"), CurrencyV1
)


def test_text_in_a_char_column_reconciles_and_one_ending_in_a_space_is_refused(sql_database, state):
    """PostgreSQL reads a CHAR(n) column's text padded ("EU  "), MariaDB without the spaces it
    ended in: reconciliation found such records drifted, for good. Read as sent, they are in
    sync; text ending in a space, which would not read back so, is refused naming the column."""
    engine = create_engine(sql_database())
    source_table(
        engine,
        "currencies",
        sa.Column("code", sa.Text),
        rows=[
            {"id": 1, "code": "EU", "updated_at": T0},
            {"id": 2, "code": "USD ", "updated_at": T0},
            {"id": 3, "code": None, "updated_at": T0},
        ],
    )
    sa.Table(
        "currencies_out",
        sa.MetaData(),
        sa.Column("currency_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("code", sa.CHAR(4)),
        sa.Column("archived_at", sa.DateTime, nullable=True),
    ).create(engine)
    result = sync(CURRENCIES, engine, engine, state)
    letters = state.list_dead_letters(flow=CURRENCIES.name, limit=None)
    if engine.dialect.name == "sqlite":  # it keeps the text as sent
        assert result.written == 3 and not letters
    else:
        assert result.written == 2
        assert [letter.record_key for letter in letters] == ["2"]
        assert "column 'code' is CHAR(4), which reads text without" in letters[0].reason
    drift = reconcile(
        CURRENCIES, SqlSource(engine, CURRENCIES.source), SqlTable(engine, CURRENCIES.target), state
    )
    assert drift.in_sync, drift.summary()
    engine.dispose()


# --- number-typed destination keys ----------------------------------------------------------


class ItemV1(pa.DataFrameModel):
    item_id: Series[int]
    name: Series[str]

    class Config:
        coerce = True


ITEMS = flow("items", "items", Target("books", "items_out", "item_id"), ItemV1)


@pytest.mark.parametrize("key_type", [sa.Numeric(20, 0), sa.Numeric(12, 2), sa.Double()], ids=str)
def test_a_number_keyed_destination_updates_archives_and_reconciles(sql_database, state, key_type):
    """Keys read back as Decimal('1.00') or 1.0 are the key 1: an update is no insert (SQLite
    counted it created, MariaDB refused it as a duplicate), an archive binds numbers (PostgreSQL
    refused `numeric = character varying`, and every later run failed), and reconciliation
    finds each record."""
    engine = create_engine(sql_database())
    items = source_table(
        engine,
        "items",
        sa.Column("name", sa.String(50)),
        rows=[
            {"id": n, "name": f"item {n}", "updated_at": T0 + timedelta(hours=n)} for n in (1, 2, 3)
        ],
    )
    sa.Table(
        "items_out",
        sa.MetaData(),
        sa.Column("item_id", key_type, primary_key=True),
        sa.Column("name", sa.String(50)),
        sa.Column("archived_at", sa.DateTime, nullable=True),
    ).create(engine)
    assert sync(ITEMS, engine, engine, state).counts["inserted"] == 3

    later = T0 + timedelta(days=1)
    with engine.begin() as connection:
        connection.execute(
            items.update().where(items.c.id == 1).values(name="renamed", updated_at=later)
        )
    renamed = sync(ITEMS, engine, engine, state)
    assert (renamed.counts["inserted"], renamed.counts["updated"]) == (0, 1)

    with engine.begin() as connection:
        connection.execute(
            items.update().where(items.c.id == 2).values(deleted_at=later, updated_at=later)
        )
    assert sync(ITEMS, engine, engine, state).counts["archived"] == 1
    assert sync(ITEMS, engine, engine, state).counts["archived"] == 0
    stored = rows_of(engine, "items_out")
    assert sorted((int(key), name, at is None) for key, (name, at) in stored.items()) == [
        (1, "renamed", True),
        (2, "item 2", False),
        (3, "item 3", True),
    ]
    drift = reconcile(ITEMS, SqlSource(engine, ITEMS.source), SqlTable(engine, ITEMS.target), state)
    assert drift.in_sync, drift.summary()
    engine.dispose()


class TicketV1(pa.DataFrameModel):
    ticket_id: Series[str]  # a UUID's text, into a native UUID column
    parent: Series[str] = pa.Field(nullable=True)  # likewise


def ticket_ids(rows: pd.DataFrame) -> pd.DataFrame:
    """Tickets keyed by the UUID numbered as the row, their parent as the source says it."""
    return pd.DataFrame(
        {"ticket_id": [str(uuid.UUID(int=n)) for n in rows["id"]], "parent": rows["parent"]},
        index=rows.index,
    )


TICKETS = dataclasses.replace(
    flow("tickets", "tickets", Target("books", "tickets_out", "ticket_id"), TicketV1),
    mapping=ticket_ids,
)


@pytest.mark.parametrize(
    "database",
    [
        pytest.param("postgres_database", marks=pytest.mark.postgres),
        pytest.param("mariadb_database", marks=pytest.mark.mariadb),
    ],
)
def test_a_uuid_column_takes_a_uuids_text_and_refuses_other_text(
    request, tmp_path, state, database
):
    """A native UUID column (PostgreSQL uuid, MariaDB UUID) was refused for a str field, with
    advice no contract could follow. It takes a UUID's canonical text; other text, which it
    would store changed (upper case) or refuse, is its record's refusal. Archives and
    reconciliation find each record by its key's text."""
    source = create_engine(f"sqlite:///{tmp_path / 'source.sqlite'}")
    parent = str(uuid.UUID(int=0xABCDEF))
    tickets = source_table(
        source,
        "tickets",
        sa.Column("parent", sa.Text),
        rows=[
            {"id": 1, "parent": parent, "updated_at": T0},
            {"id": 2, "parent": None, "updated_at": T0},
            {"id": 3, "parent": parent.upper(), "updated_at": T0},
        ],
    )
    destination = create_engine(request.getfixturevalue(database)())
    sa.Table(
        "tickets_out",
        sa.MetaData(),
        sa.Column("ticket_id", sa.UUID, primary_key=True),
        sa.Column("parent", sa.UUID),
        sa.Column("archived_at", MICROSECOND_DATETIME),
    ).create(destination)

    assert sync(TICKETS, source, destination, state).counts["inserted"] == 2
    [letter] = state.list_dead_letters(TICKETS.name)
    assert letter.record_key == "3" and "column 'parent' is a UUID" in letter.reason
    later = T0 + timedelta(days=1)
    with source.begin() as connection:
        connection.execute(
            tickets.update().where(tickets.c.id == 2).values(deleted_at=later, updated_at=later)
        )
    assert sync(TICKETS, source, destination, state).counts["archived"] == 1
    stored = rows_of(destination, "tickets_out")
    assert {
        str(key): (str(up) if up else None, at is None) for key, (up, at) in stored.items()
    } == {
        str(uuid.UUID(int=1)): (parent, True),
        str(uuid.UUID(int=2)): (None, False),
    }
    checked = SqlTable(destination, TICKETS.target)
    drift = reconcile(TICKETS, SqlSource(source, TICKETS.source), checked, state)
    assert drift.in_sync, drift.summary()
    destination.dispose()


@pytest.mark.postgres
def test_a_negative_zero_beside_a_zero_arrives_as_sent(postgres_database, state):
    """COPY's text of a column of few values is made once per distinct value: -0.0 equals 0.0,
    so whichever came second in a batch was written as the first."""
    engine = create_engine(postgres_database())
    source_table(
        engine,
        "readings",
        sa.Column("amount", sa.Double),
        sa.Column("ratio", sa.Double, nullable=True),
        sa.Column("price", sa.Double, nullable=True),
        rows=[{"id": n, "amount": a, "updated_at": T0} for n, a in ((1, 0.0), (2, -0.0))],
    )
    assert sync(READINGS, engine, engine, state).written == 2
    with engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT reading_id, amount::text FROM readings_out")
        assert dict(stored.all()) == {1: "0", 2: "-0"}
    engine.dispose()


class PricedV1(pa.DataFrameModel):
    price: Series[float]
    name: Series[str]


def test_a_float_key_is_refused_before_any_write(sql_database):
    engine = create_engine(sql_database())
    spec = dataclasses.replace(
        ITEMS,
        target=Target("books", "priced", "price"),
        target_contract=Contract("test.priced", 1, PricedV1),
    )
    with pytest.raises(DestinationMismatch) as refused:
        SqlTable(engine, spec.target, create_missing=True).prepare(spec)
    message = str(refused.value)
    assert "table 'priced', column 'price'" in message
    assert "float field" in message and "What to do: declare the key int" in message
    engine.dispose()


# --- NaN and infinity from PostgreSQL ------------------------------------------------------------


class ReadingV1(pa.DataFrameModel):
    reading_id: Series[int]
    amount: Series[float]
    ratio: Series[float] = pa.Field(nullable=True)
    price: Series[float] = pa.Field(nullable=True)

    class Config:
        coerce = True


READINGS = flow("readings", "readings", Target("books", "readings_out", "reading_id"), ReadingV1)
NAN, INF = float("nan"), float("inf")


@pytest.mark.postgres
def test_a_nan_is_refused_naming_its_field_and_infinity_is_kept_where_it_can_be(
    postgres_database, sql_database, state
):
    """PostgreSQL's 'NaN' (double precision, real, numeric) was read as missing: a nullable field
    got NULL, a required one was refused as "missing", and a change between NaN and NULL was
    never synced. A NaN is its row's refusal, naming the field, and its letter keeps it apart
    from NULL; ±Infinity is written where the destination holds it, and refused naming the
    column on MariaDB, which holds none."""
    source = create_engine(postgres_database())
    table = source_table(
        source,
        "readings",
        sa.Column("amount", sa.Double),
        sa.Column("ratio", sa.REAL, nullable=True),
        sa.Column("price", sa.Numeric, nullable=True),
        rows=[  # batches of 2
            {"id": n, "amount": a, "ratio": r, "price": p, "updated_at": T0 + timedelta(hours=n)}
            for n, a, r, p in (
                (1, 1.0, None, None),
                (2, 2.0, NAN, Decimal("NaN")),
                (3, NAN, 1.0, Decimal(1)),
                (4, INF, -INF, Decimal("Infinity")),
                (5, 5.0, 0.5, Decimal(5)),
            )
        ],
    )
    destination = create_engine(sql_database())
    mariadb = destination.dialect.name == "mariadb"

    result = sync(READINGS, source, destination, state)
    assert (result.written, result.counts["rejected"]) == ((2, 3) if mariadb else (3, 2))
    letters = {letter.record_key: letter for letter in state.list_dead_letters(READINGS.name)}
    assert letters["2"].reason.endswith("ratio is NaN (not a number); price is NaN (not a number)")
    assert letters["3"].reason.endswith("amount is NaN (not a number)")
    assert math.isnan(letters["2"].payload["ratio"]) and letters["2"].payload["price"] == "NaN"
    landed = rows_of(destination, "readings_out")
    if mariadb:
        assert "column 'amount' cannot hold the value, which is infinite" in letters["4"].reason
    else:
        assert landed[4][:3] == (INF, -INF, INF)
    assert landed[1][:3] == (1.0, None, None)

    with source.begin() as connection:  # NaN becomes NULL, NULL becomes NaN
        later = T0 + timedelta(days=1)
        connection.execute(
            table.update().where(table.c.id == 2).values(ratio=None, price=None, updated_at=later)
        )
        connection.execute(
            table.update().where(table.c.id == 1).values(ratio=NAN, updated_at=later)
        )
    again = sync(READINGS, source, destination, state)
    assert (again.written, again.counts["rejected"]) == (1, 1)
    assert rows_of(destination, "readings_out")[2][:3] == (2.0, None, None)
    assert state.list_dead_letters(READINGS.name, keys=["1"])[0].reason.endswith(
        "ratio is NaN (not a number)"
    )
    source.dispose()
    destination.dispose()


# --- a database's words about a value, PII masked ----------------------------------------------


class MemberV1(pa.DataFrameModel):
    member_id: Series[int]
    name: Series[str] = pa.Field(metadata={"pii": True})
    qty: Series[int]


MEMBERS = flow("members", "members", Target("books", "members_out", "member_id"), MemberV1)


@pytest.mark.postgres
def test_a_trigger_that_quotes_a_personal_value_in_capitals_has_it_masked(
    tmp_path, postgres_database, state
):
    """A DBA's trigger refused a row saying upper(NEW.name): the letter's reason (and the log)
    kept "JANE DOE", since only the value as sent was masked. Now it is masked in any case."""
    source = create_engine(f"sqlite:///{tmp_path / 'source.sqlite'}")
    source_table(
        source,
        "members",
        sa.Column("name", sa.Text),
        sa.Column("qty", sa.Integer),
        rows=[
            {"id": 1, "name": "Ann Lee", "qty": 1, "updated_at": T0},
            {"id": 2, "name": "Jane Doe", "qty": -5, "updated_at": T0},
        ],
    )
    destination = create_engine(postgres_database())
    with destination.begin() as connection:
        for statement in (
            "CREATE TABLE members_out (member_id BIGINT PRIMARY KEY, name TEXT, qty BIGINT, "
            "archived_at TIMESTAMP)",
            "CREATE FUNCTION no_negatives() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.qty < 0 THEN RAISE EXCEPTION 'member % has a negative qty', upper(NEW.name); "
            "END IF; RETURN NEW; END $$",
            "CREATE TRIGGER no_negatives BEFORE INSERT ON members_out "
            "FOR EACH ROW EXECUTE FUNCTION no_negatives()",
        ):
            connection.exec_driver_sql(statement.replace("%", "%%"))

    assert sync(MEMBERS, source, destination, state).written == 1
    [letter] = state.list_dead_letters(MEMBERS.name)
    assert "member J*** has a negative qty" in letter.reason
    assert "jane" not in letter.reason.lower()
    destination.dispose()


# --- "valid forever": the last day a database holds -------------------------------------------


class TermV1(pa.DataFrameModel):
    term_id: Series[int]
    valid_to: Series[pa.DateTime] = pa.Field(nullable=True)
    valid_until: Series[pa.Date] = pa.Field(nullable=True)
    starts_on: Series[pa.Date]

    class Config:
        coerce = True


TERMS = flow("terms", "terms", Target("finance", "terms_out", "term_id"), TermV1)
FOREVER = datetime(9999, 12, 31, 23, 59, 59)
D0 = date(2025, 1, 1)
EARLY = datetime(1000, 1, 1, 12, 30)


def test_the_last_day_a_database_holds_is_a_date_like_any_other(sql_database, state):
    """An ERP's "valid forever" (9999-12-31) is past the times pandas holds by default (1677 to
    2262): every such record was dead-lettered, a date field's as "not of type date"."""
    engine = create_engine(sql_database())
    source_table(
        engine,
        "terms",
        sa.Column("valid_to", sa.DateTime, nullable=True),
        sa.Column("valid_until", sa.Date, nullable=True),
        sa.Column("starts_on", sa.Date),
        rows=[  # batches of 2: each far day beside an ordinary one, then with a NULL
            {**term, "updated_at": T0}
            for term in [
                {"id": 1, "valid_to": FOREVER, "valid_until": date(9999, 12, 31), "starts_on": D0},
                {"id": 2, "valid_to": T0, "valid_until": date(2025, 6, 30), "starts_on": D0},
                {"id": 3, "valid_to": None, "valid_until": None, "starts_on": date(1, 1, 1)},
                {"id": 4, "valid_to": EARLY, "valid_until": date(2300, 1, 1), "starts_on": D0},
            ]
        ],
    )
    result = sync(TERMS, engine, engine, state)
    assert result.counts["rejected"] == 0, [d.reason for d in state.list_dead_letters(TERMS.name)]
    assert result.written == 4
    stored = rows_of(engine, "terms_out")
    as_days = {
        key: (_a_time(valid_to), _a_day(valid_until), _a_day(starts_on))
        for key, (valid_to, valid_until, starts_on, *_archived) in stored.items()
    }
    assert as_days == {
        1: (FOREVER, date(9999, 12, 31), D0),
        2: (T0, date(2025, 6, 30), D0),
        3: (None, None, date(1, 1, 1)),
        4: (EARLY, date(2300, 1, 1), D0),
    }
    assert sync(TERMS, engine, engine, state, full=True).written == 0, "the same hashes"
    table = SqlTable(engine, TERMS.target)
    drift = reconcile(TERMS, SqlSource(engine, TERMS.source), table, state)
    assert drift.in_sync, drift.summary()
    engine.dispose()


class TermRowV1(pa.DataFrameModel):
    id: Series[int]
    valid_to: Series[pa.DateTime] = pa.Field(nullable=True)

    class Config:
        coerce = True


class TermDayV1(pa.DataFrameModel):
    term_id: Series[int]
    valid_until: Series[pa.Date] = pa.Field(nullable=True)

    class Config:
        coerce = True


TERM_DAYS = FlowSpec(
    name="test_term_days",
    source=SourceTable(table="terms", key="id"),
    source_contract=Contract("test.term_row", 1, TermRowV1),
    target=Target("finance", "term_days", "term_id"),
    target_contract=Contract("test.term_day", 1, TermDayV1),
    mapping=lambda rows: pd.DataFrame(
        {"term_id": rows["id"], "valid_until": rows["valid_to"]}, index=rows.index
    ),
    batch_size=2,
)


def test_a_far_time_mapped_to_a_date_field_leaves_its_neighbours_alone(sql_database, state):
    """A batch's times are microseconds once one is past 2262: a date field the mapping gave
    them to refused every row of the batch as "not of type date", the ordinary ones too."""
    engine = create_engine(sql_database())
    source_table(
        engine,
        "terms",
        sa.Column("valid_to", sa.DateTime, nullable=True),
        rows=[
            {"id": 1, "valid_to": FOREVER, "updated_at": T0},
            {"id": 2, "valid_to": T0, "updated_at": T0},
        ],
    )
    result = sync(TERM_DAYS, engine, engine, state)
    assert result.counts["rejected"] == 0, [
        d.reason for d in state.list_dead_letters(TERM_DAYS.name)
    ]
    stored = rows_of(engine, "term_days")
    assert {key: _a_day(day) for key, (day, *_archived) in stored.items()} == {
        1: date(9999, 12, 31),
        2: T0.date(),
    }
    table = SqlTable(engine, TERM_DAYS.target)
    drift = reconcile(TERM_DAYS, SqlSource(engine, TERM_DAYS.source), table, state)
    assert drift.in_sync, drift.summary()
    engine.dispose()


def _a_time(value: object) -> datetime | None:
    """A time as the destination gives it back (SQLite: ISO text)."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _a_day(value: object) -> date | None:
    if isinstance(value, str):
        return date.fromisoformat(value[:10])
    return value.date() if isinstance(value, datetime) else value
