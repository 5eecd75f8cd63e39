"""A window of a partitioned flow whose run the error budget stopped (refused at its start while a
trip stood, or tripped in mid-run) is kept in the state store and requested again once no trip
stands. Those days were never synced: the schedule never reruns a failed partition, the
changed-days sensor's run key was used up, and finance kept an invoice paid meanwhile 'open'."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._core.test_utils import create_run_for_test

from assets.chinook import CHINOOK_INVOICES
from assets.crm_contacts import CRM_CONTACTS
from assets.factory import asset_key, flow_asset
from assets.finance_invoices import FINANCE_INVOICES
from assets.helpdesk_users import HELPDESK_USERS
from definitions import defs, resources
from integrations.cli import main
from integrations.engine.errors import ErrorBudgetExceeded, ErrorBudgetTripStands, SyncError
from integrations.engine.spec import DailyPartitions
from integrations.engine.state import (
    SINCE_WATERMARK,
    BatchCommit,
    BudgetTrip,
    DeadLetter,
    StateStore,
    StoppedWindow,
    utcnow,
)
from integrations.engine.sync import Sync
from integrations.erp.schema import customers
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource
from sensors.source_changed import source_changed_sensors
from sensors.stopped_windows import retry_wait
from tests.conftest import DLQ_KEY
from tests.expectations import valid_customers
from tests.test_error_budget import break_emails, mend_emails_quietly
from tests.test_finance_flows import JANUARY, change_invoices, materialize, query, run
from tests.test_sql_cursors import SOURCE, SPEC, live, source_lines

FLOW = FINANCE_INVOICES.name
FINANCE_INVOICES_KEY = dg.AssetKey(["finance", "invoices"])
# Invoices of these days are broken by a bad import: a one-run backfill of them (50 invoices of
# the world's, above the error budget's 20 rows) trips.
BROKEN_DAYS = {
    "dagster/asset_partition_range_start": "2024-12-01",
    "dagster/asset_partition_range_end": "2025-01-19",
}
REPLAY = {"ops": {"finance__invoices": {"config": {"replay": True}}}}


def tick(name: str, instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = defs.resolve_sensor_def(name)
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=resources(), definitions=defs
    )
    return sensor(context)


def skip_message(result) -> str:
    reason = result.skip_reason if isinstance(result, dg.SensorResult) else result
    return reason.skip_message


def failure(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.step_failure_data.user_failure_data.description


def break_currencies(erp_url: str, before: str = "2025-01-20") -> None:
    """A bad import: the invoices before `before` get a currency the contract refuses, their
    `updated_at` untouched (no change the sensors see)."""
    engine = create_engine(erp_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE invoices SET currency = 'xx' WHERE invoice_date < :day"),
            {"day": before},
        )
    engine.dispose()


def mend_currencies(erp_url: str) -> None:
    engine = create_engine(erp_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE invoices SET currency = 'EUR' WHERE currency = 'xx'"))
    engine.dispose()


def stopped(state_url: str, flow: str = FLOW) -> list[tuple[str, str, str]]:
    """The flow's stopped windows as (first day, end, stop)."""
    store = StateStore(state_url, dlq_key=DLQ_KEY)
    try:
        return [
            (f"{w.start:%Y-%m-%d}", f"{w.end:%Y-%m-%d}", w.stop)
            for w in store.list_stopped_windows(flow)
        ]
    finally:
        store.dispose()


def test_days_stopped_while_tripped_are_requested_again_once_the_trip_clears(any_world):
    """The reviewer's scenario: an invoice is paid, the changed-days sensor requests its day; a
    backfill trips the error budget in mid-run; the day's run is refused. Fixed and replayed as
    the messages say, the trip clears, and the stopped windows are requested again: finance
    shows the invoice paid."""
    finance = f"sqlite:///{any_world.home / 'finance.sqlite'}"
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        idle = tick(f"{FLOW}_changed_days", instance)
        paid, paid_on = query(
            finance,
            "SELECT invoice_number, invoice_date FROM invoices WHERE status = 'open' "
            "AND invoice_date >= '2025-01-20' ORDER BY invoice_number LIMIT 1",
        )[0]
        paid_day = str(paid_on)[:10]
        change_invoices(any_world.erp_url, {paid: {"status": "paid"}})
        (request,) = tick(f"{FLOW}_changed_days", instance, idle.cursor).run_requests
        assert request.partition_key == paid_day

        break_currencies(any_world.erp_url)
        tripped = run(FINANCE_INVOICES, instance, tags=BROKEN_DAYS)
        assert not tripped.success
        assert "and rerun this window: its rows after the failing batch were not read" in (
            failure(tripped)
        )
        assert (
            f"this run's window (2024-12-01 … 2025-01-19) is kept, and requested again once no "
            f"trip stands by sensor `{FLOW}_stopped_windows`" in failure(tripped)
        )
        refused = run(FINANCE_INVOICES, instance, partition_key=paid_day, tags=request.tags)
        assert not refused.success
        assert f"this run's window ({paid_day}) is kept, and requested again" in failure(refused)
        assert stopped(any_world.state_url) == [
            ("2024-12-01", "2025-01-20", "tripped"),
            (paid_day, f"{date.fromisoformat(paid_day) + timedelta(days=1)}", "refused"),
        ]
        waiting = tick(f"{FLOW}_stopped_windows", instance)
        assert not isinstance(waiting, dg.SensorResult) or not waiting.run_requests
        assert "2 windows of finance/invoices wait: the error budget's trip of run " in (
            skip_message(waiting)
        )

        mend_currencies(any_world.erp_url)
        replay = run(FINANCE_INVOICES, instance, partition_key="2025-01-01", run_config=REPLAY)
        assert replay.success
        again = tick(f"{FLOW}_stopped_windows", instance).run_requests
        assert [
            (r.partition_key, r.tags.get("dagster/asset_partition_range_end")) for r in again
        ] == [
            (paid_day, None),
            (None, "2025-01-19"),
        ], "the most recent first; the backfill's range as one run"
        for rerun in again:
            options = {"partition_key": rerun.partition_key} if rerun.partition_key else {}
            assert run(FINANCE_INVOICES, instance, tags=rerun.tags, **options).success

        assert query(finance, "SELECT status FROM invoices WHERE invoice_number = :n", n=paid) == [
            ("paid",)
        ]
        assert stopped(any_world.state_url) == []
        assert "waits to be run again" in skip_message(tick(f"{FLOW}_stopped_windows", instance))


