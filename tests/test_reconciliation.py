"""Reconciliation finds what changed behind handoff's back in the CRM; repair fixes exactly that."""

import dagster as dg

from assets.checks import reconciliation_check
from assets.crm_contacts import CRM_CONTACTS
from assets.factory import asset_key, flow_asset
from definitions import defs, resources
from tests.expectations import assert_crm_matches_erp, crm_contacts

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
