"""The PostgreSQL source streams its rows through psycopg rather than SQLAlchemy's result: the
frames must be the ones SQLAlchemy's rows give, a stream stopped early or cut must leave no
stuck session behind, and a lost connection is still `SourceUnavailable`."""

from __future__ import annotations

import dataclasses
import gc
import sqlite3
import sys
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import psycopg
import pymysql
import pytest
import sqlalchemy as sa
from pandas.testing import assert_frame_equal

from assets.helpdesk_users import HELPDESK_USERS
from integrations.engine.spec import Lookup, SourceTable
from integrations.erp.seed import seed_erp
from integrations.sql.connect import create_engine, unreachable, without_values
from integrations.sql.source import SourceReadFailed, SourceUnavailable, SqlSource
from tests.conftest import MARIADB_ADMIN, POSTGRES_ADMIN

pytestmark = pytest.mark.postgres

# One column per kind of value a table of record holds, and ranges, which SQLAlchemy converts.
EVERY_TYPE = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE everything (
    id int PRIMARY KEY, updated_at timestamp NOT NULL,
    small smallint, whole int, big bigint, single real, double double precision,
    amount numeric(12, 2), ratio numeric, flag boolean, note text, code varchar(8), grade char(2),
    day date, clock time, moment timestamp, ancient timestamp, zoned timestamptz, span interval,
    uid uuid, doc json, docb jsonb, blob bytea, numbers int[], mood mood, seats int4range
)
"""
VALUES = (
    *(3, 30, 2**40, 1.5, 2.25, "12.34", "1e-20", True, "it's \\", "", "AB"),
    *("2024-02-01", "12:34:56", "2024-03-01 01:02:03", "0001-01-01", "2024-01-01 00:00+02"),
    *("1 day 2 hours", "00000000-0000-0000-0000-000000000001", '{"a": [1]}', '{"b": null}'),
    *(b"\x00\xff", [1, None], "happy", "[1,5)"),
)


def test_frames_are_those_sqlalchemy_rows_give(postgres_database):
    """Dtypes are inferred per batch (an int column with nulls is Int64, exact, a column of nulls
    only stays objects): batches of 4 with no value, every value, and some."""
    url = postgres_database()
    with psycopg.connect(url) as connection:
        connection.execute(EVERY_TYPE)
        for row in range(1, 11):
            filled = 5 <= row <= 8 or (row > 8 and row % 2)
            connection.execute(
                f"INSERT INTO everything VALUES (%s, %s{', %s' * len(VALUES)})",
                (row, f"2024-01-{row:02d} 10:00:00.123456", *(VALUES if filled else [None] * 24)),
            )
    engine = create_engine(url)
    source = SqlSource(engine, SourceTable(table="everything", key="id", deleted=None))
    with engine.connect() as connection:
        rows = connection.execute(source.select.order_by(*source.order)).all()

    for streamed, start in zip(source.batches(None, 4), (0, 4, 8), strict=True):
        expected = pd.DataFrame.from_records(rows[start : start + 4], columns=source.columns)
        for name in ("small", "whole", "big"):  # pandas made floats of integers beside a null
            if expected[name].dtype == "float64":
                expected[name] = expected[name].astype("Int64")
        assert_frame_equal(streamed, expected, check_exact=True)
        for column in streamed.columns:  # objects of the same class: no psycopg Range, no NaN
            assert list(map(type, streamed[column])) == list(map(type, expected[column]))
    engine.dispose()


CUSTOMERS = SourceTable(table="customers", key="customer_id")


def _seeded(
    postgres_database, rows: int, spec: SourceTable = CUSTOMERS
) -> tuple[sa.Engine, SqlSource]:
    """A fresh seeded ERP and a source over it."""
    url = postgres_database()
    seed_erp(url, rows=rows, seed=5)
    engine = create_engine(url)
    return engine, SqlSource(engine, spec)


def test_rows_with_keys_bind_their_keys_and_totals(postgres_database):
    """A repair's IN list and a total's window and filter are parameters of the declared cursor."""
    engine, source = _seeded(postgres_database, 1000, HELPDESK_USERS.source)
    with engine.begin() as connection:
        paid_today = connection.execute(
            sa.text(
                "UPDATE invoices SET status = 'paid', invoice_date = CURRENT_DATE "
                "WHERE invoice_id = (SELECT min(invoice_id) FROM invoices) RETURNING customer_id"
            )
        ).scalar_one()
    others = [key for key in (1, 2, 3) if key != paid_today][:2]
    keys = [paid_today, *others, "not a key", 10**9]
    with engine.connect() as connection:
        frames = list(source.rows_with_keys(keys, 2))
        expected = [
            pd.DataFrame.from_records(
                connection.execute(
                    source.select.where(source.key.in_(chunk)).order_by(*source.order)
                ).all(),
                columns=source.columns,
            )
            for chunk in (keys[:2], [keys[2], keys[4]])
        ]
    assert [len(frame) for frame in frames] == [2, 1]  # the wrong keys name no row
    for frame, wanted in zip(frames, expected, strict=True):
        assert_frame_equal(frame, wanted, check_exact=True)
    assert (pd.concat(frames)["paid_last_12_months"] > 0).any(), "the total counts paid invoices"
    engine.dispose()


def test_rows_with_keys_of_a_domain_or_an_address_are_found(postgres_database):
    """Keys of a type without a Python type of its own were all taken for wrong ones: a repair
    or a replay read no row, and said nothing."""
    url = postgres_database()
    with psycopg.connect(url) as connection:
        connection.execute(
            "CREATE DOMAIN customer_no AS integer;"
            "CREATE TABLE by_domain (id customer_no PRIMARY KEY, updated_at timestamp);"
            "CREATE TABLE by_address (id inet PRIMARY KEY, updated_at timestamp);"
            "INSERT INTO by_domain VALUES (1, now()), (2, now());"
            "INSERT INTO by_address VALUES ('10.0.0.1', now()), ('10.0.0.2', now())"
        )
    engine = create_engine(url)
    for table, key in (("by_domain", "2"), ("by_address", "10.0.0.2")):
        source = SqlSource(engine, SourceTable(table=table, key="id", deleted=None))
        (frame,) = source.rows_with_keys([key], 10)
        assert [str(found) for found in frame["id"]] == [key]
    engine.dispose()


def test_a_read_stopped_early_leaves_no_query_running(postgres_database):
    engine, source = _seeded(postgres_database, 3000)
    batches = source.batches(None, 1000)
    next(batches)
    batches.close()  # what a run that fails on its first batch does
    with engine.connect() as connection:
        sessions = connection.execute(
            sa.text(
                "SELECT state FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalars()
        assert set(sessions) <= {"idle"}, "the stream was cancelled and its transaction ended"
    assert sum(len(batch) for batch in source.batches(None, 1000)) == 3000
    engine.dispose()


def test_a_connection_lost_before_the_stream_is_unavailable(postgres_database):
    """The classic read's cursor (the Arrow read's: tests/test_sql_arrow_reads.py)."""
    engine, _ = _seeded(postgres_database, 300)
    source = SqlSource(engine, CUSTOMERS, arrow=False)
    cut = []

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _(connection, cursor, statement, *args):
        if statement.startswith("DECLARE") and not cut:
            cut.append(connection.connection.dbapi_connection.info.backend_pid)
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (cut[0],))

    # The error names the server's reason, not what closing the dead connection ran into.
    reason = r"the source database of customers .* failed: .*terminating connection"
    with pytest.raises(SourceUnavailable, match=reason):
        list(source.batches(None, 100))
    assert cut, "the session was cut between declaring the cursor and fetching from it"
    assert sum(len(batch) for batch in source.batches(None, 100)) == 300
    engine.dispose()


def test_a_fault_of_the_statement_is_not_taken_for_an_unreachable_source(tmp_path):
    """sqlite3 files "no such column" (a table changed under the run) as OperationalError, and
    every OperationalError was "source unavailable … rerun when the source answers", which no
    rerun cures. Only a database that cannot be reached or used is unavailable."""
    engine = create_engine(f"sqlite:///{tmp_path / 'erp.sqlite'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE lines (id INTEGER PRIMARY KEY, memo TEXT)")
        connection.exec_driver_sql("INSERT INTO lines VALUES (1, 'x')")
    source = SqlSource(engine, SourceTable(table="lines", key="id", cursor=None, deleted=None))
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE lines DROP COLUMN memo")
    with pytest.raises(SourceReadFailed, match=r"refused a read of lines: .*no such column"):
        list(source.batches(None, 10))
    engine.dispose()


def test_an_unreachable_source_says_so_without_the_values_the_driver_quotes():
    """The drivers' messages repeat values (PII): sqlite3's "… with text 'José …'", MariaDB's
    "Duplicate entry '…'". What a source's or the state store's failure says masks them."""
    said = sqlite3.connect(":memory:")
    said.execute("CREATE TABLE people (name TEXT)")
    said.execute(
        "INSERT INTO people VALUES (CAST(? AS TEXT))", ("José <j@example.com>".encode("latin-1"),)
    )
    with pytest.raises(sqlite3.OperationalError) as raised:
        said.execute("SELECT name FROM people").fetchall()
    assert "j@example.com" in str(raised.value)
    masked = without_values(str(raised.value))
    assert "example.com" not in masked and "column 'name'" in masked
    assert without_values("Duplicate entry 'j@example.com' for key 'email'") == (
        "Duplicate entry '…' for key 'email'"
    )


def test_json_and_array_values_are_read_as_json_text(postgres_database):
    """jsonb, json and array values came as dicts and lists, which reached a destination's
    text field as Python's repr ("{'a': None, 'b': True}"), which no JSON reader takes. They
    are the server's JSON text: a numeric keeps its digits, NaN is a string (Python's own
    encoding made them strings and no JSON at all)."""
    url = postgres_database()
    with psycopg.connect(url) as connection:
        connection.execute(
            "CREATE TABLE docs (id int PRIMARY KEY, doc jsonb, raw json, tags text[], n int[], "
            "amounts numeric[], ratios float8[])"
        )
        connection.execute(
            'INSERT INTO docs VALUES (1, \'{"b": true, "a": null}\', \'{"z": 1, "y": ["é"]}\', '
            "'{red,green}', '{1,NULL}', '{1.10,2}', '{NaN,0.5}'), "
            "(2, '\"plain\"', NULL, '{}', NULL, NULL, NULL)"
        )
    engine = create_engine(url)
    source = SqlSource(engine, SourceTable(table="docs", key="id", cursor=None, deleted=None))
    [frame] = source.batches(None, 10)
    assert frame.drop(columns="id").values.tolist() == [
        [
            '{"a": null, "b": true}',
            '{"z": 1, "y": ["é"]}',
            '["red","green"]',
            "[1,null]",
            "[1.10,2]",
            '["NaN",0.5]',
        ],
        ['"plain"', None, "[]", None, None, None],
    ]
    engine.dispose()


def test_a_lookup_of_a_json_column_is_read_as_json_text(postgres_database):
    """A Lookup of a parent's jsonb or array column came as a dict or a list (Python's repr in a
    text field), though the table's own such columns came as JSON text."""
    url = postgres_database()
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE plans (id int PRIMARY KEY, terms jsonb)")
        connection.execute("CREATE TABLE quotas (id int PRIMARY KEY, caps numeric[])")
        connection.execute("CREATE TABLE subs (id int PRIMARY KEY, plan_id int, quota_id int)")
        connection.execute("""INSERT INTO plans VALUES (1, '{"tier": "gold"}')""")
        connection.execute("INSERT INTO quotas VALUES (2, '{1.50,2}')")
        connection.execute("INSERT INTO subs VALUES (10, 1, 2)")
    engine = create_engine(url)
    table = SourceTable(
        table="subs",
        key="id",
        cursor=None,
        deleted=None,
        lookups=(
            Lookup(name="terms", table="plans", via="plan_id", key="id", value="terms"),
            Lookup(name="caps", table="quotas", via="quota_id", key="id", value="caps"),
        ),
    )
    [frame] = SqlSource(engine, table).batches(None, 10)
    assert frame[["terms", "caps"]].values.tolist() == [['{"tier": "gold"}', "[1.50,2]"]]
    engine.dispose()


