"""SQL sources into SQL tables through the engine: change cursors and windows (NULL cursor values,
zoned timestamps, partition windows on a server whose time zone is not UTC), and the error budget
over records the destination refuses. Real SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, date, datetime, timedelta, timezone

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import pytest
import sqlalchemy as sa
from pandera.typing import Series
from sqlalchemy.dialects import mysql, postgresql

from assets.factory import flow_asset
from integrations.contracts import Contract
from integrations.engine.errors import (
    ArchiveGuardTripped,
    ErrorBudgetExceeded,
    ErrorBudgetTripStands,
    SyncError,
)
from integrations.engine.reconcile import reconcile
from integrations.engine.spec import DailyPartitions, ErrorBudget, FlowSpec, SourceTable
from integrations.engine.state import BatchCommit, StateStore, Watermark
from integrations.engine.sync import Sync, SyncResult
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource
from resources import ErpDatabase, SqlDestinationDatabase, StateStoreResource
from sensors.changed_days import changed_days_sensor
from sensors.source_changed import source_changed_sensors
from tests.conftest import DLQ_KEY
from tests.test_sql_destination import LINES, LedgerLineV1, create, ledger_columns, rows

SOURCE = SourceTable(table="source_lines", key="id")
SPEC = FlowSpec(
    name="test_dated_lines",
    source=SOURCE,
    source_contract=LINES.source_contract,
    target=LINES.target,
    target_contract=LINES.target_contract,
    mapping=lambda rows: rows[["line_number", "amount", "booked_on", "memo"]],
    batch_size=2,
)


def source_lines(
    engine: sa.Engine, stamps: list, cursor_type=sa.DateTime, ids: list | None = None
) -> None:
    """A source table of ledger lines, line n changed at stamps[n - 1] (None: never said), keyed
    1, 2, … or by `ids` (UUIDs, or repeated integers: then `id` is no primary key)."""
    table = sa.Table(
        "source_lines",
        sa.MetaData(),
        sa.Column(
            "id",
            sa.Uuid if ids and isinstance(ids[0], uuid.UUID) else sa.Integer,
            primary_key=not ids or len(set(ids)) == len(ids),
        ),
        *(column for column in ledger_columns() if column.name != "archived_at"),
        sa.Column("updated_at", cursor_type, nullable=True),
        sa.Column("deleted_at", sa.DateTime, nullable=True),
    )
    table.create(engine)
    with engine.begin() as connection:
        connection.execute(
            table.insert(),
            [
                {
                    "id": ids[n - 1] if ids else n,
                    "line_number": f"L{n}",
                    "amount": float(n),
                    "booked_on": "2025-01-02",
                    "memo": "x",
                    "updated_at": stamp,
                }
                for n, stamp in enumerate(stamps, start=1)
            ],
        )


class LooseLineV1(LedgerLineV1):
    line_number: Series[str]


# A contract that does not say line_number is unique (the engine still keeps one row a record's).
LOOSE = Contract("test.loose_lines", 1, LooseLineV1)
LOOSE_SPEC = dataclasses.replace(SPEC, source_contract=LOOSE, target_contract=LOOSE)


@pytest.fixture
def state(own_state):
    return own_state


@contextmanager
def syncing(
    engine: sa.Engine, state: StateStore, spec: FlowSpec = SPEC, run_id: str = "r", why: str = "t"
) -> Iterator[Sync]:
    """The lines flow into a table of the same database, through an engine of its own (as two
    resources would have)."""
    writer = create_engine(engine.url.render_as_string(hide_password=False))
    destination = SqlTable(writer, spec.target, create_missing=True)
    try:
        yield Sync(
            spec, SqlSource(engine, SOURCE), destination, state, run_id=run_id, actor="t", why=why
        )
    finally:
        writer.dispose()


def run(engine: sa.Engine, state: StateStore, spec: FlowSpec = SPEC) -> SyncResult:
    with syncing(engine, state, spec) as sync:
        return sync.run()


def test_rows_without_a_cursor_value_are_synced_and_their_changes_seen(sql_database, state):
    """A nullable `updated_at` left NULL: such rows have no place after a watermark, so every
    run reads them again (the ledger's diff writes only what changed), and they never move the
    watermark, wherever the dialect sorts NULLs."""
    engine = create_engine(sql_database())
    stamps = [datetime(2025, 1, 1) + timedelta(hours=n) for n in range(4)]
    source_lines(engine, [*stamps, None, None])

    first = run(engine, state)
    assert first.written == 6 and first.batches == 3
    assert (first.watermark_after.updated_at, first.watermark_after.key) == (stamps[3], 4)

    later = datetime(2025, 1, 2)
    with engine.begin() as connection:  # an undated row changes, still undated; a dated one too
        connection.execute(sa.text("UPDATE source_lines SET memo = 'changed' WHERE id = 5"))
        connection.execute(
            sa.text("UPDATE source_lines SET memo = 'moved', updated_at = :at WHERE id = 1"),
            {"at": later},
        )
    second = run(engine, state)
    assert second.written == 2
    assert rows(engine)["L5"][1] == "changed" and rows(engine)["L1"][1] == "moved"
    # PostgreSQL sorts NULLs last: the run's last batch is undated, and leaves the watermark.
    assert (second.watermark_after.updated_at, second.watermark_after.key) == (later, 1)
    assert run(engine, state).written == 0
    engine.dispose()


def postgres_in_zone(make, zone: str) -> sa.Engine:
    """A PostgreSQL database whose sessions run in `zone`: the URL's own `options` say so
    (handoff's sessions run in UTC otherwise, whatever the server's zone)."""
    engine = create_engine(f"{make()}?options=-c%20timezone%3D{zone}")
    with engine.connect() as connection:
        assert connection.execute(sa.text("SHOW timezone")).scalar_one() == zone
    return engine


def test_a_sqlite_cursor_stored_without_a_fraction_is_read_at_the_watermark(tmp_path, state):
    """SQLite compares its text times as text: a row stamped "… 10:05:00" (CURRENT_TIMESTAMP's
    shape, Chinook's) sorted before the bound "… 10:05:00.000000", so one committed late in the
    watermark's second, or at the lookback's edge, was never read, nor after a crash at a tie."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, 10, 5)])
    with engine.begin() as connection:  # as another writer than SQLAlchemy stores it
        connection.exec_driver_sql("UPDATE source_lines SET updated_at = '2025-01-01 10:05:00'")
    insert = "INSERT INTO source_lines VALUES ({0}, 'L{0}', {0}, '2025-01-02', 'x', '{1}', NULL)"
    spec = dataclasses.replace(SPEC, lookback=timedelta(0))
    assert run(engine, state, spec).written == 1
    with engine.begin() as connection:  # committed late, in the watermark's own second
        connection.exec_driver_sql(insert.format(2, "2025-01-01 10:05:00"))
    assert run(engine, state, spec).written == 1
    assert sorted(rows(engine)) == ["L1", "L2"]
    engine.dispose()


def test_a_sqlite_time_west_of_utc_changed_after_the_watermark_is_read(tmp_path, state):
    """SQLite compares its text times as text: "… 09:00:00-05:00" (14:00 UTC, a writer in New
    York) sorted before the bound of a watermark at 12:00, so the change was never read, while
    the sensor's mark saw it. So is the day a changed-days sensor asks for."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 2, 11), datetime(2025, 1, 2, 12)])
    spec = dataclasses.replace(SPEC, lookback=timedelta(0))
    assert run(engine, state, spec).written == 2
    assert state.watermark(SPEC.name).updated_at == datetime(2025, 1, 2, 12)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE source_lines SET memo = 'moved', updated_at = '2025-01-02 09:00:00-05:00' "
            "WHERE id = 1"
        )
    source = SqlSource(engine, SOURCE)
    assert source.high_water_mark() == datetime(2025, 1, 2, 14)
    assert source.changed_days(datetime(2025, 1, 2, 13), "booked_on") == [date(2025, 1, 2)]
    assert run(engine, state, spec).written == 1
    assert rows(engine)["L1"][1] == "moved"
    engine.dispose()


def mapped_unless_boom(rows):
    if (rows["memo"] == "BOOM").any():
        raise ValueError("cannot map")
    return rows[["line_number", "amount", "booked_on", "memo"]]


@pytest.mark.parametrize("declared", ["INTEGER", "DATETIME", ""])
def test_a_cursor_of_numbers_stops_the_run_with_what_to_do(tmp_path, state, declared):
    """Epoch seconds in a SQLite cursor column were read as nanoseconds past 1970: the watermark
    stayed in 1970, and every later change (a number, which SQLite sorts before any text bound)
    was skipped without a word. A column declared numeric is refused when the source opens; one
    declared otherwise, or not at all, when a number is read, before anything is written."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TABLE source_lines (id INTEGER PRIMARY KEY, line_number TEXT, amount REAL, "
            f"booked_on TEXT, memo TEXT, updated_at {declared}, deleted_at TEXT)"
        )
        connection.exec_driver_sql(
            "INSERT INTO source_lines VALUES (1, 'L1', 1, '2025-01-02', 'x', 1735689600, NULL)"
        )
    with pytest.raises(Exception, match=r"source_lines\.updated_at holds numbers") as raised:
        run(engine, state)
    assert "What to do" in str(raised.value)
    assert state.watermark(SPEC.name) is None and state.count_synced(SPEC.name) == 0
    engine.dispose()


def test_the_newest_sqlite_cursor_is_the_latest_time_whatever_its_text(tmp_path):
    """SQLite compares text: "…-02T09:00" sorted after "…-02 23:00", so the sensor's mark stayed
    at 09:00 while later rows changed. A value that is no time, or in the far future, is no mark."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [None, None, None, None])
    with engine.begin() as connection:
        for line, stamp in enumerate(
            ["2025-01-02T09:00:00", "2025-01-02 23:00:00.250", "2025-01-02 7pm", "2099-01-01"],
            start=1,
        ):
            connection.exec_driver_sql(
                "UPDATE source_lines SET updated_at = ? WHERE id = ?", (stamp, line)
            )
    assert SqlSource(engine, SOURCE).high_water_mark() == datetime(2025, 1, 2, 23, 0, 0, 250000)
    engine.dispose()


def test_a_sqlite_time_past_its_months_end_is_no_mark(tmp_path):
    """SQLite reads '2025-01-31 25:00' as no time, but '2025-02-30 10:00' as written, which
    Python holds no time for: newest, it failed the sensors' every tick ("day is out of range
    for month"). It is no mark, as other text that is no time."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 2, 9), None])
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE source_lines SET updated_at = '2025-02-30 10:00:00' WHERE id = 2"
        )
    assert SqlSource(engine, SOURCE).high_water_mark() == datetime(2025, 1, 2, 9)
    engine.dispose()


