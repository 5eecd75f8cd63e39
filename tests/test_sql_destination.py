"""SQL destinations and sources on real SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import pandera.pandas as pa
import psycopg
import pytest
import sqlalchemy as sa
from pandera.typing import Series
from sqlalchemy.dialects import mysql, postgresql

from integrations.contracts import Contract
from integrations.engine.destination import (
    DestinationMismatch,
    DestinationUnavailable,
    OutboundRecord,
    RecordsRejected,
)
from integrations.engine.spec import FlowSpec, SourceTable, Target
from integrations.erp.seed import seed_erp
from integrations.sql.connect import create_engine, without_values
from integrations.sql.destination import SqlTable
from integrations.sql.fit import MICROSECOND_DATETIME
from integrations.sql.source import SqlSource
from tests.conftest import POSTGRES_ADMIN


class LedgerLineV1(pa.DataFrameModel):
    line_number: Series[str] = pa.Field(unique=True)
    amount: Series[float]
    booked_on: Series[str]
    memo: Series[str] = pa.Field(nullable=True)


def into_table(table: str, key: str, model: type[pa.DataFrameModel]) -> FlowSpec:
    """A flow of `model`'s records into `table`, keyed by `key`; these tests need no source."""
    contract = Contract(f"test.{table}", 1, model)
    return FlowSpec(
        name=f"test_{table}",
        source=SourceTable(table="unused", key="id"),
        source_contract=contract,
        target=Target(system="books", dataset=table, id_property=key),
        target_contract=contract,
        mapping=lambda rows: rows,
    )


LINES = into_table("ledger_lines", "line_number", LedgerLineV1)


def record(number: str, amount: float, memo: str | None = "x") -> OutboundRecord:
    properties = {"line_number": number, "amount": amount, "booked_on": "2025-01-02", "memo": memo}
    return OutboundRecord(key=number.removeprefix("L"), properties=properties, trace_id=number)


def rows(engine: sa.Engine) -> dict[str, tuple]:
    with engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT line_number, amount, memo, archived_at FROM ledger_lines")
        ).all()
    return {row[0]: (float(row[1]), row[2], row[3]) for row in found}


@pytest.fixture
def engine(sql_database):
    engine = create_engine(sql_database())
    yield engine
    engine.dispose()