def test_no_run_is_requested_while_a_trip_stands_and_a_window_refused_again_is_kept_again(
    world, capsys
):
    """While tripped, the changed-days sensor requested a run of each changed day (up to 30 a
    tick), each failing at its start with its own alert, its key used up. Now its days wait in
    its cursor, saying why; both sensors request once the trip is cleared, and a request refused
    again (tripped anew meanwhile) is requested again after the next clear, under a new key."""
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        idle = tick(f"{FLOW}_changed_days", instance)
        break_currencies(world.erp_url)
        assert not run(FINANCE_INVOICES, instance, tags=BROKEN_DAYS).success

        paid, paid_on = query(
            world.erp_url,
            "SELECT invoice_number, invoice_date FROM invoices WHERE invoice_date >= '2025-01-20' "
            "ORDER BY invoice_number LIMIT 1",
        )[0]
        paid_day = str(paid_on)[:10]
        change_invoices(world.erp_url, {paid: {"status": "paid"}})
        held = tick(f"{FLOW}_changed_days", instance, idle.cursor)
        assert not held.run_requests
        assert skip_message(held).startswith(
            "1 changed days of finance/invoices wait: the error budget's trip of run "
        )
        assert "handoff budget list --flow" in skip_message(held)
        assert json.loads(held.cursor)["waiting_days"] == [paid_day]
        still = tick(f"{FLOW}_changed_days", instance, held.cursor)
        assert not still.run_requests and json.loads(still.cursor)["waiting_days"] == [paid_day]
        assert not getattr(tick(f"{FLOW}_stopped_windows", instance), "run_requests", None)

        assert main(["budget", "list", "--flow", FLOW]) == 0
        assert (
            "dead letters open; 1 stopped windows wait for it to clear" in capsys.readouterr().out
        )
        assert main(["budget", "clear", "--flow", FLOW, "--why", "the import is redone"]) == 0
        (changed,) = tick(f"{FLOW}_changed_days", instance, still.cursor).run_requests
        assert changed.partition_key == paid_day
        (first,) = tick(f"{FLOW}_stopped_windows", instance).run_requests

        # Tripped anew before the requested run starts: refused again, kept again.
        store = StateStore(world.state_url, dlq_key=DLQ_KEY)
        try:
            letter = DeadLetter(FLOW, "x", "contract", "finance.invoice@v1: planted", {})
            store.commit_batch(BatchCommit(FLOW, "again", dead_letters=[letter]))
            store.trip_budget(
                BudgetTrip(FLOW, "again", utcnow(), 1, 1, 0.1, {"planted": 1}), actor="t", why="t"
            )
            refused_again = run(FINANCE_INVOICES, instance, tags=first.tags)
            assert not refused_again.success
            store.clear_budget_trip(FLOW, actor="t", why="t", run_id="approval")
        finally:
            store.dispose()
        (second,) = tick(f"{FLOW}_stopped_windows", instance).run_requests
        assert second.tags["dagster/asset_partition_range_end"] == "2025-01-19"
        assert second.tags["handoff/stopped_window"] == f"refused by run {refused_again.run_id}"
        assert second.run_key != first.run_key, "a used run key would be skipped by Dagster"
        assert run(FINANCE_INVOICES, instance, tags=second.tags).success
        assert stopped(world.state_url) == []


