"""ERP invoices and payments, and Chinook (a second, real ERP), into the finance reporting
database on SQLite, PostgreSQL and MariaDB, through Dagster."""

from __future__ import annotations

import functools
import json
from datetime import date, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.checks import reconciliation_check
from assets.chinook import CHINOOK_CUSTOMERS, CHINOOK_INVOICES
from assets.factory import asset_key, flow_asset
from assets.finance_invoices import FINANCE_INVOICES
from assets.finance_payments import FINANCE_PAYMENTS
from definitions import defs, resources
from integrations import settings
from integrations.engine.state import utcnow
from integrations.erp import schema as erp_schema
from integrations.sql.connect import create_engine
from integrations.sql.fit import create_table
from sensors.alerts import stale_flow_sensor
from sensors.changed_days import MAX_DAYS_PER_TICK

JANUARY = {
    "dagster/asset_partition_range_start": "2025-01-01",
    "dagster/asset_partition_range_end": "2025-01-31",
}
# A quarter: Dagster records one materialization per day of a range, which costs ~30 ms each.
CHINOOK_QUARTER = {
    "dagster/asset_partition_range_start": "2021-01-01",
    "dagster/asset_partition_range_end": "2021-03-31",
}


def run(spec, instance, **options) -> dg.ExecuteInProcessResult:
    """Materialize the flow's asset (options: tags, partition_key, run_config); failures are
    the caller's to look at."""
    return dg.materialize(
        [flow_asset(spec)],
        resources=resources(),
        instance=instance,
        raise_on_error=False,
        **options,
    )


def materialize(spec, instance, tags=None, partition_key=None) -> dict[str, object]:
    result = run(spec, instance, tags=tags, partition_key=partition_key)
    assert result.success
    events = result.get_asset_materialization_events()
    return {key: value.value for key, value in events[0].materialization.metadata.items()}


def query(url: str, sql: str, **params) -> list[tuple]:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = connection.execute(sa.text(sql), params).all()
    engine.dispose()
    return [tuple(row) for row in found]


@pytest.fixture
def finance_url(world, sql_database, monkeypatch) -> str:
    """The finance database on each dialect, its tables made by its DBA (here: from the
    contracts) because a configured FINANCE_DATABASE_URL is never altered by handoff."""
    url = sql_database()
    engine = create_engine(url)
    for spec in (FINANCE_INVOICES, FINANCE_PAYMENTS, CHINOOK_CUSTOMERS, CHINOOK_INVOICES):
        create_table(engine, spec)
    engine.dispose()
    monkeypatch.setenv("FINANCE_DATABASE_URL", url)
    return url


def test_a_month_of_invoices_and_payments_lands_in_finance(world, finance_url):
    with dg.instance_for_test() as instance:
        invoices = materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        payments = materialize(FINANCE_PAYMENTS, instance, tags=JANUARY)
        assert len(instance.get_runs()) == 2, "each month is one run"

        expected = dict(
            query(
                world.erp_url,
                "SELECT invoice_number, amount FROM invoices WHERE deleted_at IS NULL "
                "AND invoice_date BETWEEN '2025-01-01' AND '2025-01-31'",
            )
        )
        landed = dict(query(finance_url, "SELECT invoice_number, amount FROM invoices"))
        assert landed and set(landed) == set(expected)
        assert all(float(landed[n]) == pytest.approx(float(expected[n])) for n in landed)
        assert invoices["inserted"] == len(landed)

        paid = query(
            world.erp_url,
            "SELECT count(*) FROM payments WHERE paid_on BETWEEN '2025-01-01' AND '2025-01-31'",
        )[0][0]
        assert (
            payments["inserted"]
            == paid
            == query(finance_url, "SELECT count(*) FROM payments")[0][0]
        )
        linked = query(
            finance_url,
            "SELECT count(*) FROM payments p JOIN invoices i ON i.invoice_number = p.invoice_number",
        )[0][0]
        assert 0 < linked <= paid

        again = materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        assert (again["written"], again["unchanged"]) == (0, len(landed))


