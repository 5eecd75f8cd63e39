"""The audit trail is a hash chain: an edit or a removal made behind handoff's back shows."""

import zlib
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.crm_contacts import CRM_CONTACTS
from assets.factory import flow_asset
from definitions import resources
from integrations.cli import main
from integrations.crm.client import CrmClient
from integrations.engine.state import AUDIT_TABLES, AuditHead, AuditRecord, StateStore
from integrations.erp.changes import move_customers
from integrations.http import ApiLimits
from tests.conftest import DLQ_KEY
from tests.contacts import sync
from tests.sandbox_faults import set_faults, traffic

DROP_TRIGGERS = {
    "sqlite": [
        f"DROP TRIGGER {table}_no_{verb}" for table in AUDIT_TABLES for verb in ("update", "delete")
    ],
    "postgresql": [f"DROP TRIGGER {table}_append_only ON {table}" for table in AUDIT_TABLES],
}


def tamper(store, *statements: str, **values) -> None:
    """What someone with DDL rights on the state database could do."""
    with store.engine.begin() as connection:
        for drop in DROP_TRIGGERS[store.engine.dialect.name]:
            connection.exec_driver_sql(drop)
        for statement in statements:
            connection.execute(sa.text(statement), values)


# The trail's newest entries removed, with their records: a shorter chain that still verifies.
CUT_AFTER = [
    f"DELETE FROM {table} WHERE {column} > :kept"
    for table, column in (
        ("audit_keys", "audit_id"),
        ("audit_bodies", "audit_id"),
        ("audit_records", "audit_id"),
        ("audit_log", "id"),
    )
]


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
            "UPDATE audit_bodies SET records = (SELECT records FROM audit_bodies WHERE audit_id = 1) "
            "WHERE audit_id = 2",
            2,
            "a record of it",
        ),
        ("DELETE FROM audit_bodies WHERE audit_id = 3", 3, "a record of it"),
        ("UPDATE audit_bodies SET records = :garbage WHERE audit_id = 1", 1, "a record of it"),
        (
            "DELETE FROM audit_keys WHERE audit_id = 2 AND record_key = "
            "(SELECT min(record_key) FROM audit_keys WHERE audit_id = 2)",
            2,
            "index of record keys",
        ),
        ("INSERT INTO audit_keys VALUES ('no-such-record', 1)", 1, "index of record keys"),
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
    tamper(state, statement, garbage=b"not zlib")
    verdict = state.verify_audit()
    assert not verdict.intact and verdict.broken_position == position and problem in verdict.problem
    assert main(["audit", "verify"]) == 1
    assert f"(position {position})" in capsys.readouterr().err


def test_a_record_rewritten_inside_its_body_is_reported(world, erp, crm_client, state):
    """A forger who recompresses an entry's records still breaks its seal."""
    sync(erp, crm_client, state)
    with state.engine.connect() as connection:
        body = connection.execute(
            sa.text("SELECT records FROM audit_bodies WHERE audit_id = 1")
        ).scalar_one()
    text = zlib.decompress(body).decode()
    assert "\x1fdead-letter\x1f" in text
    forged = text.replace("\x1fdead-letter\x1f", "\x1finsert\x1f", 1)
    tamper(
        state,
        "UPDATE audit_bodies SET records = :forged WHERE audit_id = 1",
        forged=zlib.compress(forged.encode()),
    )
    verdict = state.verify_audit()
    assert not verdict.intact and verdict.broken_position == 1
    assert "a record of it" in verdict.problem


