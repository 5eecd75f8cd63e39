"""Schedules: each flow's sync (hourly by default, the safety net under the sensors) and its
daily reconciliation check.

While the flow's error budget is tripped, a sync's tick requests no run (each would stop at its
start, with its failure alert, once per tick) and says why. What the tick skipped is kept as a
stopped window (`refused`), as the refused run would have kept it: a daily-partitioned flow's
day, an unpartitioned flow's sync (SINCE_WATERMARK). The stopped-windows sensor requests it once
the trip clears, not the next tick (an hour on, or a day for a flow synced daily)."""

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

import dagster as dg

from assets.checks import RECONCILIATION_CHECK, reconciliation_schedule_name
from assets.factory import asset_key, partitions_of, sync_checks, sync_selection
from integrations.engine.spec import FlowSpec
from integrations.engine.state import SINCE_WATERMARK
from resources import StateStoreResource
from sensors.trips import clear_todo, trip_skips, trip_stands

RECONCILIATION_CRON = "30 3 * * *"


def pool_tags(spec: FlowSpec) -> dict[str, str]:
    """`handoff/pool` on scheduled and sensed runs: deploy/dagster.yaml limits runs per pool."""
    return {"handoff/pool": spec.pool} if spec.pool else {}


def runs_per_pool(
    run_key: str, specs: Sequence[FlowSpec], tags: dict[str, str]
) -> list[dg.RunRequest]:
    """A sensor's syncs of `specs`, one run per pool: a run's `handoff/pool` tag holds one pool,
    and the production instance lets one run per pool go at a time. A run of two pools' flows,
    tagged with one, waited behind that pool's runs while it wrote through the other beside
    them. `run_key` stays as it is where the flows share a pool."""
    groups: dict[str | None, list[FlowSpec]] = defaultdict(list)
    for spec in specs:
        groups[spec.pool].append(spec)
    return [
        dg.RunRequest(
            run_key=run_key if len(groups) == 1 else f"{run_key}:{pool or 'no pool'}",
            asset_selection=[asset_key(spec) for spec in group],
            asset_check_keys=sync_checks(group),
            tags={**tags, **pool_tags(group[0])},
        )
        for pool, group in groups.items()
    ]


def _hourly_sync(spec: FlowSpec) -> dg.ScheduleDefinition:
    key = asset_key(spec)

    @dg.schedule(
        name=f"{spec.name}_schedule",
        cron_schedule=spec.schedule,
        target=sync_selection([spec]),
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Syncs {key.to_user_string()} (a sync it skips while the error budget is "
        "tripped is requested once the trip clears).",
    )
    def _sync(context: dg.ScheduleEvaluationContext, state: StateStoreResource):
        with state.open() as store:
            trip = trip_skips(store, spec, SINCE_WATERMARK, _tick(context))
        if trip is not None:
            return dg.SkipReason(
                f"{key.to_user_string()} skipped: {trip_stands(trip)}; "
                + clear_todo(spec, "its sync")
            )
        # Its asset named: the stopped-windows sensor sees the run queued (queued_days), and
        # leaves it a sync kept after a run gave up waiting for the flow, not request another.
        return dg.RunRequest(
            asset_selection=[key], asset_check_keys=sync_checks([spec]), tags=pool_tags(spec)
        )

    return _sync


def _daily_sync(spec: FlowSpec) -> dg.ScheduleDefinition:
    """A partitioned flow syncs each day's partition once the day is over."""
    key, partitions = asset_key(spec), partitions_of(spec)
    name = f"{spec.name}_schedule"

    @dg.schedule(
        name=name,
        cron_schedule=partitions.get_cron_schedule(),
        execution_timezone=partitions.timezone,
        job=dg.define_asset_job(
            f"{spec.name}_daily", selection=sync_selection([spec]), tags=pool_tags(spec)
        ),
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Syncs each day of {key.to_user_string()} once it is over (a day it skips "
        "while the error budget is tripped is requested once the trip clears).",
    )
    def _sync(context: dg.ScheduleEvaluationContext, state: StateStoreResource):
        with dg.partition_loading_context(effective_dt=context.scheduled_execution_time):
            window = partitions.get_last_partition_window()
        if window is None:
            return dg.SkipReason(f"{key.to_user_string()} has no day over yet")
        day = partitions.get_partition_key_for_timestamp(window.start.timestamp())
        with state.open() as store:
            trip = trip_skips(store, spec, (window.start, window.end), _tick(context))
        if trip is not None:
            return dg.SkipReason(
                f"{key.to_user_string()} {day} skipped: {trip_stands(trip)}; "
                + clear_todo(spec, "the day")
            )
        # Its asset named: the sensors see the day's run queued (queued_days), not request it too.
        return dg.RunRequest(
            run_key=day,
            partition_key=day,
            asset_selection=[key],
            asset_check_keys=sync_checks([spec]),
        )

    return _sync


def _tick(context: dg.ScheduleEvaluationContext) -> str:
    """Who stopped a window the schedule skipped: its tick (there is no run)."""
    moment: datetime = context.scheduled_execution_time
    return f"schedule tick {moment:%Y-%m-%dT%H:%M%z}"


def flow_schedules(specs: list[FlowSpec]) -> list[dg.ScheduleDefinition]:
    syncs = [_hourly_sync(spec) for spec in specs if spec.schedule and not spec.partitions]
    daily = [_daily_sync(spec) for spec in specs if spec.partitions]
    reconciliations = [
        dg.ScheduleDefinition(
            name=reconciliation_schedule_name(spec),
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
