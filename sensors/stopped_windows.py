"""A sensor per flow: once no error-budget trip stands and the flow is free, a run of each
window whose run stopped.

While a trip stands, every run of a window (a day's, the changed-days sensor's, a backfill's)
stops at its start, and a run that trips leaves the rest of its window unread. The schedule
never reruns a failed partition and a sensor's run key is used once, so such a day was never
synced: an invoice paid meanwhile stayed open in finance. The engine keeps each such window in
the state store until a run of it goes through (sync.py `run_window`); this sensor requests them
again once the trip is cleared (replayed, discarded or approved), and none while it stands. A
day's run that gave up waiting for another run of its flow (a long backfill) is kept the same
way, and requested once the flow is free; so is an unpartitioned flow's run that the trip or
the budget stopped, or that gave up (its window is all the flow has not synced: any run of the
flow that goes through syncs it). A window
whose requested run failed otherwise (the source down) is still kept: it is requested again,
under a new run key, after a wait that doubles with each failed run of it.
"""

import time
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

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

# A window's requested run that failed otherwise (the source down, a bug) left it kept with the
# same stop, so the same run key, which Dagster launches once: it is requested again under a new
# key, after this wait, doubled with each failed run (a window failing for good does not spin).
FIRST_RETRY_AFTER = timedelta(minutes=10)
LONGEST_RETRY_AFTER = timedelta(hours=6)
# The request a run was made for (its first run key): the sensor counts the runs of each.
REQUEST_TAG = "handoff/stopped_window_request"


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


class QueuedRun(NamedTuple):
    """A run of a flow's asset that waits to begin, and its days (ISO dates, first … last; none,
    "" … "", for an unpartitioned flow's run, which syncs all the flow has not synced)."""

    first: str
    last: str
    run_id: str


def queued_days(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[QueuedRun]:
    """The asset's runs that wait to begin: a day within one needs no other run (the changed-days
    sensor's and this one's requests had different keys, so both sensors' runs of a day went,
    the second waiting for the first and, past its wait, failing)."""
    runs = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_NOT_BEGUN)):
        if key not in (run.asset_selection or ()):
            continue
        tags = run.tags
        if "dagster/partition" in tags:
            runs.append(QueuedRun(tags["dagster/partition"], tags["dagster/partition"], run.run_id))
        elif "dagster/asset_partition_range_start" in tags:
            runs.append(
                QueuedRun(
                    tags["dagster/asset_partition_range_start"],
                    tags["dagster/asset_partition_range_end"],
                    run.run_id,
                )
            )
        else:
            runs.append(QueuedRun("", "", run.run_id))
    return runs


def covering(first: str, last: str, runs: list[QueuedRun]) -> QueuedRun | None:
    """The queued run whose days hold all of first … last (ISO dates), if any."""
    return next((run for run in runs if run.first <= first and last <= run.last), None)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)  # the state store keeps naive UTC


def _days(spec: FlowSpec, window: StoppedWindow) -> dg.PartitionKeyRange:
    return partitions_of(spec).get_partition_key_range_for_time_window(
        dg.TimeWindow(_utc(window.start), _utc(window.end))
    )


def _span(spec: FlowSpec, window: StoppedWindow) -> tuple[str, str]:
    """The window's first and last days; none ("", "") for an unpartitioned flow's."""
    if spec.partitions is None:
        return "", ""
    days = _days(spec, window)
    return days.start, days.end


def _request_key(spec: FlowSpec, window: StoppedWindow) -> str:
    """The request of the window's latest stop: a window refused again is requested again."""
    first, last = _span(spec, window)
    days = f"{first}:{last}:" if (first, last) != ("", "") else ""
    return f"{spec.name}:stopped:{days}{window.stopped_at.isoformat()}"


class Attempts(NamedTuple):
    """The runs made for a request of a window, all finished: how many (each failed, or the
    window would be forgotten), and when the next may be requested."""

    failed: int
    due: float  # a Unix time


def _attempts(instance: dg.DagsterInstance, keys: list[str]) -> dict[str, Attempts | None]:
    """Per request key, its finished runs' Attempts, or None while one of its runs goes on or
    waits (Dagster's own retry of a failed one, say). One query for all of them."""
    records: dict[str, list[dg.RunRecord]] = {key: [] for key in keys}
    if keys:
        for record in instance.get_run_records(filters=dg.RunsFilter(tags={REQUEST_TAG: keys})):
            records[record.dagster_run.tags[REQUEST_TAG]].append(record)
    return {key: _attempts_of(runs) for key, runs in records.items()}