def test_each_day_of_a_one_run_backfill_names_the_range_its_counts_cover(world):
    """A single-run backfill records one materialization per day of its range, and each carried
    the whole range's counts with nothing saying so: three days each claimed the range's
    inserts. Each now names the range and its number of days; a day's own run names the day."""
    first_week = {
        "dagster/asset_partition_range_start": "2025-01-05",
        "dagster/asset_partition_range_end": "2025-01-07",
    }
    with dg.instance_for_test() as instance:
        ranged = run(FINANCE_INVOICES, instance, tags=first_week)
        alone = run(FINANCE_INVOICES, instance, partition_key="2025-01-08")
    days = {
        event.partition: event.materialization.metadata
        for event in ranged.get_asset_materialization_events()
    }
    assert sorted(days) == ["2025-01-05", "2025-01-06", "2025-01-07"]
    for metadata in days.values():
        assert metadata["counts_cover"].value == "2025-01-05 … 2025-01-07 (3 days, one run)"
        assert metadata["days_in_run"].value == 3
    (day,) = alone.get_asset_materialization_events()
    assert day.materialization.metadata["counts_cover"].value == "2025-01-08"


def test_a_deleted_invoice_is_archived_when_its_day_is_rewritten(world, finance_url):
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        number, day = query(
            finance_url, "SELECT invoice_number, invoice_date FROM invoices ORDER BY invoice_number"
        )[0]
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE invoices SET deleted_at = updated_at, status = 'void' "
                    "WHERE invoice_number = :n"
                ),
                {"n": number},
            )
        engine.dispose()
        counts = materialize(FINANCE_INVOICES, instance, partition_key=str(day)[:10])
        assert counts["archived"] == 1
        archived = query(
            finance_url, "SELECT invoice_number FROM invoices WHERE archived_at IS NOT NULL"
        )
        assert archived == [(number,)]


def test_a_backfill_that_would_archive_a_month_stops_at_the_archive_guard(world, finance_url):
    """A partitioned flow's window runs are guarded too: a mass delete in the ERP stops the
    backfill of its range before anything is written, until the run allows it."""
    with dg.instance_for_test() as instance:
        synced = materialize(FINANCE_INVOICES, instance, tags=JANUARY)["written"]
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE invoices SET deleted_at = updated_at"))
        engine.dispose()
        stopped = run(FINANCE_INVOICES, instance, tags=JANUARY)
        assert not stopped.success
        (failure,) = [e for e in stopped.all_events if e.event_type_value == "STEP_FAILURE"]
        assert (
            "above the archive guard of 20%"
            in failure.step_failure_data.user_failure_data.description
        )
        archived = "SELECT count(*) FROM invoices WHERE archived_at IS NOT NULL"
        assert query(finance_url, archived) == [(0,)]

        allowed = run(
            FINANCE_INVOICES,
            instance,
            tags=JANUARY,
            run_config={"ops": {"finance__invoices": {"config": {"allow_mass_archive": True}}}},
        )
        assert allowed.success
        assert query(finance_url, archived) == [(synced,)]


def test_chinook_customers_and_invoices_land_in_finance(chinook_copy, finance_url):
    with dg.instance_for_test() as instance:
        customers = materialize(CHINOOK_CUSTOMERS, instance)
        invoices = materialize(CHINOOK_INVOICES, instance, tags=CHINOOK_QUARTER)

        count, total = query(
            chinook_copy,
            'SELECT count(*), round(sum("Total"), 2) FROM "Invoice" '
            "WHERE \"InvoiceDate\" < '2021-04-01'",
        )[0]
        assert customers["inserted"] == 59 and customers["rejected"] == 0
        assert invoices["inserted"] == count > 0 and invoices["rejected"] == 0
        assert float(query(finance_url, "SELECT sum(total) FROM chinook_invoices")[0][0]) == (
            pytest.approx(total)
        )
        first = query(
            finance_url,
            "SELECT email, country FROM chinook_customers WHERE customer_id = 1",
        )
        assert first == [("luisg@embraer.com.br", "Brazil")]
        orphans = query(
            finance_url,
            "SELECT count(*) FROM chinook_invoices i LEFT JOIN chinook_customers c "
            "ON c.customer_id = i.customer_id WHERE c.customer_id IS NULL",
        )
        assert orphans == [(0,)], "every invoice's customer landed too"

        again = materialize(CHINOOK_CUSTOMERS, instance)
        assert (again["written"], again["unchanged"]) == (0, 59)


