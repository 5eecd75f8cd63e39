"""ERP organisations → CRM companies, from nothing but a spec, a mapping and two contracts."""

import dagster as dg
import sqlalchemy as sa

from assets import FLOWS
from assets.crm_companies import CRM_COMPANIES
from assets.factory import flow_asset
from definitions import defs, resources
from integrations.sql.connect import create_engine


def test_companies_sync_and_rerun_writes_nothing(any_world, crm_client):
    with dg.instance_for_test() as instance:
        first = dg.materialize(
            [flow_asset(CRM_COMPANIES)], resources=resources(), instance=instance
        )
        again = dg.materialize(
            [flow_asset(CRM_COMPANIES)], resources=resources(), instance=instance
        )
    assert first.success and again.success
    engine = create_engine(any_world.erp_url)
    with engine.connect() as connection:
        expected = set(
            connection.execute(
                sa.text("SELECT organisation_number FROM organisations WHERE country IS NOT NULL")
            ).scalars()
        )
    engine.dispose()
    companies = list(crm_client.list_objects("companies", ["erp_organisation_id", "domain"]))
    assert {c["properties"]["erp_organisation_id"] for c in companies} == expected
    assert len(companies) == len(expected)
    (event,) = again.get_asset_materialization_events()
    assert event.materialization.metadata["written"].value == 0


def test_every_flow_gets_its_asset_checks_sensor_and_schedules_from_the_factory():
    graph = defs.resolve_asset_graph()
    for spec in FLOWS:
        key = dg.AssetKey([spec.target.system, spec.target.dataset])
        assert {"contract", "reconciliation"} <= {
            check.name for check in graph.asset_check_keys if check.asset_key == key
        }
        assert defs.resolve_schedule_def(f"{spec.name}_schedule")
        assert defs.resolve_schedule_def(f"{spec.name}_reconciliation_schedule")
        if spec.watch_source and spec.partitions:
            assert defs.resolve_sensor_def(f"{spec.name}_changed_days")
        elif spec.watch_source:
            assert defs.resolve_sensor_def(f"erp_{spec.source.table}_changed")
    assert len(FLOWS) >= 3