def test_a_chinook_day_refused_while_tripped_is_requested_again(world, chinook_copy, state):
    """Chinook has no change cursor, so no changed-days sensor; its partitioned flow gets its
    stopped windows requested again all the same."""
    flow = CHINOOK_INVOICES.name
    assert f"{flow}_changed_days" not in {sensor.name for sensor in defs.sensors}
    letter = DeadLetter(flow, "x", "contract", "chinook.invoice@v1: planted", {})
    state.commit_batch(BatchCommit(flow, "trip", dead_letters=[letter]))
    state.trip_budget(BudgetTrip(flow, "trip", utcnow(), 1, 1, 0.1, {"p": 1}), actor="t", why="t")
    with dg.instance_for_test() as instance:
        refused = run(CHINOOK_INVOICES, instance, partition_key="2021-01-03")
        assert not refused.success and "is kept, and requested again" in failure(refused)
        assert "1 windows of finance/chinook_invoices wait" in skip_message(
            tick(f"{flow}_stopped_windows", instance)
        )
        state.discard_dead_letters(
            state.list_dead_letters(flow), actor="t", why="planted", run_id="discard"
        )
        (request,) = tick(f"{flow}_stopped_windows", instance).run_requests
        assert request.partition_key == "2021-01-03"
        assert run(CHINOOK_INVOICES, instance, partition_key=request.partition_key).success
    assert stopped(world.state_url, flow) == []
    finance = f"sqlite:///{world.home / 'finance.sqlite'}"
    day = "SELECT count(*) FROM {} WHERE {} >= '2021-01-03' AND {} < '2021-01-04'"
    synced = query(finance, day.format("chinook_invoices", *["invoice_date"] * 2))
    assert synced == query(chinook_copy, day.format("Invoice", *["InvoiceDate"] * 2)) != [(0,)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request, tmp_path):
    """A database for the source, the destination and the state store, on each dialect the
    state store runs on."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_database")()
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


def test_a_window_is_kept_until_a_run_of_it_goes_through(database):
    """Day 1 trips in mid-run (its last 17 rows unread), day 2 is refused, then refused again;
    once the trip clears, a run of day 2 forgets day 2 only, and a run of day 1 the rest."""
    engine = create_engine(database)
    state = StateStore(database, dlq_key=DLQ_KEY)
    day1, day2 = datetime(2024, 1, 1), datetime(2024, 1, 2)
    stamps = [day1 + timedelta(minutes=n) for n in range(20)]
    source_lines(engine, stamps + [day2 + timedelta(minutes=n) for n in range(5)])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE source_lines SET booked_on = NULL WHERE id <= 3"))
    spec = dataclasses.replace(
        SPEC, batch_size=20, partitions=DailyPartitions(column="updated_at", start="2024-01-01")
    )
    writer = create_engine(database)

    def run_day(day: datetime, run_id: str):
        destination = SqlTable(writer, spec.target, create_missing=True)
        sync = Sync(
            spec, SqlSource(engine, SOURCE), destination, state, run_id=run_id, actor="t", why="t"
        )
        return sync.run_window(day, day + timedelta(days=1))

    def kept() -> list[tuple[datetime, str, str]]:
        return [(w.start, w.stop, w.run_id) for w in state.list_stopped_windows(spec.name)]

    try:
        with pytest.raises(ErrorBudgetExceeded) as tripped:
            run_day(day1, "day1")
        assert "rerun this window: its rows after the failing batch were not read" in str(
            tripped.value
        )
        with pytest.raises(ErrorBudgetTripStands) as refused:
            run_day(day2, "day2")
        assert "this run's window (2024-01-02) is kept, and requested again once no trip " in str(
            refused.value
        )
        assert f"sensor `{spec.name}_stopped_windows`" in str(refused.value)
        first_stop = state.list_stopped_windows(spec.name)[1].stopped_at
        with pytest.raises(ErrorBudgetTripStands):
            run_day(day2, "day2-again")
        assert kept() == [(day1, "tripped", "day1"), (day2, "refused", "day2-again")]
        assert state.list_stopped_windows(spec.name)[1].stopped_at > first_stop

        state.clear_budget_trip(spec.name, actor="t", why="t", run_id="approval")
        assert run_day(day2, "day2-through").written == 5
        assert kept() == [(day1, "tripped", "day1")]
        assert run_day(day1, "day1-through").written == 17
        assert kept() == [] and len(live(engine)) == 22
    finally:
        state.dispose()
        writer.dispose()
        engine.dispose()


def test_a_window_whose_run_waited_too_long_for_the_flow_is_kept(database):
    """A day's run that gave up waiting for another run of its flow (a long backfill) was
    failed for good: its run key used, the day never run again by itself."""
    engine = create_engine(database)
    state = StateStore(database, dlq_key=DLQ_KEY)
    day = datetime(2024, 1, 1)
    source_lines(engine, [day + timedelta(minutes=n) for n in range(3)])
    spec = dataclasses.replace(
        SPEC, partitions=DailyPartitions(column="updated_at", start="2024-01-01")
    )
    try:
        with state.flow_lock(spec.name, wait=0):  # another run of the flow, going on
            sync = Sync(
                spec, SqlSource(engine, SOURCE), SqlTable(engine, spec.target, create_missing=True),
                state, run_id="waited", actor="t", why="t",
            )  # fmt: skip
            sync.lock_wait = 0.2
            with pytest.raises(SyncError) as busy:
                sync.run_window(day, day + timedelta(days=1))
        assert "this run's window (2024-01-01) is kept" in busy.value.todo
        (window,) = state.list_stopped_windows(spec.name)
        assert (window.start, window.stop, window.run_id) == (day, "busy", "waited")
        assert sync.run_window(day, day + timedelta(days=1)).written == 3
        assert state.list_stopped_windows(spec.name) == []
    finally:
        state.dispose()
        engine.dispose()


def test_stopped_windows_wait_while_a_run_of_the_flow_goes_on(world):
    """A window requested while a long run of its flow went on (a backfill) waited for the
    flow, gave up, was kept again and requested again: a failed run every few minutes."""
    store = StateStore(world.state_url, dlq_key=DLQ_KEY)
    day = datetime(2025, 1, 10)
    store.keep_stopped_window(StoppedWindow(FLOW, day, day + timedelta(days=1), "r", "busy"))
    with dg.instance_for_test() as instance:
        with store.flow_lock(FLOW, wait=0):
            waiting = tick(f"{FLOW}_stopped_windows", instance)
        assert "1 windows of finance/invoices wait: a run of the flow is going on" in skip_message(
            waiting
        )
        (request,) = tick(f"{FLOW}_stopped_windows", instance).run_requests
        assert request.partition_key == "2025-01-10"
    store.dispose()


def test_a_run_forgets_no_window_stopped_after_it_read(tmp_path):
    """A backfill of days 1-4 read its rows; day 3 changed and its run gave up waiting for the
    backfill (kept `busy`); the backfill, done, forgot every window within its range, day 3's
    too: the change was never synced, nor day 3 requested again."""
    database = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine, state = create_engine(database), StateStore(database, dlq_key=DLQ_KEY)
    source_lines(engine, [datetime(2024, 1, 1) + timedelta(days=n, minutes=n) for n in range(4)])
    spec = dataclasses.replace(
        SPEC, partitions=DailyPartitions(column="updated_at", start="2024-01-01")
    )

    def sync(run_id: str) -> Sync:
        destination = SqlTable(engine, spec.target, create_missing=True)
        return Sync(
            spec, SqlSource(engine, SOURCE), destination, state, run_id=run_id, actor="t", why="t"
        )

    backfill, read, go_on = sync("backfill"), threading.Event(), threading.Event()
    upsert = backfill.destination.upsert

    def slow_upsert(records, **how):  # the backfill has read its batch, and writes slowly
        read.set()
        go_on.wait(60)
        return upsert(records, **how)

    backfill.destination.upsert = slow_upsert
    done: list[object] = []
    writing = threading.Thread(
        target=lambda: done.append(backfill.run_window(datetime(2024, 1, 1), datetime(2024, 1, 5)))
    )
    writing.start()
    try:
        assert read.wait(30)
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE source_lines SET memo = 'changed' WHERE id = 3"))
        day = sync("day 3")
        day.lock_wait = 0.2
        with pytest.raises(SyncError):
            day.run_window(datetime(2024, 1, 3), datetime(2024, 1, 4))
    finally:
        go_on.set()
        writing.join(60)
    assert done and [w.stop for w in state.list_stopped_windows(spec.name)] == ["busy"]
    assert sync("day 3 again").run_window(datetime(2024, 1, 3), datetime(2024, 1, 4)).written == 1
    assert state.list_stopped_windows(spec.name) == [] and live(engine)["L3"] == 3.0
    state.dispose()
    engine.dispose()


def plant_trip(state: StateStore, flow: str) -> None:
    """An error-budget trip of `flow` with one dead letter open."""
    letter = DeadLetter(flow, "x", "contract", "planted: currency is not allowed", {})
    state.commit_batch(BatchCommit(flow, "trip", dead_letters=[letter]))
    state.trip_budget(BudgetTrip(flow, "trip", utcnow(), 1, 1, 0.1, {"p": 1}), actor="t", why="t")


def schedule_tick(name: str, instance: dg.DagsterInstance, at: datetime):
    """The schedule's evaluation at `at` (UTC), as the daemon does it."""
    with dg.build_schedule_context(  # closed: else its resources keep the instance's state set
        instance=instance,
        scheduled_execution_time=at.replace(tzinfo=UTC),
        resources=resources(),
        repository_def=defs.get_repository_def(),
    ) as context:
        return defs.resolve_schedule_def(name).evaluate_tick(context)


