"""The CRM webhook sensor: a run of the CRM → ERP flows (one per pool) whenever CRM events wait
in the inbox.

The cursor is the last inbox id a run was requested for, with that run's key (the stem of the
keys of a run per pool). Events are marked consumed one tick later, once Dagster committed that
cursor with its run request: a tick that fails before the commit is evaluated again from the old
cursor, and asks for the same run key (which Dagster launches once). The run reads the CRM by its own watermark, not the events: an
event only says *when*, so a lost one costs latency, and the hourly schedule catches up.

While a flow's error budget is tripped, its run would stop at its start, with its failed run and
alert: the sensor requests none for it, says why, and keeps its sync as a stopped window
(`refused`), which the flow's stopped-windows sensor requests once the trip clears.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg

from assets.factory import asset_key, sync_selection
from integrations.engine.spec import FlowSpec
from integrations.engine.state import SINCE_WATERMARK
from integrations.webhooks.inbox import WebhookInbox
from sensors.schedules import runs_per_pool
from sensors.trips import sync_skipped, trip_skips

MAX_EVENTS_PER_TICK = 10_000  # one run covers them all; this only bounds the tick's read
NO_FLOW = "no flow follows these events"
KEPT = "a trip stands: its flow's sync is kept as a stopped window"


def webhook_inbox_sensors(specs: list[FlowSpec]) -> list[dg.SensorDefinition]:
    """One sensor over the inbox for the flows that read the CRM (none without such flows)."""
    followed = [spec for spec in specs if spec.source.system == "crm"]
    if not followed:
        return []
    keys = [asset_key(spec) for spec in followed]

    @dg.sensor(
        name="crm_webhooks",
        description="Requests a sync of "
        + ", ".join(key.to_user_string() for key in keys)
        + " when CRM webhooks (`handoff webhooks serve`) are waiting in the inbox.",
        target=sync_selection(followed),
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={"state"},
    )
    def crm_webhooks(context: dg.SensorEvaluationContext, **_resources):
        cursor = json.loads(context.cursor) if context.cursor else {"last_id": 0}
        inbox = WebhookInbox(context.resources.state.url)
        try:
            if cursor.get("last_id"):
                inbox.mark_consumed(cursor["last_id"], cursor.get("run_key") or NO_FLOW)
            events = inbox.after(cursor["last_id"], MAX_EVENTS_PER_TICK)
        finally:
            inbox.dispose()
        if not events:
            return dg.SensorResult(
                skip_reason="no CRM events waiting",
                cursor=json.dumps({"last_id": cursor["last_id"], "run_key": None}),
            )
        first, last = events[0].id, events[-1].id
        changed = {event.object_type for event in events}
        behind = [spec for spec in followed if spec.source.table in changed]
        if not behind:
            return dg.SensorResult(
                skip_reason=f"{len(events)} events about {sorted(changed)}: {NO_FLOW}",
                cursor=json.dumps({"last_id": last, "run_key": None}),
            )
        tick = f"sensor tick {datetime.now(UTC):%Y-%m-%dT%H:%M:%S%z}"
        with context.resources.state.open() as store:
            skipped = {
                spec.name: sync_skipped(spec, trip)
                for spec in behind
                if (trip := trip_skips(store, spec, SINCE_WATERMARK, tick)) is not None
            }
        to_sync = [spec for spec in behind if spec.name not in skipped]
        if not to_sync:
            return dg.SensorResult(
                skip_reason="; ".join(skipped.values()),
                cursor=json.dumps({"last_id": last, "run_key": KEPT}),
            )
        if skipped:
            context.log.info("; ".join(skipped.values()))
        run_key = f"crm_webhooks:{first}-{last}"  # each pool's run's key, or the stem of them
        requests = runs_per_pool(run_key, to_sync, {"handoff/inbox_events": f"{first}-{last}"})
        return dg.SensorResult(
            run_requests=requests, cursor=json.dumps({"last_id": last, "run_key": run_key})
        )

    return [crm_webhooks]