@pytest.mark.parametrize(
    "forged",
    [
        "INSERT INTO audit_records (audit_id, flow, record_key, action, correlation_id, diff) "
        "VALUES (1, 'f', '1', 'archive', 'c', '{}')",
        "INSERT INTO audit_bodies VALUES (4, :body)",
        "INSERT INTO audit_keys VALUES ('1', 4)",
    ],
    ids=["a row beside a body", "a body of an entry without records", "a key of such an entry"],
)
def test_records_added_beside_an_entry_are_reported(world, erp, crm_client, state, forged):
    """Triggers refuse updates and deletes, not inserts: a record added to an entry, where its
    records are not kept or it has none, would show in a story unsealed."""
    sync(erp, crm_client, state)
    state.append_audit(actor="test", action="note", why="test", detail={})  # entry 4, no records
    with state.engine.begin() as connection:
        connection.execute(sa.text(forged), {"body": zlib.compress(b"f\x1f1\x1finsert\x1fc\x1f{}")})
    verdict = state.verify_audit()
    position = 1 if "audit_records" in forged else 4
    assert not verdict.intact and verdict.broken_position == position


def test_a_record_whose_field_would_break_the_framing_is_refused_not_sealed(state):
    record = AuditRecord("f", "a\x1fb", "insert", "c", {})
    with pytest.raises(ValueError, match="control character"):
        state.append_audit([record], actor="test", action="note", why="test", detail={})
    assert state.verify_audit().intact


def test_the_audit_refuses_edits_while_its_triggers_stand(world, erp, crm_client, state):
    sync(erp, crm_client, state)
    for statement in (
        "UPDATE audit_bodies SET records = records",
        "DELETE FROM audit_keys",
        "DELETE FROM audit_log",
    ):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):  # noqa: SIM117
            with state.engine.begin() as connection:
                connection.execute(sa.text(statement))