def test_the_schedule_skips_a_day_while_a_trip_stands_and_the_day_is_synced_once_it_clears(
    world, state
):
    """The schedule launched a run of each day that failed at its start (its alert each
    midnight) while a trip stood. Now it skips, saying why, and the day it skipped is kept:
    once the trip clears, the stopped-windows sensor requests it, and its run syncs it."""
    plant_trip(state, FLOW)
    with dg.instance_for_test() as instance:
        skipped = schedule_tick(f"{FLOW}_schedule", instance, datetime(2025, 1, 21))
        assert not skipped.run_requests
        assert "finance/invoices 2025-01-20 skipped: the error budget's trip of run trip " in (
            skipped.skip_message
        )
        assert f"`handoff budget list --flow {FLOW}`" in skipped.skip_message
        assert f"requested by sensor `{FLOW}_stopped_windows` once it clears" in (
            skipped.skip_message
        )
        assert stopped(world.state_url) == [("2025-01-20", "2025-01-21", "refused")]

        state.discard_dead_letters(
            state.list_dead_letters(FLOW), actor="t", why="planted", run_id="discard"
        )
        (next_day,) = schedule_tick(
            f"{FLOW}_schedule", instance, datetime(2025, 1, 22)
        ).run_requests
        assert next_day.partition_key == "2025-01-21"
        (request,) = tick(f"{FLOW}_stopped_windows", instance).run_requests
        assert request.partition_key == "2025-01-20"
        assert run(FINANCE_INVOICES, instance, partition_key="2025-01-20").success
    assert stopped(world.state_url) == []
    finance = f"sqlite:///{world.home / 'finance.sqlite'}"
    day = "SELECT count(*) FROM invoices WHERE invoice_date >= '2025-01-20' AND invoice_date < '2025-01-21'"
    assert query(finance, day) == query(world.erp_url, day) != [(0,)]


