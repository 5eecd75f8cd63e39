"""The audit trail is a hash chain: an edit or a removal made behind handoff's back shows."""

import pytest
import sqlalchemy as sa

from integrations.cli import main
from tests.contacts import sync

DROP_TRIGGERS = {
    "sqlite": ["DROP TRIGGER audit_log_no_update", "DROP TRIGGER audit_log_no_delete"],
    "postgresql": ["DROP TRIGGER audit_log_append_only ON audit_log"],
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
