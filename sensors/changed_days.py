"""A sensor per daily-partitioned flow: a run of each past day whose rows changed.

The flow's schedule syncs a day once it is over; a row of an earlier day changed later (an
invoice paid, voided or deleted a week on) is read by no run of its own. The sensor finds the
business days of the rows changed since its last look and requests a run of each such day's
partition, which rewrites that day (the ledger's diff sends only what changed).

A tick costs one `max(updated_at)` query and the source's change counter (one query at the mark's
second, for a cursor keeping whole seconds: see source_changed.py), and one DISTINCT query over the
rows changed since the sensor's mark when the mark or, at the same mark, the counter moved. The
cursor holds the mark (the newest change seen), the counter there, and the changed days not
requested yet: a tick requests at most `MAX_DAYS_PER_TICK` runs, the most recent days first, and
the days beyond wait in the cursor for the next ticks. While the flow's error budget is tripped it
requests none (each run would stop at its start, and its key be used up): the changed days wait in
the cursor until the trip clears. A changed day whose run waits in the queue already (the
schedule's, say) is left to it, in the cursor until it begins: should it never begin (cancelled in
the queue), the day is requested.
"""

import json
from datetime import UTC, datetime

import dagster as dg

from assets.factory import asset_key, partitions_of, sync_checks, sync_selection
from integrations.engine.source import FAR_FUTURE
from integrations.engine.spec import FlowSpec
from integrations.engine.state import looked_back, utcnow
from sensors.schedules import pool_tags
from sensors.stopped_windows import covering, queued_days
from sensors.trips import standing_trip, trip_stands

# A month of days per tick: a month-end's corrections are requested at once, while a mass edit
# (three years of invoices touched) is requested a month per tick instead of a thousand runs in
# one tick flooding the run queue and the flow's pool ahead of every other flow's runs.
MAX_DAYS_PER_TICK = 30


