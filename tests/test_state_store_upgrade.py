"""A state store made by an older handoff: what it lacks is added in place, or named with what to
do; nothing it holds is lost."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa

from integrations.engine.state import (
    _RECORD_FIELDS,
    GENESIS,
    AuditRecord,
    BatchCommit,
    BudgetTrip,
    DeadLetter,
    LedgerEntry,
    StateStore,
    StoppedWindow,
    _records_digest,
    _seal,
    audit_log,
    audit_records,
    metadata,
)
from integrations.sql import evolve
from integrations.sql.connect import create_engine
from integrations.sql.evolve import SchemaOutdated, UpgradeBlocked, create_or_evolve
from tests.conftest import DLQ_KEY

THEN = datetime(2025, 1, 2, 3, 4, 5)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request, tmp_path):
    if request.param == "postgres":
        return request.getfixturevalue("postgres_database")()
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


def older_store(url: str, *, sealed_audit: bool = True) -> None:
    """The ledger and DLQ as handoff made them before field hashes and correlation ids; no claims
    or audit records yet; an audit log sealed or (older still) not."""
    old = sa.MetaData()
    sa.Table(
        "ledger",
        old,
        sa.Column("flow", sa.String(120), primary_key=True),
        sa.Column("record_key", sa.String(255), primary_key=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("destination_id", sa.String(255)),
        sa.Column("archived", sa.Boolean, nullable=False),
        sa.Column("synced_at", sa.DateTime, nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
    )
    sa.Table(
        "dead_letters",
        old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        *(sa.Column(name, sa.Text, nullable=False) for name in ("flow", "record_key")),
        *(sa.Column(name, sa.Text, nullable=False) for name in ("reason_kind", "reason")),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("content_hash", sa.String(64)),
        sa.Column("first_seen", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("resolved_at", sa.DateTime),
        sa.Column("resolution", sa.String(32)),
    )
    sa.Table(
        "audit_log",
        old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("run_id", sa.String(64)),
        sa.Column("flow", sa.String(120)),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("why", sa.Text, nullable=False),
        *(
            [sa.Column(name, sa.String(64), nullable=False) for name in ("prev_hash", "entry_hash")]
            if sealed_audit
            else []
        ),
    )
    engine = create_engine(url)
    old.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            old.tables["ledger"].insert(),
            [{"flow": "f", "record_key": "1", "content_hash": "h1", "destination_id": "d1",
              "archived": False, "synced_at": THEN, "run_id": "r0"}],
        )  # fmt: skip
    engine.dispose()


def test_an_older_state_store_gains_what_it_lacks_and_keeps_what_it_holds(state_url):
    older_store(state_url)
    store = StateStore(state_url, dlq_key=DLQ_KEY)
    try:
        assert store.ledger_entries("f", ["1"]) == {"1": LedgerEntry("h1", "d1", False, None)}
        store.commit_batch(
            BatchCommit("f", "r1", synced={"2": LedgerEntry("h2", "d2", False, "ab:cd")}),
            audit={"actor": "test", "action": "sync_batch", "why": "test", "detail": {}},
        )
        assert store.ledger_entries("f", ["1", "2"])["2"].field_hashes == "ab:cd"
        assert store.verify_audit().intact
        columns = {c["name"] for c in sa.inspect(store.engine).get_columns("dead_letters")}
        assert {"correlation_id", "budget_trip_id"} <= columns
        letter = DeadLetter("f", "3", "contract", "f.v1: amount is missing", {}, content_hash="h")
        store.commit_batch(BatchCommit("f", "r2", dead_letters=[letter]))
        trip = BudgetTrip("f", "r2", THEN, 1, 1, 0.1, {"f.v1: amount is missing": 1})
        store.trip_budget(trip, actor="test", why="test")
        assert [t.open_letters for t in store.standing_budget_trips("f")] == [1]
        window = StoppedWindow("f", THEN, THEN + timedelta(days=1), "r3", "refused")
        kept = store.keep_stopped_window(window)
        assert store.list_stopped_windows("f") == [kept]
        indexes = {i["name"] for i in sa.inspect(store.engine).get_indexes("dead_letters")}
        assert {"ix_dead_letters_flow_key", "ix_dead_letters_standing"} <= indexes
    finally:
        store.dispose()
    StateStore(state_url, dlq_key=DLQ_KEY).dispose()  # up to date: opens as it is


_KEY_COLUMNS = sa.text(
    "SELECT table_name || '.' || column_name, collation_name FROM information_schema.columns "
    "WHERE (table_name, column_name) IN (('ledger', 'flow'), ('ledger', 'record_key'), "
    "('ledger', 'destination_id'), ('audit_keys', 'record_key'))"
)


@pytest.mark.postgres
def test_a_new_postgresql_store_matches_keys_byte_by_byte_and_an_older_one_keeps_its_own(
    postgres_database,
):
    """Under the database's collation each insert into the ledger's and the audit keys' indexes
    compared keys with strcoll (a quarter longer at a million rows). A store
    made before keeps its collation (changing it rebuilds the indexes under a lock) and works
    as it did."""
    new, old = postgres_database(), postgres_database()
    older_store(old)
    collations = {}
    for url in (new, old):
        store = StateStore(url, dlq_key=DLQ_KEY)
        try:
            store.commit_batch(BatchCommit("f", "r1", synced={"é2": LedgerEntry("h", "d", False)}))
            assert store.ledger_entries("f", ["é2"])["é2"].destination_id == "d"
            assert store.live_owners("f", ["d"]) == {"d": {"é2"}}
            with store.engine.connect() as connection:
                collations[url] = dict(connection.execute(_KEY_COLUMNS).all())
        finally:
            store.dispose()
    assert set(collations[new].values()) == {"C"} and len(collations[new]) == 4
    assert collations[old] == {
        "ledger.flow": None,
        "ledger.record_key": None,
        "ledger.destination_id": None,
        "audit_keys.record_key": "C",  # new to that store
    }


_LEDGER_UPDATES = sa.text(
    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'ledger'"
)


@pytest.mark.postgres
def test_a_postgresql_ledger_updates_known_records_in_place_new_store_or_older(
    postgres_database,
):
    """A known record's write changes none of the ledger's indexed columns: with room left on
    its page, PostgreSQL keeps the new version beside the old one (a HOT update) and adds no
    index entries. A store made before gains that room for its pages from then on."""
    for older in (False, True):
        url = postgres_database()
        if older:
            older_store(url)
        store = StateStore(url, dlq_key=DLQ_KEY)
        try:
            with store.engine.connect() as connection:
                options = connection.exec_driver_sql(
                    "SELECT reloptions FROM pg_class WHERE relname = 'ledger'"
                ).scalar()
            assert options == ["fillfactor=90"]
            # 1,000 records written, then one in twenty changed (as an incremental run would)
            for digest, keys in (("h1", range(1000)), ("h2", range(0, 1000, 20))):
                entries = {str(n): LedgerEntry(digest, f"d{n}", False, digest) for n in keys}
                store.commit_batch(BatchCommit("g", digest, synced=entries))
            deadline = time.monotonic() + 10  # a session reports its counts within a second
            while time.monotonic() < deadline:
                with store.engine.connect() as connection:
                    updates = connection.execute(_LEDGER_UPDATES).one()
                if updates[0] >= 50:
                    break
                time.sleep(0.2)
            assert updates == (50, 50), "every update in place"
            assert store.ledger_entries("g", ["20"])["20"].content_hash == "h2"
        finally:
            store.dispose()


def test_a_column_that_cannot_be_added_is_named_with_what_to_do_and_nothing_changes(state_url):
    older_store(state_url, sealed_audit=False)
    with pytest.raises(SchemaOutdated) as outdated:
        StateStore(state_url, dlq_key=DLQ_KEY)
    message = str(outdated.value)
    assert "the state store" in message
    assert "audit_log.prev_hash, audit_log.entry_hash" in message
    assert "What to do:" in message
    engine = create_engine(state_url)
    inspector = sa.inspect(engine)
    assert not inspector.has_table("audit_records")
    assert "field_hashes" not in {c["name"] for c in inspector.get_columns("ledger")}
    engine.dispose()


def test_audit_entries_an_older_handoff_kept_record_by_record_still_verify_and_tell(state_url):
    """Entries then kept their records as rows of `audit_records`; newer ones in one body. A
    trail of both verifies, tells a record's story across both, and a changed row still shows."""
    store = StateStore(state_url, dlq_key=DLQ_KEY)
    try:
        older = [
            ("f", "1", "insert", "r0:f:1", '{"city":"Oslo"}'),
            ("f", "2", "insert", "r0:f:2", "{}"),
        ]
        entry = {"at": THEN, "actor": "test", "run_id": "r0", "flow": "f", "action": "sync_batch",
                 "why": "test", "prev_hash": GENESIS,
                 "detail": json.dumps({"records": 2, "records_digest": _records_digest(older)})}  # fmt: skip
        with store.engine.begin() as connection:
            connection.execute(sa.insert(audit_log).values(**entry, entry_hash=_seal(entry)))
            connection.execute(
                sa.insert(audit_records),
                [dict(zip(_RECORD_FIELDS, row, strict=True), audit_id=1) for row in older],
            )
        store.append_audit(
            [AuditRecord("f", "1", "update", "r1:f:1", {"city": "Bergen"})],
            actor="test", action="sync_batch", why="test", detail={}, run_id="r1", flow="f",
        )  # fmt: skip
        assert store.verify_audit().intact
        story = store.record_history("1", flow="f")
        assert [(s["action"], s["run_id"], s["diff"]) for s in story] == [
            ("insert", "r0", {"city": "Oslo"}),
            ("update", "r1", {"city": "Bergen"}),
        ]
        with store.engine.begin() as connection:
            for drop in _DROPS[store.engine.dialect.name]:
                connection.exec_driver_sql(drop)
            connection.execute(
                sa.text("UPDATE audit_records SET diff = '{}' WHERE record_key = '1'")
            )
        verdict = store.verify_audit()
        assert not verdict.intact and verdict.broken_position == 1
    finally:
        store.dispose()


