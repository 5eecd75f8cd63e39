"""Schedules: each flow's sync (hourly by default, the safety net under the sensors) and its
daily reconciliation check."""

import dagster as dg

from assets.checks import RECONCILIATION_CHECK
from assets.factory import asset_key
from integrations.engine.spec import FlowSpec

RECONCILIATION_CRON = "30 3 * * *"


def pool_tags(spec: FlowSpec) -> dict[str, str]:
    """`handoff/pool` on scheduled and sensed runs: deploy/dagster.yaml limits runs per pool."""
    return {"handoff/pool": spec.pool} if spec.pool else {}


def flow_schedules(specs: list[FlowSpec]) -> list[dg.ScheduleDefinition]:
    syncs = [
        dg.ScheduleDefinition(
            name=f"{spec.name}_schedule",
            target=[asset_key(spec)],
            cron_schedule=spec.schedule,
            default_status=dg.DefaultScheduleStatus.STOPPED,
            tags=pool_tags(spec),
        )
        for spec in specs
        if spec.schedule and not spec.partitions
    ]
    # A partitioned flow syncs each day's partition once the day is over.
    daily = [
        dg.build_schedule_from_partitioned_job(
            dg.define_asset_job(
                f"{spec.name}_daily", selection=[asset_key(spec)], tags=pool_tags(spec)
            ),
            name=f"{spec.name}_schedule",
            default_status=dg.DefaultScheduleStatus.STOPPED,
        )
        for spec in specs
        if spec.partitions
    ]
    reconciliations = [
        dg.ScheduleDefinition(
            name=f"{spec.name}_reconciliation_schedule",
            job=dg.define_asset_job(
                f"{spec.name}_reconciliation",
                selection=dg.AssetSelection.checks(
                    dg.AssetCheckKey(asset_key(spec), RECONCILIATION_CHECK)
                ),
            ),
            cron_schedule=RECONCILIATION_CRON,
            default_status=dg.DefaultScheduleStatus.STOPPED,
        )
        for spec in specs
    ]
    return syncs + daily + reconciliations