def test_a_record_renumbered_leaves_no_row_behind(sql_database, state):
    """A record written under another destination id than before (an invoice renumbered:
    same source row, new invoice number) left its old row live: counted twice in every total,
    and archived never. The old row is archived with the write, audited; one another record
    was written into meanwhile is not."""
    engine = create_engine(sql_database())
    stamps = [datetime(2025, 1, 1) + timedelta(hours=n) for n in range(3)]
    source_lines(engine, stamps)
    assert run(engine, state).written == 3
    with engine.begin() as connection:  # 1 takes a new number; 2 takes the number 3 lets go
        for line, number in ((1, "L9"), (3, "L7"), (2, "L3")):
            connection.execute(
                sa.text("UPDATE source_lines SET line_number = :n, updated_at = :at WHERE id = :i"),
                {"n": number, "at": datetime(2025, 1, 2), "i": line},
            )
    second = run(engine, state, dataclasses.replace(SPEC, batch_size=10))  # one batch
    counts = second.counts
    assert (counts["inserted"], counts["updated"], counts["archived"]) == (2, 1, 2)
    live = {number for number, row in rows(engine).items() if row[2] is None}
    assert live == {"L9", "L7", "L3"} and sorted(rows(engine)) == ["L1", "L2", "L3", "L7", "L9"]
    archives = [record for record in state.record_history("1") if record.get("action") == "archive"]
    assert archives and archives[0]["diff"] == {"destination_id": "L1", "now": "L9"}
    assert run(engine, state).written == 0
    engine.dispose()


def test_two_records_never_share_a_destination_row(sql_database, state):
    """Two source rows mapped to one destination id (a number given twice, in one batch or in
    two) each overwrote the other's row, both counted synced; archiving one archived the
    other's. The later one is dead-lettered, naming the record that holds the id (a contract
    that says the field is unique refuses both of a batch; this one does not say so)."""
    spec = LOOSE_SPEC
    engine = create_engine(sql_database())
    stamps = [datetime(2025, 1, 1) + timedelta(hours=n) for n in range(5)]
    source_lines(engine, stamps)
    with engine.begin() as connection:  # 2 repeats 1's number in its batch, 5 in a later one
        connection.execute(
            sa.text("UPDATE source_lines SET line_number = 'L1', memo = 'two' WHERE id IN (2, 5)")
        )
    first = run(engine, state, spec)
    assert (first.written, first.counts["rejected"]) == (3, 2)
    assert rows(engine)["L1"][1] == "x"
    letters = {letter.record_key: letter.reason for letter in state.list_dead_letters(SPEC.name)}
    assert sorted(letters) == ["2", "5"]
    assert all("is record 1's destination id too" in reason for reason in letters.values())
    with engine.begin() as connection:  # 1 leaves: its row is archived, no other's
        connection.execute(
            sa.text("UPDATE source_lines SET deleted_at = :at, updated_at = :at WHERE id = 1"),
            {"at": datetime(2025, 1, 2)},
        )
    second = run(engine, state, spec)
    assert (second.counts["archived"], second.counts["rejected"]) == (1, 0)
    # The number is free: the first record refused it takes it, the other is refused again.
    assert rows(engine)["L1"][1:] == ("two", None)
    letters = {letter.record_key: letter.reason for letter in state.list_dead_letters(SPEC.name)}
    assert list(letters) == ["5"] and "is record 2's destination id too" in letters["5"]
    engine.dispose()


def renumber(engine: sa.Engine, moves: list[tuple[int, str]], hour: int = 0) -> None:
    """Give source lines new numbers, each changed a minute after the one before."""
    with engine.begin() as connection:
        for n, (line, number) in enumerate(moves):
            connection.execute(
                sa.text("UPDATE source_lines SET line_number = :n, updated_at = :at WHERE id = :i"),
                {"n": number, "at": datetime(2025, 1, 2, hour) + timedelta(minutes=n), "i": line},
            )


def live(engine: sa.Engine) -> dict[str, float]:
    return {number: amount for number, (amount, _, gone) in rows(engine).items() if gone is None}


def test_ids_swapped_across_batches_land_together_at_the_runs_end(sql_database, state):
    """Two records swapping numbers in two batches were each refused for the other's old
    number, for good: the run tries them again, together, once every batch is written."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1), datetime(2025, 1, 1, 1)])
    spec = dataclasses.replace(LOOSE_SPEC, batch_size=1)
    run(engine, state, spec)
    renumber(engine, [(1, "L2"), (2, "L1")])
    swapped = run(engine, state, spec)
    assert (swapped.counts["updated"], swapped.counts["rejected"]) == (2, 0)
    assert live(engine) == {"L1": 2.0, "L2": 1.0}
    assert state.list_dead_letters(spec.name) == []
    entries = [e for e in state.audit_entries(spec.name) if e["run_id"] == "r"]
    assert sum(e["detail"].get("archived", 0) for e in entries) == 0
    engine.dispose()


def test_a_number_a_record_deleted_outright_held_is_free(sql_database, state):
    """The ledger's holder of a number had left the source (deleted outright): a record taking
    the number was refused for good, naming a record that no longer exists. Then the ledger
    kept that holder live at the number: one synced record too many, and, once the holder was
    restored in the source, it was written over the taker's row (the ledger said it was its)."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1), datetime(2025, 1, 1, 1)])
    run(engine, state, LOOSE_SPEC)
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM source_lines WHERE id = 2"))
    renumber(engine, [(1, "L2")])
    taken = run(engine, state, LOOSE_SPEC)
    assert (taken.counts["updated"], taken.counts["archived"]) == (1, 1)
    assert live(engine) == {"L2": 1.0} and state.list_dead_letters(LOOSE_SPEC.name) == []
    assert state.count_synced(LOOSE_SPEC.name) == 1
    assert [row["archived"] for row in state.ledger_rows("2")] == [True]
    history = [e for e in state.record_history("2", LOOSE_SPEC.name) if e["action"] == "archive"]
    assert history and "taken by record 1" in history[-1]["diff"]["row"]
    source_lines_restore(engine, 2, "L2")
    restored = run(engine, state, LOOSE_SPEC)
    assert (restored.counts["inserted"], restored.counts["rejected"]) == (0, 1)
    assert live(engine) == {"L2": 1.0}
    engine.dispose()


def source_lines_restore(engine: sa.Engine, line: int, number: str) -> None:
    """Put a deleted source line back (an undone delete), changed now."""
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO source_lines (id, line_number, amount, booked_on, memo, updated_at) "
                "VALUES (:i, :n, :a, '2025-01-02', 'x', :at)"
            ),
            {"i": line, "n": number, "a": float(line), "at": datetime(2025, 1, 3)},
        )


def test_a_number_is_taken_only_once_its_holders_move_off_it_landed(sql_database, state):
    """1 moving to L9 was refused by the table, 2 taking 1's L1 in the same batch was written
    all the same: over 1's row, which 1 kept (the ledger held both at L1)."""
    engine = create_engine(sql_database())
    create(engine, *ledger_columns(), sa.CheckConstraint("line_number <> 'L9'", name="no_l9"))
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(2)])
    run(engine, state, LOOSE_SPEC)
    renumber(engine, [(1, "L9"), (2, "L1")])
    refused = run(engine, state, dataclasses.replace(LOOSE_SPEC, batch_size=10))
    assert (refused.written, refused.counts["rejected"]) == (0, 2)
    assert live(engine) == {"L1": 1.0, "L2": 2.0}
    letters = {letter.record_key: letter.reason for letter in state.list_dead_letters(SPEC.name)}
    assert "refused" in letters["1"] and "record 1's" in letters["2"]
    assert "L9" not in letters["2"]  # PII-free wording: the id is the table's, not the move's
    engine.dispose()


