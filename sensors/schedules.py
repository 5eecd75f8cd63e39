"""A schedule per flow that declares one (hourly by default): the safety net under the sensors."""

from __future__ import annotations

import dagster as dg

from assets.factory import asset_key
from integrations.engine.spec import FlowSpec


def flow_schedules(specs: list[FlowSpec]) -> list[dg.ScheduleDefinition]:
    return [
        dg.ScheduleDefinition(
            name=f"{spec.name}_schedule",
            target=[asset_key(spec)],
            cron_schedule=spec.schedule,
            default_status=dg.DefaultScheduleStatus.STOPPED,
        )
        for spec in specs
        if spec.schedule
    ]