def test_an_unpartitioned_flow_s_schedule_skips_while_a_trip_stands_and_its_sync_is_kept(
    world, state
):
    """An hourly run that would stop at its start is not launched. Its sync was not kept, as the
    refused run's is: once the trip cleared, nothing synced the flow before the next tick (an
    hour on). Now it is kept, and the stopped-windows sensor requests it once the trip clears."""
    flow, sensor = CRM_CONTACTS.name, f"{CRM_CONTACTS.name}_stopped_windows"
    plant_trip(state, flow)
    with dg.instance_for_test() as instance:
        skipped = schedule_tick(f"{flow}_schedule", instance, datetime(2025, 1, 21, 10))
        assert not skipped.run_requests
        assert "crm/contacts skipped: the error budget's trip of run trip stands" in (
            skipped.skip_message
        )
        assert f"`handoff budget clear --flow {flow} --why ...`" in skipped.skip_message
        assert f"its sync is kept, and requested by sensor `{sensor}` once it clears" in (
            skipped.skip_message
        )
        assert stopped(world.state_url, flow) == [("1970-01-01", "1970-01-01", "refused")]
        assert "1 windows of crm/contacts wait: the error budget's trip of run trip" in (
            skip_message(tick(sensor, instance))
        )
        assert main(["budget", "clear", "--flow", flow, "--why", "planted"]) == 0
        (request,) = tick(sensor, instance).run_requests
        assert request.tags["handoff/stopped_window"] == (
            "refused by run schedule tick 2025-01-21T10:00+0000"
        )
        assert run_as_requested(CRM_CONTACTS, instance, sensor, request).success
        assert stopped(world.state_url, flow) == []
        (hourly,) = schedule_tick(
            f"{flow}_schedule", instance, datetime(2025, 1, 21, 11)
        ).run_requests
        assert hourly.tags["handoff/pool"] == CRM_CONTACTS.pool


def move_one_customer(erp_url: str) -> None:
    """A synced customer (a valid email no other shares) moves city: one change past the mark."""
    valid = valid_customers(erp_url)
    emails = Counter(valid.values())
    number = min(number for number, email in valid.items() if emails[email] == 1)
    erp = create_engine(erp_url)
    with erp.begin() as connection:
        newest = connection.execute(sa.select(sa.func.max(customers.c.updated_at))).scalar_one()
        connection.execute(
            sa.update(customers)
            .where(customers.c.customer_number == number)
            .values(city="Tripville", updated_at=newest + timedelta(seconds=1))
        )
    erp.dispose()


def test_the_change_sensor_skips_while_a_trip_stands_and_the_change_is_synced_once_it_clears(
    world, state
):
    """The change sensor of an unpartitioned flow requested a run for each change while a trip
    stood: each stopped at its start, with its failed run and alert. Now it requests none and
    says why; the flow's sync is kept, and requested once the trip clears, so the change it saw
    (its cursor moved past it) is synced then."""
    flow, changed = CRM_CONTACTS.name, "erp_customers_changed"
    sensor = f"{flow}_stopped_windows"
    with dg.instance_for_test() as instance:
        assert run(CRM_CONTACTS, instance).success
        idle = tick(changed, instance)
        assert not idle.run_requests
        plant_trip(state, flow)
        move_one_customer(world.erp_url)
        skipped = tick(changed, instance, idle.cursor)
        assert not skipped.run_requests
        assert "crm/contacts skipped: the error budget's trip of run trip stands" in (
            skip_message(skipped)
        )
        assert f"`handoff dlq replay --flow {flow}`" in skip_message(skipped)
        assert f"its sync is kept, and requested by sensor `{sensor}` once it clears" in (
            skip_message(skipped)
        )
        assert stopped(world.state_url, flow) == [("1970-01-01", "1970-01-01", "refused")]
        assert "unchanged since" in skip_message(tick(changed, instance, skipped.cursor))

        assert main(["budget", "clear", "--flow", flow, "--why", "planted"]) == 0
        (request,) = tick(sensor, instance).run_requests
        assert request.tags["handoff/stopped_window"].startswith("refused by run sensor tick ")
        synced = run_as_requested(CRM_CONTACTS, instance, sensor, request)
        assert synced.success
        (materialized,) = synced.get_asset_materialization_events()
        assert materialized.materialization.metadata["written"].value == 1, "the change"
        assert stopped(world.state_url, flow) == []


def test_the_change_sensor_still_requests_the_flows_of_the_table_no_trip_stops(world, state):
    """Two flows read ERP customers (the helpdesk's, once configured): a trip of one keeps its
    sync for the stopped-windows sensor; the other's run is requested as before."""
    (sensor,) = source_changed_sensors([CRM_CONTACTS, HELPDESK_USERS])
    plant_trip(state, CRM_CONTACTS.name)
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance, resources=resources(), definitions=defs
        )
        (request,) = sensor(context).run_requests
    assert request.asset_selection == [dg.AssetKey(["helpdesk", "users"])]
    assert request.tags["handoff/pool"] == "rt_api", "the pool it writes through, not the CRM's"
    assert stopped(world.state_url, CRM_CONTACTS.name) == [("1970-01-01", "1970-01-01", "refused")]
    assert stopped(world.state_url, HELPDESK_USERS.name) == []


def test_a_change_read_by_flows_of_two_pools_is_synced_by_one_run_per_pool(world, state):
    """ERP customers feed crm/contacts (pool crm_api) and helpdesk/users (rt_api): the change
    sensor requested one run of both, tagged with the CRM's pool alone. The production instance
    lets one run per `handoff/pool` go at a time: that run waited behind every CRM run, and
    wrote to RT beside a run of rt_api's. Now each pool's flows are a run tagged with its pool,
    the pool of every asset it materializes."""
    (sensor,) = source_changed_sensors([CRM_CONTACTS, HELPDESK_USERS])
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance, resources=resources(), definitions=defs
        )
        requests = sensor(context).run_requests
    tagged = {tuple(r.asset_selection): r.tags.get("handoff/pool") for r in requests}
    assert tagged == {
        (dg.AssetKey(["crm", "contacts"]),): "crm_api",
        (dg.AssetKey(["helpdesk", "users"]),): "rt_api",
    }
    for request, spec in zip(requests, (CRM_CONTACTS, HELPDESK_USERS), strict=True):
        assert flow_asset(spec).op.pool == request.tags["handoff/pool"]
        assert {key.asset_key for key in request.asset_check_keys} == {asset_key(spec)}
    assert len({request.run_key for request in requests}) == 2, "each run is requested once"


