"""A first sync asks the state store only about what it wrote itself (engine/first_sync.py), and
still sees all of that: a record read twice in the run, a letter it opened, an id it gave."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from unittest.mock import Mock

import pandas as pd
import pytest
import sqlalchemy as sa

from integrations.engine.errors import FlowHeld
from integrations.engine.first_sync import RunWritten
from integrations.engine.state import StateStore, StateStoreUnavailable
from integrations.engine.sync import Sync
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource
from tests.conftest import DLQ_KEY
from tests.test_flow_lock import end_lock_sessions
from tests.test_sql_cursors import SOURCE, SPEC, source_lines
from tests.test_sql_destination import rows

LOOKUPS = ("ledger_entries", "live_owners", "held_letter_hashes")


@pytest.fixture
def state(own_state):
    return own_state


def asked(state: StateStore, monkeypatch) -> dict[str, list[str]]:
    """What the run asks the state store about, by lookup: every value, and every key whose open
    letters a commit settles."""
    seen: dict[str, list[str]] = defaultdict(list)
    for name in LOOKUPS:
        lookup = getattr(state, name)

        def spied(flow, values, lookup=lookup, name=name):
            seen[name] += list(values)
            return lookup(flow, values)

        monkeypatch.setattr(state, name, spied)
    commit = state.commit_batch

    def committed(batch, audit=None):
        settled = batch.lettered if batch.lettered is not None else [*batch.synced]
        seen["settled"] += [*settled]
        refreshed = batch.letters_open
        if refreshed is None:
            refreshed = [letter.record_key for letter in batch.dead_letters]
        seen["refreshed"] += [*refreshed]
        return commit(batch, audit)

    monkeypatch.setattr(state, "commit_batch", committed)
    return seen


class ReadTwice(SqlSource):
    """A source that, once its first batch is read, changes some of that batch's rows and hands
    them over again after the others, as an API read page by page may: `moves` maps a line id to
    the columns it gets."""

    def __init__(self, engine: sa.Engine, moves: dict[int, dict[str, object]]):
        super().__init__(engine, SOURCE)
        self.moves = moves

    def batches(self, since, batch_size, within=None) -> Iterator[pd.DataFrame]:
        later = datetime(2025, 2, 1)
        for number, batch in enumerate(super().batches(since, batch_size, within)):
            yield batch
            if number == 0:
                with self.engine.begin() as connection:
                    for line, values in self.moves.items():
                        sets = "".join(f"{name} = :{name}, " for name in values)
                        connection.execute(
                            sa.text(
                                f"UPDATE source_lines SET {sets}updated_at = :at WHERE id = :i"
                            ),
                            {**values, "at": later + timedelta(minutes=line), "i": line},
                        )
        yield from self.rows_with_keys(sorted(self.moves), batch_size)


def first_sync(engine: sa.Engine, state: StateStore, source: SqlSource, run_id: str = "r"):
    writer = create_engine(engine.url.render_as_string(hide_password=False))
    try:
        destination = SqlTable(writer, SPEC.target, create_missing=True)
        sync = Sync(SPEC, source, destination, state, run_id=run_id, actor="t", why="t")
        return sync.run()
    finally:
        writer.dispose()


def test_a_first_sync_asks_the_state_store_nothing_it_did_not_write(tmp_path, state, monkeypatch):
    """A first sync of 1M rows asked the ledger about every key and destination id, and the
    dead-letter queue about every key twice, each finding nothing: a third of the database's
    work. A later run, its ledger no longer empty, asks the ledger about every record it reads."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, hour) for hour in range(6)])
    seen = asked(state, monkeypatch)
    result = first_sync(engine, state, SqlSource(engine, SOURCE))
    assert (result.written, result.batches) == (6, 3)
    assert {name: seen[name] for name in [*LOOKUPS, "settled", "refreshed"]} == {
        name: [] for name in [*LOOKUPS, "settled", "refreshed"]
    }
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE source_lines SET memo = 'y', updated_at = :at"),
            {"at": datetime(2025, 1, 3)},
        )
    seen.clear()
    again = first_sync(engine, state, SqlSource(engine, SOURCE), run_id="r2")
    assert again.counts["updated"] == 6
    assert sorted(seen["ledger_entries"]) == [str(n) for n in range(1, 7)]
    assert seen["held_letter_hashes"] == [], "no letter stood as it began: none to ask about"
    engine.dispose()


