"""PostgreSQL's COPY (`bulk_write`, the SQL destination's and the ledger's writes) stores every
kind of value handoff sends as it reads back from a parameter: text with the characters COPY's
formats treat apart, "" apart from NULL, whole numbers past 64 bits, floats to the last bit,
decimals at their scale, times with and without zones. Real PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from integrations.sql.connect import (
    _COPY_ROWS,
    bulk_write,
    copy_columns,
    copy_new_rows,
    create_engine,
)

pytestmark = pytest.mark.postgres

AT = datetime(2025, 3, 4, 5, 6, 7, 890123)
PLUS_TWO = timezone(timedelta(hours=2))
TEXTS = [
    *("", None, "tab\there", "new\nline", "cr\r", "crlf\r\n", 'say "hi"', '"', "a,b", ","),
    *("back\\slash", "\\", "\\N", "\\.", "line\n\\.\nafter", "NULL", " padded ", "Zoë 東京 🙂"),
]
MIXED = [True, 7, 2**70, -0.0, Decimal("1.50"), AT, AT.replace(tzinfo=PLUS_TWO), "x", None]
FLOATS = [-0.0, 0.0, float("nan"), float("inf"), -float("inf"), 0.1, 1e16, 5e-324, 1.0, None]

# (column type, values sent, values read back)
CASES = {
    "texts": (sa.Text, TEXTS, TEXTS),
    "mixed kinds as text": (
        sa.Text,
        MIXED,
        [
            "t",
            "7",
            str(2**70),
            "-0.0",
            "1.50",
            AT.isoformat(),
            f"{AT.isoformat()}+02:00",
            "x",
            None,
        ],
    ),
    "booleans as text": (sa.Text, [True, False, None], ["t", "f", None]),
    "whole numbers as text": (
        sa.Text,
        [0, -(2**63), 2**63 - 1],
        ["0", str(-(2**63)), str(2**63 - 1)],
    ),
    "floats as text": (
        sa.Text,
        FLOATS,
        ["-0.0", "0.0", "nan", "inf", "-inf", "0.1", "1e+16", "5e-324", "1.0", None],
    ),
    "decimals as text": (
        sa.Text,
        [Decimal("1.50"), Decimal("NaN"), Decimal("-0.00"), Decimal("1E+2"), Decimal("2.5")],
        ["1.50", "NaN", "-0.00", "1E+2", "2.5"],
    ),
    "times as text": (
        sa.Text,
        [AT, AT.replace(microsecond=0), AT.replace(tzinfo=UTC), date(1, 1, 1)],
        [AT.isoformat(), "2025-03-04T05:06:07", f"{AT.isoformat()}+00:00", "0001-01-01"],
    ),
    "bigints": (sa.BigInteger, [0, -(2**63), 2**63 - 1, None], [0, -(2**63), 2**63 - 1, None]),
    "numbers past 64 bits": (
        sa.Numeric,
        [2**64, -(2**100), 5, None],
        [Decimal(2**64), Decimal(-(2**100)), Decimal(5), None],
    ),
    "decimals": (
        sa.Numeric,
        [Decimal("1.50"), Decimal("NaN"), Decimal("-0.00"), Decimal("1E+2"), 0.1, 3],
        [
            Decimal("1.50"),
            Decimal("NaN"),
            Decimal("0.00"),
            Decimal("100"),
            Decimal("0.1"),
            Decimal(3),
        ],
    ),
    "floats": (postgresql.DOUBLE_PRECISION, FLOATS, FLOATS),
    "booleans": (sa.Boolean, [True, False, None, "t", "false"], [True, False, None, True, False]),
    # A time without zone takes an aware time's wall clock: two at one instant differ.
    "times": (
        sa.DateTime,
        [AT, AT.replace(tzinfo=UTC), (AT + timedelta(hours=2)).replace(tzinfo=PLUS_TWO), None],
        [AT, AT, AT + timedelta(hours=2), None],
    ),
    "zoned times": (
        sa.DateTime(timezone=True),
        [AT.replace(tzinfo=UTC), (AT + timedelta(hours=2)).replace(tzinfo=PLUS_TWO), AT],
        [AT.replace(tzinfo=UTC)] * 3,
    ),
    "dates": (
        sa.Date,
        [date(1, 1, 1), date(9999, 12, 31), None],
        [date(1, 1, 1), date(9999, 12, 31), None],
    ),
    "json": (postgresql.JSONB, ['{"a": "b\\"c", "t": "x\\ty"}'], [{"a": 'b"c', "t": "x\ty"}]),
}


def case_table(metadata: sa.MetaData, name: str, kind) -> sa.Table:
    return sa.Table(
        name.replace(" ", "_"),
        metadata,
        sa.Column("k", sa.Text, primary_key=True),
        sa.Column("v", kind),
    )


def keys_of(values: list) -> list[str]:
    """Keys in descending order: a keyed write sorts them first."""
    return [f"k{at:03d}" for at in range(len(values))][::-1]


def read_back(connection: sa.Connection, table: sa.Table) -> list:
    return list(connection.execute(sa.select(table.c.v).order_by(table.c.k.desc())).scalars())


@pytest.mark.parametrize("way", ["copy", "first load", "upsert"])
def test_every_kind_of_value_reads_back_as_sent(postgres_database, way):
    """Straight COPY (no key), COPY of new rows (a first load), and COPY into a temporary table
    that then updates rows already there. Compared by repr: -0.0, NaN and a decimal's scale
    count."""
    engine = create_engine(postgres_database())
    metadata = sa.MetaData()
    tables = {name: case_table(metadata, name, kind) for name, (kind, _, _) in CASES.items()}
    metadata.create_all(engine)
    with engine.begin() as connection:
        for name, (_, sent, _) in CASES.items():
            key = () if way == "copy" else ["k"]
            if way == "upsert":
                bulk_write(connection, tables[name], {"k": keys_of(sent), "v": [None] * len(sent)})
            bulk_write(connection, tables[name], {"k": keys_of(sent), "v": sent}, key=key)
        found = {name: list(map(repr, read_back(connection, tables[name]))) for name in CASES}
    assert found == {name: list(map(repr, expected)) for name, (_, _, expected) in CASES.items()}
    engine.dispose()


def test_a_batch_of_many_parts_lands_whole_and_in_key_order(postgres_database):
    """A batch larger than one message to the server, its text spanning lines and quotes, lands
    whole; keyed, in the key's order (its index then fills leaf by leaf)."""
    engine = create_engine(postgres_database())
    table = case_table(sa.MetaData(), "many", sa.Text)
    table.metadata.create_all(engine)
    count = 2 * _COPY_ROWS + 1
    keys = [f"C{number:07d}" for number in range(count)]
    random.Random(3).shuffle(keys)
    values = [f'"{key}",\n\\.\n' if at % 3 else None for at, key in enumerate(keys)]
    with engine.begin() as connection:
        bulk_write(connection, table, {"k": keys, "v": values}, key=["k"])
        stored = connection.exec_driver_sql("SELECT k, v FROM many ORDER BY ctid").all()
    assert [key for key, _ in stored] == sorted(keys)
    assert dict(stored) == dict(zip(keys, values, strict=True))
    engine.dispose()


def test_copy_errors_keep_their_shape(postgres_database):
    """The database's refusal is SQLAlchemy's DBAPIError, as every other statement's; a key
    already there makes `copy_new_rows` write nothing and say so (None); a COPY says how many
    rows the table took."""
    engine = create_engine(postgres_database())
    table = case_table(sa.MetaData(), "refusals", sa.String(3))
    table.metadata.create_all(engine)
    with engine.begin() as connection:
        assert copy_columns(connection, "refusals", {"k": ["a", "b"], "v": ["abc", None]}) == 2
        assert copy_new_rows(connection, "refusals", {"k": ["c", "a"], "v": ["x", "y"]}) is None
        with pytest.raises(sa.exc.DataError, match="too long"):
            copy_new_rows(connection, "refusals", {"k": ["d"], "v": ["abcd"]})
    with engine.connect() as connection:
        assert dict(connection.execute(sa.select(table.c.k, table.c.v)).all()) == {
            "a": "abc",
            "b": None,
        }
    engine.dispose()
