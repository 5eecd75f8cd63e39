"""Paid invoices → deals: daily partitions, a backfill range in one run, associations, voids."""

import dagster as dg
import sqlalchemy as sa

from assets.crm_contacts import CRM_CONTACTS
from assets.crm_deals import CRM_DEALS
from assets.factory import flow_asset
from definitions import defs, resources
from integrations.sql.connect import create_engine

JANUARY = {
    "dagster/asset_partition_range_start": "2025-01-01",
    "dagster/asset_partition_range_end": "2025-01-31",
}


def run_deals(instance, tags=JANUARY, partition_key=None, **options):
    return dg.materialize(
        [flow_asset(CRM_DEALS)],
        resources=resources(),
        instance=instance,
        tags=tags,
        partition_key=partition_key,
        **options,
    )


def materialize_deals(instance, tags=JANUARY, partition_key=None) -> dict[str, object]:
    result = run_deals(instance, tags, partition_key)
    assert result.success
    events = result.get_asset_materialization_events()  # one per partition, same metadata
    return {key: value.value for key, value in events[0].materialization.metadata.items()}


def paid_invoices(erp_url: str, start: str, end: str) -> dict[str, str]:
    """invoice number → customer number, for paid invoices dated in [start, end]."""
    engine = create_engine(erp_url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT i.invoice_number, c.customer_number FROM invoices i "
                "JOIN customers c ON c.customer_id = i.customer_id "
                "WHERE i.status = 'paid' AND i.invoice_date BETWEEN :start AND :end"
            ),
            {"start": start, "end": end},
        ).all()
    engine.dispose()
    return dict(rows)


def test_a_month_of_deals_in_one_run_linked_to_their_contacts(any_world, crm_client):
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        counts = materialize_deals(instance)
        runs = instance.get_runs()
        assert len(runs) == 2, "the month's 31 partitions ran as one run"

        expected = paid_invoices(any_world.erp_url, "2025-01-01", "2025-01-31")
        deals = list(crm_client.list_objects("deals", ["erp_invoice_id", "closedate", "dealstage"]))
        synced = {d["properties"]["erp_invoice_id"]: d for d in deals}
        assert set(synced) <= set(expected)
        assert counts["inserted"] == len(synced) and counts["inserted"] >= 0.8 * len(expected)
        assert all(d["properties"]["closedate"].startswith("2025-01") for d in deals)
        assert {d["properties"]["dealstage"] for d in deals} == {"closedwon"}
        refused = set(expected) - set(synced)
        assert counts["rejected"] >= len(refused), (
            "deals of customers not in the CRM are dead-lettered"
        )

        contacts = {
            c["id"]: c["properties"]["erp_customer_id"]
            for c in crm_client.list_objects("contacts", ["erp_customer_id"])
        }
        for number, deal in list(synced.items())[:20]:
            linked = crm_client.associated_ids("deals", deal["id"], "contacts")
            assert [contacts[i] for i in linked] == [expected[number]]

        again = materialize_deals(instance)
        assert again["written"] == 0, "re-running the backfill writes nothing"


def test_a_voided_invoice_archives_its_deal_when_its_day_is_rewritten(world, crm_client):
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        materialize_deals(instance)
        deal = next(iter(crm_client.list_objects("deals", ["erp_invoice_id", "closedate"])))
        number, day = deal["properties"]["erp_invoice_id"], deal["properties"]["closedate"]
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE invoices SET status = 'void' WHERE invoice_number = :n"),
                {"n": number},
            )
        engine.dispose()
        counts = materialize_deals(instance, tags=None, partition_key=day)
        assert (counts["archived"], counts["written"]) == (1, 1)
        archived = list(crm_client.list_objects("deals", ["erp_invoice_id"], archived=True))
        assert [d["properties"]["erp_invoice_id"] for d in archived] == [number]


def test_deals_are_daily_partitioned_with_a_single_run_backfill_policy():
    deals = defs.resolve_assets_def(dg.AssetKey(["crm", "deals"]))
    assert isinstance(deals.partitions_def, dg.DailyPartitionsDefinition)
    assert deals.backfill_policy == dg.BackfillPolicy.single_run()
    assert defs.resolve_schedule_def("erp_paid_invoices_to_crm_deals_schedule")


def test_a_mass_exit_from_the_flows_scope_stops_at_the_archive_guard(world, crm_client):
    """Every January invoice voided at once leaves the flow's scope (paid invoices): their deals
    would all be archived. The guard counted soft deletes only, so the run archived them all."""
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        synced = materialize_deals(instance)["inserted"]
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE invoices SET status = 'void'"))
        engine.dispose()
        stopped = run_deals(instance, raise_on_error=False)
        assert not stopped.success
        (failure,) = [e for e in stopped.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "above the archive guard" in failure.step_failure_data.user_failure_data.description
        assert list(crm_client.list_objects("deals", ["erp_invoice_id"], archived=True)) == []

        allow = {"ops": {"crm__deals": {"config": {"allow_mass_archive": True}}}}
        allowed = run_deals(instance, run_config=allow)
        assert allowed.success
        archived = list(crm_client.list_objects("deals", ["erp_invoice_id"], archived=True))
        assert len(archived) == synced
