"""A sensor per daily-partitioned flow: once no error-budget trip stands, a run of each window
the error budget stopped.

While a trip stands, every run of a window (a day's, the changed-days sensor's, a backfill's)
stops at its start, and a run that trips leaves the rest of its window unread. The schedule
never reruns a failed partition and a sensor's run key is used once, so such a day was never
synced: an invoice paid meanwhile stayed open in finance. The engine keeps each such window in
the state store until a run of it goes through (sync.py `run_window`); this sensor requests them
again once the trip is cleared (replayed, discarded or approved), and none while it stands. A
day's run that gave up waiting for another run of its flow (a long backfill) is kept the same
way, and requested once the flow is free.
"""

from datetime import UTC, datetime

import dagster as dg

from assets.factory import asset_key, partitions_of, sync_checks, sync_selection
from integrations.engine.spec import FlowSpec
from integrations.engine.state import FlowBusy, StateStore, StoppedWindow
from resources import StateStoreResource
from sensors.schedules import pool_tags
from sensors.trips import standing_trip, trip_stands

# As many as the changed-days sensor requests in a tick: a month of days. Those beyond wait in
# the state store, and are requested once the runs of the first ones went through.
MAX_WINDOWS_PER_TICK = 30


def flow_busy(store: StateStore, spec: FlowSpec) -> bool:
    """Whether a run of the flow holds it now: a window requested meanwhile would wait for it,
    and, past the wait, fail and be kept again (a loop of failed runs while a backfill goes)."""
    try:
        with store.flow_lock(spec.name, wait=0):
            return False
    except FlowBusy:
        return True


# Runs that have not begun reading: each reads its days after whatever a sensor saw now.
_NOT_BEGUN = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
]


def queued_days(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[tuple[str, str]]:
    """The (first, last) days of the asset's runs that wait to begin: a day within one needs no
    other run (the changed-days sensor's and this one's requests had different keys, so both
    sensors' runs of a day went, the second waiting for the first and, past its wait, failing)."""
    windows = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_NOT_BEGUN)):
        if key not in (run.asset_selection or ()):
            continue
        tags = run.tags
        if "dagster/partition" in tags:
            windows.append((tags["dagster/partition"], tags["dagster/partition"]))
        elif "dagster/asset_partition_range_start" in tags:
            windows.append(
                (
                    tags["dagster/asset_partition_range_start"],
                    tags["dagster/asset_partition_range_end"],
                )
            )
    return windows


def within(first: str, last: str, windows: list[tuple[str, str]]) -> bool:
    """Whether the days first … last (ISO dates) are all within one of the windows."""
    return any(start <= first and last <= end for start, end in windows)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)  # the state store keeps naive UTC


def _days(spec: FlowSpec, window: StoppedWindow) -> dg.PartitionKeyRange:
    return partitions_of(spec).get_partition_key_range_for_time_window(
        dg.TimeWindow(_utc(window.start), _utc(window.end))
    )


def _run_request(spec: FlowSpec, window: StoppedWindow) -> dg.RunRequest:
    """A run of the window: its day's partition, or a one-run backfill of its range. The key
    names the window's latest stop: a window refused again is requested again."""
    days = _days(spec, window)
    one_day = days.start == days.end
    return dg.RunRequest(
        run_key=f"{spec.name}:stopped:{days.start}:{days.end}:{window.stopped_at.isoformat()}",
        partition_key=days.start if one_day else None,
        asset_selection=[asset_key(spec)],
        asset_check_keys=sync_checks([spec]),
        tags={
            "handoff/stopped_window": f"{window.stop} by run {window.run_id}",
            **pool_tags(spec),
            **(
                {}
                if one_day
                else {
                    "dagster/asset_partition_range_start": days.start,
                    "dagster/asset_partition_range_end": days.end,
                }
            ),
        },
    )


def stopped_windows_sensor(spec: FlowSpec) -> dg.SensorDefinition:
    key = asset_key(spec)

    @dg.sensor(
        name=f"{spec.name}_stopped_windows",
        description=f"Once no error-budget trip stands, requests a run of each window of "
        f"{key.to_user_string()} the error budget stopped (refused while a trip stood, or "
        "tripped in mid-run).",
        target=sync_selection([spec]),
        minimum_interval_seconds=60,
        # On by default, unlike the others: it requests nothing unless a run was stopped, and the
        # stop's message promises the window is requested again once the trip clears.
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def _stopped_windows(context: dg.SensorEvaluationContext, state: StateStoreResource):
        with state.open() as store:
            windows = store.list_stopped_windows(spec.name)
            trip = standing_trip(store, spec) if windows else None
            busy = bool(windows) and trip is None and flow_busy(store, spec)
        if not windows:
            return dg.SkipReason(
                f"no run of {key.to_user_string()} was stopped by the error budget"
            )
        if trip is not None:
            return dg.SkipReason(
                f"{len(windows)} windows of {key.to_user_string()} wait: {trip_stands(trip)}"
            )
        if busy:
            return dg.SkipReason(
                f"{len(windows)} windows of {key.to_user_string()} wait: a run of the flow is "
                "going on"
            )
        # A window whose run waits to begin is read by it: it is forgotten once that run is
        # through, or kept again, with a new stop, should the run be stopped too.
        queued = queued_days(context.instance, key)
        todo = [w for w in windows if not within(*_days(spec, w), queued)]
        if not todo:
            return dg.SkipReason(
                f"{len(windows)} windows of {key.to_user_string()} wait for the runs of them "
                "queued already"
            )
        # The most recent first, as the changed-days sensor: the days reports are read for now.
        latest = sorted(todo, key=lambda window: window.start, reverse=True)
        return dg.SensorResult(
            run_requests=[_run_request(spec, window) for window in latest[:MAX_WINDOWS_PER_TICK]]
        )

    return _stopped_windows


def stopped_windows_sensors(specs: list[FlowSpec]) -> list[dg.SensorDefinition]:
    """One sensor per daily-partitioned flow, with a change cursor or not (Chinook's too)."""
    return [stopped_windows_sensor(spec) for spec in specs if spec.partitions]
