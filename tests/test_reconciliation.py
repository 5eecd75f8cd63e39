"""Reconciliation finds what changed behind handoff's back in the CRM or a SQL table, and leaves
out what the runs hold; repair fixes exactly the drift."""

from datetime import datetime, timedelta

import dagster as dg
import sqlalchemy as sa

from assets.checks import reconciliation_check
from assets.crm_contacts import CRM_CONTACTS
from assets.factory import asset_key, flow_asset, sync_checks
from definitions import defs, resources
from integrations.engine.reconcile import Drift, reconcile
from integrations.engine.state import StateStore
from integrations.engine.sync import Sync
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource
from tests.expectations import assert_crm_matches_erp, crm_contacts
from tests.test_sql_cursors import SOURCE, SPEC, run, source_lines, syncing

CONTACTS = asset_key(CRM_CONTACTS)


def check(instance) -> dg.AssetCheckEvaluation:
    result = dg.materialize(
        [flow_asset(CRM_CONTACTS), reconciliation_check(CRM_CONTACTS, CONTACTS)],
        resources=resources(),
        instance=instance,
        selection=dg.AssetSelection.checks(dg.AssetCheckKey(CONTACTS, "reconciliation")),
    )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_reconciliation_catches_a_deleted_and_a_changed_contact_and_repair_fixes_both(
    world, crm_client
):
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        clean = check(instance)
        assert (
            clean.passed and clean.metadata["source_digest"] == clean.metadata["destination_digest"]
        )

        contacts = crm_contacts(crm_client)
        deleted, changed = contacts[3], contacts[7]
        crm_client.batch_archive("contacts", [deleted["id"]])
        crm_client.batch_upsert(
            "contacts",
            "erp_customer_id",
            [{"id": changed["properties"]["erp_customer_id"], "properties": {"city": "Atlantis"}}],
        )
        drifted = check(instance)
        assert not drifted.passed and drifted.severity == dg.AssetCheckSeverity.ERROR
        assert (drifted.metadata["missing"].value, drifted.metadata["differing"].value) == (1, 1)
        assert drifted.metadata["extra"].value == 0
        assert "repair: true" in drifted.description
        before = world.crm.store.stats()["upsert_inputs"]

        repaired = dg.materialize(
            [flow_asset(CRM_CONTACTS)],
            resources=resources(),
            instance=instance,
            run_config={"ops": {"crm__contacts": {"config": {"repair": True}}}},
        )
        assert repaired.success
        assert world.crm.store.stats()["upsert_inputs"] - before == 2, "two writes, no more"
        assert check(instance).passed
        assert_crm_matches_erp(world.erp_url, crm_client)


def test_the_reconciliation_check_has_a_daily_schedule():
    schedule = defs.resolve_schedule_def("erp_customers_to_crm_contacts_reconciliation_schedule")
    assert schedule.cron_schedule == "30 3 * * *"
    job = defs.resolve_job_def("erp_customers_to_crm_contacts_reconciliation")
    assert job.asset_layer.asset_graph.asset_check_keys >= {
        dg.AssetCheckKey(CONTACTS, "reconciliation")
    }


def test_a_materialization_with_every_check_leaves_the_reconciliation_to_its_schedule(
    world, crm_client
):
    """The UI's Materialize selects every check of the asset: the reconciliation, which reads
    the whole CRM, ran after each one. The sync's own checks still run with it."""
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [flow_asset(CRM_CONTACTS), reconciliation_check(CRM_CONTACTS, CONTACTS)],
            resources=resources(),
            instance=instance,
        )
        assert result.success
        evaluated = {evaluation.check_name for evaluation in result.get_asset_check_evaluations()}
        assert evaluated == {"contract", "audit_anchor"}
        assert check(instance).passed, "executed on its own, it reconciles"


def test_syncs_from_schedules_and_sensors_leave_the_reconciliation_out():
    """Every sync a schedule or sensor started (a sensor's, every 30 s) read the whole CRM too."""
    reconciliations = {
        key for key in defs.resolve_asset_graph().asset_check_keys if key.name == "reconciliation"
    }
    syncs = [
        *(s for s in defs.schedules if not s.name.endswith("_reconciliation_schedule")),
        *(s for s in defs.sensors if s.has_jobs),
    ]
    targets = {sync.job_name for sync in syncs}
    assert len(targets) >= len(syncs) // 2, "every flow's syncs are looked at"
    for name in targets:
        checks = checks_run_by(defs.resolve_job_def(name))
        assert checks and not checks & reconciliations, name
    # A run request naming its assets names their checks: unnamed, Dagster adds all of them.
    job = defs.resolve_job_def(defs.resolve_sensor_def("erp_customers_changed").job_name)
    reconciliation = dg.AssetCheckKey(CONTACTS, "reconciliation")
    assert reconciliation in checks_run_by(job.get_subset(asset_selection={CONTACTS}))
    requested = job.get_subset(
        asset_selection={CONTACTS}, asset_check_selection=set(sync_checks([CRM_CONTACTS]))
    )
    assert checks_run_by(requested) == {
        dg.AssetCheckKey(CONTACTS, "contract"),
        dg.AssetCheckKey(CONTACTS, "audit_anchor"),
    }