def test_a_chain_or_a_swap_of_numbers_is_written_only_where_every_move_lands(sql_database, state):
    """A chain 1 → L2, 2 → L3, 3 → L9 whose last move the table refused: 1 was written over
    the row 2 kept. A swap of which the table refused one half: the other half was written over
    its row. Both times a record's content was nowhere, and the ledger held two at one id."""
    engine = create_engine(sql_database())
    create(engine, *ledger_columns(), sa.CheckConstraint("amount < 100", name="small"))
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(5)])
    run(engine, state, LOOSE_SPEC)
    renumber(engine, [(1, "L2"), (2, "L3"), (3, "L9"), (4, "L5"), (5, "L4")])
    with engine.begin() as connection:  # 3's and 5's moves are refused by the table
        connection.execute(sa.text("UPDATE source_lines SET amount = 1000 WHERE id IN (3, 5)"))
    refused = run(engine, state, dataclasses.replace(LOOSE_SPEC, batch_size=10))
    assert (refused.written, refused.counts["rejected"]) == (0, 5)
    assert live(engine) == {f"L{n}": float(n) for n in range(1, 6)}
    letters = {letter.record_key: letter.reason for letter in state.list_dead_letters(SPEC.name)}
    assert "record 3's destination id too" in letters["2"] and "record 2's" in letters["1"]
    assert "none was written" in letters["4"] and "none was written" in letters["5"]
    engine.dispose()


def test_a_swap_is_written_whole_or_not_at_all(sql_database, state):
    """A swap of which the table turned one half down on its own (an amount its NUMERIC(8, 2)
    would round, refused before the statement): the other half was written over its row."""
    engine = create_engine(sql_database())
    create(engine, *ledger_columns(amount=sa.Numeric(8, 2)))
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(2)])
    run(engine, state, LOOSE_SPEC)
    renumber(engine, [(1, "L2"), (2, "L1")])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET amount = 2.005 WHERE id = 2"))
    refused = run(engine, state, dataclasses.replace(LOOSE_SPEC, batch_size=10))
    assert (refused.written, refused.counts["rejected"]) == (0, 2)
    assert live(engine) == {"L1": 1.0, "L2": 2.0}
    letters = {letter.record_key: letter.reason for letter in state.list_dead_letters(SPEC.name)}
    assert all("record 2: column 'amount'" in reason for reason in letters.values())
    assert "none was written" in letters["1"]
    # Fixed, record 2 alone is read again: its partner's letter goes with it (alone, each
    # would wait on the other for good).
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE source_lines SET amount = 2.5, updated_at = :at WHERE id = 2"),
            {"at": datetime(2025, 1, 3)},
        )
    run(engine, state, dataclasses.replace(LOOSE_SPEC, batch_size=10))
    assert live(engine) == {"L1": 2.5, "L2": 1.0}
    assert state.list_dead_letters(SPEC.name) == []
    engine.dispose()


@pytest.mark.postgres
def test_a_swap_whose_half_a_trigger_skips_is_not_written(postgres_database, state):
    """PostgreSQL returns no row for an update a BEFORE trigger skipped, as for a row it found
    equal: the other half of a swap landed on the row the skipped one kept."""
    engine = create_engine(postgres_database())
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(2)])
    run(engine, state, LOOSE_SPEC)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION keep_l1() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF OLD.line_number = 'L1' THEN RETURN NULL; END IF; RETURN NEW; END $$"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER keep_l1 BEFORE UPDATE ON ledger_lines FOR EACH ROW "
            "EXECUTE FUNCTION keep_l1()"
        )
    renumber(engine, [(1, "L2"), (2, "L1")])
    refused = run(engine, state, dataclasses.replace(LOOSE_SPEC, batch_size=10))
    assert (refused.written, refused.counts["rejected"]) == (0, 2)
    assert live(engine) == {"L1": 1.0, "L2": 2.0}
    engine.dispose()


@pytest.mark.postgres
def test_an_update_a_trigger_skips_is_dead_lettered_and_lands_once_it_is_dropped(
    postgres_database, state
):
    """A DBA's trigger that keeps closed periods' rows (BEFORE UPDATE, RETURN NULL, no error)
    skipped a changed line's update: PostgreSQL returned it no more than a row held as sent, the
    run counted it unchanged and the ledger took its new hash, so the change was never sent
    again. Now its letter says the trigger skipped it; the open period's line lands; once the
    trigger is dropped, a replay lands it."""
    engine = create_engine(postgres_database())
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(2)])
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE source_lines SET booked_on = '2025-02-03' WHERE id = 2")
    run(engine, state)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION keep_closed_periods() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF OLD.booked_on < '2025-02-01' THEN RETURN NULL; END IF; RETURN NEW; END $$"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER keep_closed_periods BEFORE UPDATE ON ledger_lines FOR EACH ROW "
            "EXECUTE FUNCTION keep_closed_periods()"
        )
        connection.exec_driver_sql(
            "UPDATE source_lines SET amount = amount + 0.5, updated_at = '2025-01-02'"
        )
    skipped = run(engine, state)
    assert (skipped.counts["updated"], skipped.counts["rejected"]) == (1, 1)
    assert live(engine) == {"L1": 1.0, "L2": 2.5}
    (letter,) = state.list_dead_letters(SPEC.name)
    assert letter.record_key == "1"
    assert "a trigger on the table skipped the row" in letter.reason
    assert "What to do:" in letter.reason
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TRIGGER keep_closed_periods ON ledger_lines")
    with syncing(engine, state, run_id="replay") as sync:
        assert sync.replay([letter]).counts["updated"] == 1
    assert live(engine) == {"L1": 1.5, "L2": 2.5}
    assert state.list_dead_letters(SPEC.name) == []
    engine.dispose()


def test_a_record_refused_a_number_lands_when_a_later_run_moves_its_holder_off(sql_database, state):
    """2 was refused 1's number; a later run moved 1 to another: 2's letter waited for an
    operator's replay (2's row unchanged, it was held), though the number was free."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(2)])
    run(engine, state, LOOSE_SPEC)
    renumber(engine, [(2, "L1")])
    assert run(engine, state, LOOSE_SPEC).counts["rejected"] == 1
    renumber(engine, [(1, "L3")], hour=5)
    freed = run(engine, state, LOOSE_SPEC)
    landed = freed.counts["inserted"] + freed.counts["updated"]
    assert (landed, freed.counts["rejected"]) == (2, 0)
    assert live(engine) == {"L1": 2.0, "L3": 1.0}
    assert state.list_dead_letters(LOOSE_SPEC.name) == []
    engine.dispose()


def test_letters_waiting_on_letters_land_round_by_round(sql_database, state):
    """2 was refused L3 (3's), 1 was refused L2 (2's). The run that moved 3 off L3 landed 2
    at its end, but 1, waiting on 2, waited for an operator's replay."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(3)])
    spec = dataclasses.replace(LOOSE_SPEC, batch_size=10)
    run(engine, state, spec)
    renumber(engine, [(2, "L3"), (1, "L2")], hour=1)
    assert run(engine, state, spec).counts["rejected"] == 2
    renumber(engine, [(3, "L9")], hour=2)
    run(engine, state, spec)
    assert live(engine) == {"L2": 1.0, "L3": 2.0, "L9": 3.0}
    assert state.list_dead_letters(spec.name) == []
    engine.dispose()


def a_letter_waiting_on_a_deleted_holder(engine, state) -> None:
    """1 is refused L2, which 2 holds; then 2 is deleted outright, which no run reads."""
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(3)])
    run(engine, state, LOOSE_SPEC)
    renumber(engine, [(1, "L2")], hour=1)
    assert run(engine, state, LOOSE_SPEC).counts["rejected"] == 1
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM source_lines WHERE id = 2"))


def test_a_repair_that_archives_a_holder_lands_the_letters_waiting_on_it(sql_database, state):
    """1 was refused L2 (2's); 2 was deleted outright, and the repair archived its row: 1's
    letter stayed open, held run after run (1 unchanged), until an operator's replay."""
    engine = create_engine(sql_database())
    a_letter_waiting_on_a_deleted_holder(engine, state)
    with syncing(engine, state, LOOSE_SPEC, run_id="repair") as sync:
        drift = reconcile(LOOSE_SPEC, sync.source, sync.destination, state)
        assert sync.archive_extras(drift.extra_ids) == 1
    assert live(engine) == {"L2": 1.0, "L3": 3.0}
    assert state.list_dead_letters(LOOSE_SPEC.name) == []
    engine.dispose()


def test_a_repair_s_materialization_counts_the_letters_its_archives_landed(sql_database, state):
    """The repair landed 1's letter once it archived 2 (deleted outright), but its
    materialization did not say so: nothing updated, and 1's letter counted open."""
    url = sql_database()
    engine = create_engine(url)
    a_letter_waiting_on_a_deleted_holder(engine, state)
    repaired = dg.materialize(
        [flow_asset(LOOSE_SPEC)],
        resources={
            SOURCE.system: ErpDatabase(url=url),
            LOOSE_SPEC.target.system: SqlDestinationDatabase(url=url, create_missing_tables=True),
            "state": StateStoreResource(
                url=state.engine.url.render_as_string(hide_password=False), dlq_key=DLQ_KEY
            ),
        },
        run_config={"ops": {"books__ledger_lines": {"config": {"repair": True}}}},
    )
    (event,) = repaired.get_asset_materialization_events()
    counts = event.materialization.metadata
    # Archived: 2's row, then 1's at the number it left; updated: 1, onto 2's number.
    assert (counts["archived"].value, counts["updated"].value) == (2, 1)
    assert counts["dead_letters_open"].value == 0
    assert live(engine) == {"L2": 1.0, "L3": 3.0}
    engine.dispose()