def _attempts_of(runs: list[dg.RunRecord]) -> Attempts | None:
    if any(not record.dagster_run.is_finished for record in runs):
        return None
    if not runs:
        return Attempts(0, 0.0)
    ended = max(record.end_time or record.update_timestamp.timestamp() for record in runs)
    return Attempts(len(runs), ended + retry_wait(len(runs)).total_seconds())


def retry_wait(failed: int) -> timedelta:
    """The wait after a window's `failed`-th failed run: doubling from FIRST_RETRY_AFTER up to
    LONGEST_RETRY_AFTER (and no further: a window failing for weeks would double it past what
    a timedelta holds, and the sensor would fail every tick)."""
    wait = FIRST_RETRY_AFTER
    for _ in range(failed - 1):
        if wait >= LONGEST_RETRY_AFTER:
            break
        wait *= 2
    return min(wait, LONGEST_RETRY_AFTER)


def _run_request(spec: FlowSpec, window: StoppedWindow, failed: int) -> dg.RunRequest:
    """A run of the window: its day's partition, or a one-run backfill of its range, or an
    unpartitioned flow's run. After `failed` runs of the request, a key of its own (Dagster
    launches a run key once)."""
    first, last = _span(spec, window)
    one_day = first == last
    key = _request_key(spec, window)
    return dg.RunRequest(
        run_key=f"{key}:after-{failed}-failed" if failed else key,
        partition_key=first if one_day and first else None,
        asset_selection=[asset_key(spec)],
        asset_check_keys=sync_checks([spec]),
        tags={
            REQUEST_TAG: key,
            "handoff/stopped_window": f"{window.stop} by run {window.run_id}",
            **pool_tags(spec),
            **(
                {}
                if one_day
                else {
                    "dagster/asset_partition_range_start": first,
                    "dagster/asset_partition_range_end": last,
                }
            ),
        },
    )


def _waiting(key: dg.AssetKey, count: int, dues: list[float], now: float) -> str:
    """Why no window is requested: each waits for a run of it going on, or after a failed one."""
    if not dues:
        return f"{count} windows of {key.to_user_string()} wait for the runs of them going on"
    minutes = max(1, round((min(dues) - now) / 60))
    return (
        f"{count} windows of {key.to_user_string()} wait: their last run failed; the next in "
        f"{minutes} min (the wait doubles with each failed run, up to "
        f"{LONGEST_RETRY_AFTER.total_seconds() / 3600:.0f} h)"
    )


def stopped_windows_sensor(spec: FlowSpec) -> dg.SensorDefinition:
    key = asset_key(spec)

    @dg.sensor(
        name=f"{spec.name}_stopped_windows",
        description=f"Once no error-budget trip stands and the flow is free, requests a run of "
        f"each window of {key.to_user_string()} whose run stopped (refused while a trip stood, "
        "tripped in mid-run, or given up waiting for another run of the flow), until one goes "
        "through.",
        target=sync_selection([spec]),
        # Every 5 minutes, as the alert sensors: one on for each flow, checked each minute, had the
        # daemon log a tick of each a minute though none had anything to do. What it waits for is
        # someone clearing a trip, or a run of the flow (itself waited for 5 minutes) ending.
        minimum_interval_seconds=300,
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
                f"no run of {key.to_user_string()} waits to be run again (stopped by the error "
                "budget, or given up waiting for the flow)"
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
        todo = [w for w in windows if covering(*_span(spec, w), queued) is None]
        if not todo:
            return dg.SkipReason(
                f"{len(windows)} windows of {key.to_user_string()} wait for the runs of them "
                "queued already"
            )
        # A window a run was requested for: once it failed otherwise, after its wait.
        attempts = _attempts(context.instance, [_request_key(spec, w) for w in todo])
        now = time.time()
        due, later = [], []
        for window in todo:
            attempt = attempts[_request_key(spec, window)]
            if attempt is not None:
                (due if attempt.due <= now else later).append((window, attempt))
        if not due:
            return dg.SkipReason(_waiting(key, len(windows), [a.due for _, a in later], now))
        # The most recent first, as the changed-days sensor: the days reports are read for now.
        latest = sorted(due, key=lambda pair: pair[0].start, reverse=True)
        return dg.SensorResult(
            run_requests=[
                _run_request(spec, window, attempt.failed)
                for window, attempt in latest[:MAX_WINDOWS_PER_TICK]
            ]
        )

    return _stopped_windows


def stopped_windows_sensors(specs: list[FlowSpec]) -> list[dg.SensorDefinition]:
    """One sensor per flow: a daily-partitioned one's, with a change cursor or not (Chinook's
    too), and an unpartitioned one's, for its runs that gave up waiting for the flow."""
    return [stopped_windows_sensor(spec) for spec in specs]