def test_a_record_read_twice_in_a_first_sync_is_diffed_against_its_first_write(
    sql_database, state, monkeypatch
):
    """Line 1 changes after it was written, line 3 is handed over again unchanged, and line 2,
    dead-lettered in the first batch, comes back fixed; line 6 asks for line 1's number, refused
    until line 1 has moved off it (the run tries it again at its end). Each is found where this
    run put it."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1, hour) for hour in range(6)])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET amount = NULL WHERE id = 2"))
        connection.execute(sa.text("UPDATE source_lines SET line_number = 'L1' WHERE id = 6"))
    moves = {1: {"amount": 10.0, "line_number": "L1b"}, 2: {"amount": 2.0}, 3: {}}
    seen = asked(state, monkeypatch)
    result = first_sync(engine, state, ReadTwice(engine, moves))
    counts = result.counts
    assert (counts["inserted"], counts["updated"], counts["unchanged"]) == (6, 1, 1)
    assert {key: row[:2] for key, row in rows(engine).items() if row[2] is None} == {
        "L1b": (10.0, "x"),
        "L1": (6.0, "x"),
        "L2": (2.0, "x"),
        "L3": (3.0, "x"),
        "L4": (4.0, "x"),
        "L5": (5.0, "x"),
    }
    letters = state.list_dead_letters(include_resolved=True)
    assert [(letter.record_key, letter.resolution) for letter in letters] == [
        ("2", "synced"),
        ("6", "replayed"),
    ]
    assert "is record 1's destination id too" in letters[1].reason
    # It asked about what it had written, and only that (but for the filter's rare false hit):
    # not line 2, dead-lettered, nor the lines read once.
    assert sorted(seen["ledger_entries"]) == ["1", "3"]
    assert set(seen["live_owners"]) == {"L1"}
    assert sorted(seen["held_letter_hashes"]) == ["2", "6"]
    assert sorted(seen["settled"]) == ["2", "6"]
    assert seen["refreshed"] == [], "no letter stood as it began, nor was one opened twice"
    engine.dispose()


def test_a_record_refused_twice_in_a_first_sync_keeps_one_letter(sql_database, state, monkeypatch):
    """Line 2 is refused in the first batch, and again when it comes back still without an
    amount: the second refusal is looked for and refreshes the first letter (one letter, two
    attempts); no other key's letter is looked for."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1, hour) for hour in range(6)])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET amount = NULL WHERE id = 2"))
    seen = asked(state, monkeypatch)
    result = first_sync(engine, state, ReadTwice(engine, {2: {"memo": "again"}}))
    assert result.counts["rejected"] == 2
    letters = state.list_dead_letters(SPEC.name)
    assert [(letter.record_key, letter.attempts) for letter in letters] == [("2", 2)]
    assert seen["refreshed"] == ["2"]
    engine.dispose()


class ThenAgain(SqlSource):
    """Hands over what changed, then sets `line` back to `amount` and hands it over again."""

    def __init__(self, engine: sa.Engine, line: int, amount: float):
        super().__init__(engine, SOURCE)
        self.line, self.amount = line, amount

    def batches(self, since, batch_size, within=None) -> Iterator[pd.DataFrame]:
        yield from super().batches(since, batch_size, within)
        with self.engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE source_lines SET amount = :a WHERE id = :i"),
                {"a": self.amount, "i": self.line},
            )
        yield from self.rows_with_keys([self.line], batch_size)