def _last_look(spec: FlowSpec, context: dg.SensorEvaluationContext) -> datetime | None:
    """The newest change the sensor saw (its cursor's mark); on its first look, or past a mark in
    the far future (a mistaken cursor value an earlier tick kept), when the flow last
    materialized; None when it never did."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    mark = cursor.get("high_water_mark")
    if mark is not None and datetime.fromisoformat(mark) <= utcnow() + FAR_FUTURE:
        return datetime.fromisoformat(mark)
    event = context.instance.get_latest_materialization_event(asset_key(spec))
    if event is None:
        return None
    return datetime.fromtimestamp(event.timestamp, UTC).replace(tzinfo=None)


def _cursor(mark: str | None, counter: int | None, waiting: list[str], left: dict[str, str]) -> str:
    """The mark and the source's change counter there, the days found changed but not requested
    yet, and those left to a queued run (day → run id) until it begins (each left out when
    none)."""
    cursor: dict[str, object] = {} if mark is None else {"high_water_mark": mark}
    if counter is not None:
        cursor["change_counter"] = counter
    if waiting:
        cursor["waiting_days"] = waiting
    if left:
        cursor["left_to_runs"] = left
    return json.dumps(cursor)


def _settle(instance: dg.DagsterInstance, left: dict[str, str]) -> tuple[set[str], dict[str, str]]:
    """Of the changed days left to runs that waited in the queue: those whose run ended without
    beginning (cancelled in the queue, failed to launch, deleted), to request now; and those
    whose run waits still. A run that began read its days after their change: they are done."""
    if not left:
        return set(), {}
    records = {
        record.dagster_run.run_id: record
        for record in instance.get_run_records(
            filters=dg.RunsFilter(run_ids=sorted(set(left.values())))
        )
    }
    never_began, waits = set(), {}
    for day, run_id in left.items():
        record = records.get(run_id)
        if record is None or (record.dagster_run.is_finished and record.start_time is None):
            never_began.add(day)
        elif record.start_time is None:
            waits[day] = run_id
    return never_began, waits


def _most_recent_first(days: set[str]) -> tuple[list[str], list[str]]:
    """The days to request this tick, and those left for later ticks. The most recent go first:
    they are the days reports are read for now (this month's close, yesterday's payments), and a
    mass edit of old years drains behind them at a month per tick; oldest first would hold a
    correction of yesterday back behind three years of them."""
    ordered = sorted(days, reverse=True)
    return ordered[:MAX_DAYS_PER_TICK], ordered[MAX_DAYS_PER_TICK:]


def changed_days_sensor(spec: FlowSpec) -> dg.SensorDefinition:
    key, system = asset_key(spec), spec.source.system
    partitions = partitions_of(spec)
    column = spec.partitions.column

    @dg.sensor(
        name=f"{spec.name}_changed_days",
        description=f"Requests a run of each day of {key.to_user_string()} whose rows changed in "
        f"{system} `{spec.source.table}` since it last looked (the schedule syncs a day once).",
        target=sync_selection([spec]),
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={system, "state"},
    )
    def _changed_days(context: dg.SensorEvaluationContext, **_resources):
        # The source's resource key is the system's name (see source_changed.py).
        table = f"{system} {spec.source.table}"
        seen = json.loads(context.cursor) if context.cursor else {}
        never_began, left = _settle(context.instance, seen.get("left_to_runs", {}))
        waiting = set(seen.get("waiting_days", [])) | never_began
        with getattr(context.resources, system).source(spec.source) as source:
            high_water_mark = source.high_water_mark()
            if high_water_mark is None:
                return dg.SensorResult(skip_reason=f"{table} is empty", cursor=context.cursor)
            mark = high_water_mark.isoformat()
            counter = source.change_counter(high_water_mark)
            last_look = _last_look(spec, context)
            if last_look is None:
                return dg.SensorResult(
                    skip_reason=f"{key.to_user_string()} was never materialized: backfill it; "
                    f"changes are watched from {mark} on",
                    cursor=_cursor(mark, counter, sorted(waiting), left),
                )
            # Or a change within the second of the newest it saw (a cursor keeping seconds).
            moved = high_water_mark > last_look or (
                mark == seen.get("high_water_mark")
                and counter is not None
                and counter != seen.get("change_counter")
            )
            # The newest change the sensor saw, its cursor's: it only goes forward, and so names
            # each request anew (the table's can go back: its newest row deleted, or edited by a
            # host whose clock is behind; a waiting day requested under an earlier tick's key,
            # which Dagster launches once, was never run).
            seen_mark = mark if moved else seen.get("high_water_mark")
            seen_counter = counter if moved else seen.get("change_counter")
            # From the lookback before the last look on: commits that came late.
            changed = (
                source.changed_days(looked_back(last_look, spec.lookback), column) if moved else []
            )
        # A day not over yet (or before the partitions start) is no partition: its own
        # scheduled run reads it.
        days = waiting | {
            day.isoformat() for day in changed if partitions.has_partition_key(day.isoformat())
        }
        if not days and not moved:
            return dg.SensorResult(
                skip_reason=f"{table} unchanged since {last_look.isoformat()}",
                cursor=_cursor(seen_mark, seen_counter, [], left),
            )
        if not days:
            return dg.SensorResult(
                skip_reason=f"no past day of {key.to_user_string()} changed",
                cursor=_cursor(mark, counter, [], left),
            )
        with context.resources.state.open() as store:
            trip = standing_trip(store, spec)
        if trip is not None:
            return dg.SensorResult(
                skip_reason=f"{len(days)} changed days of {key.to_user_string()} wait: "
                f"{trip_stands(trip)}",
                cursor=_cursor(seen_mark, seen_counter, sorted(days), left),
            )
        # A day whose run waits to begin (the stopped-windows sensor's, say) reads the change:
        # left to it until it begins.
        queued = queued_days(context.instance, key)
        for day in sorted(days):
            if (run := covering(day, day, queued)) is not None:
                left[day] = run.run_id
                days.discard(day)
        if not days:
            return dg.SensorResult(
                skip_reason=f"the changed days of {key.to_user_string()} have runs queued already",
                cursor=_cursor(seen_mark, seen_counter, [], left),
            )
        requested, later = _most_recent_first(days)
        if later:
            context.log.info(
                f"{len(days)} days of {key.to_user_string()} changed: requesting the "
                f"{len(requested)} most recent, {len(later)} wait for the next ticks"
            )
        # Dagster requests a run key once: a change within the same second is another.
        run_key_counter = "" if seen_counter is None else f":{seen_counter}"
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{spec.name}:{day}:{seen_mark}" + run_key_counter,
                    partition_key=day,
                    asset_selection=[key],
                    asset_check_keys=sync_checks([spec]),
                    tags={"handoff/high_water_mark": seen_mark, **pool_tags(spec)},
                )
                for day in requested
            ],
            cursor=_cursor(seen_mark, seen_counter, later, left),
        )

    return _changed_days


def changed_days_sensors(specs: list[FlowSpec]) -> list[dg.SensorDefinition]:
    """One sensor per watched daily-partitioned flow with a change cursor (a table without one
    cannot say what changed)."""
    return [
        changed_days_sensor(spec)
        for spec in specs
        if spec.partitions and spec.watch_source and spec.source.cursor
    ]