def test_a_record_refused_its_new_number_keeps_its_row(sql_database, state):
    """1 moving onto 2's number is refused; 3 moving onto 1's number was written over 1's row
    all the same (1 did not move), and 1's content was nowhere."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(3)])
    run(engine, state, LOOSE_SPEC)
    renumber(engine, [(1, "L2"), (3, "L1")])
    refused = run(engine, state, dataclasses.replace(LOOSE_SPEC, batch_size=10))
    assert refused.counts["rejected"] == 2
    assert live(engine) == {"L1": 1.0, "L2": 2.0, "L3": 3.0}
    letters = {letter.record_key: letter.reason for letter in state.list_dead_letters(SPEC.name)}
    assert "record 2's" in letters["1"] and "record 1's" in letters["3"]
    engine.dispose()


def test_a_repair_lands_a_swap_of_numbers_across_its_batches(sql_database, state):
    """Lines 1 and 3 swap numbers in place (no change time: found by reconciling). The repair
    sends 1, 2 and 3, two a batch: 1 is refused for 3's number, then 3 for 1's. A run tries such
    records again at its end, together; a repair did not: both stayed refused, the table kept
    the old numbers, and no later run read them."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(4)])
    run(engine, state)
    with engine.begin() as connection:
        for line, number in ((1, "L9"), (3, "L1"), (1, "L3")):
            connection.execute(
                sa.text("UPDATE source_lines SET line_number = :n WHERE id = :i"),
                {"n": number, "i": line},
            )
    with syncing(engine, state, run_id="fix") as sync:
        sync.repair(["1", "2", "3"])
    assert state.list_dead_letters(SPEC.name) == []
    assert live(engine) == {"L1": 3.0, "L2": 2.0, "L3": 1.0, "L4": 4.0}
    engine.dispose()


def test_a_repair_that_would_archive_most_records_stops_at_the_guard(tmp_path, state):
    """Rows deleted outright and archived by a repair skipped the archive guard: a source
    emptied by mistake (a wrong database) archived everything."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(12)])
    run(engine, state)
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM source_lines WHERE id > 1"))
    with syncing(engine, state, run_id="fix") as sync:
        drift = reconcile(SPEC, sync.source, sync.destination, state)
        with pytest.raises(ArchiveGuardTripped):
            sync.archive_extras(drift.extra_ids)
        assert len(live(engine)) == 12
        assert sync.archive_extras(drift.extra_ids, approved=True) == 11
    assert live(engine) == {"L1": 1.0}
    engine.dispose()


def test_a_replay_of_rows_without_a_key_reads_them_again_and_closes_those_fixed(tmp_path, state):
    """Rows without a key trip the error budget. Their letters' replay judged their stored
    payloads again, refused again: once a row was given its key in the source (without its
    change time moving: no run reads it), no replay synced it or closed its letter, and the
    trip held on until discarded or approved. A replay now reads the rows changed since theirs:
    one still without a key is held (counted), one fixed is synced and its letter closed."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(4)], ids=[1, None, None, 4])
    spec = dataclasses.replace(SPEC, error_budget=ErrorBudget(max_share=0.1, min_rows=4))
    with pytest.raises(ErrorBudgetExceeded):
        run(engine, state, spec)
    letters = state.list_dead_letters(spec.name)
    assert len(letters) == 2 and all(
        letter.record_key.startswith("!unkeyed:") for letter in letters
    )

    def replay(run_id: str) -> SyncResult:
        with syncing(engine, state, spec, run_id=run_id) as sync:
            return sync.replay(state.list_dead_letters(spec.name))

    assert replay("not-yet").counts["unkeyed_held"] == 2  # (L4, which the trip left, is synced)
    assert len(state.list_dead_letters(spec.name)) == 2 and state.standing_budget_trips(spec.name)
    with engine.begin() as connection:  # fixed by hand: updated_at stays
        connection.exec_driver_sql("UPDATE source_lines SET id = 2 WHERE line_number = 'L2'")
    one = replay("one-fixed")
    assert (one.counts["unkeyed_held"], one.counts["gone"], one.written) == (1, 1, 1)
    assert "L2" in live(engine)
    [still] = state.list_dead_letters(spec.name)
    assert still.payload["line_number"] == "L3"
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE source_lines SET id = 3 WHERE line_number = 'L3'")
    assert replay("both-fixed").counts["unkeyed_held"] == 0
    assert state.list_dead_letters(spec.name) == [] and not state.standing_budget_trips(spec.name)
    assert set(live(engine)) == {"L1", "L2", "L3", "L4"}
    assert run(engine, state, spec).counts["rejected"] == 0, "the trip is settled"
    engine.dispose()


def test_a_renumbering_chain_across_batches_lands(sql_database, state):
    """Forty records each taking the next one's number, four to a batch: each batch's chain
    was refused, the error budget stopped the run before its end-of-run retry, and a replay
    (in batches again) landed none."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1, 0, n) for n in range(40)])
    spec = dataclasses.replace(LOOSE_SPEC, batch_size=4)
    run(engine, state, spec)
    renumber(engine, [(line, f"L{line + 1}") for line in range(1, 41)])
    chained = run(engine, state, spec)
    assert (chained.counts["rejected"], state.list_dead_letters(spec.name)) == (0, [])
    assert live(engine) == {f"L{n + 1}": float(n) for n in range(1, 41)}
    engine.dispose()


def test_a_chain_ending_on_a_taken_number_is_refused_whole_and_overwrites_no_row(
    sql_database, state
):
    """Twelve records each taking the next one's number, the last onto a number that stays
    taken: past eight passes of the check, a refused record's row was written over."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1, 0, n) for n in range(13)])
    spec = dataclasses.replace(LOOSE_SPEC, batch_size=20)
    run(engine, state, spec)
    renumber(engine, [(line, f"L{line + 1}") for line in range(1, 13)])
    assert run(engine, state, spec).counts["rejected"] == 12
    assert live(engine) == {f"L{n}": float(n) for n in range(1, 14)}
    engine.dispose()


def test_a_holder_keyed_by_a_sqlite_column_without_a_type_is_found(tmp_path, state):
    """Keys of a SQLite column declared without a type were looked up as text, which does not
    match the number SQLite keeps: a holder still in the source was taken for deleted, and
    another record written over its row."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE source_lines (id PRIMARY KEY, line_number TEXT, amount REAL, "
            "booked_on TEXT, memo TEXT, updated_at TIMESTAMP, deleted_at TIMESTAMP)"
        )
        connection.exec_driver_sql(
            "INSERT INTO source_lines VALUES (1, 'L1', 1, '2025-01-02', 'x', "
            "'2025-01-01 00:00:00', NULL), (2, 'L2', 2, '2025-01-02', 'x', "
            "'2025-01-01 01:00:00', NULL)"
        )
    run(engine, state, LOOSE_SPEC)
    renumber(engine, [(2, "L1")])
    assert run(engine, state, LOOSE_SPEC).counts["rejected"] == 1
    assert live(engine) == {"L1": 1.0, "L2": 2.0}
    engine.dispose()


def test_keys_of_numbers_and_text_at_one_time_make_a_watermark(tmp_path, state):
    """A SQLite key column without a type holds numbers beside text (1, 2, 'A1'); stamped at
    one time (a bulk update), the watermark's key was compared across the two, and every run
    after the first failed with a TypeError naming no flow. SQLite orders numbers before text;
    so does the watermark."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE source_lines (id PRIMARY KEY, line_number TEXT, amount REAL, "
            "booked_on TEXT, memo TEXT, updated_at TIMESTAMP, deleted_at TIMESTAMP)"
        )
        for key in (1, 2, "A1"):
            connection.exec_driver_sql(
                "INSERT INTO source_lines VALUES (?, ?, 1, '2025-01-02', 'x', "
                "'2025-01-02 10:00:00', NULL)",
                (key, f"L{key}"),
            )
    assert run(engine, state).written == 3
    assert run(engine, state).counts["unchanged"] == 3
    assert state.watermark(SPEC.name) == Watermark(datetime(2025, 1, 2, 10), "A1")
    engine.dispose()