def test_a_letter_a_batch_opens_closes_when_a_later_batch_finds_the_record_in_sync(
    tmp_path, state, monkeypatch
):
    """Line 2 loses its amount (a letter) and, later in the same run, is handed over again as the
    ledger holds it: in sync, so its letter closes, as the next run's read would close it. The
    reader looked for the record's letters before the batch that opened it was committed (the
    commits run two batches behind): the letter stayed open, for a record in sync, until someone
    replayed it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, hour) for hour in range(4)])
    assert first_sync(engine, state, SqlSource(engine, SOURCE)).written == 4
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE source_lines SET amount = NULL, updated_at = :at WHERE id = 2"),
            {"at": datetime(2025, 1, 2)},
        )
    commit = state.commit_batch

    def slow_commit(batch, audit=None):  # a state store a little slower than the reader
        if batch.dead_letters:
            time.sleep(0.5)
        return commit(batch, audit)

    monkeypatch.setattr(state, "commit_batch", slow_commit)
    again = first_sync(engine, state, ThenAgain(engine, 2, 2.0), run_id="r2")
    assert (again.counts["rejected"], again.written) == (1, 0)
    assert rows(engine)["L2"][0] == 2.0 and state.ledger_rows("2")[0]["run_id"] == "r"
    assert state.list_dead_letters(SPEC.name) == [], "line 2 is in sync: its letter closes"
    engine.dispose()


def test_what_a_run_wrote_is_always_found_and_most_else_is_not_asked():
    written = RunWritten(empty=True)
    keys = [str(n) for n in range(200_000)]
    written.add(keys[:100_000])
    assert written.to_look_up(keys[:100_000]) == keys[:100_000]
    assert len(written.to_look_up(keys[100_000:])) < 100  # two bits in 2^26: few false hits
    assert RunWritten().to_look_up(keys[:3]) == keys[:3]  # a table not empty: ask about all


def test_a_failed_first_look_leaves_the_run_holding_no_lock(tmp_path, state, monkeypatch):
    """The look at the flow's tables as the lock is taken failed: the Sync went on believing it
    held the lock, and its next run ran alongside the holder of the flow."""
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, hour) for hour in range(2)])
    looked = state.empty_of
    monkeypatch.setattr(
        state, "empty_of", Mock(side_effect=[StateStoreUnavailable("down"), looked])
    )
    writer = create_engine(engine.url.render_as_string(hide_password=False))
    destination = SqlTable(writer, SPEC.target, create_missing=True)
    sync = Sync(SPEC, SqlSource(engine, SOURCE), destination, state, run_id="r", actor="t", why="t")
    with pytest.raises(StateStoreUnavailable):
        sync.run()
    sync.lock_wait = 0.2
    with state.flow_lock(SPEC.name, wait=0), pytest.raises(FlowHeld):
        sync.run()
    assert state.count_synced(SPEC.name) == 0
    writer.dispose()
    engine.dispose()


class Interleaved(SqlSource):
    """Hands over its first batch, then lets `meanwhile` run, then lines 3 to 6 as they are."""

    def __init__(self, engine: sa.Engine, meanwhile):
        super().__init__(engine, SOURCE)
        self.meanwhile = meanwhile

    def batches(self, since, batch_size, within=None) -> Iterator[pd.DataFrame]:
        yield next(iter(super().batches(since, batch_size, within)))
        self.meanwhile()
        yield from self.rows_with_keys([3, 4, 5, 6], batch_size)


@pytest.mark.postgres
def test_a_run_that_lost_its_lock_stops_before_writing_more(postgres_database, tmp_path):
    """The lock's session ended mid-run (a state store restarted) and another run of the flow
    wrote meanwhile. The first went on writing beside it: a first sync, asking only about its
    own writes, rewrote what the other had written, left open a letter its sync settled, and
    wrote a record over the row another held. It now stops before its next batch, its sync
    kept for the stopped-windows sensor, and the rerun finds everything where it is."""
    url = postgres_database()
    state = StateStore(url, dlq_key=DLQ_KEY)
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, hour) for hour in range(6)])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET amount = NULL WHERE id = 5"))

    def another_run_meanwhile():
        end_lock_sessions(url)
        other = StateStore(url, dlq_key=DLQ_KEY)
        first_sync(engine, other, SqlSource(engine, SOURCE), run_id="other")
        other.dispose()
        with engine.begin() as connection:  # then line 5 is fixed, line 3 takes line 6's number
            later = {"at": datetime(2025, 1, 2)}
            connection.execute(
                sa.text("UPDATE source_lines SET amount = 5.0, updated_at = :at WHERE id = 5"),
                later,
            )
            connection.execute(
                sa.text(
                    "UPDATE source_lines SET line_number = 'L6', updated_at = :at WHERE id = 3"
                ),
                later,
            )

    with pytest.raises(FlowHeld, match="the flow's lock was lost during the run") as stopped:
        first_sync(engine, state, Interleaved(engine, another_run_meanwhile))
    assert "run it again once no other run of the flow is going on" in str(stopped.value)
    # Lines 1 and 2 are the first run's at most (its first batch may be stopped too); the
    # other run's lines are the other's still.
    assert {key: state.ledger_rows(key)[0]["run_id"] for key in "346"} == dict.fromkeys(
        "346", "other"
    )
    # Kept for the sensor (and forgotten by the other run if it began reading after the stop).
    assert f"requested again by sensor `{SPEC.name}_stopped_windows`" in str(stopped.value)

    rerun = first_sync(engine, state, SqlSource(engine, SOURCE), run_id="rerun")
    assert (rerun.counts["inserted"], rerun.counts["updated"]) == (1, 0)  # line 5
    assert rows(engine)["L6"][:2] == (6.0, "x")
    letters = {
        letter.record_key: letter for letter in state.list_dead_letters(include_resolved=True)
    }
    assert letters["5"].resolution == "synced"
    assert letters["3"].resolved_at is None and "line_number" in letters["3"].reason  # L6: 6's
    state.dispose()
    engine.dispose()


class AfterEvent(SqlSource):
    """Reads nothing until `ready` is set; then lets `meanwhile` change the source, and reads."""

    def __init__(self, engine: sa.Engine, ready: threading.Event, meanwhile):
        super().__init__(engine, SOURCE)
        self.ready, self.meanwhile = ready, meanwhile

    def batches(self, since, batch_size, within=None) -> Iterator[pd.DataFrame]:
        assert self.ready.wait(30)
        self.meanwhile()
        yield from super().batches(since, batch_size, within)


@pytest.mark.postgres
def test_a_run_that_lost_its_lock_commits_nothing_once_another_took_it(postgres_database, tmp_path):
    """Run 1's lock goes with its session while it loads its first batch (line 2 refused: no
    amount); run 2 takes the flow and looks at its tables, finding them empty; run 1's commit,
    under way, landed after that look: run 2, a first sync asking only about its own writes,
    never saw line 2's letter, and left it open once line 2, fixed, was synced. Run 1's commit
    is now refused: run 2 took the flow's lock after it."""
    url = postgres_database()
    state, other = StateStore(url, dlq_key=DLQ_KEY), StateStore(url, dlq_key=DLQ_KEY)
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, hour) for hour in range(4)])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET amount = NULL WHERE id = 2"))
    looked, committed, outcome = threading.Event(), threading.Event(), {}
    empty_of, commit = other.empty_of, state.commit_batch

    def looking(flow):
        try:
            return empty_of(flow)
        finally:
            looked.set()

    def committing(batch, audit=None):
        try:
            return commit(batch, audit)
        finally:
            committed.set()

    def fix_line_2():
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE source_lines SET amount = 2.0 WHERE id = 2"))

    other.empty_of, state.commit_batch = looking, committing
    second = threading.Thread(
        target=lambda: outcome.update(
            second=first_sync(engine, other, AfterEvent(engine, committed, fix_line_2), "second")
        )
    )
    writer = create_engine(engine.url.render_as_string(hide_password=False))
    destination = SqlTable(writer, SPEC.target, create_missing=True)
    upsert = destination.upsert

    def loading(records, whole=False):
        if not second.is_alive() and "second" not in outcome:
            end_lock_sessions(url)  # run 1's lock goes with its session, mid-batch
            second.start()
            assert looked.wait(30)
        return upsert(records, whole)

    destination.upsert = loading
    run = Sync(SPEC, SqlSource(engine, SOURCE), destination, state, run_id="r", actor="t", why="t")
    with pytest.raises(FlowHeld, match="another run took the flow, so this run committed nothing"):
        run.run()
    second.join(60)
    assert outcome["second"].written == 4
    assert [row["run_id"] for key in "1234" for row in state.ledger_rows(key)] == ["second"] * 4
    assert state.list_dead_letters(SPEC.name) == [], "line 2 is synced: no letter stays open"
    for store in (state, other):
        store.dispose()
    writer.dispose()
    engine.dispose()


