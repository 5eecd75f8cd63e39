"""A state store made by an older handoff: what it lacks is added in place, or named with what to
do; nothing it holds is lost."""

from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa

from integrations.engine.state import BatchCommit, LedgerEntry, StateStore
from integrations.sql.connect import create_engine
from integrations.sql.evolve import SchemaOutdated
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
        assert "correlation_id" in columns
        indexes = {i["name"] for i in sa.inspect(store.engine).get_indexes("dead_letters")}
        assert "ix_dead_letters_flow_key" in indexes
    finally:
        store.dispose()
    StateStore(state_url, dlq_key=DLQ_KEY).dispose()  # up to date: opens as it is


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