def checks_run_by(job: dg.JobDefinition) -> set[dg.AssetCheckKey]:
    return {key for data in job.asset_layer.data for key in data.assets_def.check_keys}


def test_a_record_whose_letter_was_discarded_is_left_out_while_the_runs_hold_it(
    sql_database, own_state
):
    """Reconciliation left out records with open letters only: a record whose letter was
    discarded, which every run holds, was reported extra day after day, and no repair could
    clear it. Now it is left out as long as it stays as discarded; changed behind the runs'
    back (no cursor moved), it is drift again, and repair sends it."""
    engine = create_engine(sql_database())
    start = datetime(2025, 1, 1)
    source_lines(engine, [start + timedelta(minutes=n) for n in range(3)])
    assert run(engine, own_state).written == 3
    lines = sa.Table("source_lines", sa.MetaData(), autoload_with=engine)
    with engine.begin() as connection:  # the contract refuses it; the table keeps line 2
        connection.execute(
            sa.update(lines)
            .where(lines.c.id == 2)
            .values(amount=None, updated_at=start.replace(hour=1))
        )
    assert run(engine, own_state).counts["rejected"] == 1
    own_state.discard_dead_letters(
        own_state.list_dead_letters(SPEC.name), actor="ops", why="known bad", run_id="d"
    )
    assert run(engine, own_state).counts["held"] == 1
    assert reconciled(engine, own_state).in_sync

    with engine.begin() as connection:
        connection.execute(sa.update(lines).where(lines.c.id == 2).values(amount=7.0))
    drift = reconciled(engine, own_state)
    assert drift.differing == ["2"] and not (drift.missing or drift.extra), drift.summary()
    repair = Sync(
        SPEC, SqlSource(engine, SOURCE), SqlTable(engine, SPEC.target), own_state,
        run_id="r", actor="test", why="repair",
    )  # fmt: skip
    assert repair.repair(drift.differing).written == 1
    assert reconciled(engine, own_state).in_sync
    engine.dispose()


def test_a_null_and_empty_text_are_two_values_in_a_sql_table(sql_database, own_state):
    """Reconciliation read NULL and '' as one value: a table whose NULLs became '' (or whose ''
    became NULL) differed from its source unseen, and no repair was offered."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(3)])
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE source_lines SET memo = '' WHERE id = 1")
        connection.exec_driver_sql("UPDATE source_lines SET memo = NULL WHERE id = 2")
    assert run(engine, own_state).written == 3
    assert reconciled(engine, own_state).in_sync
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE ledger_lines SET memo = NULL WHERE line_number = 'L1'")
        connection.exec_driver_sql("UPDATE ledger_lines SET memo = '' WHERE line_number = 'L2'")
    assert reconciled(engine, own_state).differing == ["1", "2"]
    engine.dispose()


def reconciled(engine: sa.Engine, state: StateStore) -> Drift:
    return reconcile(SPEC, SqlSource(engine, SOURCE), SqlTable(engine, SPEC.target), state)


def test_a_repairs_audit_record_shows_what_it_wrote(sql_database, own_state):
    """A repair rewrites records whose content the ledger already holds: their audit records
    said `{}` changed, though a drifted row was written over."""
    engine = create_engine(sql_database())
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(2)])
    assert run(engine, own_state).written == 2
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE ledger_lines SET memo = 'drifted' WHERE line_number = 'L1'"
        )
    with syncing(engine, own_state, run_id="repair", why="repair") as repair:
        assert repair.repair(reconciled(engine, own_state).differing).written == 1
    (rewrite,) = [e for e in own_state.record_history("1", SPEC.name) if e["run_id"] == "repair"]
    assert rewrite["trigger"] == "repair"
    assert rewrite["diff"] == {
        "line_number": "L1",
        "amount": 1.0,
        "booked_on": "2025-01-02",
        "memo": "x",
    }
    assert reconciled(engine, own_state).in_sync
    engine.dispose()