def test_upsert_by_key_archive_and_come_back(engine):
    table = SqlTable(engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    written = table.upsert(
        [record("L1", 10.0), record("L2", 20.5, None), record("L3", 30.0)]
    ).written
    assert [(w.key, w.destination_id, w.created) for w in written] == [
        ("1", "L1", True),
        ("2", "L2", True),
        ("3", "L3", True),
    ]

    again = table.upsert([record("L2", 21.0, "fixed"), record("L4", 40.0)]).written
    assert [(w.destination_id, w.created) for w in again] == [("L2", False), ("L4", True)]
    assert rows(engine)["L2"][:2] == (21.0, "fixed")

    table.archive(["L1"])
    assert rows(engine)["L1"][2] is not None
    assert sorted(id_value for id_value, _, _ in table.snapshot(["amount"])) == ["L2", "L3", "L4"]

    table.upsert([record("L1", 10.0)])
    assert rows(engine)["L1"][2] is None, "a record sent again is live again"
    assert len(rows(engine)) == 4


def test_equal_rows_are_left_alone(engine):
    table = SqlTable(engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    table.upsert([record("L1", 10.0)])
    written = table.upsert([record("L1", 10.0)]).written
    # PostgreSQL tells a row it found equal (None: nothing rewritten); the others update it.
    kept = None if engine.dialect.name == "postgresql" else False
    assert [(w.destination_id, w.created) for w in written] == [("L1", kept)]
    assert rows(engine)["L1"][:2] == (10.0, "x")


TRICKY_TEXTS = [
    "tab\there",
    "line\nbreak",
    "carriage\rreturn",
    "back\\slash",
    "\\N",  # COPY's own word for NULL, as text
    "",
    "naïve café 東京 🚀",
    None,
]


def test_text_copy_must_escape_arrives_as_sent(engine):
    """PostgreSQL takes a batch as COPY text built by handoff: tabs, line breaks, backslashes and
    a literal \\N must arrive as they were sent, on a first load and on an update alike."""
    table = SqlTable(engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    numbers = [f"L{i}" for i in range(len(TRICKY_TEXTS))]
    table.upsert([record(n, 1.5, memo) for n, memo in zip(numbers, TRICKY_TEXTS, strict=True)])
    assert {n: rows(engine)[n][1] for n in numbers} == dict(zip(numbers, TRICKY_TEXTS, strict=True))

    changed = [*TRICKY_TEXTS[1:], TRICKY_TEXTS[0]]
    table.upsert([record(n, 2.5, memo) for n, memo in zip(numbers, changed, strict=True)])
    assert {n: rows(engine)[n][:2] for n in numbers} == {
        n: (2.5, memo) for n, memo in zip(numbers, changed, strict=True)
    }


def create(engine: sa.Engine, *columns: sa.Column | sa.Constraint) -> None:
    sa.Table("ledger_lines", sa.MetaData(), *columns).create(engine)


def ledger_columns(
    keyed: bool = True, amount=sa.Double, memo_nullable: bool = True, archived: bool = True
) -> list[sa.Column]:
    """The table LINES needs, or one with a single fault."""
    return [
        sa.Column("line_number", sa.String(20), primary_key=keyed),
        sa.Column("amount", amount),
        sa.Column("booked_on", sa.String(10)),
        sa.Column("memo", sa.Text, nullable=memo_nullable),
        *([sa.Column("archived_at", sa.DateTime)] if archived else []),
    ]


@pytest.mark.parametrize(
    ("fault", "column", "problem"),
    [
        ({"keyed": False}, "line_number", "not the primary key nor unique"),
        ({"memo_nullable": False}, "memo", "NOT NULL, but test.ledger_lines@v1 allows nulls"),
        ({"amount": sa.Integer}, "amount", "cannot hold the contract's float values"),
        ({"archived": False}, "archived_at", "missing, or not a nullable timestamp"),
    ],
    ids=["key-not-unique", "not-null", "type", "archive-column"],
)
def test_a_table_that_does_not_fit_is_refused_before_any_write(engine, fault, column, problem):
    create(engine, *ledger_columns(**fault))
    with pytest.raises(DestinationMismatch) as refused:
        SqlTable(engine, LINES.target).prepare(LINES)
    message = str(refused.value)
    assert "flow test_ledger_lines" in message
    assert "table 'ledger_lines'" in message
    assert f"column {column!r}" in message
    assert problem in message
    assert "What to do:" in message
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM ledger_lines")).scalar() == 0


LOOSE_KEYS = {  # key columns that take two different keys for one
    "sqlite": ["TEXT COLLATE NOCASE", "TEXT COLLATE RTRIM"],
    "postgresql": ["citext", "text COLLATE loose"],
    "mariadb": [],  # it refuses the second key as a duplicate: nothing is merged
}


def test_a_key_column_that_compares_loosely_is_refused_before_any_write(engine):
    """Under NOCASE, citext or a nondeterministic collation "abc" and "ABC" are one key: the
    second record was written over the first, and both counted."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS citext")
            connection.exec_driver_sql(
                "CREATE COLLATION loose (provider = icu, locale = 'und-u-ks-level2', "
                "deterministic = false)"
            )
    for declared in LOOSE_KEYS[engine.dialect.name]:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS ledger_lines")
            connection.exec_driver_sql(
                f"CREATE TABLE ledger_lines (line_number {declared} PRIMARY KEY, amount FLOAT, "
                "booked_on VARCHAR(10), memo TEXT, archived_at TIMESTAMP NULL)"
            )
        with pytest.raises(DestinationMismatch) as refused:
            SqlTable(engine, LINES.target).prepare(LINES)
        assert "column 'line_number'" in str(refused.value), declared
        assert "differ only in case or trailing spaces" in str(refused.value), declared


class CodeV1(pa.DataFrameModel):
    code: Series[str]
    name: Series[str]


def test_a_char_or_date_key_is_written_read_and_archived_as_its_text(engine):
    """PostgreSQL pads a CHAR(n) key: read back "a1  ", it was counted as updated and reported
    missing and extra by reconciliation; a key ending in a space is refused, as it would be
    another's. A DATE key's archive compared a date with text (PostgreSQL refused it)."""
    for key_type, keys in ((sa.CHAR(4), ["EUR", "a1"]), (sa.Date, ["2025-01-02", "2025-01-03"])):
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS codes")
        sa.Table(
            "codes",
            sa.MetaData(),
            sa.Column("code", key_type, primary_key=True),
            sa.Column("name", sa.Text),
            sa.Column("archived_at", sa.DateTime),
        ).create(engine)
        spec = into_table("codes", "code", CodeV1)
        table = SqlTable(engine, spec.target)
        table.prepare(spec)

        def coded(key: str, name: str) -> OutboundRecord:
            return OutboundRecord(key=key, properties={"code": key, "name": name}, trace_id=key)

        first = table.upsert([coded(keys[0], "one")])
        again = table.upsert([coded(keys[0], "uno"), coded(keys[1], "two")])
        assert [(w.destination_id, w.created) for w in first.written] == [(keys[0], True)]
        assert [(w.destination_id, w.created) for w in again.written] == [
            (keys[0], False),
            (keys[1], True),
        ]
        assert sorted(key for key, _, _ in table.snapshot(["name"])) == keys
        table.archive([keys[0]])
        assert [key for key, _, _ in table.snapshot(["name"])] == [keys[1]]
        if key_type is sa.Date:
            continue
        padded = table.upsert([coded("EUR ", "padded")])
        if engine.dialect.name == "sqlite":  # it keeps CHAR text as sent: another key
            assert [w.destination_id for w in padded.written] == ["EUR "]
        else:
            assert "pads keys with spaces" in padded.refused[0].reason


class ShapedV1(pa.DataFrameModel):
    shape_id: Series[str]
    count: Series[pa.UInt32]
    flag: Series[int]


SHAPES = into_table("shapes", "shape_id", ShapedV1)


def test_fields_and_keys_of_the_wrong_kind_are_refused_before_any_write(engine):
    """An int field in a BOOLEAN column (2 stored, read back true), a time key (the ledger's
    text is not the column's), a field named archived_at (handoff's own): refused.
    An unsigned int field is an int (it was taken for text)."""
    created = SqlTable(engine, SHAPES.target, create_missing=True)
    created.prepare(SHAPES)
    assert isinstance(created.table.c["count"].type, sa.Integer)

    def refused(*columns: sa.Column) -> str:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS shapes")
        sa.Table("shapes", sa.MetaData(), *columns).create(engine)
        with pytest.raises(DestinationMismatch) as refusal:
            SqlTable(engine, SHAPES.target).prepare(SHAPES)
        return str(refusal.value).replace("TINYINT", "BOOLEAN")  # MariaDB's BOOLEAN

    def fitting() -> list[sa.Column]:
        return [sa.Column("count", sa.BigInteger), sa.Column("archived_at", sa.DateTime)]

    shape_id = sa.Column("shape_id", sa.String(20), primary_key=True)
    assert "column 'flag': type BOOLEAN keeps only true and false" in refused(  # TINYINT
        shape_id, *fitting(), sa.Column("flag", sa.Boolean)
    )
    assert "as the key: a time's text is not one" in refused(
        sa.Column("shape_id", sa.DateTime, primary_key=True),
        *fitting(),
        sa.Column("flag", sa.Integer),
    )
    archived = into_table("marked", "shape_id", ArchivedFieldV1)
    for _ in ("missing", "there"):
        with pytest.raises(DestinationMismatch, match=r"'archived_at'.*keeps this column"):
            SqlTable(engine, archived.target, create_missing=True).prepare(archived)
        sa.Table("marked", sa.MetaData(), sa.Column("shape_id", sa.Text), *fitting()).create(
            engine, checkfirst=True
        )


class ArchivedFieldV1(pa.DataFrameModel):
    shape_id: Series[str]
    archived_at: Series[pa.DateTime] = pa.Field(nullable=True)


def test_a_generated_column_is_refused_and_a_table_changed_mid_run_stops_it(engine):
    """A contract field in a generated column: no record could be written (on SQLite each chunk
    was taken for an unreachable database, to be retried for good). A column dropped under a
    run stops it, as a table that no longer fits (its records are not at fault); a full disk
    is the database unable to write, not the records' refusal either."""
    create(
        engine,
        *ledger_columns(),
        sa.Column("total", sa.Float, sa.Computed("amount * 2", persisted=True)),
    )
    SqlTable(engine, LINES.target).prepare(LINES)  # not in the contract: the database fills it
    doubled = into_table("ledger_lines", "line_number", DoubledLineV1)
    with pytest.raises(DestinationMismatch, match="column 'total': a generated column"):
        SqlTable(engine, doubled.target).prepare(doubled)
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE ledger_lines DROP COLUMN memo")
    with pytest.raises(DestinationMismatch, match="the table changed since the run checked it"):
        table.upsert([record("L1", 10.0)])
    if engine.dialect.name != "sqlite":
        return
    full = SqlTable(create_engine(str(engine.url)), LINES.target)
    with full.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE ledger_lines ADD COLUMN memo TEXT")
    full.prepare(LINES)

    @sa.event.listens_for(full.engine, "connect")
    def _no_room(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA max_page_count = 1")

    full.engine.dispose()
    with pytest.raises(DestinationUnavailable, match="cannot write"):
        full.upsert([record(f"L{n}", 1.0, "x" * 5000) for n in range(50)])
    full.engine.dispose()


class DoubledLineV1(LedgerLineV1):
    total: Series[float]


def test_a_missing_table_is_named_with_what_to_do(engine):
    with pytest.raises(DestinationMismatch, match=r"no table 'ledger_lines'.*What to do"):
        SqlTable(engine, LINES.target).prepare(LINES)


def test_a_refused_record_is_rejected_without_its_value(engine):
    create(engine, *ledger_columns(), sa.CheckConstraint("amount > 0", name="positive_amount"))
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    with pytest.raises(RecordsRejected) as refused:
        table.upsert([record("L1", 10.0), record("L2", -987654.0)])
    assert "987654" not in str(refused.value)
    assert rows(engine) == {}, "the whole chunk is one transaction"


@pytest.mark.postgres
def test_a_record_beyond_a_postgres_limit_is_its_own_refusal(postgres_database):
    """An index row too large (SQLSTATE 54000, an OperationalError to psycopg) was taken for an
    unreachable database: psycopg's args hold the message, not a code. Every run stopped on the
    one record; now it is that record's refusal, and the others land."""
    engine = create_engine(postgres_database())
    create(engine, *ledger_columns(), sa.Index("ledger_memo", "memo"))
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    noise = "".join(format(n * 7919 % 10007, "x") for n in range(1500))  # no run to compress
    with pytest.raises(RecordsRejected, match="index row size"):
        table.upsert([record("L1", 1.0), record("L2", 2.0, noise)])
    table.upsert([record("L1", 1.0)])
    assert list(rows(engine)) == ["L1"]
    engine.dispose()


@contextmanager
def a_user_who_cannot_update(engine: sa.Engine) -> Iterator[sa.Engine]:
    """An engine for a new user of `engine`'s database who may read and insert ledger lines and
    create temporary tables, but not update."""
    user, database = f"handoff_test_{uuid.uuid4().hex[:8]}", engine.url.database
    if engine.dialect.name == "postgresql":
        grants = [
            f"CREATE ROLE {user} LOGIN",
            f"GRANT SELECT, INSERT ON ledger_lines TO {user}",
            f'GRANT TEMPORARY ON DATABASE "{database}" TO {user}',
        ]
        revokes = [f"DROP OWNED BY {user}", f"DROP ROLE {user}"]
    else:
        grants = [
            f"CREATE USER '{user}'@'%'",
            f"GRANT SELECT, INSERT, CREATE TEMPORARY TABLES ON `{database}`.* TO '{user}'@'%'",
        ]
        revokes = [f"DROP USER '{user}'@'%'"]
    with engine.begin() as connection:
        for statement in grants:
            connection.exec_driver_sql(statement.replace("%", "%%"))
    limited = create_engine(str(engine.url.set(username=user)))
    try:
        yield limited
    finally:
        limited.dispose()
        with engine.begin() as connection:
            for statement in revokes:
                connection.exec_driver_sql(statement.replace("%", "%%"))


def test_a_right_refused_stops_the_write_and_refuses_no_record(server_engine):
    """A revoked UPDATE right was taken for every record's refusal: each chunk was bisected down
    to single records, all dead-lettered and then held after the right came back. It is the
    configuration's fault: the run stops with what to do."""
    create(server_engine, *ledger_columns())
    with a_user_who_cannot_update(server_engine) as limited:
        table = SqlTable(limited, LINES.target)
        table.prepare(LINES)
        table.upsert([record("L1", 1.0)])
        with pytest.raises(DestinationMismatch, match=r"refused handoff's user a right.*grant"):
            table.upsert([record("L1", 2.0)])
    assert rows(server_engine)["L1"][0] == 1.0


@pytest.mark.postgres
def test_a_read_only_postgres_stops_the_write_and_refuses_no_record(postgres_database):
    """A database set read-only (or a hot standby) refused every record in turn (25006), and
    all were dead-lettered: it is unavailable for writes, and the run stops with what to do."""
    url = postgres_database()
    engine = create_engine(url)
    table = SqlTable(engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(
            f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" SET default_transaction_read_only = on'
        )
    engine.dispose()  # new sessions take the setting
    with pytest.raises(DestinationUnavailable, match=r"takes no writes.*point the flow's URL"):
        table.upsert([record("L1", 1.0)])
    engine.dispose()


def test_a_value_the_database_quotes_in_its_refusal_is_not_repeated(engine):
    """MariaDB says "Incorrect datetime value: '…' for column", PostgreSQL "date/time field value
    out of range: "…"": the value (a birth date: personal data) stays out of the DLQ and logs."""
    create(
        engine, *ledger_columns()[:2], sa.Column("booked_on", sa.DateTime), *ledger_columns()[3:]
    )
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    properties = {"line_number": "L1", "amount": 1.0, "booked_on": "1984-13-07", "memo": None}
    if engine.dialect.name == "sqlite":  # SQLite keeps any text in a DATETIME column
        return
    with pytest.raises(RecordsRejected) as refused:
        table.upsert([OutboundRecord(key="1", properties=properties, trace_id="1")])
    assert "13-07" not in str(refused.value) and "…" in str(refused.value), refused.value


class TextTimesV1(pa.DataFrameModel):
    stamp_id: Series[str]
    day: Series[str]  # text, into a DATE column
    at: Series[str]  # text, into a timestamp without a zone


def test_text_a_date_or_time_column_would_change_is_refused_or_said_in_utc(engine):
    """A DATE column dropped a time of day (SQLite and MariaDB even cut any text to ten
    characters), a timestamp without a zone dropped the text's offset: 10:00+05:00 was kept as
    10:00. Now such a record is refused with what to do, and an offset is turned into UTC."""
    spec = into_table("text_times", "stamp_id", TextTimesV1)
    sa.Table(
        "text_times",
        sa.MetaData(),
        sa.Column("stamp_id", sa.String(20), primary_key=True),
        sa.Column("day", sa.Date),
        sa.Column("at", MICROSECOND_DATETIME),
        sa.Column("archived_at", sa.DateTime),
    ).create(engine)
    table = SqlTable(engine, spec.target)
    table.prepare(spec)
    sent = {
        "1": ("2025-01-02", "2025-01-02T10:00:00+05:00"),
        "2": ("2025-01-02T00:00:00", "2025-01-02T10:00:00Z"),
        "3": ("2025-01-02T23:30:00", "2025-01-02T10:00:00"),
        "4": ("2025-01-02 and a note", "2025-01-02T10:00:00"),
        "5": ("2025-01-02", "Jan 2 2025 10:00 EST"),
        "6": ("2025-01-02", "２０２５-01-02T10:00:00"),  # full-width digits
        "7": ("2025-01-02", "2025-01-02T10:00:00\n"),
    }
    outcome = table.upsert(
        [
            OutboundRecord(key=n, properties={"stamp_id": n, "day": d, "at": t}, trace_id=n)
            for n, (d, t) in sent.items()
        ]
    )
    reasons = {refusal.key: refusal.reason for refusal in outcome.refused}
    assert sorted(reasons) == ["3", "4", "5", "6", "7"]
    assert "column 'day' is a DATE and the text holds a time of day" in reasons["3"]
    assert "column 'day' is a DATE and the text is no ISO 8601 date" in reasons["4"]
    for refused in "567":
        assert "column 'at' is a timestamp and the text is no ISO 8601" in reasons[refused]
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT stamp_id, day, at FROM text_times")).all()
    as_text = {n: (str(day)[:10], str(at)[:19].replace("T", " ")) for n, day, at in stored}
    assert as_text == {
        "1": ("2025-01-02", "2025-01-02 05:00:00"),
        "2": ("2025-01-02", "2025-01-02 10:00:00"),
    }
    if engine.dialect.name == "postgresql":  # its dates and times without end stay welcome
        endless = {"stamp_id": "6", "day": "infinity", "at": "-infinity"}
        assert table.upsert([OutboundRecord("6", endless, "6")]).refused == []


@pytest.mark.parametrize(
    ("said", "shown"),
    [
        ('value "4915112345678" is out of range for type integer', 'value "…" is out of range'),
        ("Duplicate entry 'o'brien for sure@x.com' for key 'email'", "entry '…' for key 'email'"),
        ('invalid input syntax for type integer: "Bob" is my name, 42"', 'integer: "…"'),
        ('column "born" is of type date', 'column "born" is of type date'),
    ],
)
def test_the_databases_words_keep_no_value(said, shown):
    assert shown in without_values(said)


def test_text_that_is_no_valid_unicode_is_the_records_refusal(engine):
    """A lone surrogate (JSON's "\\ud800" decodes to one) failed the whole run, on every rerun,
    with the codec's error: it is the record's refusal, for the engine to find and dead-letter."""
    create(engine, *ledger_columns())
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    with pytest.raises(RecordsRejected, match="no valid Unicode"):
        table.upsert([record("L1", 1.0, "x\ud800y")])
    if engine.dialect.name != "mariadb":
        return
    # A connection in latin1 cannot carry 東京: the configuration's fault, not the record's.
    latin = create_engine(str(engine.url.update_query_dict({"charset": "latin1"})))
    in_latin = SqlTable(latin, LINES.target)
    in_latin.prepare(LINES)
    with pytest.raises(DestinationMismatch, match="connect in UTF-8"):
        in_latin.upsert([record("L1", 1.0, "Tokyo 東京")])
    latin.dispose()


def refusing_rounded_values(engine: sa.Engine, amount, declared: str) -> SqlTable:
    """Lines with values an `amount` column of 8 digits, 2 decimals would not keep: those are
    refused, naming the column (as `declared`, a pattern) and what to do; the rest lands."""
    create(engine, *ledger_columns(amount=amount))
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    outcome = table.upsert(
        [
            record("L1", 10.25),
            record("L2", 12.345),  # a third decimal
            record("L3", 0.1 + 0.2),  # 0.30000000000000004
            record("L4", 1_234_567.0),  # seven digits before the point, room for six
            record("L5", 999_999.99),
        ]
    )
    assert [w.destination_id for w in outcome.written] == ["L1", "L5"]
    reasons = {refusal.key: refusal.reason for refusal in outcome.refused}
    assert sorted(reasons) == ["2", "3", "4"]
    for key in ("2", "3"):
        assert re.search(f"column 'amount' is {declared}", reasons[key]), reasons[key]
        assert "more than 2 decimals, and the column would store it rounded" in reasons[key]
        assert "What to do:" in reasons[key]
    assert "more than 6 digits before the decimal point" in reasons["4"]
    assert not any("12.345" in reason or "1234567" in reason for reason in reasons.values())
    assert {number: amount for number, (amount, _, _) in rows(engine).items()} == {
        "L1": 10.25,
        "L5": 999_999.99,
    }
    return table


@pytest.mark.mariadb
def test_mariadb_rounds_into_a_double_with_decimals_and_such_a_value_is_refused(
    mariadb_database,
):
    """MariaDB's DOUBLE(p, s) (FLOAT(p, s) too) rounds every value to s decimals without a word,
    even in strict mode: 12.345 was stored 12.35 and counted written as sent."""
    engine = create_engine(mariadb_database())
    refusing_rounded_values(engine, mysql.DOUBLE(8, 2), r"DOUBLE\(8, 2\)")
    engine.dispose()


def test_a_value_a_fixed_point_column_would_round_is_refused_alone(engine):
    """PostgreSQL and MariaDB round extra decimals into NUMERIC(p, s) without a word: such a
    record is refused with the column and what to do, and the rest of the chunk lands."""
    table = refusing_rounded_values(engine, sa.Numeric(8, 2), r"(NUMERIC|DECIMAL)\(8, 2\)")

    refused_all = table.upsert([record("L2", 12.345)])
    assert not refused_all.written and [r.key for r in refused_all.refused] == ["2"]


class ShortCodeV1(pa.DataFrameModel):
    code_id: Series[str]
    code: Series[str]


SHORT_CODES = into_table("short_codes", "code_id", ShortCodeV1)


def test_a_text_longer_than_its_column_is_refused_alone_not_cut(engine):
    """PostgreSQL and MariaDB cut the spaces beyond a VARCHAR(n)'s length without a word (the
    record then drifted for good), and refused a longer text naming no column: either record
    is refused alone with the column and what to do; the rest lands. SQLite keeps the text."""
    sa.Table(
        "short_codes",
        sa.MetaData(),
        sa.Column("code_id", sa.String(20), primary_key=True),
        sa.Column("code", sa.String(3)),
        sa.Column("archived_at", sa.DateTime),
    ).create(engine)
    table = SqlTable(engine, SHORT_CODES.target)
    table.prepare(SHORT_CODES)
    sent = {"1": "abc  ", "2": "abcd", "3": "ab"}
    outcome = table.upsert(
        [
            OutboundRecord(key=n, properties={"code_id": n, "code": c}, trace_id=n)
            for n, c in sent.items()
        ]
    )
    stored = {key: values["code"] for key, _, values in table.snapshot(["code"])}
    if engine.dialect.name == "sqlite":
        assert not outcome.refused and stored == sent
        return
    assert [w.key for w in outcome.written] == ["3"] and stored == {"3": "ab"}
    assert [r.key for r in outcome.refused] == ["1", "2"]
    for refused in outcome.refused:
        assert refused.reason.startswith("column 'code' is VARCHAR(3) and the text has")
        assert "What to do: widen the column" in refused.reason


class StampV1(pa.DataFrameModel):
    stamp_id: Series[str]
    at: Series[pa.DateTime]


class StampTextV1(pa.DataFrameModel):
    stamp_id: Series[str]
    at: Series[str]  # a time's ISO text, into the same timestamp column


STAMPS = into_table("stamps", "stamp_id", StampV1)
STAMP_TEXTS = into_table("stamps", "stamp_id", StampTextV1)
COARSE_TIMES = {  # a column without microseconds, as a user may have declared it
    "mysql": mysql.DATETIME(),
    "mariadb": mysql.DATETIME(),
    "postgresql": postgresql.TIMESTAMP(precision=0),
}


@pytest.mark.parametrize("spec", [STAMPS, STAMP_TEXTS], ids=["datetime", "text"])
def test_a_time_finer_than_its_column_keeps_is_refused_alone(engine, spec):
    """MariaDB cuts a DATETIME's fraction of a second, PostgreSQL rounds a timestamp(0)'s,
    without a word (and reconciliation then finds the record drifted for good): such a record
    is refused with the column and what to do, whether the field is a time or a time's text. A
    whole second lands; SQLite keeps the text."""
    sa.Table(
        "stamps",
        sa.MetaData(),
        sa.Column("stamp_id", sa.String(20), primary_key=True),
        sa.Column("at", COARSE_TIMES.get(engine.dialect.name, sa.DateTime())),
        sa.Column("archived_at", sa.DateTime),
    ).create(engine)
    table = SqlTable(engine, spec.target)
    table.prepare(spec)
    outcome = table.upsert(
        [
            OutboundRecord(key=n, properties={"stamp_id": n, "at": at}, trace_id=n)
            for n, at in [("1", "2025-01-03T10:00:00.000000"), ("2", "2025-01-03T10:00:00.700000")]
        ]
    )
    if engine.dialect.name == "sqlite":
        assert not outcome.refused and len(outcome.written) == 2
        return
    assert [w.key for w in outcome.written] == ["1"]
    (refused,) = outcome.refused
    assert refused.key == "2"
    assert refused.reason.startswith(
        "column 'at' has a finer fraction of a second than the 0 digits the column keeps"
    )
    assert "What to do:" in refused.reason


def dated(number: str, amount: float, booked_on: str, memo: str = "x") -> OutboundRecord:
    properties = {"line_number": number, "amount": amount, "booked_on": booked_on, "memo": memo}
    return OutboundRecord(key=number, properties=properties, trace_id=number)


SKIPPING_TRIGGERS = {
    "postgresql": [
        "CREATE FUNCTION no_negatives() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.amount < 0 THEN RETURN NULL; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER no_negatives BEFORE INSERT OR UPDATE ON ledger_lines "
        "FOR EACH ROW EXECUTE FUNCTION no_negatives()",
    ],
    "sqlite": [
        f"CREATE TRIGGER no_negative_{event} BEFORE {event} ON ledger_lines "
        "WHEN NEW.amount < 0 BEGIN SELECT RAISE(IGNORE); END"
        for event in ("INSERT", "UPDATE")
    ],
}


def test_a_row_a_trigger_skips_is_refused_not_counted_written(engine):
    """A BEFORE trigger that skips a row without an error (PostgreSQL's RETURN NULL, SQLite's
    RAISE(IGNORE)) had the record counted inserted (or unchanged) and marked synced, though it
    never reached the table. Now it is refused with why; the chunk's other rows land."""
    if engine.dialect.name not in SKIPPING_TRIGGERS:  # MariaDB's triggers cannot skip a row
        return
    create(engine, *ledger_columns())
    with engine.begin() as connection:
        for statement in SKIPPING_TRIGGERS[engine.dialect.name]:
            connection.exec_driver_sql(statement)
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    first = table.upsert([record("L1", 10.0), record("L2", -5.0), record("L3", 30.0)])
    assert [
        (r.key, "a trigger on the table skipped the row" in r.reason) for r in first.refused
    ] == [("2", True)]
    assert [(w.destination_id, w.created) for w in first.written] == [("L1", True), ("L3", True)]

    sent = [record("L1", -1.0), record("L3", 30.0), record("L4", -4.0), record("L5", 50.0)]
    second = table.upsert(sent)
    assert sorted(refusal.key for refusal in second.refused) == ["1", "4"]
    unchanged = None if engine.dialect.name == "postgresql" else False  # SQLite rewrites it
    assert [(w.destination_id, w.created) for w in second.written] == [
        ("L3", unchanged),
        ("L5", True),
    ]
    assert {n: amount for n, (amount, _, _) in rows(engine).items()} == {
        "L1": 10.0,
        "L3": 30.0,
        "L5": 50.0,
    }


LOWER_MEMO = (
    "CREATE FUNCTION lower_memo() RETURNS trigger AS $$ BEGIN "
    "NEW.memo := lower(NEW.memo); RETURN NEW; END $$ LANGUAGE plpgsql"
)
SUPPRESS_REDUNDANT = (  # named to fire after the others, as PostgreSQL's manual advises
    "CREATE TRIGGER z_min_update BEFORE UPDATE ON ledger_lines "
    "FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()"
)
HARMLESS_TRIGGERS = {  # PostgreSQL BEFORE triggers that change or spare a write, never skip one
    "normalising": [
        LOWER_MEMO,
        "CREATE TRIGGER lower_memo BEFORE INSERT OR UPDATE ON ledger_lines "
        "FOR EACH ROW EXECUTE FUNCTION lower_memo()",
    ],
    "normalising updates": [
        LOWER_MEMO,
        "CREATE TRIGGER lower_memo BEFORE UPDATE ON ledger_lines "
        "FOR EACH ROW EXECUTE FUNCTION lower_memo()",
    ],
    "suppressing redundant updates": [SUPPRESS_REDUNDANT],
    "normalising updates, suppressing redundant ones": [
        LOWER_MEMO,
        "CREATE TRIGGER lower_memo BEFORE UPDATE ON ledger_lines "
        "FOR EACH ROW EXECUTE FUNCTION lower_memo()",
        SUPPRESS_REDUNDANT,
    ],
}


@pytest.mark.parametrize("trigger", list(HARMLESS_TRIGGERS))
def test_a_trigger_that_changes_values_or_spares_equal_rows_refuses_no_record(engine, trigger):
    """A BEFORE trigger that lowers a value, or skips an update that changes nothing: records
    sent again onto rows that hold them (a rerun after a crash, a replay), or changed, were
    refused as rows a trigger skipped."""
    if engine.dialect.name != "postgresql":
        return
    create(engine, *ledger_columns())
    with engine.begin() as connection:
        for statement in HARMLESS_TRIGGERS[trigger]:
            connection.exec_driver_sql(statement)
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    sent = [record("L1", 1.0, "Mixed"), record("L2", 2.0, "Case")]
    assert table.upsert(sent).refused == []
    again = table.upsert(sent)
    assert again.refused == [] and [w.created for w in again.written] == [None, None]
    changed = [record("L1", 1.5, "Mixed"), record("L2", 2.0, "Case")]
    for _ in range(2):  # the second: onto a row an update trigger normalised
        outcome = table.upsert(changed)
        assert outcome.refused == [] and len(outcome.written) == 2
    assert {n: amount for n, (amount, _, _) in rows(engine).items()} == {"L1": 1.5, "L2": 2.0}


CLOSED_PERIOD = [
    "CREATE FUNCTION closed_period() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF OLD.booked_on < '2025-02-01' THEN RETURN NULL; END IF; RETURN NEW; END $$",
    "CREATE TRIGGER closed_period BEFORE UPDATE ON ledger_lines "
    "FOR EACH ROW EXECUTE FUNCTION closed_period()",
]


def test_an_update_a_guard_skips_beside_the_suppressor_is_refused(engine):
    """Beside an update-only normaliser and `suppress_redundant_updates_trigger`, a guard that
    skips updates of a closed period (RETURN NULL): a change to a closed row is refused, every
    time it is sent, while one resent onto an open row the normaliser rewrote is not."""
    if engine.dialect.name != "postgresql":
        return
    create(engine, *ledger_columns())
    with engine.begin() as connection:
        for statement in [
            *HARMLESS_TRIGGERS["normalising updates, suppressing redundant ones"],
            *CLOSED_PERIOD,
        ]:
            connection.exec_driver_sql(statement)
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    opened = [dated("L1", 1.0, "2025-01-02", "Mixed"), dated("L2", 2.0, "2025-03-01", "Mixed")]
    assert table.upsert(opened).refused == []
    changed = [dated("L1", 1.5, "2025-01-02", "Mixed"), dated("L2", 2.5, "2025-03-01", "Mixed")]
    for _ in range(2):  # the second: L2 onto the row the normaliser rewrote
        outcome = table.upsert(changed)
        assert [refusal.key for refusal in outcome.refused] == ["L1"]
        assert [w.destination_id for w in outcome.written] == ["L2"]
    assert rows(engine) == {"L1": (1.0, "Mixed", None), "L2": (2.5, "mixed", None)}


def test_a_table_postgresql_keeps_from_updates_stops_the_write_refusing_no_record(engine):
    """A table a publication keeps from updates (no replica identity: SQLSTATE 55000) is no
    record's fault: every record of the batch was dead-lettered, then held once it was fixed."""
    if engine.dialect.name != "postgresql":
        return
    create(engine, *ledger_columns())
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    table.upsert([record("L1", 1.0)])
    name = f"handoff_test_{uuid.uuid4().hex[:8]}"
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE ledger_lines REPLICA IDENTITY NOTHING")
        connection.exec_driver_sql(f"CREATE PUBLICATION {name} FOR TABLE ledger_lines")
    try:
        with pytest.raises(DestinationUnavailable, match="replica identity"):
            table.upsert([record("L1", 2.0)])
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"DROP PUBLICATION {name}")


def test_a_clash_on_another_unique_column_is_refused_not_written_over(engine):
    """Only the key decides between insert and update: a record whose other unique value another
    row holds is refused (MariaDB's ON DUPLICATE KEY UPDATE would update that other row)."""
    create(engine, *ledger_columns(), sa.UniqueConstraint("booked_on", name="one_line_a_day"))
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    table.upsert([dated("L1", 10.0, "2025-01-01"), dated("L2", 20.0, "2025-01-02")])
    before = rows(engine)

    with pytest.raises(RecordsRejected) as refused:
        table.upsert([dated("L3", 30.0, "2025-01-01")])  # new, with L1's day
    assert "2025-01-01" not in str(refused.value), "the clashing value is not repeated"
    with pytest.raises(RecordsRejected):
        table.upsert([dated("L2", 25.0, "2025-01-01")])  # known, moved onto L1's day
    assert rows(engine) == before, "no other record was written over"

    written = table.upsert([dated("L2", 25.0, "2025-01-03"), dated("L4", 40.0, "2025-01-04")])
    assert [(w.destination_id, w.created) for w in written.written] == [("L2", False), ("L4", True)]
    assert rows(engine)["L2"][0] == 25.0
    assert rows(engine)["L1"] == before["L1"]


REPLACING = {
    "column": "booked_on VARCHAR(10) UNIQUE ON CONFLICT REPLACE, memo TEXT, archived_at TIMESTAMP",
    "table": 'booked_on VARCHAR(10), memo TEXT, archived_at TIMESTAMP, UNIQUE ("booked_on") '
    "ON CONFLICT REPLACE",
    "key's own": "booked_on VARCHAR(10), memo TEXT, archived_at TIMESTAMP, UNIQUE (line_number) "
    "ON CONFLICT REPLACE",
}


@pytest.mark.parametrize("declared", REPLACING.values(), ids=REPLACING.keys())
def test_a_sqlite_unique_column_that_replaces_rows_is_refused_before_any_write(tmp_path, declared):
    """SQLite's UNIQUE … ON CONFLICT REPLACE on another column deleted the row holding a new
    record's value without a word (the upsert's ON CONFLICT covers the key alone): a record
    lost, though the ledger held it synced. Refused before any write; on the key, harmless."""
    engine = create_engine(f"sqlite:///{tmp_path / 'replacing.sqlite'}")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE ledger_lines (line_number VARCHAR(20) PRIMARY KEY, amount DOUBLE, "
            f"{declared})"
        )
    table = SqlTable(engine, LINES.target)
    if "line_number" in declared:
        table.prepare(LINES)
        return
    with pytest.raises(DestinationMismatch) as refused:
        table.prepare(LINES)
    assert "column 'booked_on': unique with ON CONFLICT REPLACE" in str(refused.value)
    assert "What to do: make the table again without ON CONFLICT REPLACE" in str(refused.value)
    engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def impatient_engine(request):
    """An engine whose lock waits give up within a second (PostgreSQL 300 ms, MariaDB 1 s)."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_database")()
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE \"{url.rsplit('/', 1)[1]}\" SET lock_timeout = '300ms'")
    else:
        url = request.getfixturevalue("mariadb_database")()
        url += "?init_command=SET%20innodb_lock_wait_timeout%3D1"
    engine = create_engine(url)
    yield engine
    engine.dispose()


@contextmanager
def row_locked(engine: sa.Engine, number: str, release_after: float | None = None):
    """Another transaction holding the row of `number` (released after some seconds, or at the
    end of the block)."""
    holder = engine.connect()
    transaction = holder.begin()
    holder.execute(
        sa.text("UPDATE ledger_lines SET memo = 'held' WHERE line_number = :n"), {"n": number}
    )
    timer = threading.Timer(release_after or 0, transaction.rollback)
    if release_after is not None:
        timer.start()
    try:
        yield
    finally:
        if release_after is None:
            transaction.rollback()
        else:
            timer.join()
        holder.close()


def test_a_chunk_that_loses_a_lock_conflict_is_written_again(impatient_engine):
    table = SqlTable(impatient_engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    table.upsert([record("L1", 10.0), record("L2", 20.0)])
    with row_locked(impatient_engine, "L1", release_after=1.5):
        written = table.upsert([record("L1", 11.0), record("L3", 30.0)]).written
    assert [(w.destination_id, w.created) for w in written] == [("L1", False), ("L3", True)]
    assert {n: v[0] for n, v in rows(impatient_engine).items()} == {
        "L1": 11.0,
        "L2": 20.0,
        "L3": 30.0,
    }


def test_a_lock_held_past_every_attempt_is_unavailability_not_a_refusal(
    impatient_engine, monkeypatch
):
    monkeypatch.setattr("integrations.sql.destination.LOCK_ATTEMPTS", 2)
    table = SqlTable(impatient_engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    table.upsert([record("L1", 10.0)])
    with row_locked(impatient_engine, "L1"), pytest.raises(DestinationUnavailable) as lost:
        table.upsert([record("L1", 11.0), record("L2", 20.0)])
    assert "2 attempts lost lock conflicts" in str(lost.value)
    assert rows(impatient_engine) == {"L1": (10.0, "x", None)}, "nothing of the chunk was written"


@pytest.mark.mariadb
def test_a_key_another_run_inserts_meanwhile_is_updated_not_refused(mariadb_database):
    """MariaDB: keys are looked up, then new ones INSERTed, unlocked in between. A key another
    run inserts in that gap makes the INSERT fail; the chunk is run again and updates it."""
    url = mariadb_database()
    engine, other = create_engine(url), create_engine(url)
    table = SqlTable(engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    raced: list[bool] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _other_run_first(_connection, _cursor, statement, *_args):
        if statement.startswith("INSERT INTO ledger_lines") and not raced:
            raced.append(True)
            with other.begin() as connection:
                connection.execute(
                    sa.text(
                        "INSERT INTO ledger_lines (line_number, amount, booked_on, memo) "
                        "VALUES ('L2', 1.0, '2025-01-01', 'theirs')"
                    )
                )

    written = table.upsert([record("L1", 10.0), record("L2", 20.0)]).written
    assert raced
    assert [(w.destination_id, w.created) for w in written] == [("L1", True), ("L2", False)]
    assert rows(engine) == {"L1": (10.0, "x", None), "L2": (20.0, "x", None)}
    engine.dispose()
    other.dispose()


@pytest.mark.mariadb
def test_a_lax_mariadb_server_still_refuses_what_it_would_cut(mariadb_database):
    """A server whose sql_mode is not strict would cut a text too long for its column, with a
    warning only: handoff's session refuses it, so the record is dead-lettered, not cut."""
    engine = create_engine(mariadb_database() + "?init_command=SET%20sql_mode%3D%27%27")
    create(engine, *ledger_columns())  # memo is TEXT: at most 65,535 bytes
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    with pytest.raises(RecordsRejected, match="too long"):
        table.upsert([dated("L1", 10.0, "2025-01-01", memo="x" * 70_000)])
    assert rows(engine) == {}
    engine.dispose()


@pytest.mark.mariadb
def test_a_record_larger_than_mariadbs_packet_is_its_own_refusal(mariadb_database):
    """A record beyond the server's max_allowed_packet (a long text the LONGTEXT column holds)
    made the server close the connection: every run stopped as "unavailable", on that one
    record. Now it is refused alone, before the write, with what to do."""
    engine = create_engine(mariadb_database())
    create(
        engine,
        *ledger_columns()[:3],
        sa.Column("memo", mysql.LONGTEXT),
        sa.Column("archived_at", sa.DateTime),
    )
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    with engine.connect() as connection:
        packet = connection.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one()
    outcome = table.upsert([record("L1", 1.0), record("L2", 2.0, "x" * packet)])
    [refusal] = outcome.refused
    assert refusal.key == "2" and "more than the server's max_allowed_packet" in refusal.reason
    assert "column 'memo'" in refusal.reason and "What to do: raise" in refusal.reason
    assert list(rows(engine)) == ["L1"]
    engine.dispose()


def test_source_streams_in_batches_by_cursor_and_key(sql_database):
    url = sql_database()
    seed_erp(url, rows=250, seed=3)
    engine = create_engine(url)
    source = SqlSource(engine, SourceTable(table="customers", key="customer_id"))
    batches = list(source.batches(None, 100))
    assert [len(batch) for batch in batches] == [100, 100, 50]
    everything = pd.concat(batches)
    order = list(zip(everything["updated_at"], everything["customer_id"], strict=True))
    assert order == sorted(order)
    middle = everything["updated_at"].iloc[125]
    since = list(source.batches(middle.to_pydatetime(), 100))
    assert sum(len(batch) for batch in since) == (everything["updated_at"] >= middle).sum()
    engine.dispose()


@pytest.mark.mariadb
def test_a_key_equal_only_under_the_collation_is_refused_not_taken_for_a_race(mariadb_database):
    """MariaDB's default collation holds 'ABC' and 'abc ' equal to 'abc': a different key for
    handoff, which MariaDB refuses as a duplicate. Refused (the record is dead-lettered), not
    retried as a race with another run until the destination counts as unavailable."""
    engine = create_engine(mariadb_database())
    table = SqlTable(engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    table.upsert([record("abc", 1.0)])
    for twin in ("ABC", "abc "):
        with pytest.raises(RecordsRejected, match="Duplicate entry"):
            table.upsert([record(twin, 2.0)])
    assert rows(engine) == {"abc": (1.0, "x", None)}
    engine.dispose()


@pytest.mark.postgres
def test_copy_text_arrives_intact_in_a_latin1_database(postgres_database):
    """COPY text is UTF-8; sessions say so, and the server converts it to the database's
    encoding, refusing what that encoding cannot hold instead of storing it garbled."""
    url = postgres_database("ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    engine = create_engine(url)
    table = SqlTable(engine, LINES.target, create_missing=True)
    table.prepare(LINES)
    table.upsert([record("L1", 1.0, "Café Müller"), record("L2", 2.0, "Zoë")])  # a first load
    table.upsert([record("L1", 1.5, "Crème brûlée")])  # an update, through the temporary table
    assert {number: memo for number, (_, memo, _) in rows(engine).items()} == {
        "L1": "Crème brûlée",
        "L2": "Zoë",
    }
    with pytest.raises(RecordsRejected, match="has no equivalent in encoding"):
        table.upsert([record("L3", 3.0, "東京")])
    engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def server_engine(request):
    """PostgreSQL and MariaDB, whose 4-byte floats and partial indexes SQLite does not share."""
    engine = create_engine(request.getfixturevalue(f"{request.param}_database")())
    yield engine
    engine.dispose()


def test_a_single_precision_float_column_is_refused_before_any_write(server_engine):
    create(server_engine, *ledger_columns(amount=sa.REAL().with_variant(mysql.FLOAT(), "mariadb")))
    with pytest.raises(DestinationMismatch, match="keeps about 7 significant digits"):
        SqlTable(server_engine, LINES.target).prepare(LINES)


class CountedV1(pa.DataFrameModel):
    number: Series[str] = pa.Field(unique=True)
    count: Series[int]
    flag: Series[bool]


COUNTED = into_table("counted", "number", CountedV1)


def counted(number: str, count: int, flag: bool) -> OutboundRecord:
    properties = {"number": number, "count": count, "flag": flag}
    return OutboundRecord(key=number, properties=properties, trace_id=number)


def test_whole_numbers_a_float_column_would_round_are_refused_and_flags_fit_integers(engine):
    """An int field in a DOUBLE column: beyond 2**53 not every whole number is a double, so such
    a value is refused, alone. A bool field in an INTEGER column is written as 1/0."""
    sa.Table(
        "counted",
        sa.MetaData(),
        sa.Column("number", sa.String(20), primary_key=True),
        sa.Column("count", sa.Double),
        sa.Column("flag", sa.SmallInteger),
        sa.Column("archived_at", sa.DateTime),
    ).create(engine)
    table = SqlTable(engine, COUNTED.target)
    table.prepare(COUNTED)
    outcome = table.upsert(
        [counted("a", 2**53, True), counted("b", 2**53 + 1, False), counted("c", -7, False)]
    )
    assert [w.destination_id for w in outcome.written] == ["a", "c"]
    assert [(r.key, "beyond 9,007,199,254,740,992" in r.reason) for r in outcome.refused] == [
        ("b", True)
    ]
    with engine.connect() as connection:
        found = connection.execute(sa.text("SELECT number, count, flag FROM counted")).all()
    assert sorted((n, int(c), f) for n, c, f in found) == [("a", 2**53, 1), ("c", -7, 0)]


@pytest.mark.postgres
def test_a_partial_unique_index_on_the_key_does_not_count_as_unique(postgres_database):
    """ON CONFLICT cannot use a unique index WHERE …: the first load would pass, every update
    fail. Refused before any write instead."""
    engine = create_engine(postgres_database())
    create(
        engine,
        *ledger_columns(keyed=False),
        sa.Index(
            "live_lines",
            "line_number",
            unique=True,
            postgresql_where=sa.text("archived_at IS NULL"),
        ),
    )
    with pytest.raises(DestinationMismatch, match="not the primary key nor unique"):
        SqlTable(engine, LINES.target).prepare(LINES)
    engine.dispose()


class StampedV1(pa.DataFrameModel):
    number: Series[str] = pa.Field(unique=True)
    at: Series[pa.DateTime]


@pytest.mark.postgres
@pytest.mark.parametrize("initially", ["IMMEDIATE", "DEFERRED"])
def test_a_deferrable_key_is_refused_before_any_write(postgres_database, initially):
    """A DEFERRABLE primary key passed the check, then no record could be updated: ON CONFLICT
    takes no deferrable arbiter (every run stopped, as if the database were unreachable), or,
    INITIALLY DEFERRED, every changed record was dead-lettered as a duplicate at commit."""
    engine = create_engine(postgres_database())
    key = sa.PrimaryKeyConstraint("line_number", deferrable=True, initially=initially)
    create(engine, *ledger_columns(keyed=False), key)
    with pytest.raises(DestinationMismatch, match=r"is DEFERRABLE.*add it again without"):
        SqlTable(engine, LINES.target).prepare(LINES)
    engine.dispose()


@pytest.mark.mariadb
def test_a_table_created_on_mariadb_keeps_microseconds(mariadb_database):
    """MariaDB's DATETIME keeps whole seconds and drops the rest without a word: handoff creates
    DATETIME(6)."""
    stamped = into_table("stamped", "number", StampedV1)
    engine = create_engine(mariadb_database())
    table = SqlTable(engine, stamped.target, create_missing=True)
    table.prepare(stamped)
    properties = {"number": "s1", "at": "2025-01-01T10:00:00.123456"}
    table.upsert([OutboundRecord(key="s1", properties=properties, trace_id="s1")])
    with engine.connect() as connection:
        found = connection.execute(sa.text("SELECT at FROM stamped")).scalar_one()
    assert found.microsecond == 123456
    engine.dispose()


def test_a_snapshot_reads_flags_as_sent(engine):
    """Reconciliation compares the snapshot with what was sent: a flag is True/False on every
    dialect (MariaDB keeps it as TINYINT(1), which reads as 1/0)."""
    table = SqlTable(engine, COUNTED.target, create_missing=True)
    table.prepare(COUNTED)
    table.upsert([counted("a", 1, True), counted("b", 2, False)])
    found = {key: values for key, _, values in table.snapshot(["count", "flag"])}
    # as reconciliation compares them: text (1 == True in Python, "1" != "True")
    assert {key: {k: str(v) for k, v in values.items()} for key, values in found.items()} == {
        "a": {"count": "1", "flag": "True"},
        "b": {"count": "2", "flag": "False"},
    }