def test_a_replay_of_a_record_deleted_since_archives_it_not_revives_it(sql_database, state):
    """A synced record whose change was dead-lettered, then deleted from the source (no soft
    delete): replay wrote its stored payload, live again. Its letter closes as gone, and its
    row is archived."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1), datetime(2025, 1, 1, 1)])
    assert run(engine, state, LOOSE_SPEC).written == 2
    with engine.begin() as connection:  # 1 takes 2's number: refused, its old row stays
        connection.execute(
            sa.text("UPDATE source_lines SET line_number = 'L2', updated_at = :at WHERE id = 1"),
            {"at": datetime(2025, 1, 2)},
        )
    assert run(engine, state, LOOSE_SPEC).counts["rejected"] == 1
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM source_lines WHERE id = 1"))
    with syncing(engine, state, LOOSE_SPEC, run_id="replay") as sync:
        replayed = sync.replay(state.list_dead_letters(SPEC.name))
    assert (replayed.counts["gone"], replayed.counts["archived"]) == (1, 1)
    assert rows(engine)["L1"][2] is not None and rows(engine)["L2"][2] is None
    assert state.list_dead_letters(SPEC.name) == []
    assert state.count_synced(SPEC.name) == 1
    engine.dispose()


def test_a_table_changed_under_a_run_stops_it_saying_what_to_do_once(tmp_path, state):
    """The destination's own "What to do" and the run's were both in the error, one after the
    other: now the destination's comes first, then where the rerun resumes, once."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(hours=n) for n in range(4)])
    calls = []

    def mapping(rows):
        calls.append(len(rows))
        if len(calls) == 2:  # a DBA drops a column while the run is under way
            with engine.begin() as connection:
                connection.exec_driver_sql("ALTER TABLE ledger_lines DROP COLUMN memo")
        return SPEC.mapping(rows)

    with pytest.raises(SyncError) as stopped:
        run(engine, state, dataclasses.replace(SPEC, mapping=mapping))
    message = str(stopped.value)
    assert "no longer fits the flow" in message and message.count("What to do") == 1
    assert "the rerun resumes from the watermark" in message
    engine.dispose()


class DatedLineV1(pa.DataFrameModel):
    id: Series[int]
    updated_at: Series[pd.Timestamp] = pa.Field(nullable=True)

    class Config:
        coerce = True


# The lines flow, its source contract taking the cursor as a time.
DATED = dataclasses.replace(SPEC, source_contract=Contract("test.dated_lines", 1, DatedLineV1))


@pytest.mark.postgres
def test_postgresql_times_python_cannot_hold_are_dead_lettered_not_fatal(postgres_database, state):
    """'infinity' in any timestamp or date column (even one the flow does not map) failed every
    run while reading ("timestamp too large"), naming no flow and no row. Such values are read
    as their text: a column the mapping ignores passes it, a contract taking the column as a
    time dead-letters the row, an infinite cursor moves no watermark, a window reads such a
    business date (it was in none) and the sensor's mark leaves it out."""
    engine = create_engine(postgres_database())
    stamps = [datetime(2025, 1, 1) + timedelta(hours=n) for n in range(4)]
    source_lines(engine, stamps)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE source_lines ADD valid_until timestamp, "
            "ADD opened_on date NOT NULL DEFAULT '2025-01-01'"
        )
        connection.exec_driver_sql(
            "UPDATE source_lines SET valid_until = 'infinity', opened_on = '-infinity' WHERE id = 2"
        )
        connection.exec_driver_sql(
            "UPDATE source_lines SET updated_at = 'infinity', valid_until = '12345-01-01' "
            "WHERE id = 3"
        )

    result = run(engine, state, DATED)
    assert (result.written, result.counts["rejected"]) == (3, 1)
    assert sorted(rows(engine)) == ["L1", "L2", "L4"]
    [letter] = state.list_dead_letters(DATED.name)
    assert letter.record_key == "3" and "updated_at is not a date and time" in letter.reason
    assert (state.watermark(DATED.name).updated_at, state.watermark(DATED.name).key) == (
        stamps[3],
        4,
    )
    assert run(engine, state, DATED).counts["read"] == 2  # line 4 again, and the infinite one
    source = SqlSource(engine, SOURCE)
    # The sensor's fingerprint of the rows at a second reads them, too.
    assert source.change_counter(stamps[1]) != source.change_counter(stamps[0])
    # Each window's run reads the row without a date Python holds, for its contract.
    day = source.in_window("opened_on", datetime(2025, 3, 1), datetime(2025, 3, 2))
    assert [list(frame["id"]) for frame in source.batches(None, 10, day)] == [[2]]
    with engine.begin() as connection:  # no row has a time Python holds: no mark, no failure
        connection.exec_driver_sql("UPDATE source_lines SET updated_at = '-infinity'")
    assert source.high_water_mark() is None
    engine.dispose()


@pytest.mark.mariadb
def test_mariadb_zero_dates_in_the_cursor_and_soft_delete_are_no_date(mariadb_database, state):
    """A legacy table's zero dates ('0000-00-00 00:00:00', the default of a NOT NULL column
    never filled) came as text: as a cursor the run died after its first batch on every rerun
    (or, read once, such a row's later changes were never seen); as `deleted_at` a row never
    deleted was archived. Zero dates there are no date: read by every run, not deleted."""
    engine = create_engine(mariadb_database())
    with engine.begin() as connection:
        connection.exec_driver_sql("SET SESSION sql_mode = ''")
        connection.exec_driver_sql(
            "CREATE TABLE source_lines (id INTEGER PRIMARY KEY, line_number VARCHAR(20), "
            "amount DOUBLE, booked_on VARCHAR(10), memo TEXT, "
            "updated_at DATETIME NOT NULL DEFAULT '0000-00-00 00:00:00', "
            "deleted_at DATETIME NULL DEFAULT '0000-00-00 00:00:00')"
        )
        connection.exec_driver_sql(
            "INSERT INTO source_lines (id, line_number, amount, booked_on, memo) VALUES "
            "(1, 'L1', 1, '2025-01-02', 'x'), (2, 'L2', 2, '2025-01-02', 'x'), "
            "(3, 'L3', 3, '2025-01-02', 'x')"
        )
        connection.exec_driver_sql(
            "INSERT INTO source_lines (id, line_number, amount, booked_on, memo, updated_at) "
            "VALUES (4, 'L4', 4, '2025-01-02', 'x', '2025-01-01 10:00:00')"
        )

    first = run(engine, state)
    assert (first.written, first.counts["archived"]) == (4, 0)
    assert (state.watermark(SPEC.name).updated_at, state.watermark(SPEC.name).key) == (
        datetime(2025, 1, 1, 10),
        4,
    )
    source = SqlSource(engine, SOURCE)
    assert source.high_water_mark() == datetime(2025, 1, 1, 10)
    assert source.change_counter(datetime(2025, 1, 1, 10)) is not None  # L4's zero deleted_at
    assert source.deleted_keys(None) == []  # what the archive guard counts
    day = source.in_window("updated_at", datetime(2025, 1, 1), datetime(2025, 1, 2))
    assert [list(frame["id"]) for frame in source.batches(None, 10, day)] == [[1, 2, 3, 4]]
    with engine.begin() as connection:  # the legacy application never touches updated_at
        connection.exec_driver_sql("UPDATE source_lines SET memo = 'changed' WHERE id = 2")
    second = run(engine, state)
    assert second.written == 1 and rows(engine)["L2"][1] == "changed"
    assert all(archived is None for _, _, archived in rows(engine).values())
    with engine.begin() as connection:  # a partial date is a date: deleted (it was not)
        connection.exec_driver_sql("SET SESSION sql_mode = ''")
        connection.exec_driver_sql(
            "UPDATE source_lines SET deleted_at = '2025-03-00', updated_at = '2025-01-02' "
            "WHERE id = 3"
        )
    assert run(engine, state).counts["archived"] == 1
    assert rows(engine)["L3"][2] is not None
    engine.dispose()


@pytest.mark.mariadb
def test_a_mariadb_partial_business_date_is_the_day_whose_window_reads_it(mariadb_database):
    """A legacy table's partial dates ('2025-03-00', '2025-00-00') came to changed-days as text
    no day is read from: the sensor failed on every tick ("day is out of range for month")
    while such a row's change was in its lookback. MariaDB sorts one after the last day before
    it, and that day's window reads it: it is the day changed-days names."""
    engine = create_engine(mariadb_database())
    with engine.begin() as connection:
        connection.exec_driver_sql("SET SESSION sql_mode = ''")
        connection.exec_driver_sql(
            "CREATE TABLE source_lines (id INTEGER PRIMARY KEY, booked_on DATE NOT NULL, "
            "updated_at DATETIME(6) NOT NULL, deleted_at DATETIME NULL)"
        )
        connection.exec_driver_sql(
            "INSERT INTO source_lines VALUES (1, '2025-03-00', '2025-03-05 10:00', NULL), "
            "(2, '2025-00-00', '2025-03-05 11:00', NULL), (3, '2025-03-01', '2025-03-05', NULL)"
        )
    source = SqlSource(engine, SOURCE)
    days = source.changed_days(datetime(2025, 3, 1), "booked_on")
    assert days == [date(2024, 12, 31), date(2025, 2, 28), date(2025, 3, 1)]

    def read_on(day: date) -> list[int]:
        start = datetime.combine(day, datetime.min.time())
        within = source.in_window("booked_on", start, start + timedelta(days=1))
        return [n for frame in source.batches(None, 10, within) for n in frame["id"]]

    assert [read_on(day) for day in days] == [[2], [1], [3]]
    engine.dispose()


