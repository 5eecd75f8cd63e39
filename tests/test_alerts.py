"""A stale flow, an old dead letter and a failed run each give exactly one alert on the webhook."""

import dataclasses
import json
import time
from datetime import datetime, timedelta

import dagster as dg

from assets.checks import reconciliation_check
from assets.crm_contacts import CRM_CONTACTS
from assets.factory import flow_asset
from definitions import resources
from integrations.engine import state as state_module
from integrations.engine.state import BatchCommit, DeadLetter, utcnow
from sensors import alerts as alerts_module
from sensors.alerts import dead_letter_sensor, run_failure_sensor, stale_flow_sensor


def tick(sensor, instance, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources())
    return sensor(context)


def tick_at(monkeypatch, moment: datetime, sensor, instance, cursor: str | None):
    """The sensor's tick as if the time were `moment`."""
    with monkeypatch.context() as sensor_host:
        sensor_host.setattr(alerts_module, "utcnow", lambda: moment)
        return tick(sensor, instance, cursor)


def alert_on_failure(instance: dg.DagsterInstance, failed: dg.ExecuteInProcessResult) -> None:
    """The run-failure sensor, evaluated on the failed run as the daemon evaluates it."""
    (event,) = [e for e in failed.all_events if e.event_type_value == "PIPELINE_FAILURE"]
    context = dg.build_run_status_sensor_context(
        sensor_name="handoff_run_failures",
        dagster_event=event,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(failed.run_id),
        resources=resources(),
    ).for_run_failure()
    run_failure_sensor([CRM_CONTACTS])(context)


def test_a_stale_flow_alerts_once(world, alert_receiver):
    impatient = dataclasses.replace(CRM_CONTACTS, max_staleness=timedelta(0))
    sensor = stale_flow_sensor([impatient])
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        first = tick(sensor, instance)
        second = tick(sensor, instance, first.cursor)
        assert second.skip_reason
        fresh = tick(stale_flow_sensor([CRM_CONTACTS]), instance)
        assert fresh.skip_reason, "within its max_staleness the flow is fresh"
    (alert,) = alert_receiver.received
    assert alert["handoff"]["kind"] == "stale_flow"
    assert alert["handoff"]["flow"] == "erp_customers_to_crm_contacts"
    assert "last succeeded" in alert["text"] and "What to do:" in alert["text"]


def test_a_fresh_flow_is_not_stale_on_a_host_west_of_utc(world, alert_receiver, monkeypatch):
    """The sensor's clock is naive UTC; read as the host's local time (Los Angeles, 8 hours
    behind UTC in winter), a flow materialized a minute ago was 8 hours old, past its 3 hours."""
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(["crm", "contacts"]))
        with monkeypatch.context() as host:
            host.setenv("TZ", "America/Los_Angeles")
            time.tzset()
            try:
                result = tick(stale_flow_sensor([CRM_CONTACTS]), instance)
            finally:
                host.undo()
                time.tzset()
    assert result.skip_reason, "materialized a minute ago, within its 3 hours"
    assert alert_receiver.received == []


def test_old_dead_letters_alert_once(world, alert_receiver):
    hasty = dataclasses.replace(CRM_CONTACTS, dead_letter_max_age=timedelta(0))
    sensor = dead_letter_sensor([hasty])
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        first = tick(sensor, instance)
        assert tick(sensor, instance, first.cursor).skip_reason
        assert tick(dead_letter_sensor([CRM_CONTACTS]), instance).skip_reason, "not old yet"
    (alert,) = alert_receiver.received
    assert (
        alert["handoff"]["kind"] == "old_dead_letters" and alert["handoff"]["details"]["count"] > 0
    )
    assert "handoff dlq list --flow erp_customers_to_crm_contacts" in alert["text"]
    assert "@" not in alert["text"], "no email in an alert"