def test_a_repair_archives_the_rows_of_records_deleted_outright_and_is_audited_as_one(
    world, state, chinook_copy
):
    """A Chinook customer deleted outright stays live in finance (no soft delete to archive by,
    and no run reads a row that is gone): the reconciliation check told the operator to run
    `repair: true`, which changed nothing. A repair now archives such a row, and leaves one
    handoff never wrote (saying so); its audit entries say `repair`."""
    key = asset_key(CHINOOK_CUSTOMERS)
    assets = [flow_asset(CHINOOK_CUSTOMERS), reconciliation_check(CHINOOK_CUSTOMERS, key)]
    finance = f"sqlite:///{world.home / 'finance.sqlite'}"

    def check(instance) -> dg.AssetCheckEvaluation:
        result = dg.materialize(
            assets,
            resources=resources(),
            instance=instance,
            selection=dg.AssetSelection.checks(dg.AssetCheckKey(key, "reconciliation")),
        )
        (evaluation,) = result.get_asset_check_evaluations()
        return evaluation

    with dg.instance_for_test() as instance:
        materialize(CHINOOK_CUSTOMERS, instance)
        engine = create_engine(chinook_copy)
        with engine.begin() as connection:
            connection.execute(sa.text('DELETE FROM "Customer" WHERE "CustomerId" = 3'))
        engine.dispose()
        extra_only = check(instance)
        assert not extra_only.passed and extra_only.metadata["extra"].value == 1
        assert "run config `repair: true`" in extra_only.description

        engine = create_engine(finance)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE chinook_customers SET city = 'Nowhere' WHERE customer_id = 20")
            )
            connection.execute(  # a row someone else put there: not handoff's to archive
                sa.text(
                    "INSERT INTO chinook_customers (customer_id, first_name, last_name, email, "
                    "country) VALUES (999, 'A', 'B', 'a@b.example', 'X')"
                )
            )
        engine.dispose()
        repaired = run(
            CHINOOK_CUSTOMERS,
            instance,
            run_config={"ops": {"finance__chinook_customers": {"config": {"repair": True}}}},
        )
        assert repaired.success
        after = check(instance)
        assert (after.metadata["differing"].value, after.metadata["extra"].value) == (0, 1)
    archived = query(
        finance, "SELECT customer_id FROM chinook_customers WHERE archived_at IS NOT NULL"
    )
    assert archived == [(3,)]
    entries = [
        e for e in state.audit_entries(CHINOOK_CUSTOMERS.name) if e["run_id"] == repaired.run_id
    ]
    assert {e["why"] for e in entries} == {"repair"}
    assert sum(e["detail"].get("updated", 0) for e in entries) == 1
    assert sum(e["detail"].get("archived", 0) for e in entries) == 1


def test_a_contract_violation_planted_in_chinook_lands_in_the_dlq(world, state, chinook_copy):
    engine = create_engine(chinook_copy)
    with engine.begin() as connection:
        connection.execute(
            sa.text('UPDATE "Customer" SET "Email" = \'not-an-address\' WHERE "CustomerId" = 7')
        )
    engine.dispose()
    with dg.instance_for_test() as instance:
        counts = materialize(CHINOOK_CUSTOMERS, instance)
    assert (counts["inserted"], counts["rejected"]) == (58, 1)
    letters = state.list_dead_letters(CHINOOK_CUSTOMERS.name)
    assert [(letter.record_key, letter.reason_kind) for letter in letters] == [("7", "contract")]
    assert "Email is not a valid email address" in letters[0].reason
    assert letters[0].payload["Email"] == "not-an-address"
    finance = (world.home / "finance.sqlite").as_posix()
    assert query(f"sqlite:///{finance}", "SELECT count(*) FROM chinook_customers") == [(58,)]