def queue_run_of(instance: dg.DagsterInstance, request: dg.RunRequest) -> None:
    """The requested run, created and not begun yet (as one the queue holds): its asset
    selection is the request's, none when the request names none, as the daemons make it."""
    create_run_for_test(
        instance,
        job_name=request.job_name or "__ASSET_JOB",
        status=dg.DagsterRunStatus.NOT_STARTED,
        tags={
            **request.tags,
            **({"dagster/partition": request.partition_key} if request.partition_key else {}),
        },
        asset_selection=(
            frozenset(request.asset_selection) if request.asset_selection is not None else None
        ),
    )


def test_a_day_both_sensors_would_request_is_run_once(world, state):
    """A day refused while a trip stood, whose rows changed meanwhile: once the trip cleared,
    both sensors requested it under different run keys, two runs of one day (the second
    waiting for the first and, past its wait, failing with its alert). A day whose run waits
    in the queue is not requested again, whichever sensor asked first."""
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        idle = tick(f"{FLOW}_changed_days", instance)
        plant_trip(state, FLOW)
        (paid, paid_on), (other, other_on) = query(
            world.erp_url,
            "SELECT invoice_number, invoice_date FROM invoices WHERE invoice_date >= '2025-01-20' "
            "ORDER BY invoice_date DESC LIMIT 2",
        )
        days = [str(paid_on)[:10], str(other_on)[:10]]
        assert days[0] != days[1] or pytest.skip("the world's last two invoices share a day")
        for day in days:
            start = datetime.fromisoformat(day)
            state.keep_stopped_window(
                StoppedWindow(FLOW, start, start + timedelta(days=1), "refused", "refused")
            )
        change_invoices(world.erp_url, {paid: {"status": "paid"}, other: {"status": "paid"}})
        held = tick(f"{FLOW}_changed_days", instance, idle.cursor)
        state.discard_dead_letters(
            state.list_dead_letters(FLOW), actor="t", why="planted", run_id="discard"
        )

        # The changed-days sensor first: its runs queued, the other requests neither day.
        changed = tick(f"{FLOW}_changed_days", instance, held.cursor).run_requests
        assert sorted(r.partition_key for r in changed) == sorted(days)
        queue_run_of(instance, changed[0])
        (stopped_day,) = tick(f"{FLOW}_stopped_windows", instance).run_requests
        assert stopped_day.partition_key == changed[1].partition_key
        queue_run_of(instance, changed[1])
        assert "2 windows of finance/invoices wait for the runs of them queued already" in (
            skip_message(tick(f"{FLOW}_stopped_windows", instance))
        )

    with dg.instance_for_test() as instance:  # the stopped-windows sensor first
        for request in tick(f"{FLOW}_stopped_windows", instance).run_requests:
            queue_run_of(instance, request)
        again = tick(f"{FLOW}_changed_days", instance, held.cursor)
        assert not again.run_requests
        assert "the changed days of finance/invoices have runs queued already" in (
            skip_message(again)
        )


def test_a_day_the_schedule_queued_is_not_requested_again_by_the_changed_days_sensor(world, state):
    """The schedule's run of yesterday waits in the queue (its pool is busy) when the sensor
    sees yesterday's late edits: it requested the day again (the schedule's run named no asset,
    so the sensor did not see it queued), the second run waiting for the first and failing."""
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        idle = tick(f"{FLOW}_changed_days", instance)
        ((number, invoiced),) = query(
            world.erp_url,
            "SELECT invoice_number, invoice_date FROM invoices ORDER BY invoice_date DESC LIMIT 1",
        )
        day = datetime.fromisoformat(str(invoiced)[:10])
        (scheduled,) = schedule_tick(
            f"{FLOW}_schedule", instance, day + timedelta(days=1)
        ).run_requests
        assert scheduled.partition_key == f"{day:%Y-%m-%d}"
        queue_run_of(instance, scheduled)
        change_invoices(world.erp_url, {number: {"status": "paid"}})
        changed = tick(f"{FLOW}_changed_days", instance, idle.cursor)
    assert not changed.run_requests, "the day's run waits in the queue already"


def run_as_requested(
    spec, instance: dg.DagsterInstance, sensor: str, request: dg.RunRequest
) -> dg.ExecuteInProcessResult:
    """The requested run, tagged as the sensor daemon tags it (its run key and sensor)."""
    tags = {**request.tags, "dagster/run_key": request.run_key, "dagster/sensor_name": sensor}
    return run(spec, instance, partition_key=request.partition_key, tags=tags)


def launched(instance: dg.DagsterInstance, sensor: str, requests) -> list[dg.RunRequest]:
    """The requests the sensor daemon launches: it skips one whose run key a run of the sensor
    used already (dagster/_daemon/sensor.py `fetch_existing_runs`), whatever that run's end."""
    return [
        request
        for request in requests
        if not instance.get_runs(
            filters=dg.RunsFilter(
                tags={"dagster/run_key": request.run_key, "dagster/sensor_name": sensor}
            )
        )
    ]


def test_the_wait_before_a_failing_window_is_requested_again_doubles_up_to_six_hours():
    """A window whose runs kept failing for weeks doubled its wait past what a timedelta holds:
    from its fortieth failed run on, the sensor failed every tick (OverflowError)."""
    assert [retry_wait(n) for n in (1, 2, 3)] == [timedelta(minutes=m) for m in (10, 20, 40)]
    assert retry_wait(40) == retry_wait(10_000) == timedelta(hours=6)