def test_a_failed_run_alerts_once_with_the_flow_and_what_to_do(
    world, alert_receiver, monkeypatch, tmp_path
):
    monkeypatch.setenv("ERP_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with dg.instance_for_test() as instance:
        failed = dg.materialize(
            [flow_asset(CRM_CONTACTS)],
            resources=resources(),
            instance=instance,
            raise_on_error=False,
        )
        assert not failed.success
        alert_on_failure(instance, failed)
    (alert,) = alert_receiver.received
    assert alert["handoff"]["kind"] == "run_failure"
    assert alert["handoff"]["flow"] == "erp_customers_to_crm_contacts"
    assert failed.run_id in alert["text"] and "What to do:" in alert["text"]


def test_a_failed_reconciliation_run_alerts_naming_its_flow_and_the_error_it_raised(
    world, alert_receiver, monkeypatch, tmp_path
):
    """The daily reconciliation's run failing on a source without its table alerted for flow
    `crm__contacts_reconciliation` (its op), with Dagster's wrapper for the error ("Error
    occurred while executing op ...") instead of the error."""
    monkeypatch.setenv("ERP_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.sqlite'}")
    key = dg.AssetKey(["crm", "contacts"])
    with dg.instance_for_test() as instance:
        failed = dg.materialize(
            [reconciliation_check(CRM_CONTACTS, key)],
            selection=dg.AssetSelection.checks(dg.AssetCheckKey(key, "reconciliation")),
            resources=resources(),
            instance=instance,
            raise_on_error=False,
        )
        assert not failed.success
        alert_on_failure(instance, failed)
    (alert,) = alert_receiver.received
    assert alert["handoff"]["flow"] == "erp_customers_to_crm_contacts"
    assert "table 'customers' is not in the source database" in alert["text"]


def test_a_receiver_that_is_down_does_not_break_alerting(world, monkeypatch, caplog):
    monkeypatch.setenv("HANDOFF_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/nowhere")
    sensor = stale_flow_sensor([CRM_CONTACTS])
    with dg.instance_for_test() as instance:
        result = tick(sensor, instance)
    assert "never succeeded" in caplog.text and "could not post" in caplog.text
    assert result.cursor


def test_each_old_dead_letter_alerts_once_whatever_order_its_run_wrote_it_in(
    world, state, alert_receiver, monkeypatch
):
    """Runs on hosts whose clocks disagree (or after a clock was set back) write letters whose
    ids do not follow their first_seen. The sensor remembered the highest id it alerted and
    looked only above it: a letter of a lower id that grew old later was never alerted."""
    flow = CRM_CONTACTS.name
    hourly = dataclasses.replace(CRM_CONTACTS, dead_letter_max_age=timedelta(hours=1))
    now = utcnow()

    def written_at(key: str, clock: datetime) -> None:
        letter = DeadLetter(flow, key, "contract", "erp.customer@v1: planted", {})
        with monkeypatch.context() as host:
            host.setattr(state_module, "utcnow", lambda: clock)
            state.commit_batch(BatchCommit(flow, f"run on {key}", dead_letters=[letter]))

    written_at("1", now)
    written_at("2", now - timedelta(hours=2))  # a later run, on a host two hours behind
    sensor = dead_letter_sensor([hourly])

    with dg.instance_for_test() as instance:
        # At the first tick letter 2 is old, letter 1 not yet.
        first = tick_at(monkeypatch, now + timedelta(minutes=1), sensor, instance, None)
        second = tick_at(monkeypatch, now + timedelta(minutes=61), sensor, instance, first.cursor)
        third = tick_at(monkeypatch, now + timedelta(hours=3), sensor, instance, second.cursor)
    assert third.skip_reason
    assert [alert["handoff"]["details"]["count"] for alert in alert_receiver.received] == [1, 1]


def test_a_letter_already_old_when_written_after_a_tick_is_alerted_once(
    world, state, alert_receiver, monkeypatch
):
    """A run on a host two hours behind writes a letter after the sensor's tick: its first_seen
    is already below where that tick looked, and the sensor looks only above it (by first_seen)
    from then on: the letter was never alerted. The old id cursor alerted it."""
    flow = CRM_CONTACTS.name
    hourly = dataclasses.replace(CRM_CONTACTS, dead_letter_max_age=timedelta(hours=1))
    now = utcnow()
    sensor = dead_letter_sensor([hourly])

    with dg.instance_for_test() as instance:
        first = tick_at(monkeypatch, now, sensor, instance, None)
        letter = DeadLetter(flow, "behind", "contract", "erp.customer@v1: planted", {})
        with monkeypatch.context() as host:
            host.setattr(state_module, "utcnow", lambda: now - timedelta(hours=2))
            state.commit_batch(BatchCommit(flow, "run on a host behind", dead_letters=[letter]))
        second = tick_at(monkeypatch, now + timedelta(minutes=5), sensor, instance, first.cursor)
        third = tick_at(monkeypatch, now + timedelta(minutes=10), sensor, instance, second.cursor)
    assert first.skip_reason and third.skip_reason
    assert [alert["handoff"]["details"]["count"] for alert in alert_receiver.received] == [1]


def test_a_cursor_of_an_older_handoff_alerts_no_letter_again(world, state, alert_receiver):
    """Its cursor held the highest letter id alerted per flow: the letters up to it are not
    alerted again, those above are."""
    flow = CRM_CONTACTS.name
    for key in ("1", "2"):
        letter = DeadLetter(flow, key, "contract", "erp.customer@v1: planted", {})
        state.commit_batch(BatchCommit(flow, "run", dead_letters=[letter]))
    first_id = state.list_dead_letters(flow)[0].id
    hasty = dataclasses.replace(CRM_CONTACTS, dead_letter_max_age=timedelta(0))
    with dg.instance_for_test() as instance:
        upgraded = tick(dead_letter_sensor([hasty]), instance, json.dumps({flow: first_id}))
        assert tick(dead_letter_sensor([hasty]), instance, upgraded.cursor).skip_reason
    assert [alert["handoff"]["details"]["count"] for alert in alert_receiver.received] == [1]
