"""The audit trail is a hash chain: an edit or a removal made behind handoff's back shows."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from assets.crm_contacts import CRM_CONTACTS
from integrations.cli import main
from integrations.engine.state import StateStore
from integrations.erp.changes import move_customers
from tests.conftest import DLQ_KEY
from tests.contacts import sync

DROP_TRIGGERS = {
    "sqlite": [
        f"DROP TRIGGER {table}_no_{verb}"
        for table in ("audit_log", "audit_records")
        for verb in ("update", "delete")
    ],
    "postgresql": [
        f"DROP TRIGGER {table}_append_only ON {table}" for table in ("audit_log", "audit_records")
    ],
}


def tamper(store, statement: str) -> None:
    """What someone with DDL rights on the state database could do."""
    with store.engine.begin() as connection:
        for drop in DROP_TRIGGERS[store.engine.dialect.name]:
            connection.exec_driver_sql(drop)
        connection.execute(sa.text(statement))


def test_an_untouched_trail_verifies(world, erp, crm_client, state, capsys):
    sync(erp, crm_client, state)
    sync(erp, crm_client, state, run_id="run-2")
    verdict = state.verify_audit()
    assert verdict.intact and verdict.entries == 4
    assert main(["audit", "verify"]) == 0
    assert "audit trail intact: 4 entries" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("statement", "position", "problem"),
    [
        ("UPDATE audit_log SET why = 'nothing to see' WHERE id = 2", 2, "content was changed"),
        ("DELETE FROM audit_log WHERE id = 2", 2, "removed or replaced"),
        (
            "UPDATE audit_records SET diff = '{}' WHERE audit_id = 2 AND id = (SELECT max(id) FROM audit_records WHERE audit_id = 2)",
            2,
            "a record of it",
        ),
        (
            "DELETE FROM audit_records WHERE id = (SELECT min(id) FROM audit_records WHERE audit_id = 3)",
            3,
            "a record of it",
        ),
        (
            "UPDATE audit_records SET action = 'insert' WHERE audit_id = 1 AND action = 'dead-letter'",
            1,
            "a record of it",
        ),
    ],
)
def test_tampering_is_reported_at_its_position(
    world,
    erp,
    crm_client,
    state,
    capsys,
    statement,
    position,
    problem,
):
    sync(erp, crm_client, state)
    tamper(state, statement)
    verdict = state.verify_audit()
    assert not verdict.intact and verdict.broken_position == position and problem in verdict.problem
    assert main(["audit", "verify"]) == 1
    assert f"(position {position})" in capsys.readouterr().err


def test_the_audit_refuses_edits_while_its_triggers_stand(world, erp, crm_client, state):
    sync(erp, crm_client, state)
    for statement in ("UPDATE audit_records SET diff = '{}'", "DELETE FROM audit_log"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):  # noqa: SIM117
            with state.engine.begin() as connection:
                connection.execute(sa.text(statement))


def test_a_records_story_shows_each_change_field_by_field(world, erp, crm_client, state, capsys):
    sync(erp, crm_client, state)
    with state.engine.connect() as connection:
        key = connection.execute(
            sa.text("SELECT min(record_key) FROM ledger WHERE archived = false")
        ).scalar_one()
    move_customers(erp, [int(key)], seed=3)
    sync(erp, crm_client, state, run_id="run-2")
    story = state.record_history(key)
    assert [entry["action"] for entry in story] == ["insert", "update"]
    inserted, updated = story[0]["diff"], story[1]["diff"]
    assert set(inserted) >= {"email", "city", "country", "erp_customer_id"}
    assert set(updated) == {"city", "phone"}, "only what the move changed"
    assert updated["phone"].endswith("***") or "***" in updated["phone"]
    assert "***" in inserted["email"] and "***" in inserted["lastname"]
    assert story[1]["correlation_id"] == f"run-2:{CRM_CONTACTS.name}:{key}"
    assert main(["audit", "show", "--key", key]) == 0
    out = capsys.readouterr().out
    assert "live as" in out and "insert" in out and "update" in out


@pytest.mark.postgres
def test_several_workers_opening_a_new_state_store_at_once_all_succeed(postgres_database):
    """Runs starting together on a fresh PostgreSQL state database race to create its tables
    and triggers; every one of them gets a working store."""
    url = postgres_database()

    def open_store(_):
        store = StateStore(url, dlq_key=DLQ_KEY)
        intact = store.verify_audit().intact
        store.dispose()
        return intact

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert all(pool.map(open_store, range(6)))