@pytest.mark.postgres
def test_a_repair_that_lost_its_lock_archives_nothing(postgres_database, tmp_path, monkeypatch):
    """Archiving the extra rows reconciliation found (records deleted outright) wrote to the
    destination without asking whether the run still held the flow's lock: a run of the flow
    going on meanwhile may have given the id to another record. It stops before it archives."""
    url = postgres_database()
    state = StateStore(url, dlq_key=DLQ_KEY)
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1, hour) for hour in range(3)])
    first_sync(engine, state, SqlSource(engine, SOURCE))
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM source_lines WHERE id = 2"))
    writer = create_engine(engine.url.render_as_string(hide_password=False))
    destination = SqlTable(writer, SPEC.target)
    sync = Sync(
        SPEC, SqlSource(engine, SOURCE), destination, state, run_id="repair", actor="t", why="t"
    )
    in_source = sync._in_source

    def lock_lost_meanwhile(keys):
        end_lock_sessions(url)
        return in_source(keys)

    monkeypatch.setattr(sync, "_in_source", lock_lost_meanwhile)
    with pytest.raises(FlowHeld, match="the flow's lock was lost during the run"):
        sync.archive_extras(["L2"])
    assert rows(engine)["L2"][2] is None  # still live
    assert not state.ledger_entries(SPEC.name, ["2"])["2"].archived
    state.dispose()
    writer.dispose()
    engine.dispose()