def test_a_window_whose_rerun_failed_otherwise_is_requested_again_after_a_wait(world, monkeypatch):
    """A stopped window's run failed for another reason (the ERP down): the window stayed kept,
    but the sensor requested it under the same run key, which Dagster skips, so it was never
    run again. Now it is requested again under a new key, after a wait that doubles with each
    failed run (a window failing for good does not spin), until a run of it goes through."""
    sensor = f"{FLOW}_stopped_windows"
    store = StateStore(world.state_url, dlq_key=DLQ_KEY)
    day = datetime(2025, 1, 10)
    store.keep_stopped_window(StoppedWindow(FLOW, day, day + timedelta(days=1), "r", "busy"))
    store.dispose()
    with dg.instance_for_test() as instance:
        (first,) = tick(sensor, instance).run_requests
        monkeypatch.setenv("ERP_DATABASE_URL", "postgresql://postgres@127.0.0.1:9/erp")
        down = run_as_requested(FINANCE_INVOICES, instance, sensor, first)
        assert not down.success and "rerun when it answers again" in failure(down)
        assert stopped(world.state_url) == [("2025-01-10", "2025-01-11", "busy")]

        waiting = tick(sensor, instance)
        assert not launched(instance, sensor, getattr(waiting, "run_requests", None) or [])
        assert "1 windows of finance/invoices wait: their last run failed; the next in " in (
            skip_message(waiting)
        )

        monkeypatch.setattr("sensors.stopped_windows.FIRST_RETRY_AFTER", timedelta(0))
        (second,) = launched(instance, sensor, tick(sensor, instance).run_requests)
        assert second.partition_key == "2025-01-10" and second.run_key != first.run_key
        assert not run_as_requested(FINANCE_INVOICES, instance, sensor, second).success
        (third,) = launched(instance, sensor, tick(sensor, instance).run_requests)
        assert third.run_key not in {first.run_key, second.run_key}

        monkeypatch.setenv("ERP_DATABASE_URL", world.erp_url)
        assert run_as_requested(FINANCE_INVOICES, instance, sensor, third).success
        assert stopped(world.state_url) == []
        assert "waits to be run again" in skip_message(tick(sensor, instance))


def stamp_invoices(erp_url: str, where: str, at: datetime, **params) -> None:
    """Invoices edited by a writer whose clock says `at` (their change cursor set to it)."""
    engine = create_engine(erp_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"UPDATE invoices SET status = 'paid', updated_at = :at WHERE {where}"),
            {"at": at, **params},
        )
    engine.dispose()


def first_march_invoice(erp_url: str) -> tuple[str, str]:
    """The number and day of the first invoice of March 2024 (after the January the tests sync)."""
    ((number, day),) = query(
        erp_url,
        "SELECT invoice_number, invoice_date FROM invoices WHERE invoice_date >= '2024-03-01' "
        "ORDER BY invoice_date, invoice_number LIMIT 1",
    )
    return number, str(day)[:10]


def test_a_changed_day_is_requested_under_a_run_key_no_earlier_request_used(world):
    """The changed-days sensor named its requests after the table's newest change. A mass edit
    left days waiting in its cursor; their rows were edited again by a host whose clock is
    behind, so the newest change went back to one an earlier tick had seen: a waiting day that
    tick had requested was requested under the same run key, which Dagster skips, and its
    changes were never synced."""
    sensor = f"{FLOW}_changed_days"
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        idle = tick(sensor, instance)
        first, day = first_march_invoice(world.erp_url)
        earlier = utcnow()
        stamp_invoices(world.erp_url, "invoice_number = :n", earlier, n=first)
        seen = tick(sensor, instance, idle.cursor)
        (request,) = seen.run_requests
        assert request.partition_key == day
        assert run_as_requested(FINANCE_INVOICES, instance, sensor, request).success

        mass = "invoice_date >= :day AND invoice_date < '2024-06-01' AND invoice_number != :n"
        stamp_invoices(world.erp_url, mass, earlier + timedelta(minutes=1), day=day, n=first)
        edited = tick(sensor, instance, seen.cursor)
        assert day in json.loads(edited.cursor)["waiting_days"], "the oldest day waits"
        stamp_invoices(world.erp_url, mass, earlier - timedelta(hours=1), day=day, n=first)

        waiting = tick(sensor, instance, edited.cursor).run_requests
        assert day in [r.partition_key for r in waiting]
        assert launched(instance, sensor, waiting) == waiting, "each under a key of its own"


def test_a_changed_day_left_to_a_queued_run_is_requested_once_that_run_is_cancelled(world):
    """The sensor left a changed day to the day's run waiting in the queue (the schedule's), and
    forgot it: that run cancelled before it began (by someone clearing the queue), the change
    was never synced. The day waits for the queued run to begin, and is requested if it does
    not."""
    sensor = f"{FLOW}_changed_days"
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        idle = tick(sensor, instance)
        number, day = first_march_invoice(world.erp_url)
        queue_run_of(
            instance,
            dg.RunRequest(run_key=day, partition_key=day, asset_selection=[FINANCE_INVOICES_KEY]),
        )
        change_invoices(world.erp_url, {number: {"status": "paid"}})
        left = tick(sensor, instance, idle.cursor)
        assert not left.run_requests
        assert "the changed days of finance/invoices have runs queued already" in (
            skip_message(left)
        )
        still = tick(sensor, instance, left.cursor)
        assert not still.run_requests, "the queued run still reads it"

        (queued,) = instance.get_runs(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.NOT_STARTED])
        )
        instance.report_run_canceled(queued)
        (request,) = tick(sensor, instance, still.cursor).run_requests
        assert request.partition_key == day
        assert run_as_requested(FINANCE_INVOICES, instance, sensor, request).success
    finance = f"sqlite:///{world.home / 'finance.sqlite'}"
    assert query(finance, "SELECT status FROM invoices WHERE invoice_number = :n", n=number) == [
        ("paid",)
    ]


