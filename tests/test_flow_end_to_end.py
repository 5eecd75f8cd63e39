"""crm/contacts through real Dagster: materialize, rerun, sensor-driven change, PostgreSQL too."""

from __future__ import annotations

import json
from collections import Counter

import dagster as dg
import sqlalchemy as sa

from assets.crm_contacts import CRM_CONTACTS
from assets.factory import flow_asset
from definitions import defs, resources
from integrations.engine.state import StateStore
from integrations.erp.changes import live_customer_ids, move_customers, soft_delete_customers
from integrations.sql.connect import create_engine
from tests.expectations import assert_crm_matches_erp, crm_contacts, valid_customers

CONTACTS = dg.AssetKey(["crm", "contacts"])


def materialize(
    instance: dg.DagsterInstance, tags: dict[str, str] | None = None
) -> dg.ExecuteInJobResult:
    return dg.materialize(
        [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance, tags=tags
    )


def metadata(result: dg.ExecuteInJobResult) -> dict[str, object]:
    (event,) = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_first_sync_fills_the_crm_and_a_rerun_sends_nothing(any_world, crm_client):
    with dg.instance_for_test() as instance:
        first = materialize(instance)
        assert first.success
        counts = metadata(first)
        assert counts["inserted"] > 0 and counts["rejected"] > 0
        assert_crm_matches_erp(any_world.erp_url, crm_client)
        before = {c["id"]: c["updatedAt"] for c in crm_contacts(crm_client)}
        received = any_world.crm.store.stats()["upsert_inputs"]

        second = materialize(instance)
        assert second.success
        again = metadata(second)
        assert again["written"] == 0 and again["all_unchanged"] is True
        assert any_world.crm.store.stats()["upsert_inputs"] == received, "the rerun sent records"
        assert {c["id"]: c["updatedAt"] for c in crm_contacts(crm_client)} == before

        checks = {check.check_name: check for check in first.get_asset_check_evaluations()}
        assert checks.keys() == {"contract", "audit_anchor"}
        check = checks["contract"]
        assert not check.passed
        assert check.metadata["rejected"].value == counts["rejected"]
        samples = check.metadata["samples"].value
        assert samples and all(
            "***" in str(s["record"]["email"]) for s in samples if s["record"]["email"]
        )
        assert (
            "dagster/column_schema"
            in first.get_asset_materialization_events()[0].materialization.metadata
        )


def test_sensor_requests_one_run_that_writes_exactly_the_changes(any_world, crm_client):
    erp = create_engine(any_world.erp_url)
    sensor = defs.resolve_sensor_def("erp_customers_changed")
    with dg.instance_for_test() as instance:
        assert materialize(instance).success
        idle = sensor(
            dg.build_sensor_context(
                instance=instance, cursor=None, resources=resources(), definitions=defs
            )
        )
        assert not idle.run_requests, "nothing changed since the sync: no run"
        cursor = idle.cursor

        # Synced customers whose email no other customer shares: archiving one of a clashing
        # pair would leave its twin in the DLQ until replayed (see the DLQ replay work).
        emails = Counter(valid_customers(any_world.erp_url).values())
        chosen = sorted(
            int(c["properties"]["erp_customer_id"][1:])
            for c in crm_contacts(crm_client)
            if emails[c["properties"]["email"].lower()] == 1
        )[:30]
        move_customers(erp, chosen[:25])
        soft_delete_customers(erp, chosen[25:30])

        tick = sensor(
            dg.build_sensor_context(
                instance=instance, cursor=cursor, resources=resources(), definitions=defs
            )
        )
        assert len(tick.run_requests) == 1
        request = tick.run_requests[0]
        assert request.asset_selection == [CONTACTS]
        assert {key.name for key in request.asset_check_keys} == {"contract", "audit_anchor"}, (
            "a sensor's sync leaves the reconciliation (the whole CRM read) to its schedule"
        )
        repeat = sensor(
            dg.build_sensor_context(
                instance=instance, cursor=tick.cursor, resources=resources(), definitions=defs
            )
        )
        assert not repeat.run_requests, "the same change must not request a second run"

        result = materialize(
            instance, tags={**request.tags, "dagster/sensor_name": "erp_customers_changed"}
        )
        counts = metadata(result)
        assert (counts["inserted"], counts["updated"], counts["archived"]) == (0, 25, 5)
        assert counts["rejected"] == 0
        archived = list(crm_client.list_objects("contacts", ["erp_customer_id"], archived=True))
        assert sorted(int(c["properties"]["erp_customer_id"][1:]) for c in archived) == sorted(
            chosen[25:30]
        )
        assert_crm_matches_erp(any_world.erp_url, crm_client)

        with StateStore(any_world.state_url).engine.connect() as connection:
            actions = (
                connection.execute(sa.text("SELECT why FROM audit_log ORDER BY id DESC"))
                .scalars()
                .first()
            )
        assert actions == "sensor erp_customers_changed"
        assert StateStore(any_world.state_url).verify_audit().intact
    erp.dispose()


def test_rejected_customers_are_dead_lettered_with_a_reason(world, crm_client):
    with dg.instance_for_test() as instance:
        counts = metadata(materialize(instance))
    store = StateStore(world.state_url)
    letters = store.list_dead_letters(flow=CRM_CONTACTS.name, limit=10_000)
    assert len(letters) == counts["rejected"] > 0
    reasons = {letter.reason for letter in letters}
    assert any("email is not a valid email address" in reason for reason in reasons)
    assert any("country is missing" in reason for reason in reasons)
    assert any("already used by record" in reason for reason in reasons), "dataset-wide email clash"
    assert all(letter.reason_kind in {"contract", "destination-rejected"} for letter in letters)
    audit = store.audit_entries(CRM_CONTACTS.name)
    assert audit and audit[-1]["actor"].startswith("dagster run ")
    assert json.dumps([entry["detail"] for entry in audit]).count("@") == 0, (
        "no email in the audit trail"
    )


def test_a_mass_delete_stops_at_the_archive_guard_and_lists_its_plan(world, crm_client):
    erp = create_engine(world.erp_url)
    with dg.instance_for_test() as instance:
        assert materialize(instance).success
        live_before = len(crm_contacts(crm_client))
        soft_delete_customers(erp, live_customer_ids(erp))

        stopped = dg.materialize(
            [flow_asset(CRM_CONTACTS)],
            resources=resources(),
            instance=instance,
            raise_on_error=False,
        )
        assert not stopped.success
        (failure,) = [e for e in stopped.all_events if e.event_type_value == "STEP_FAILURE"]
        info = failure.step_failure_data.user_failure_data
        assert "above the archive guard of 20%" in info.description
        assert "allow_mass_archive" in info.description
        plan = info.metadata["archive_plan"].value
        assert plan["would_archive"] == live_before and len(plan["keys"]) == 100
        assert len(crm_contacts(crm_client)) == live_before, "the CRM keeps all its contacts"

        confirmed = dg.materialize(
            [flow_asset(CRM_CONTACTS)],
            resources=resources(),
            instance=instance,
            run_config={"ops": {"crm__contacts": {"config": {"allow_mass_archive": True}}}},
        )
        assert metadata(confirmed)["archived"] == live_before
        assert crm_contacts(crm_client) == []
    erp.dispose()