def test_invoice_dates_sqlite_cannot_read_are_dead_lettered_not_fatal(world, state, chinook_copy):
    """SQLite keeps any text in a DATETIME column. One impossible date failed the whole read
    ("day is out of range for month", no flow, no record, on every rerun); one SQLite reads as
    no time at all was in no partition's window, and never read. Both are dead-lettered now,
    and the rest of the quarter lands."""
    engine = create_engine(chinook_copy)
    with engine.begin() as connection:
        for invoice, day in ((40, "2021-02-30 00:00:00"), (41, "2021-01-32 00:00:00")):
            connection.execute(
                sa.text('UPDATE "Invoice" SET "InvoiceDate" = :day WHERE "InvoiceId" = :id'),
                {"day": day, "id": invoice},
            )
    engine.dispose()
    count = query(
        chinook_copy,
        'SELECT count(*) FROM "Invoice" WHERE datetime("InvoiceDate") < \'2021-04-01\'',
    )[0][0]
    with dg.instance_for_test() as instance:
        counts = materialize(CHINOOK_INVOICES, instance, tags=CHINOOK_QUARTER)
    assert (counts["inserted"], counts["rejected"]) == (count - 1, 2)
    letters = state.list_dead_letters(CHINOOK_INVOICES.name)
    assert sorted(letter.record_key for letter in letters) == ["40", "41"]
    assert all("InvoiceDate is not a date and time" in letter.reason for letter in letters)


def test_invoice_dates_sqlite_reads_as_no_date_are_read_by_every_day(world, state):
    """SQLite keeps any text in the ERP's DATE column too: an invoice dated '15/01/2025' (typed by
    hand, loaded from a spreadsheet), or 20250115 (a number), sorted before every day's bounds, so
    no partition's run read it. The first was never synced though its contract takes it, and
    reconciliation took it for dated before the first partition; the second was never
    dead-lettered. As with a DATETIME, each day's run reads them: one lands, the other is
    dead-lettered."""
    spelled, number = [
        row[0]
        for row in query(
            world.erp_url,
            "SELECT invoice_number FROM invoices WHERE invoice_date BETWEEN '2025-01-01' AND "
            "'2025-01-31' ORDER BY invoice_number LIMIT 2",
        )
    ]
    engine = create_engine(world.erp_url)
    with engine.begin() as connection:
        for invoice, day in ((spelled, "15/01/2025"), (number, 20250115)):
            connection.execute(
                sa.text("UPDATE invoices SET invoice_date = :day WHERE invoice_number = :n"),
                {"day": day, "n": invoice},
            )
    engine.dispose()
    finance = f"sqlite:///{world.home / 'finance.sqlite'}"
    with dg.instance_for_test() as instance:
        counts = materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        assert counts["rejected"] == 1
        (letter,) = state.list_dead_letters(FINANCE_INVOICES.name)
        assert letter.payload["invoice_number"] == number and "invoice_date" in letter.reason
        landed = "SELECT invoice_date FROM invoices WHERE invoice_number = :n"
        assert [str(day)[:10] for (day,) in query(finance, landed, n=spelled)] == ["2025-01-15"]
        again = materialize(FINANCE_INVOICES, instance, partition_key="2025-02-01")
        assert again["held"] == 1, "a day of February reads them too"


def change_invoices(erp_url: str, changes: dict[str, dict[str, object]]) -> None:
    """Edit invoices by number, now (their change cursor moves to the present)."""
    engine = create_engine(erp_url)
    with engine.begin() as connection:
        for number, values in changes.items():
            connection.execute(
                erp_schema.invoices.update()
                .where(erp_schema.invoices.c.invoice_number == number)
                .values(**values, updated_at=utcnow())
            )
    engine.dispose()