def test_sqlite_text_that_is_not_utf8_is_the_rows_dead_letter(tmp_path, state):
    """A memo another program wrote in Latin-1 failed every run as "source unavailable",
    quoting the text (PII) in the failure. The row is dead-lettered, saying why without its
    value, and keeps its bytes for a replay; the other rows land."""
    path = tmp_path / "lines.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(hours=n) for n in range(3)])
    with closing(sqlite3.connect(path)) as raw, raw:
        raw.execute(
            "UPDATE source_lines SET memo = CAST(? AS TEXT) WHERE id = 2",
            ("José Müller".encode("latin-1"),),
        )

    result = run(engine, state)
    assert (result.written, result.counts["rejected"]) == (2, 1)
    assert sorted(rows(engine)) == ["L1", "L3"]
    [letter] = state.list_dead_letters(SPEC.name)
    assert letter.record_key == "2" and letter.reason.endswith("memo is not UTF-8 text")
    assert letter.payload["memo"].encode("utf-8", "surrogateescape") == "José Müller".encode(
        "latin-1"
    )
    assert run(engine, state).counts["rejected"] == 0  # the next run passes too
    engine.dispose()


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sqlite_key_that_is_not_utf8_is_dead_lettered_and_the_run_goes_on(request, tmp_path, store):
    """A text key another program wrote in Latin-1 reached the state store, whose driver cannot
    encode it: every run failed at that batch, nothing after it synced. Its row is dead-lettered
    as a row without a usable key, with its bytes; the others land and the watermark moves past
    it, also when it is the batch's last row."""
    path = tmp_path / "lines.sqlite"
    with closing(sqlite3.connect(path)) as raw, raw:
        raw.execute(
            "CREATE TABLE source_lines (id TEXT PRIMARY KEY, line_number TEXT, amount REAL, "
            "booked_on TEXT, memo TEXT, updated_at TIMESTAMP, deleted_at TIMESTAMP)"
        )
        for n, key in enumerate([b"A1", b"B2", "José".encode("latin-1")], start=1):
            raw.execute(
                "INSERT INTO source_lines VALUES (CAST(? AS TEXT), ?, ?, '2025-01-02', 'x', ?, "
                "NULL)",
                (key, f"L{n}", float(n), f"2025-01-01 0{n}:00:00"),
            )
    url = (
        request.getfixturevalue("postgres_database")()
        if store == "postgres"
        else f"sqlite:///{tmp_path / 'state.sqlite'}"
    )
    state = StateStore(url, dlq_key=DLQ_KEY)
    engine = create_engine(f"sqlite:///{path}")

    result = run(engine, state)
    assert (result.written, result.counts["rejected"]) == (2, 1)
    assert sorted(rows(engine)) == ["L1", "L2"]
    assert result.watermark_after.updated_at == datetime(2025, 1, 1, 3)
    [letter] = state.list_dead_letters(SPEC.name)
    assert letter.record_key.startswith("!unkeyed:")
    assert letter.reason.startswith("the key is not UTF-8 text")
    assert letter.payload["id"].encode("utf-8", "surrogateescape") == "José".encode("latin-1")
    assert run(engine, state).counts["rejected"] == 0  # held, not refused again
    state.dispose()
    engine.dispose()


def test_reconciliation_leaves_records_held_in_the_dlq_out_of_both_sides(sql_database, state):
    """A record synced, then changed so that its contract refuses it, is held: the destination
    keeps what it had, which is no drift (it was reported extra). A row the mapping fails on
    is held too, and the reconciliation no longer fails with the mapping's error."""
    engine = create_engine(sql_database())
    start = datetime(2025, 1, 1)
    source_lines(engine, [start + timedelta(minutes=n) for n in range(4)])
    spec = dataclasses.replace(SPEC, mapping=mapped_unless_boom)
    assert run(engine, state, spec).written == 4
    lines = sa.Table("source_lines", sa.MetaData(), autoload_with=engine)
    later = start + timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            sa.update(lines).where(lines.c.id == 2).values(amount=None, updated_at=later)
        )
        connection.execute(
            sa.update(lines).where(lines.c.id == 3).values(memo="BOOM", updated_at=later)
        )
    assert run(engine, state, spec).counts["rejected"] == 2
    held = sorted(letter.record_key for letter in state.list_dead_letters(spec.name))
    assert held == ["2", "3"]
    drift = reconcile(spec, SqlSource(engine, SOURCE), SqlTable(engine, spec.target), state)
    assert drift.in_sync, drift.summary()
    engine.dispose()


@pytest.mark.postgres
def test_records_postgresql_already_holds_as_sent_are_unchanged_not_updated(
    postgres_database, state, tmp_path
):
    """A state store lost or new: every record is sent again. PostgreSQL rewrites none that it
    holds as sent (IS DISTINCT FROM); they were counted, and audited, as updated."""
    engine = create_engine(postgres_database())
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(5)])
    assert run(engine, state).written == 5
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE ledger_lines SET memo = 'drifted' WHERE line_number = 'L2'"
        )
    anew = StateStore(f"sqlite:///{tmp_path / 'anew.sqlite'}", dlq_key=DLQ_KEY)
    again = run(engine, anew)
    assert (again.counts["updated"], again.counts["unchanged"], again.written) == (1, 4, 1)
    actions = {row["action"] for row in anew.record_history("1")}
    assert actions == {"unchanged"}
    assert {row["action"] for row in anew.record_history("2")} == {"update"}
    anew.dispose()
    engine.dispose()


def test_a_cursor_in_the_far_future_moves_no_watermark_past_the_present(
    sql_database, state, caplog
):
    """A row stamped 2099 (a typo) made the watermark 2099: every later change was skipped, and
    the sensor's mark stayed there too. The watermark stops at the present and says why."""
    engine = create_engine(sql_database())
    now = datetime.now(UTC).replace(tzinfo=None)
    source_lines(engine, [now - timedelta(hours=1), datetime(2099, 1, 1)])
    assert run(engine, state).written == 2
    assert state.watermark(SPEC.name).updated_at <= datetime.now(UTC).replace(tzinfo=None)
    assert "record 2 has updated_at 2099-01-01T00:00:00, in the future" in caplog.text
    lines = sa.Table("source_lines", sa.MetaData(), autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(
            sa.update(lines)
            .where(lines.c.id == 1)
            .values(memo="changed", updated_at=datetime.now(UTC).replace(tzinfo=None))
        )
    again = run(engine, state)
    assert again.written == 1 and rows(engine)["L1"][1] == "changed"
    assert SqlSource(engine, SOURCE).high_water_mark().year < 2099
    # A watermark an earlier handoff left in 2099: the next run reads every row, sets it anew.
    state.commit_batch(BatchCommit(SPEC.name, "old", watermark=Watermark(datetime(2099, 1, 1), 2)))
    assert run(engine, state).counts["read"] == 2
    assert state.watermark(SPEC.name).updated_at <= datetime.now(UTC).replace(tzinfo=None)
    assert "the stored watermark 2099-01-01T00:00:00 is in the future" in caplog.text
    engine.dispose()


@pytest.mark.postgres
def test_a_repair_sends_a_record_whose_letter_was_discarded(postgres_database, state):
    """The table refused line 2, its letter was discarded, then the table let it be: the
    repair reconciliation asked for was held as the discarded content, and the line never
    written, reconciliation finding it missing run after run."""
    engine = create_engine(postgres_database())
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(2)])
    SqlTable(engine, SPEC.target, create_missing=True).prepare(SPEC)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE ledger_lines ADD CONSTRAINT no_two CHECK (line_number <> 'L2')"
        )
    assert run(engine, state).counts["rejected"] == 1
    state.discard_dead_letters(state.list_dead_letters(SPEC.name), actor="o", why="w", run_id="d")
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE ledger_lines DROP CONSTRAINT no_two")
    repair = Sync(
        SPEC, SqlSource(engine, SOURCE), SqlTable(engine, SPEC.target), state,
        run_id="r2", actor="test", why="repair",
    )  # fmt: skip
    assert repair.repair(["2"]).written == 1
    assert sorted(rows(engine)) == ["L1", "L2"]
    engine.dispose()