@pytest.mark.parametrize("dated", ["invoice_date", "created_at"])
def test_the_paid_total_sums_eur_invoices_dated_up_to_now(sql_database, dated):
    """The support tier's total summed a paid invoice dated 30 days ahead (only the window's
    start was bound), and yen as if they were euros, against the tiers' EUR floors: a customer
    who paid 0.30 EUR was silver, one who paid 300,000 JPY gold. A DATE's window ends today,
    inclusive; a timestamp's at the run's present."""
    url = sql_database()
    seed_erp(url, rows=20, seed=5)
    engine = create_engine(url)
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    invoices = sa.Table("invoices", sa.MetaData(), autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(sa.update(invoices).values(status="void"))
        chosen = connection.execute(
            sa.select(invoices.c.invoice_id).order_by(invoices.c.invoice_id).limit(4)
        ).scalars()
        for invoice, (customer, ahead, amount, currency) in zip(
            chosen,
            [(1, 0, 0.20, "EUR"), (1, 0, 0.10, "EUR"), (1, 30, 600, "EUR"), (2, 0, 300000, "JPY")],
            strict=True,
        ):
            moment = now + timedelta(days=ahead) - timedelta(minutes=1)
            connection.execute(
                sa.update(invoices)
                .where(invoices.c.invoice_id == invoice)
                .values(
                    customer_id=customer,
                    status="paid",
                    amount=amount,
                    currency=currency,
                    **{dated: moment.date() if dated == "invoice_date" else moment},
                )
            )
    [total] = HELPDESK_USERS.source.totals
    source = SqlSource(
        engine,
        dataclasses.replace(
            HELPDESK_USERS.source, totals=(dataclasses.replace(total, dated=dated),)
        ),
    )
    frame = pd.concat(source.rows_with_keys([1, 2], 10)).set_index("customer_id")
    assert frame["paid_last_12_months"].astype(float).round(2).to_dict() == {1: 0.30, 2: 0.0}
    engine.dispose()


def test_lookups_into_one_parent_twice_or_into_the_table_itself(sql_database):
    """An invoice's billing and shipping customer both from `customers`, and an employee's
    manager from `employees`: the parent table was joined under its own name twice, which every
    dialect refused (DuplicateAlias, "ambiguous column name", "Not unique table/alias")."""
    url = sql_database()
    engine = create_engine(url)
    metadata = sa.MetaData()
    customers = sa.Table(
        "customers",
        metadata,
        sa.Column("customer_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(40)),
    )
    invoices = sa.Table(
        "invoices",
        metadata,
        sa.Column("invoice_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("billed_to", sa.Integer),
        sa.Column("shipped_to", sa.Integer),
        sa.Column("invoice_date", sa.Date),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("deleted_at", sa.DateTime),
    )
    employees = sa.Table(
        "employees",
        metadata,
        sa.Column("employee_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(40)),
        sa.Column("reports_to", sa.Integer),
    )
    metadata.create_all(engine)
    changed = datetime(2025, 3, 1, 12)
    with engine.begin() as connection:  # rows by position: the columns' order above
        connection.execute(sa.insert(customers).values([(1, "Ada"), (2, "Grace")]))
        february = [date(2025, 2, 1), date(2025, 2, 2)]
        connection.execute(
            sa.insert(invoices).values(
                [
                    (10, 1, 2, february[0], changed, None),
                    (11, 2, None, february[1], changed, changed),
                ]
            )
        )
        connection.execute(
            sa.insert(employees).values([(1, "Adams", None), (2, "Edwards", 1), (3, "Peacock", 2)])
        )
    billed_and_shipped = SourceTable(
        table="invoices",
        key="invoice_id",
        lookups=(
            Lookup(
                "billed_name", table="customers", via="billed_to", key="customer_id", value="name"
            ),
            Lookup(
                "shipped_name", table="customers", via="shipped_to", key="customer_id", value="name"
            ),
        ),
    )
    source = SqlSource(engine, billed_and_shipped)
    names = ["invoice_id", "billed_name", "shipped_name"]
    both = [[10, "Ada", "Grace"], [11, "Grace", None]]
    since = changed - timedelta(hours=1)
    rows = [row for batch in source.batches(since, 1) for row in batch[names].values.tolist()]
    assert rows == both
    second = source.in_window("invoice_date", datetime(2025, 2, 2), datetime(2025, 2, 3))
    [window] = source.batches(None, 10, within=second)
    assert window[names].values.tolist() == [both[1]]
    assert pd.concat(source.rows_with_keys([11, 10], 2))[names].values.tolist() == both
    assert source.deleted_keys(since, within=second) == [11]
    assert source.changed_days(since, "invoice_date") == february

    manager = Lookup(
        "manager", table="employees", via="reports_to", key="employee_id", value="name"
    )
    staff = SourceTable(
        table="employees", key="employee_id", cursor=None, deleted=None, lookups=(manager,)
    )
    [frame] = SqlSource(engine, staff).batches(None, 10)
    assert frame[["name", "manager"]].values.tolist() == [
        ["Adams", None],
        ["Edwards", "Adams"],
        ["Peacock", "Edwards"],
    ]
    engine.dispose()


@pytest.mark.mariadb
def test_a_mariadb_query_over_its_time_limit_is_the_database_unavailable(mariadb_database):
    """A query MariaDB cut at max_statement_time (1969) was reported as the statement's own
    fault, not as a database to rerun against (PostgreSQL's statement_timeout, 57014, was)."""
    engine = create_engine(mariadb_database())
    with pytest.raises(sa.exc.DBAPIError) as cut, engine.connect() as connection:
        connection.exec_driver_sql(
            "SET STATEMENT max_statement_time = 0.05 FOR SELECT COUNT(*) FROM "
            "information_schema.columns a, information_schema.columns b, information_schema.columns c"
        )
    assert cut.value.orig.args[0] == 1969 and unreachable(cut.value)
    engine.dispose()


@pytest.mark.parametrize(
    ("code", "sqlstate", "unavailable"),
    [
        (1053, "08S01", True),  # a server shutting down
        (1152, "08S01", True),  # a connection aborted
        (1213, "40001", True),  # a deadlock
        (1205, "HY000", True),  # a lock wait timed out
        (1203, "42000", True),  # a user's connection limit: 42000 is no PostgreSQL class here
        (4025, "23000", False),  # a CHECK constraint: the record's
        (1366, "22007", False),  # an incorrect value: the record's
    ],
)
def test_mariadb_errors_are_classified_by_their_codes_not_as_postgresql(
    code, sqlstate, unavailable
):
    """PyMySQL carries MariaDB's SQLSTATE, which was read as PostgreSQL's (42000 is no class of
    PostgreSQL's unavailable ones): a user's connection limit counted as the statement's fault,
    a server shutting down mid-statement against the records."""
    driver_error = pymysql.err.OperationalError(code, "the server's words", sqlstate=sqlstate)
    error = sa.exc.DBAPIError.instance("SELECT 1", {}, driver_error, pymysql.err.Error)
    assert unreachable(error) is unavailable


@pytest.mark.mariadb
def test_a_mariadb_source_lost_mid_stream_under_a_chosen_zone_is_unavailable(mariadb_database):
    """Under a zone the URL chose, a read of a TIMESTAMP table runs in UTC and sets the session's
    zone back after it: on a connection lost mid-stream, setting it back raised SQLAlchemy's
    "Can't reconnect until invalid transaction is rolled back" in place of the lost source, so
    the run stopped with no "rerun when the source answers" and Dagster did not retry it."""
    url = mariadb_database()
    with create_engine(url).begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE notes (id INT PRIMARY KEY, memo TEXT, updated_at TIMESTAMP(6) NULL, "
            "deleted_at DATETIME NULL)"
        )
        connection.exec_driver_sql(  # some 25 MB: far more than the socket buffers hold
            "INSERT INTO notes SELECT seq, REPEAT('x', 500), '2025-01-01', NULL FROM seq_1_to_50000"
        )
    engine = create_engine(f"{url}?init_command=SET+time_zone%3D%27-05%3A00%27")
    source = SqlSource(engine, SourceTable(table="notes", key="id"))
    streaming = []

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _(connection, cursor, statement, *args):
        if "FROM notes ORDER BY" in " ".join(statement.split()):
            streaming.append(connection.connection.dbapi_connection.thread_id())

    batches = source.batches(None, 1000)
    next(batches)
    admin = pymysql.connect(**MARIADB_ADMIN, autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"KILL {streaming[0]}")
    admin.close()
    # PyMySQL's cursor of the killed stream fails to drain it when collected, a complaint about
    # the dead socket that is no finding of this suite: collected here, not amid another test
    # (a collection inside Python's parser aborts the whole session).
    hook, sys.unraisablehook = sys.unraisablehook, lambda _unraisable: None
    try:
        with pytest.raises(SourceUnavailable, match=r"the source database of notes .* failed"):
            for _batch in batches:
                pass
        assert sum(len(batch) for batch in source.batches(None, 10_000)) == 50_000
        engine.dispose()
        del batches
        gc.collect()
    finally:
        sys.unraisablehook = hook