def test_an_invoice_changed_after_its_day_ran_is_synced_by_a_run_of_its_day(any_world):
    """A daily partition is synced once, by the schedule, when its day is over: an invoice paid
    or deleted a week later never reached finance. The changed-days sensor requests a run of
    each past day whose rows changed since it last looked, once per change."""
    sensor = defs.resolve_sensor_def(f"{FINANCE_INVOICES.name}_changed_days")
    finance = f"sqlite:///{any_world.home / 'finance.sqlite'}"

    def tick(instance, cursor):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources=resources(), definitions=defs
        )
        return sensor(context)

    with dg.instance_for_test() as instance:
        never = tick(instance, None)
        assert not never.run_requests and "never materialized" in never.skip_reason.skip_message
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        idle = tick(instance, None)
        assert not idle.run_requests, "nothing changed since the backfill"

        paid, paid_on = query(
            finance,
            "SELECT invoice_number, invoice_date FROM invoices WHERE status = 'open' "
            "ORDER BY invoice_number LIMIT 1",
        )[0]
        voided, voided_on = query(
            finance,
            "SELECT invoice_number, invoice_date FROM invoices WHERE invoice_date > :day "
            "ORDER BY invoice_number LIMIT 1",
            day=paid_on,
        )[0]
        change_invoices(
            any_world.erp_url,
            {
                paid: {"status": "paid"},
                voided: {"status": "void", "deleted_at": utcnow()},
            },
        )
        changed = tick(instance, idle.cursor)
        requests = sorted(changed.run_requests, key=lambda request: request.partition_key)
        assert [request.partition_key for request in requests] == [
            str(day)[:10] for day in (paid_on, voided_on)
        ]
        assert tick(instance, changed.cursor).skip_reason, "the same change requests no more"
        mistaken = json.dumps({"high_water_mark": "2099-01-01T00:00:00"})
        assert len(tick(instance, mistaken).run_requests) == 2, "a mark in 2099 is no mark"

        for request in requests:
            ran = run(
                FINANCE_INVOICES,
                instance,
                partition_key=request.partition_key,
                tags={**request.tags, "dagster/sensor_name": sensor.name},
            )
            assert ran.success
    assert query(finance, "SELECT status FROM invoices WHERE invoice_number = :n", n=paid) == [
        ("paid",)
    ]
    archived = "SELECT archived_at IS NOT NULL FROM invoices WHERE invoice_number = :n"
    assert query(finance, archived, n=voided) == [(1,)]


def test_an_invoice_dated_past_its_months_end_stops_no_sensor_tick(world, state):
    """SQLite's date() keeps '2025-02-30' as written: the changed-days sensor read it as a day,
    and failed on every tick ("day is out of range for month") while the change was in its
    lookback, requesting no changed day at all. Such a date is no day: the tick requests the
    others, and each day's run reads the invoice and dead-letters it."""
    sensor = defs.resolve_sensor_def(f"{FINANCE_INVOICES.name}_changed_days")
    context = functools.partial(dg.build_sensor_context, resources=resources(), definitions=defs)
    (impossible, changed, changed_on) = query(
        world.erp_url,
        "SELECT a.invoice_number, b.invoice_number, b.invoice_date FROM invoices a, invoices b "
        "WHERE a.invoice_date = '2025-01-10' AND b.invoice_date = '2025-01-20' LIMIT 1",
    )[0]
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        idle = sensor(context(instance=instance))
        change_invoices(world.erp_url, {impossible: {}, changed: {"status": "void"}})
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE invoices SET invoice_date = '2025-02-30' WHERE invoice_number = :n"
                ),
                {"n": impossible},
            )
        engine.dispose()
        ticked = sensor(context(instance=instance, cursor=idle.cursor))
        assert [request.partition_key for request in ticked.run_requests] == [str(changed_on)[:10]]
        counts = materialize(FINANCE_INVOICES, instance, partition_key="2025-01-20")
    assert counts["rejected"] == 1
    (letter,) = state.list_dead_letters(FINANCE_INVOICES.name)
    assert letter.payload["invoice_number"] == impossible and "invoice_date" in letter.reason