def test_reconciliation_compares_a_tables_ids_exactly(sql_database, state):
    """Keys "L1" and "l1" are two records in a table that compares exactly: reconciliation
    lower-cased both into one, hiding the drift of either (and showed ids lower-cased)."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(2)])
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE source_lines SET line_number = 'l1' WHERE id = 2")
    if engine.dialect.name == "mariadb":  # its collation takes them for one: the second is refused
        engine.dispose()
        return
    assert run(engine, state).written == 2
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE ledger_lines SET memo = 'drifted' WHERE line_number = 'L1'"
        )
        connection.exec_driver_sql(
            "INSERT INTO ledger_lines VALUES ('X9', 1, '2025-01-02', 'x', NULL)"
        )
    drift = reconcile(SPEC, SqlSource(engine, SOURCE), SqlTable(engine, SPEC.target), state)
    assert (drift.differing, drift.extra) == (["1"], ["X9"]), drift.summary()
    engine.dispose()


@pytest.mark.postgres
def test_a_zoned_cursor_keeps_its_watermark_in_utc(postgres_database, state):
    """`updated_at timestamptz`, sessions in New York: the watermark is the UTC instant (the
    state store keeps times without zone), and the next run compares it as that instant."""
    engine = postgres_in_zone(postgres_database, "America/New_York")
    plus_two = timezone(timedelta(hours=2))
    stamps = [datetime(2025, 1, 1, 12, tzinfo=plus_two) + timedelta(hours=n) for n in range(3)]
    source_lines(engine, stamps, sa.DateTime(timezone=True))

    first = run(engine, state)
    assert first.written == 3
    assert (first.watermark_after.updated_at, first.watermark_after.key) == (
        datetime(2025, 1, 1, 12),
        3,
    )
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE source_lines SET memo = 'changed', "
                "updated_at = updated_at + interval '3 hours' WHERE id = 1"
            )
        )
    assert SqlSource(engine, SOURCE).high_water_mark() == datetime(2025, 1, 1, 13)
    second = run(engine, state)
    assert second.written == 1 and second.counts["read"] == 2, "rows from 11:55 UTC on"
    assert second.watermark_after.updated_at == datetime(2025, 1, 1, 13)
    assert run(engine, state).written == 0
    engine.dispose()


@pytest.mark.postgres
def test_a_day_window_is_the_utc_day_whatever_the_session_zone(postgres_database):
    """A partition window (UTC bounds, as Dagster gives them) over a timestamp column without a
    zone selects the same rows on a server whose sessions run in Berlin."""
    engine = postgres_in_zone(postgres_database, "Europe/Berlin")
    source_lines(
        engine,
        [datetime(2024, 1, 1, 0, 30), datetime(2024, 1, 1, 23, 30), datetime(2024, 1, 2, 0, 30)],
    )
    source = SqlSource(engine, SOURCE)

    def day(start: datetime) -> list[int]:
        within = source.in_window("updated_at", start, start + timedelta(days=1))
        return [n for batch in source.batches(None, 10, within=within) for n in batch["id"]]

    assert day(datetime(2024, 1, 1, tzinfo=UTC)) == [1, 2]
    assert day(datetime(2024, 1, 2, tzinfo=UTC)) == [3]
    engine.dispose()


def test_records_the_destination_refuses_count_once_against_the_error_budget(sql_database, state):
    """3 of 28 records refused by the table (a CHECK): 10.7%, above the 10% budget. Counted as
    valid and again as rejected, they were 3 of 31 (9.7%), and the run passed. The run ends
    committed, so the error says to replay, not that the watermark stayed."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(28)])
    create(engine, *ledger_columns(), sa.CheckConstraint("amount <= 25", name="at_most_25"))
    with pytest.raises(ErrorBudgetExceeded) as stopped:
        run(engine, state)
    message = str(stopped.value)
    assert "3 of 28 rows (10.7%)" in message
    assert "every batch of this run was committed" in message and "handoff dlq replay" in message
    assert state.count_open_dead_letters(SPEC.name) == 3
    engine.dispose()


def test_a_trip_holds_its_own_runs_letters_not_the_earlier_ones_it_retried(tmp_path, state):
    """Three earlier runs each refused a record taking record 1's number. A run moves 1 off it
    and retries their letters at its end (one lands, two are refused again), and is stopped by
    its own 3 refusals of 26 rows. Its trip took in the two retried letters: counted among the
    letters it left, they kept every run stopped until replayed, though it never judged them.
    (Its share was its own: 3 of 26.)"""
    engine = create_engine(f"sqlite:///{tmp_path / 'erp.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(40)])
    spec = dataclasses.replace(LOOSE_SPEC, batch_size=10)

    def run_as(run_id: str) -> SyncResult:
        with syncing(engine, state, spec, run_id=run_id) as sync:
            return sync.run()

    run_as("first")
    for hour, line in enumerate((35, 36, 37), start=1):
        renumber(engine, [(line, "L1")], hour=hour)
        assert run_as(f"earlier-{hour}").counts["rejected"] == 1
    renumber(engine, [(1, "L500"), (3, "L38"), (4, "L39"), (5, "L40")], hour=5)
    with engine.begin() as connection:  # and 22 other lines change, as they should
        connection.execute(
            sa.text("UPDATE source_lines SET memo = 'y', updated_at = :at WHERE id BETWEEN 6 AND 27"),
            {"at": datetime(2025, 1, 2, 6)},
        )  # fmt: skip
    with pytest.raises(ErrorBudgetExceeded) as stopped:
        run_as("tripping")
    trip = stopped.value.trip
    assert (trip.failed, trip.seen) == (3, 26)
    assert trip.letters == 3, "the two earlier letters it retried are not this run's"
    assert state.count_open_dead_letters(spec.name) == 5
    with pytest.raises(ErrorBudgetTripStands, match="3 of the 3 dead letters"):
        run_as("next")
    engine.dispose()


def test_uuid_keys_make_a_watermark(sql_database, state):
    """A UUID primary key (Decimal keys likewise) is not JSON: the watermark keeps its text."""
    engine = create_engine(sql_database())
    ids = [uuid.UUID(int=n) for n in (3, 1, 2)]
    source_lines(engine, [datetime(2025, 1, 1, n) for n in range(3)], ids=ids)
    first = run(engine, state)
    assert first.written == 3
    # PostgreSQL has a uuid type; SQLite and MariaDB keep the 32 hex digits as text.
    assert first.watermark_after.key in (str(ids[2]), ids[2].hex)
    assert run(engine, state).written == 0
    engine.dispose()


def test_batches_left_without_rows_pass(sql_database, state):
    """The newest row breaks the contract, alone in its batch; the next run reads it again
    (cursor >= watermark) and holds it. Both leave a frame without rows, whose column types need
    not fit the contract (an empty object column is no float64 column): the runs stopped with
    "the batch does not fit the contract", and so did every rerun, until the row was fixed."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(hours=n) for n in range(3)])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET booked_on = NULL WHERE id = 3"))
    first = run(engine, state)
    assert (first.written, first.counts["rejected"]) == (2, 1)
    second = run(engine, state)
    assert (second.counts["read"], second.counts["held"], second.written) == (1, 1, 0)
    assert second.watermark_after == first.watermark_after
    engine.dispose()


def test_a_row_without_a_business_date_is_dead_lettered_not_lost(sql_database, state):
    """A partitioned flow over a nullable date: a row without one falls in no day. Each day's run
    reads it; the first dead-letters it, saying what to do, the next holds it; once dated, its
    own day's run syncs it and closes the letter."""
    engine = create_engine(sql_database())
    day = datetime(2024, 1, 1)
    source_lines(engine, [day + timedelta(hours=1), None, day + timedelta(hours=2)])
    spec = dataclasses.replace(
        SPEC, partitions=DailyPartitions(column="updated_at", start="2024-01-01")
    )
    writer = create_engine(engine.url.render_as_string(hide_password=False))

    def run_day(start: datetime) -> SyncResult:
        source, destination = (
            SqlSource(engine, SOURCE),
            SqlTable(writer, spec.target, create_missing=True),
        )
        sync = Sync(spec, source, destination, state, run_id="r", actor="test", why="test")
        return sync.run_window(start, start + timedelta(days=1))

    first = run_day(day)
    assert (first.written, first.counts["rejected"]) == (2, 1)
    (letter,) = state.list_dead_letters(flow=spec.name)
    assert letter.record_key == "2" and "no updated_at" in letter.reason
    assert "set updated_at in the source" in letter.reason

    second = run_day(day + timedelta(days=1))
    assert (second.written, second.counts["rejected"], second.counts["held"]) == (0, 0, 1)

    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE source_lines SET updated_at = :d WHERE id = 2"),
            {"d": day + timedelta(days=1, hours=3)},
        )
    third = run_day(day + timedelta(days=1))
    assert (third.written, third.counts["rejected"]) == (1, 0)
    assert state.count_open_dead_letters(spec.name) == 0
    writer.dispose()
    engine.dispose()


def test_rows_of_a_repeated_key_each_count_against_the_error_budget(tmp_path, state):
    """A view or a table without a primary key can repeat a key: its rows go to one dead letter,
    and each of them is a rejected row. Counted as one, 3 of 20 rows were 1 of 18 (5.6%), and
    the run went on under a 10% budget."""
    engine = create_engine(f"sqlite:///{tmp_path / 'erp.sqlite'}")
    ids = [7 if n in (8, 9) else n for n in range(1, 21)]
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(20)], ids=ids)
    with pytest.raises(ErrorBudgetExceeded) as stopped:
        run(engine, state, dataclasses.replace(SPEC, batch_size=20))
    assert "3 of 20 rows (15.0%)" in str(stopped.value)
    (letter,) = state.list_dead_letters(flow=SPEC.name)
    assert letter.record_key == "7" and "3 rows with key 7" in letter.reason
    # Once going on is approved, read again unchanged, they are held, as any dead-lettered row
    # is: not refused again.
    with pytest.raises(ErrorBudgetTripStands):
        run(engine, state, dataclasses.replace(SPEC, batch_size=20))
    state.clear_budget_trip(SPEC.name, actor="t", why="t", run_id="approval")
    again = run(engine, state, dataclasses.replace(SPEC, batch_size=20))
    assert (again.counts["held"], again.counts["rejected"]) == (3, 0)
    assert state.list_dead_letters(flow=SPEC.name)[0].attempts == 1
    engine.dispose()