def materialize_contacts(instance: dg.DagsterInstance) -> tuple[str, dg.AssetCheckEvaluation]:
    """A run of crm/contacts in Dagster: the audit head its materialization recorded, and its
    audit anchor's check."""
    result = dg.materialize([flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance)
    (event,) = result.get_asset_materialization_events()
    (anchor,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "audit_anchor"]
    return event.materialization.metadata["audit_head"].value, anchor


def test_a_trail_cut_after_a_materialization_is_caught(any_world, crm_client, capsys):
    """Removing the trail's newest entries leaves a chain that verifies; the head each
    materialization records in Dagster's event log is what the trail no longer holds."""
    store = StateStore(any_world.state_url, dlq_key=DLQ_KEY)
    with dg.instance_for_test() as instance:
        first, anchor = materialize_contacts(instance)
        assert anchor.passed, "nothing recorded before the first run"
        newest = store.audit_entries()[-1]
        assert first == f"{newest['id']}:{newest['entry_hash']}", "the head after its commits"
        assert newest["actor"].startswith("dagster run ")
        with store.engine.connect() as connection:
            key = connection.execute(sa.text("SELECT min(record_key) FROM ledger")).scalar_one()
        assert main(["audit", "show", "--key", key]) == 0
        (told,) = [line for line in capsys.readouterr().out.splitlines() if " insert " in line]
        assert told.count(newest["run_id"]) == 1, "a Dagster run's id was named twice"

        second, anchor = materialize_contacts(instance)
        assert anchor.passed and f"holds entry {first.split(':')[0]}" in anchor.description
        assert main(["audit", "verify", "--head", second]) == 0
        assert f"it holds entry {second.split(':')[0]} as recorded" in capsys.readouterr().out

        kept = int(first.split(":")[0])
        tamper(store, *CUT_AFTER, kept=kept)
        assert store.verify_audit().intact, "the chain alone cannot tell"
        assert main(["audit", "verify", "--head", first]) == 0, "what it still holds verifies"
        assert main(["audit", "verify", "--head", second]) == 1
        assert f"the trail was cut after entry {kept} or earlier" in capsys.readouterr().err

        _, anchor = materialize_contacts(instance)
        assert not anchor.passed and anchor.severity == dg.AssetCheckSeverity.ERROR
        assert f"cut after entry {kept} or earlier" in anchor.description
        assert anchor.metadata["head_recorded"].value == second
        assert not store.verify_audit(AuditHead.parse(second)).intact, "its entries regrew"
    store.dispose()


def test_a_head_is_given_as_id_and_hash(world, state, capsys):
    with pytest.raises(SystemExit):
        main(["audit", "verify", "--head", "12"])
    assert "not an audit head: ID:HASH" in capsys.readouterr().err
    state.append_audit(actor="test", action="note", why="test", detail={})
    head = state.audit_head()
    assert head.id == 1 and AuditHead.parse(str(head).upper()) == head
    forged = AuditHead(1, "0" * 64)
    assert "entry 1 is not the one recorded" in state.verify_audit(forged).problem
    assert state.verify_audit(AuditHead(2, head.hash)).problem.startswith("the trail was cut after")


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


def test_a_create_whose_answer_was_lost_is_audited_as_created(
    world, erp, crm_sandbox, crm_token, state
):
    """A third of the CRM's answers are lost after it wrote (a connection closed on the way
    back): the retry of a batch upsert found its contacts there, and the run audited and
    counted as updated what it had created."""
    set_faults(crm_sandbox, crm_token, drop_rate=0.3, seed=1)
    crm = CrmClient(crm_sandbox.base_url, crm_token, ApiLimits(retries=8, backoff=0.01))
    result = sync(erp, crm, state)
    crm.close()
    assert traffic(crm_sandbox, crm_token)["counts"]["dropped"] > 0
    assert result.counts["updated"] == 0 and result.counts["inserted"] == result.counts["valid"]
    batches = [entry["detail"] for entry in state.audit_entries(CRM_CONTACTS.name)]
    assert sum(batch["updated"] for batch in batches) == 0
    key = next(iter(state.ledger_entries(CRM_CONTACTS.name, ["1", "2", "3"])))
    assert [entry["action"] for entry in state.record_history(key)] == ["insert"]


@pytest.mark.postgres
def test_a_trail_in_a_database_whose_collation_is_not_pythons_verifies(postgres_database):
    """The key index comes back in the database's order ("B" before "a" in C, after it in a
    language's collation): compared as what it holds, not in that order."""
    icu = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    store = StateStore(postgres_database(icu), dlq_key=DLQ_KEY)
    keys = ("a", "B", "c-1", "c1")
    records = [AuditRecord("f", key, "insert", f"r:f:{key}", {}) for key in keys]
    store.append_audit(records, actor="test", action="sync_batch", why="test", detail={})
    assert store.verify_audit().intact
    store.dispose()


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


@pytest.mark.postgres
def test_a_store_opens_beside_a_commit_under_way(postgres_database):
    """Each store replaced the audit tables' triggers as it opened, which takes their exclusive
    lock: every run starting waited behind the commits under way, and held up the next ones."""
    url = postgres_database()
    StateStore(url, dlq_key=DLQ_KEY).dispose()
    committing = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with committing.begin() as connection:  # a commit's audit step, still under way
        connection.exec_driver_sql("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")
        waiting_at_most = url + "?options=-c%20lock_timeout%3D3000"
        StateStore(waiting_at_most, dlq_key=DLQ_KEY).dispose()
    committing.dispose()


@pytest.mark.postgres
def test_a_store_restores_its_triggers_disabled_or_missing_in_its_schema(postgres_database):
    """Opening skips the triggers only when they stand, enabled, on this store's own tables: a
    second store in another schema of the database got none (its trail could be deleted), and
    a trigger left disabled stayed so."""
    url = postgres_database()
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE SCHEMA staging")
    StateStore(url, dlq_key=DLQ_KEY).dispose()
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    for schema in ("public", "staging"):
        store = StateStore(url + f"?options=-c%20search_path%3D{schema}", dlq_key=DLQ_KEY)
        store.append_audit(actor="t", action="approve", why="t", detail={})
        store.dispose()
    for table in ("public.audit_log", "staging.audit_log"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as connection:
            connection.exec_driver_sql(f"DELETE FROM {table}")
    engine.dispose()