def test_a_mass_edit_is_requested_a_month_of_days_per_tick_the_most_recent_first(world):
    """A mass edit touching every invoice of half a year requested a run per day in one tick
    (three years of invoices: a thousand runs). A tick requests at most MAX_DAYS_PER_TICK days,
    the most recent first; the others wait in the cursor for the next ticks, each requested once,
    and a day changed meanwhile goes ahead of them."""
    sensor = defs.resolve_sensor_def(f"{FINANCE_INVOICES.name}_changed_days")
    engine = create_engine(world.erp_url)
    invoices, first_half = erp_schema.invoices, erp_schema.invoices.c.invoice_date < "2024-07-01"

    def days_of(*where) -> list[str]:
        with engine.connect() as connection:
            found = connection.execute(sa.select(invoices.c.invoice_date).where(*where)).scalars()
            return sorted({str(day)[:10] for day in found}, reverse=True)

    def mass_edit(*where) -> None:
        with engine.begin() as connection:
            connection.execute(invoices.update().where(*where).values(updated_at=utcnow()))

    with dg.instance_for_test() as instance:

        def ticks(cursor: str, meanwhile=None) -> tuple[list[list[str]], str]:
            """The days each tick requests, until one requests none, and the cursor then; the
            edit `meanwhile` is made after the first tick."""
            requested = []
            for _ in range(20):
                context = dg.build_sensor_context(
                    instance=instance, cursor=cursor, resources=resources(), definitions=defs
                )
                result = sensor(context)
                if not result.run_requests:
                    assert result.skip_reason
                    return requested, result.cursor
                requested.append([request.partition_key for request in result.run_requests])
                cursor = result.cursor
                if meanwhile and len(requested) == 1:
                    meanwhile()
            raise AssertionError(f"still requesting after 20 ticks: {requested}")

        cursor = json.dumps({"high_water_mark": utcnow().isoformat()})  # it looked just now
        mass_edit(first_half)
        edited = days_of(first_half)
        assert len(edited) > 2 * MAX_DAYS_PER_TICK, "the edit is more than two ticks' worth"
        requested, cursor = ticks(cursor)
        assert requested == [
            edited[start : start + MAX_DAYS_PER_TICK]
            for start in range(0, len(edited), MAX_DAYS_PER_TICK)
        ], "the most recent first, each day once, none lost"
        assert "waiting_days" not in json.loads(cursor)

        latest = days_of()[0]
        mass_edit(first_half)
        requested, cursor = ticks(cursor, lambda: mass_edit(invoices.c.invoice_date == latest))
        assert requested[0] == edited[:MAX_DAYS_PER_TICK]
        assert requested[1][0] == latest, "a day changed meanwhile goes ahead of those waiting"
        assert {day for days in requested for day in days} == {*edited, latest}
    engine.dispose()


def test_a_daily_partitioned_flow_is_not_stale_between_its_daily_runs(world, alert_receiver):
    """The daily-partitioned flows kept FlowSpec's default max_staleness of 3 hours: their
    freshness policy failed, and handoff_stale_flows alerted, every day between two daily runs.
    Both allow a day and 3 hours now."""
    day_and_some = timedelta(days=1, hours=3)
    graph = defs.resolve_asset_graph()
    for spec in (FINANCE_INVOICES, FINANCE_PAYMENTS, CHINOOK_INVOICES):
        policy = graph.get(asset_key(spec)).freshness_policy
        assert policy.fail_window.to_timedelta() == day_and_some
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources())
        stale_flow_sensor([FINANCE_INVOICES])(context)
    (alert,) = alert_receiver.received
    assert "never succeeded (allowed: 1 day, 3:00:00)" in alert["text"]


def test_finance_flows_are_daily_partitioned_and_wired():
    for key in (["finance", "invoices"], ["finance", "payments"], ["finance", "chinook_invoices"]):
        asset = defs.resolve_assets_def(dg.AssetKey(key))
        assert isinstance(asset.partitions_def, dg.DailyPartitionsDefinition)
        assert asset.backfill_policy == dg.BackfillPolicy.single_run()
    customers = defs.resolve_assets_def(dg.AssetKey(["finance", "chinook_customers"]))
    assert customers.required_resource_keys >= {"chinook", "finance", "state"}


