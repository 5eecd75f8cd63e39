"""The inbox and its sensor: events consumed only once their run's request is committed; the inbox
on PostgreSQL as on SQLite."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from datetime import timedelta

import dagster as dg
import psycopg
import pytest
import requests
import sqlalchemy as sa

from assets.erp_crm_contact_updates import ERP_CRM_CONTACT_UPDATES
from assets.erp_crm_deals import ERP_CRM_DEALS
from definitions import active_flows, definitions, resources
from integrations.engine.state import BatchCommit, BudgetTrip, DeadLetter, StateStore, utcnow
from integrations.webhooks.events import parse_delivery
from integrations.webhooks.inbox import ReplayRefused, WebhookInbox, webhook_inbox
from sensors.webhook_inbox import NO_FLOW, webhook_inbox_sensors
from tests.conftest import DLQ_KEY
from tests.webhooks import deliver, event, receiver


def events(*items) -> list:
    return parse_delivery(json.dumps(list(items)).encode()).events


@pytest.fixture
def inbox(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))
    monkeypatch.setenv("HANDOFF_STATE_URL", url)
    inbox = WebhookInbox(url)
    yield inbox
    inbox.dispose()


def tick(instance, cursor):
    defs = definitions(active_flows())
    return defs.resolve_sensor_def("crm_webhooks")(
        dg.build_sensor_context(
            instance=instance, cursor=cursor, resources=resources(), definitions=defs
        )
    )


def run_keys(inbox: WebhookInbox) -> list[str | None]:
    with inbox.engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(webhook_inbox.c.run_key).order_by(webhook_inbox.c.id)
            ).scalars()
        )


def test_events_are_consumed_once_the_request_covering_them_is_committed(inbox):
    with dg.instance_for_test() as instance:
        inbox.accept("d1", "test", events(event(1, "company.creation")))
        ignored = tick(instance, None)
        assert not ignored.run_requests and "no flow" in ignored.skip_reason.skip_message
        inbox.accept(
            "d2", "test", events(event(2), event(3, "contact.propertyChange", propertyName="city"))
        )

        wanted = tick(instance, ignored.cursor)
        retried = tick(instance, ignored.cursor)  # the tick failed before Dagster committed it
        (request,) = wanted.run_requests
        assert retried.run_requests[0].run_key == request.run_key == "crm_webhooks:2-3"
        assert request.asset_selection == [dg.AssetKey(["erp", "crm_contact_updates"])]
        assert run_keys(inbox) == [NO_FLOW, None, None], "not consumed before the commit"

        idle = tick(instance, wanted.cursor)
        assert not idle.run_requests
        assert run_keys(inbox) == [NO_FLOW, request.run_key, request.run_key]
        assert inbox.counts() == {"deliveries": 2, "events": 3, "waiting": 0}


def test_events_for_flows_of_two_pools_are_one_run_per_pool_each_tagged_with_its_own(inbox):
    """The CRM → ERP flows share the crm_api pool today; one given another pool was synced in
    a run tagged crm_api alone (its first flow's), which the production instance's one run per
    `handoff/pool` neither held back nor counted for the other pool."""
    deals = dataclasses.replace(ERP_CRM_DEALS, pool="erp_db")
    (sensor,) = webhook_inbox_sensors([ERP_CRM_CONTACT_UPDATES, deals])
    inbox.accept("d1", "test", events(event(1), event(2, "deal.creation")))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources())
        wanted = sensor(context)
        tagged = {
            (tuple(r.asset_selection), r.tags["handoff/pool"], r.run_key)
            for r in wanted.run_requests
        }
        assert tagged == {
            ((dg.AssetKey(["erp", "crm_contact_updates"]),), "crm_api", "crm_webhooks:1-2:crm_api"),
            ((dg.AssetKey(["erp", "crm_deals"]),), "erp_db", "crm_webhooks:1-2:erp_db"),
        }
        sensor(
            dg.build_sensor_context(instance=instance, cursor=wanted.cursor, resources=resources())
        )
    assert run_keys(inbox) == ["crm_webhooks:1-2", "crm_webhooks:1-2"], "the runs' stem"


def test_the_inbox_on_postgresql_refuses_replays_and_counts_duplicates(postgres_database):
    inbox = WebhookInbox(postgres_database())
    try:
        same = event(9, event_id=99)
        assert inbox.accept("d1", "test", events(same, event(10))).stored == 2
        with pytest.raises(ReplayRefused):
            inbox.accept("d1", "test", events(event(11)))
        again = inbox.accept("d2", "test", events(same))
        assert (again.stored, again.duplicates) == (0, 1)
        assert inbox.counts() == {"deliveries": 2, "events": 2, "waiting": 2}
        assert [e.object_id for e in inbox.after(0, 10)] == [9, 10]
        assert inbox.forget_deliveries(before=utcnow() + timedelta(seconds=1)) == 2
        assert inbox.counts()["events"] == 2, "events stay; only delivery ids are forgotten"
    finally:
        inbox.dispose()


def test_consumed_events_are_forgotten_but_ids_never_come_back(inbox):
    """Old consumed events go; waiting ones and the newest stay, so no id is handed out twice."""
    inbox.accept("d1", "test", events(event(1), event(2)))
    inbox.mark_consumed(up_to_id=2, run_key="run-a")
    later = utcnow() + timedelta(seconds=1)
    assert inbox.forget_consumed(before=later) == 1, "the newest event stays"
    inbox.accept("d2", "test", events(event(3)))
    assert [e.object_id for e in inbox.after(0, 10)] == [2, 3]
    assert [e.id for e in inbox.after(2, 10)] == [3], "a new event is never under a passed id"

    inbox.mark_consumed(up_to_id=3, run_key="run-b")
    inbox.accept("d3", "test", events(event(4)))  # waiting: never forgotten
    assert inbox.forget_consumed(before=utcnow() + timedelta(seconds=1)) == 2
    assert [e.object_id for e in inbox.after(0, 10)] == [4]
    assert inbox.counts() == {"deliveries": 3, "events": 1, "waiting": 1}


def test_no_run_is_requested_for_a_flow_whose_trip_stands_and_its_sync_is_kept(inbox):
    """Each tick with events asked for a run of a tripped flow that stopped at its start, with its
    failed run and alert, as long as CRM webhooks came. Now that flow is skipped, saying why, and
    its sync kept for its stopped-windows sensor; a flow no trip stops is still requested."""
    flow = ERP_CRM_CONTACT_UPDATES.name
    state = StateStore(inbox.engine.url.render_as_string(hide_password=False), dlq_key=DLQ_KEY)
    letter = DeadLetter(flow, "x", "contract", "planted: country is not a code", {})
    state.commit_batch(BatchCommit(flow, "trip", dead_letters=[letter]))
    state.trip_budget(BudgetTrip(flow, "trip", utcnow(), 1, 1, 0.1, {"p": 1}), actor="t", why="t")
    with dg.instance_for_test() as instance:
        inbox.accept("d1", "test", events(event(1)))
        skipped = tick(instance, None)
        assert not skipped.run_requests
        message = skipped.skip_reason.skip_message
        assert "erp/crm_contact_updates skipped: the error budget's trip of run trip" in message
        assert f"requested by sensor `{flow}_stopped_windows` once it clears" in message
        assert [w.stop for w in state.list_stopped_windows(flow)] == ["refused"]

        inbox.accept("d2", "test", events(event(2), event(3, "deal.creation")))
        (request,) = tick(instance, skipped.cursor).run_requests
        assert request.asset_selection == [dg.AssetKey(["erp", "crm_deals"])]
    state.dispose()


def test_on_postgresql_an_event_committed_after_a_later_id_is_not_passed_by_the_cursor(
    postgres_database, tmp_path, monkeypatch
):
    """Receiver threads commit in any order on PostgreSQL: the sensor saw a later id committed
    first, its cursor passed an earlier one still uncommitted, and that event was marked consumed
    by a run that never covered it (its deal flow never requested)."""
    url = postgres_database()
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))
    monkeypatch.setenv("HANDOFF_STATE_URL", url)
    secret = os.environ["CRM_WEBHOOK_SECRET"]
    with receiver(url, [secret]) as server, dg.instance_for_test() as instance:
        admin = psycopg.connect(url, autocommit=True)
        # Another delivery's transaction, still open, holds an event of delivery A: A's thread
        # stops mid-transaction, its first event under an id already handed out.
        holder = psycopg.connect(url)
        held = event(7, "deal.propertyChange", event_id=72, propertyName="amount")
        holder.execute(
            "INSERT INTO webhook_inbox (event_key, delivery_id, subscription_type, object_type,"
            " object_id, property_name, occurred_at, received_at)"
            " VALUES (%s, 'other', 'deal.propertyChange', 'deals', 7, 'amount', now(), now())",
            (f"{held['portalId']}:72",),
        )
        first = event(6, "deal.creation", event_id=71)
        answers: dict[str, requests.Response] = {}

        def send(name: str, events: list) -> None:
            answers[name] = deliver(requests.Session(), server.url, secret, events)[0]

        def waiting_on_locks() -> int:
            return admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()[0]

        def until(condition) -> None:
            deadline = time.monotonic() + 10
            while not condition():
                assert time.monotonic() < deadline, "timed out"
                time.sleep(0.02)

        senders = [threading.Thread(target=send, args=("a", [first, held]))]
        senders[0].start()
        until(lambda: waiting_on_locks() == 1)
        senders.append(threading.Thread(target=send, args=("b", [event(8)])))
        senders[1].start()
        until(lambda: "b" in answers or waiting_on_locks() == 2)

        before = tick(instance, None)  # while A is still open
        holder.commit()  # the held event lands; A (and B after it) finish
        for sender in senders:
            sender.join(10)
        after = tick(instance, before.cursor)
        requested = {
            key for r in before.run_requests + after.run_requests for key in r.asset_selection
        }
        holder.close()
        admin.close()
        assert {answers["a"].status_code, answers["b"].status_code} == {200}
        assert dg.AssetKey(["erp", "crm_deals"]) in requested, "the deal events were passed"
        assert dg.AssetKey(["erp", "crm_contact_updates"]) in requested