def test_an_unpartitioned_run_that_waited_too_long_for_the_flow_is_requested_once_it_is_free(
    world, monkeypatch
):
    """A day's run that gave up waiting for another run of its flow is kept and requested again;
    an unpartitioned flow's (a sensor's run while `handoff dlq replay` held the flow) just
    failed: the change it was requested for waited for the next change or the hourly schedule.
    It is kept the same way, and requested once the flow is free."""
    flow, sensor = CRM_CONTACTS.name, f"{CRM_CONTACTS.name}_stopped_windows"
    monkeypatch.setattr(Sync, "lock_wait", 0.2)
    store = StateStore(world.state_url, dlq_key=DLQ_KEY)
    try:
        with dg.instance_for_test() as instance:
            with store.flow_lock(flow, wait=0):  # `handoff dlq replay`, going on
                busy = run(CRM_CONTACTS, instance)
                assert not busy.success
                assert f"this run's sync is kept, and requested again by sensor `{sensor}` " in (
                    failure(busy)
                )
                assert [w.stop for w in store.list_stopped_windows(flow)] == ["busy"]
                retried = [e for e in busy.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
                assert not retried, "each retry would wait for the flow again, holding the run"
                assert "a run of the flow is going on" in skip_message(tick(sensor, instance))
            (request,) = tick(sensor, instance).run_requests
            assert request.partition_key is None
            assert request.asset_selection == [dg.AssetKey(["crm", "contacts"])]
            synced = run_as_requested(CRM_CONTACTS, instance, sensor, request)
            assert synced.success
            (materialized,) = synced.get_asset_materialization_events()
            assert materialized.materialization.metadata["written"].value > 0
            assert store.list_stopped_windows(flow) == []
            assert "waits to be run again" in skip_message(tick(sensor, instance))
    finally:
        store.dispose()


def test_an_unpartitioned_run_the_error_budget_stopped_is_requested_once_the_trip_clears(
    world, erp, state, capsys
):
    """A partition's run the error budget stopped (tripped in mid-run, or refused at its start)
    is kept and requested once the trip clears; an unpartitioned flow's was not: its change (and
    the rows after the failing batch) waited for the next change or the hourly schedule. It is
    kept the same way, as its sync from the watermark."""
    flow, sensor = CRM_CONTACTS.name, f"{CRM_CONTACTS.name}_stopped_windows"
    broken = break_emails(erp)
    with dg.instance_for_test() as instance:
        tripped = run(CRM_CONTACTS, instance)
        assert not tripped.success
        assert "the watermark did not advance past the failing batch" in failure(tripped)
        kept = f"this run's sync is kept, and requested again by sensor `{sensor}` once no trip"
        assert kept in failure(tripped)
        assert [w.stop for w in state.list_stopped_windows(flow)] == ["tripped"]
        refused = run(CRM_CONTACTS, instance)
        assert not refused.success and kept in failure(refused)
        assert [w.stop for w in state.list_stopped_windows(flow)] == ["refused"]
        assert "1 windows of crm/contacts wait: the error budget's trip of run " in (
            skip_message(tick(sensor, instance))
        )

        mend_emails_quietly(erp, broken)
        replay = {"ops": {"crm__contacts": {"config": {"replay": True}}}}
        assert run(CRM_CONTACTS, instance, run_config=replay).success
        assert main(["dlq", "discard", "--flow", flow, "--reason", "the seed's bad rows"]) == 0
        assert "the trip is cleared, runs go on" in capsys.readouterr().out
        (request,) = tick(sensor, instance).run_requests
        assert request.partition_key is None
        assert request.tags["handoff/stopped_window"] == f"refused by run {refused.run_id}"
        synced = run_as_requested(CRM_CONTACTS, instance, sensor, request)
        assert synced.success
        (materialized,) = synced.get_asset_materialization_events()
        assert materialized.materialization.metadata["written"].value > 1500, "the unread rows"
        assert state.list_stopped_windows(flow) == []
        assert "waits to be run again" in skip_message(tick(sensor, instance))


def test_an_unpartitioned_flow_s_kept_sync_is_left_to_its_hourly_run_queued_already(world, state):
    """A sync kept after it gave up waiting for the flow is requested once the flow is free,
    unless a run of the flow waits to begin: that one reads it. The hourly schedule's run named
    no asset, so the sensor saw none queued and requested a second run beside it, which waited
    for the first and, past its wait, gave up and was kept again."""
    flow = CRM_CONTACTS.name
    state.keep_stopped_window(StoppedWindow(flow, *SINCE_WATERMARK, "gave-up", "busy"))
    with dg.instance_for_test() as instance:
        (hourly,) = schedule_tick(
            f"{flow}_schedule", instance, datetime(2025, 1, 21, 10)
        ).run_requests
        assert {key.name for key in hourly.asset_check_keys or ()} <= {"contract", "audit_anchor"}
        queue_run_of(instance, hourly)
        assert "queued already" in skip_message(tick(f"{flow}_stopped_windows", instance))