def reconciled(spec, instance) -> dg.AssetCheckEvaluation:
    """The flow's reconciliation check, run as its daily schedule runs it."""
    key = asset_key(spec)
    result = dg.materialize(
        [flow_asset(spec), reconciliation_check(spec, key)],
        resources=resources(),
        instance=instance,
        selection=dg.AssetSelection.checks(dg.AssetCheckKey(key, "reconciliation")),
    )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_reconciliation_leaves_out_invoices_dated_on_days_no_partition_holds_yet(any_world):
    """The daily reconciliation compared the whole ERP with finance: an invoice dated today
    (its day is synced once it is over) or before the flow's first day was reported missing,
    one re-dated to today differing, and the check failed with ERROR every morning, asking for
    a repair. They are on neither side now; a January invoice lost from finance still is drift."""
    today, now = utcnow().date(), utcnow()
    erp = create_engine(any_world.erp_url)
    outside_january = "invoice_date NOT BETWEEN :first AND :last"
    with erp.begin() as connection:  # the ERP's invoices of January 2025 only: a quick backfill
        for table in ("payments", "invoices"):
            connection.execute(
                sa.text(
                    f"DELETE FROM {table} WHERE invoice_id IN "
                    f"(SELECT invoice_id FROM invoices WHERE {outside_january})"
                ),
                {"first": date(2025, 1, 1), "last": date(2025, 1, 31)},
            )
    with dg.instance_for_test() as instance:
        materialize(FINANCE_INVOICES, instance, tags=JANUARY)
        assert reconciled(FINANCE_INVOICES, instance).passed
        with erp.begin() as connection:
            for number, day in (
                ("INV-09999998", today),
                ("INV-09999999", date(2023, 12, 31)),
                ("INV-09999997", date(9999, 12, 31)),  # "valid forever": no partition either
                ("INV-09999996", date(1, 1, 1)),
            ):
                connection.execute(
                    sa.text(
                        "INSERT INTO invoices (invoice_id, invoice_number, order_id, customer_id, "
                        "invoice_date, due_date, amount, currency, status, created_at, updated_at) "
                        "SELECT :id, :number, order_id, customer_id, :day, :day, amount, currency, "
                        "'open', :now, :now FROM invoices ORDER BY invoice_id LIMIT 1"
                    ),
                    {"id": int(number[4:]), "number": number, "day": day, "now": now},
                )
            connection.execute(
                sa.text(
                    "UPDATE invoices SET invoice_date = :day, updated_at = :now "
                    "WHERE invoice_id = (SELECT max(invoice_id) FROM invoices WHERE invoice_id < 9000000)"
                ),
                {"day": today, "now": now},
            )
        evaluation = reconciled(FINANCE_INVOICES, instance)
        assert evaluation.passed, evaluation.description

        finance = create_engine(settings.finance_database_url())
        with finance.begin() as connection:
            gone = connection.execute(
                sa.text(
                    "DELETE FROM invoices "
                    "WHERE invoice_number = (SELECT min(invoice_number) FROM invoices)"
                )
            )
            assert gone.rowcount == 1
        finance.dispose()
        lost = reconciled(FINANCE_INVOICES, instance)
        assert not lost.passed and lost.metadata["missing"].value == 1
    erp.dispose()


def test_reconciliation_before_the_first_run_reports_every_payment_missing(world):
    """Before the embedded finance database had the flow's table (its first run creates it),
    the reconciliation check stopped on SQLAlchemy's NoSuchTableError. Nothing is synced yet:
    every payment is missing, and a repair sends them."""
    paid = query(world.erp_url, "SELECT count(*) FROM payments")[0][0]
    with dg.instance_for_test() as instance:
        first = reconciled(FINANCE_PAYMENTS, instance)
        assert not first.passed
        assert (first.metadata["missing"].value, first.metadata["destination_count"].value) == (
            paid,
            0,
        )
        assert "repair: true" in first.description


def test_reconciliation_of_a_table_the_dbas_have_not_made_says_what_to_do(world, finance_url):
    engine = create_engine(finance_url)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE payments"))
    engine.dispose()
    key = asset_key(FINANCE_PAYMENTS)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [flow_asset(FINANCE_PAYMENTS), reconciliation_check(FINANCE_PAYMENTS, key)],
            resources=resources(),
            instance=instance,
            selection=dg.AssetSelection.checks(dg.AssetCheckKey(key, "reconciliation")),
            raise_on_error=False,
        )
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    said = failure.step_failure_data.error.message
    assert "flow erp_payments_to_finance_payments" in said
    assert "no table 'payments'" in said and "What to do" in said