_DROPS = {
    "sqlite": ["DROP TRIGGER audit_records_no_update"],
    "postgresql": ["DROP TRIGGER audit_records_append_only ON audit_records"],
}


@pytest.mark.mariadb
def test_a_state_store_on_mariadb_is_refused_with_what_to_do(mariadb_database):
    """It was created without the audit trail's append-only triggers, and its first commit
    failed deep in the ledger's upsert."""
    with pytest.raises(ValueError, match=r"PostgreSQL or SQLite, not mariadb.*HANDOFF_STATE_URL"):
        StateStore(mariadb_database())


def _session(url: str, name: str, *statements: str) -> psycopg.Connection:
    """Another client of the store's database, in a transaction left open after `statements`."""
    session = psycopg.connect(url, application_name=name)
    for statement in statements:
        session.execute(statement)
    return session


def _opened(url: str, within: float) -> StateStore | BaseException:
    """The store opened (or why it did not), or AssertionError if that took over `within` s."""
    outcome: list[StateStore | BaseException] = []

    def open_store():
        try:
            outcome.append(StateStore(url, dlq_key=DLQ_KEY))
        except BaseException as error:  # the test judges it
            outcome.append(error)

    opening = threading.Thread(target=open_store)
    opening.start()
    opening.join(within)
    assert outcome, f"opening the store still waits after {within} s"
    return outcome[0]