def test_the_letter_of_a_record_deleted_before_it_ever_synced_closes(sql_database, state):
    """Dead-lettered on first sight, then soft-deleted: never written, so never archived, its
    letter stayed open for good (and aged into the dead-letter alert)."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(hours=n) for n in range(3)])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET booked_on = NULL WHERE id = 2"))
    run(engine, state)
    assert state.count_open_dead_letters(SPEC.name) == 1
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE source_lines SET deleted_at = :at, updated_at = :at WHERE id = 2"),
            {"at": datetime(2025, 1, 2)},
        )
    result = run(engine, state)
    assert (result.written, result.counts["archived"]) == (0, 0)
    assert state.count_open_dead_letters(SPEC.name) == 0
    engine.dispose()


def test_a_run_the_error_budget_stops_audits_the_rows_it_dead_lettered(tmp_path, state):
    """The batch that trips the budget keeps its rejected rows in the DLQ; the audit trail had
    no word of them."""
    engine = create_engine(f"sqlite:///{tmp_path / 'erp.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(20)])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET booked_on = NULL WHERE id <= 3"))
    with pytest.raises(ErrorBudgetExceeded):
        run(engine, state, dataclasses.replace(SPEC, batch_size=20))
    assert state.count_open_dead_letters(SPEC.name) == 3
    (story,) = state.record_history("2", SPEC.name)
    assert story["action"] == "dead-letter" and "booked_on is missing" in story["diff"]["reason"]
    assert state.verify_audit().intact
    engine.dispose()


def mariadb_in_zone(url: str, zone: str) -> sa.Engine:
    """A MariaDB engine whose sessions run in `zone`: the URL's own `init_command` says so
    (handoff's sessions run in UTC otherwise, whatever the server's zone)."""
    quoted = zone.replace("+", "%2B").replace(":", "%3A")
    engine = create_engine(f"{url}?init_command=SET+time_zone%3D%27{quoted}%27")
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT @@session.time_zone")).scalar_one() == zone
    return engine


@pytest.mark.mariadb
def test_a_mariadb_timestamp_cursor_under_a_chosen_zone_keeps_its_watermark_in_utc(
    mariadb_database, state
):
    """MariaDB shows a TIMESTAMP in the session's zone: under a zone the URL chose (New York's,
    whose offset a DST change moves), the watermark was New York's wall time, said to be UTC.
    After the clocks went back (01:59 EDT, then 01:00 EST), a row changed at 01:20 EST fell
    before the watermark of 01:40 EDT and its 5 minutes' lookback: never read."""
    url = mariadb_database()
    utc = create_engine(url)
    source_lines(utc, [datetime(2025, 11, 2, 5, 40)], mysql.TIMESTAMP(fsp=6))  # 01:40 EDT

    summer = mariadb_in_zone(url, "-04:00")
    first = run(summer, state)
    assert first.written == 1
    assert first.watermark_after.updated_at == datetime(2025, 11, 2, 5, 40), "UTC, not EDT"
    summer.dispose()

    with utc.begin() as connection:  # 06:20 UTC, 01:20 EST: after the clocks went back
        connection.execute(
            sa.text("UPDATE source_lines SET memo = 'changed', updated_at = :at WHERE id = 1"),
            {"at": datetime(2025, 11, 2, 6, 20)},
        )
    utc.dispose()
    winter = mariadb_in_zone(url, "-05:00")
    assert SqlSource(winter, SOURCE).high_water_mark() == datetime(2025, 11, 2, 6, 20)
    second = run(winter, state)
    assert second.written == 1, "the change after the clocks went back"
    assert second.watermark_after.updated_at == datetime(2025, 11, 2, 6, 20)
    winter.dispose()


def test_a_date_cursor_reads_its_last_day_again_and_marks_the_sensor_in_time(sql_database, state):
    """A change cursor of days (an ERP's `changed_on DATE`): its newest value was handed to the
    change sensors as a date, which they compare with the flows' watermarks (times): every tick
    of a flow synced once failed with a TypeError. A change later on the last day read is read,
    as the lookback reads that day again."""
    engine = create_engine(sql_database())
    source_lines(engine, [date(2025, 1, 1), date(2025, 1, 2)], cursor_type=sa.Date)
    assert run(engine, state).written == 2
    newest = SqlSource(engine, SOURCE).high_water_mark()
    assert newest == datetime(2025, 1, 2)
    assert not state.watermark(SPEC.name).updated_at < newest, "synced: no run to request"
    with engine.begin() as connection:  # the same day, later: its cursor does not move
        connection.execute(sa.text("UPDATE source_lines SET amount = 20 WHERE id = 2"))
        connection.execute(
            sa.text("UPDATE source_lines SET updated_at = :d WHERE id = 1"), {"d": date(2025, 1, 3)}
        )
    again = run(engine, state)
    assert (again.counts["updated"], again.counts["unchanged"]) == (1, 1), "L1's day is no field"
    assert rows(engine)["L2"][0] == 20
    assert SqlSource(engine, SOURCE).high_water_mark() == datetime(2025, 1, 3)
    engine.dispose()


def test_a_cursor_of_year_one_placeholders_reads_again_without_overflow(sql_database, state):
    """A legacy table stamping rows never changed with 0001-01-01 (a "no date" placeholder):
    the watermark stood at year 1, and every later run failed taking the lookback off it (an
    OverflowError naming nothing)."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(1, 1, 1), datetime(1, 1, 1, 0, 2)])
    assert run(engine, state).written == 2
    assert state.watermark(SPEC.name).updated_at.year == 1
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET amount = 30 WHERE id = 2"))
    assert run(engine, state).counts["updated"] == 1, "the lookback reads from year 1 itself"
    engine.dispose()


# A change cursor kept in whole seconds: MariaDB's DATETIME, PostgreSQL's timestamp(0), and
# SQLite's text as SQLAlchemy writes it (a fraction of zeros).
WHOLE_SECONDS = sa.DateTime().with_variant(postgresql.TIMESTAMP(precision=0), "postgresql")


def tick(sensor: dg.SensorDefinition, engine: sa.Engine, state: StateStore, cursor, instance=None):
    """One evaluation of `sensor`, with the source and the state store as resources."""
    return sensor(
        dg.build_sensor_context(
            instance=instance,
            cursor=cursor,
            resources={
                SOURCE.system: ErpDatabase(url=engine.url.render_as_string(hide_password=False)),
                "state": StateStoreResource(
                    url=state.engine.url.render_as_string(hide_password=False), dlq_key=DLQ_KEY
                ),
            },
        )
    )


def change_within_the_second(engine: sa.Engine, line: int, second: datetime, **values) -> None:
    """Line `line` changed, its cursor set to `second` (what a source keeping seconds stamps a
    change made within the second a run read up to)."""
    table = sa.Table("source_lines", sa.MetaData(), autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(
            table.update().where(table.c.id == line).values(updated_at=second, **values)
        )


def test_a_change_within_the_synced_second_of_a_whole_second_cursor_requests_a_run(
    sql_database, state
):
    """A cursor kept in whole seconds holds a row changed again within the second a run synced up
    to (or one moved into it) at the same value: the table's newest cursor equalled the flow's
    watermark, and every tick said "already synced" until another change or the schedule. The
    sensor keeps a fingerprint of the rows at that second, and a run when it moved reads them."""
    engine = create_engine(sql_database())
    first, second = datetime(2025, 1, 2, 10), datetime(2025, 1, 2, 11)
    source_lines(engine, [first, second], cursor_type=WHOLE_SECONDS)
    assert run(engine, state).written == 2
    assert state.watermark(SPEC.name).updated_at == second
    (sensor,) = source_changed_sensors([SPEC])
    idle = tick(sensor, engine, state, tick(sensor, engine, state, None).cursor)
    assert not idle.run_requests, "nothing changed since the sync"

    change_within_the_second(engine, 2, second, amount=20)  # L2 again, within its second
    changed = tick(sensor, engine, state, idle.cursor)
    (request,) = changed.run_requests
    assert request.asset_selection == [flow_asset(SPEC).key]
    again = run(engine, state)
    assert again.counts["updated"] == 1 and rows(engine)["L2"][0] == 20
    assert not tick(sensor, engine, state, changed.cursor).run_requests, "the same change: no run"

    change_within_the_second(engine, 1, second, amount=10)  # L1 moved into that second
    moved = tick(sensor, engine, state, changed.cursor)
    assert moved.run_requests and moved.run_requests[0].run_key != request.run_key
    assert run(engine, state).counts["updated"] == 1 and rows(engine)["L1"][0] == 10
    engine.dispose()


def test_a_change_within_the_second_a_changed_days_sensor_saw_requests_its_day(sql_database, state):
    """The changed-days sensor had the same blind second: a row of a past day changed again
    within the second of the newest change it saw requested no run of its day."""
    engine = create_engine(sql_database())
    first, second = datetime(2025, 1, 2, 10), datetime(2025, 1, 2, 11)
    source_lines(engine, [first, second], cursor_type=WHOLE_SECONDS)
    spec = dataclasses.replace(
        SPEC, partitions=DailyPartitions(column="booked_on", start="2025-01-01")
    )
    sensor = changed_days_sensor(spec)
    looked = json.dumps({"high_water_mark": first.isoformat()})
    with dg.instance_for_test() as instance:
        seen = tick(sensor, engine, state, looked, instance)
        (request,) = seen.run_requests
        assert request.partition_key == "2025-01-02"
        assert not tick(sensor, engine, state, seen.cursor, instance).run_requests

        change_within_the_second(engine, 2, second, amount=20)
        changed = tick(sensor, engine, state, seen.cursor, instance)
        (again,) = changed.run_requests
        assert again.partition_key == "2025-01-02" and again.run_key != request.run_key
        assert not tick(sensor, engine, state, changed.cursor, instance).run_requests
    engine.dispose()
