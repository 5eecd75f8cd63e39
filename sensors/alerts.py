"""Alerts for what asynchrony hides: a flow that stopped succeeding, dead letters nobody handled,
and failed runs. Each condition alerts once (the sensors' cursors remember what was said)."""

import json
from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.checks import reconciliation_op_name
from assets.factory import asset_key, max_staleness
from integrations.alerts import Alert
from integrations.engine.spec import FlowSpec
from integrations.engine.state import utcnow
from resources import Notifier, StateStoreResource


def stale_flow_sensor(specs: list[FlowSpec]) -> dg.SensorDefinition:
    @dg.sensor(
        name="handoff_stale_flows",
        description="Alerts once when a flow has not materialized successfully within its "
        "max_staleness (a daily-partitioned flow's: at least a day and 3 hours).",
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _stale(context: dg.SensorEvaluationContext, notifier: Notifier):
        said = json.loads(context.cursor) if context.cursor else {}
        # Said to be UTC: a naive time's timestamp() is read in the host's zone (8 h off in LA).
        now = utcnow().replace(tzinfo=UTC).timestamp()
        alerted = []
        for spec in specs:
            allowed = max_staleness(spec).total_seconds()
            event = context.instance.get_latest_materialization_event(asset_key(spec))
            last = event.timestamp if event else None
            if last is not None and now - last <= allowed:
                continue
            episode = str(last)  # one alert per stretch of staleness, not one per tick
            if said.get(spec.name) == episode:
                continue
            age = "never succeeded" if last is None else f"last succeeded {_ago(now - last)} ago"
            notifier.send(
                Alert(
                    kind="stale_flow",
                    flow=spec.name,
                    message=f"{asset_key(spec).to_user_string()} {age} (allowed: {_ago(allowed)})",
                    what_to_do="check its schedule and sensor are on and its latest run's logs "
                    "in the Dagster UI, then materialize it",
                )
            )
            said[spec.name] = episode
            alerted.append(spec.name)
        return dg.SensorResult(
            cursor=json.dumps(said),
            skip_reason=None if alerted else "every flow is fresh, or already alerted",
        )

    return _stale


def dead_letter_sensor(specs: list[FlowSpec]) -> dg.SensorDefinition:
    @dg.sensor(
        name="handoff_old_dead_letters",
        description="Alerts once per dead letter left open longer than its flow's "
        "dead_letter_max_age.",
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _old(context: dg.SensorEvaluationContext, notifier: Notifier, state: StateStoreResource):
        # Per flow, the first_seen below which letters were looked at and the highest id then:
        # each tick looks at those that grew old since and those written since, so a letter is
        # alerted once whatever its id and first_seen (runs on hosts whose clocks disagree write
        # ids out of first_seen's order, and letters already old).
        said = json.loads(context.cursor) if context.cursor else {}
        alerted = []
        with state.open() as store:
            for spec in specs:
                before = utcnow() - spec.dead_letter_max_age
                since, after_id = _looked(said.get(spec.name))
                count, oldest, highest = store.old_dead_letters(spec.name, before, since, after_id)
                said[spec.name] = {
                    "seen_before": max(before, since or before).isoformat(),
                    "highest_id": highest or after_id or 0,
                }
                if not count:
                    continue
                notifier.send(
                    Alert(
                        kind="old_dead_letters",
                        flow=spec.name,
                        message=f"{count} dead letters open for more than "
                        f"{_ago(spec.dead_letter_max_age.total_seconds())} (oldest since "
                        f"{oldest:%Y-%m-%d %H:%M} UTC)",
                        what_to_do=f"`handoff dlq list --flow {spec.name}`: fix the source rows "
                        "(they sync on their next change) or replay them",
                        details={"count": count},
                    )
                )
                alerted.append(spec.name)
        return dg.SensorResult(
            cursor=json.dumps(said),
            skip_reason=None if alerted else "no dead letter is older than its limit",
        )

    return _old


def _looked(said: dict | str | int | None) -> tuple[datetime | None, int | None]:
    """Where a flow's last look at its dead letters ended: the first_seen it looked below and
    the highest letter id then; an older handoff's cursor held one of them (the id: the highest
    it alerted)."""
    if isinstance(said, dict):
        return datetime.fromisoformat(said["seen_before"]), said["highest_id"]
    if isinstance(said, str):
        return datetime.fromisoformat(said), None
    return None, said or 0


def run_failure_sensor(specs: list[FlowSpec]) -> dg.SensorDefinition:
    # A flow's steps: its asset's, and its reconciliation check's (its daily run fails too).
    flows_by_step = {
        step: spec.name
        for spec in specs
        for step in (
            asset_key(spec).to_python_identifier(),
            reconciliation_op_name(asset_key(spec)),
        )
    }

    @dg.run_failure_sensor(
        name="handoff_run_failures",
        description="Alerts once for every failed run, naming its flows and their errors.",
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _failed(context: dg.RunFailureSensorContext, notifier: Notifier):
        run = context.dagster_run
        failures = context.get_step_failure_events()
        names = sorted({flows_by_step.get(e.step_key, e.step_key) for e in failures if e.step_key})
        errors = [
            _raised(failure.step_failure_data.error)
            for failure in failures
            if failure.step_failure_data.error
        ]
        notifier.send(
            Alert(
                kind="run_failure",
                flow=", ".join(names) or run.job_name,
                message=f"run {run.run_id} failed: "
                + (" | ".join(errors) or context.failure_event.message or "no error message"),
                what_to_do=f"open run {run.run_id} in the Dagster UI, act on the error above, "
                "then rerun",
                details={"run_id": run.run_id},
            )
        )

    return _failed


def _raised(error) -> str:
    """The error the step raised: Dagster wraps one that is no dg.Failure in an error naming only
    the op ("Error occurred while executing op ..."), which told the alert's reader nothing."""
    while error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None:
        error = error.cause
    return error.message.strip()


def alert_sensors(specs: list[FlowSpec]) -> list[dg.SensorDefinition]:
    return [stale_flow_sensor(specs), dead_letter_sensor(specs), run_failure_sensor(specs)]


def _ago(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))
