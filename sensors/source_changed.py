"""A sensor per source table: a run when the table's high-water mark passed what the flows synced.

The cursor holds the last high-water mark seen; a tick costs one `max(updated_at)` query per table
plus one watermark read per flow, so it stays far below Dagster's 60 s tick budget.

A source whose times keep whole seconds (RT's LastUpdated, a MariaDB DATETIME) can hold a change
made after a run read, within the second that run synced up to: the high-water mark stays equal to
the flow's watermark and tells nothing. Such a source offers a change counter (RT's newest ticket
transaction; a fingerprint of a SQL table's rows at the mark's second; one query or request more),
which the cursor keeps: where it moved, a flow synced up to that very second is behind too. It is
the counter at the tick, not at the run's read: a change made between the two costs one run more,
which finds nothing new.

While a flow's error budget is tripped, its run would stop at its start, each with its failed run
and alert: the sensor requests none for it, says why, and keeps its sync as a stopped window
(`refused`, as the refused run would have), which the flow's stopped-windows sensor requests once
the trip clears. The cursor moves on: the change it saw waits in the state store, not in it.
"""

import json
from collections import defaultdict
from datetime import UTC, datetime

import dagster as dg

from assets.factory import asset_key, sync_selection
from integrations.engine.spec import FlowSpec
from integrations.engine.state import SINCE_WATERMARK
from sensors.schedules import runs_per_pool
from sensors.trips import sync_skipped, trip_skips


def _sensor(system: str, table: str, specs: list[FlowSpec]) -> dg.SensorDefinition:
    keys = [asset_key(spec) for spec in specs]

    @dg.sensor(
        name=f"{system}_{table}_changed",
        description=f"Requests a sync of {', '.join(k.to_user_string() for k in keys)} when "
        f"{system} `{table}` changed since they last synced.",
        target=sync_selection(specs),
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={system, "state"},
    )
    def _changed(context: dg.SensorEvaluationContext, **_resources):
        # The source's resource key is the system's name, so resources come from the context
        # (a direct call also passes them as keyword arguments).
        cursor = json.loads(context.cursor) if context.cursor else {}
        with getattr(context.resources, system).source(specs[0].source) as source:
            high_water_mark = source.high_water_mark()
            counter = None if high_water_mark is None else source.change_counter(high_water_mark)
        if high_water_mark is None:
            return dg.SensorResult(skip_reason=f"{system} {table} is empty", cursor=context.cursor)
        newest, seen = high_water_mark.isoformat(), cursor.get("high_water_mark")
        moved = counter is not None and counter != cursor.get("change_counter")
        if seen is not None and (newest < seen or (newest == seen and not moved)):
            return dg.SensorResult(
                skip_reason=f"{system} {table} unchanged since {seen}", cursor=context.cursor
            )
        with context.resources.state.open() as store:
            behind = [
                spec
                for spec in specs
                if (mark := store.watermark(spec.name)) is None
                or mark.updated_at < high_water_mark
                or (moved and mark.updated_at == high_water_mark)  # a change within its second
            ]
            # A flow whose trip stands gets no run (it would stop at its start): its sync is kept.
            tick = f"sensor tick {datetime.now(UTC):%Y-%m-%dT%H:%M:%S%z}"
            tripped = [
                (spec, trip)
                for spec in behind
                if (trip := trip_skips(store, spec, SINCE_WATERMARK, tick)) is not None
            ]
        new_cursor = json.dumps(
            {"high_water_mark": newest} | ({} if counter is None else {"change_counter": counter})
        )
        if not behind:
            return dg.SensorResult(
                skip_reason=f"flows already synced up to {high_water_mark}", cursor=new_cursor
            )
        skipped = {spec.name: sync_skipped(spec, trip) for spec, trip in tripped}
        to_sync = [spec for spec in behind if spec.name not in skipped]
        if not to_sync:
            return dg.SensorResult(skip_reason="; ".join(skipped.values()), cursor=new_cursor)
        if skipped:
            context.log.info("; ".join(skipped.values()))
        return dg.SensorResult(
            run_requests=runs_per_pool(
                # Dagster requests a run key once: a change within the same second is another.
                f"{system}_{table}:{newest}" + ("" if counter is None else f":{counter}"),
                to_sync,
                {"handoff/high_water_mark": newest},
            ),
            cursor=new_cursor,
        )

    return _changed


def source_changed_sensors(specs: list[FlowSpec]) -> list[dg.SensorDefinition]:
    """One sensor per watched source table; tables without a change cursor cannot be watched.
    A daily-partitioned flow has a sensor of its own (changed_days.py): its runs are days."""
    by_table: dict[tuple[str, str], list[FlowSpec]] = defaultdict(list)
    for spec in specs:
        if spec.watch_source and spec.source.cursor and not spec.partitions:
            by_table[(spec.source.system, spec.source.table)].append(spec)
    return [
        _sensor(system, table, table_specs)
        for (system, table), table_specs in sorted(by_table.items())
    ]