def _indexes(url: str, table: str) -> dict[str, bool]:
    """The table's indexes and whether each is valid."""
    with psycopg.connect(url) as session:
        return dict(
            session.execute(
                "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c "
                "ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass",
                (table,),
            ).fetchall()
        )


def _waiting(url: str, statement: str, deadline: float = 10) -> None:
    """Until a session waits for a lock in `statement` (its start)."""
    ends = time.monotonic() + deadline
    with psycopg.connect(url, autocommit=True) as session:
        while not session.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE %s",
            (statement + "%",),
        ).fetchone()[0]:
            assert time.monotonic() < ends, f"no session waits in {statement}"
            time.sleep(0.05)


@pytest.mark.postgres
def test_an_upgrade_that_cannot_get_a_lock_stops_fast_naming_who_holds_it(
    postgres_database, monkeypatch
):
    """An older store's upgrade added its columns and built its indexes in one transaction
    without a lock timeout: behind a session reading the ledger (a report left in a transaction)
    its ALTER waited for ever, and every run queued behind the ALTER's lock. Now it waits a few
    seconds, then stops naming that session and what to do; once it is gone the upgrade goes
    through, and a second open finds nothing to do."""
    monkeypatch.setattr(evolve, "LOCK_TIMEOUT", 1.0)
    url = postgres_database()
    older_store(url)
    report = _session(url, "quarterly report", "SELECT count(*) FROM ledger")
    try:
        started = time.monotonic()
        blocked = _opened(url, within=20)
        assert isinstance(blocked, UpgradeBlocked), blocked
        assert time.monotonic() - started < 10
        message = str(blocked)
        assert message.startswith(
            "the state store at postgresql+psycopg://postgres@127.0.0.1:5432/"
        )
        assert (
            "its upgrade stopped at adding " in message and " to ledger: it waited 1 s" in message
        )
        assert f"pid {report.info.backend_pid} (application 'quarterly report'" in message
        assert "idle in transaction" in message and "holding AccessShareLock" in message
        assert "What to do: let them finish, or end them" in message
        assert f"WHERE pid IN ({report.info.backend_pid})" in message
        assert "the upgrade goes on where it stopped" in message
        assert report.execute("SELECT count(*) FROM ledger").fetchone() == (1,), "untouched"
    finally:
        report.close()
    store = _opened(url, within=20)
    assert isinstance(store, StateStore), store
    try:
        assert store.ledger_entries("f", ["1"]) == {"1": LedgerEntry("h1", "d1", False, None)}
        assert {"field_hashes", "links"} <= {
            c["name"] for c in sa.inspect(store.engine).get_columns("ledger")
        }
        assert _indexes(url, "ledger") == {"ledger_pkey": True, "ix_ledger_destination": True}
        assert _indexes(url, "dead_letters")["ix_dead_letters_standing"]
    finally:
        store.dispose()
    engine = create_engine(url)
    try:
        assert create_or_evolve(engine, metadata, "the state store") == [], "nothing left to do"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_an_index_is_built_while_the_table_takes_writes_and_a_build_cut_short_is_redone(
    postgres_database, monkeypatch
):
    """The upgrade built a missing index inside its transaction, holding the table's write lock
    for the build (minutes over millions of ledger rows): every run's commit waited. Now it is
    built concurrently: behind a run's commit under way it waits, and the next commit goes
    through meanwhile; a build that waits too long stops the upgrade, its index left invalid,
    and the next open builds it again."""
    monkeypatch.setattr(evolve, "LOCK_TIMEOUT", 4.0)
    url = postgres_database()
    StateStore(url, dlq_key=DLQ_KEY).dispose()
    with psycopg.connect(url, autocommit=True) as session:
        session.execute("DROP INDEX ix_ledger_destination")
    row = "INSERT INTO ledger VALUES ('f', '{0}', 'h', 'd{0}', false, NULL, NULL, now(), 'r')"
    commit_under_way = _session(url, "a run's commit", row.format(1))
    try:
        opening = threading.Thread(target=lambda: _opened(url, within=20))
        opening.start()
        _waiting(url, "CREATE INDEX")
        with psycopg.connect(url, options="-c lock_timeout=2000") as next_commit:
            next_commit.execute(row.format(2))  # not queued behind the build
        commit_under_way.commit()
        opening.join(20)
        assert _indexes(url, "ledger")["ix_ledger_destination"] is True
    finally:
        commit_under_way.close()

    with psycopg.connect(url, autocommit=True) as session:
        session.execute("DROP INDEX ix_ledger_destination")
    monkeypatch.setattr(evolve, "LOCK_TIMEOUT", 1.0)
    commit_under_way = _session(url, "a run's commit", row.format(3))
    try:
        blocked = _opened(url, within=20)
        assert isinstance(blocked, UpgradeBlocked), blocked
        message = str(blocked)
        assert "stopped at building index ix_ledger_destination of ledger" in message
        assert "the index is left invalid, and built again by the next upgrade" in message
        assert f'pid {commit_under_way.info.backend_pid} (application "a run\'s commit"' in (
            message
        )
        assert _indexes(url, "ledger")["ix_ledger_destination"] is False, "cut short"
    finally:
        commit_under_way.close()
    store = _opened(url, within=20)
    assert isinstance(store, StateStore), store
    store.dispose()
    assert _indexes(url, "ledger")["ix_ledger_destination"] is True
    with psycopg.connect(url) as session:
        (definition,) = session.execute(
            "SELECT pg_get_indexdef('ix_ledger_destination'::regclass)"
        ).fetchone()
    assert definition.endswith("ON public.ledger USING btree (flow, destination_id)")
