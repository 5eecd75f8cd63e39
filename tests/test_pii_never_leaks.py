"""After a demo's worth of runs over PII-bearing data, no seeded email or phone number, and no
secret (the CRM token, the DLQ key), is in clear text in the logs, the Dagster event log and
compute logs, the audit trail or the DLQ."""

from __future__ import annotations

import logging
import os
import traceback
import zlib
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.crm_companies import CRM_COMPANIES
from assets.crm_contacts import CRM_CONTACTS
from assets.crm_deals import CRM_DEALS
from assets.factory import flow_asset
from definitions import resources
from integrations.cli import main
from integrations.engine.destination import DestinationMismatch, OutboundRecord
from integrations.engine.errors import SyncError
from integrations.engine.source import SourceReadFailed
from integrations.engine.spec import SourceTable
from integrations.erp.changes import live_customer_ids, move_customers, soft_delete_customers
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource
from tests.test_sql_cursors import syncing
from tests.test_sql_destination import LINES, create, ledger_columns


def seeded_pii(erp_url: str) -> set[str]:
    engine = create_engine(erp_url)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT email, phone FROM customers")).all()
    engine.dispose()
    values = set()
    for email, phone in rows:
        values |= {email, email.strip().lower()} if email else set()
        values |= {phone} if phone else set()
    return {value for value in values if len(value) >= 6}


def leaks(text: str, secrets: set[str]) -> list[str]:
    return sorted(value for value in secrets if value in text)


def test_no_seeded_email_or_phone_in_logs_events_audit_or_dlq(
    world, tmp_path, caplog, capfd, crm_client
):
    caplog.set_level(logging.DEBUG)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    erp = create_engine(world.erp_url)
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        contacts, companies, deals = (
            flow_asset(spec) for spec in (CRM_CONTACTS, CRM_COMPANIES, CRM_DEALS)
        )
        for asset in (companies, contacts):
            assert dg.materialize([asset], resources=resources(), instance=instance).success
        with erp.connect() as connection:
            day = connection.execute(
                sa.text("SELECT max(invoice_date) FROM invoices WHERE status = 'paid'")
            ).scalar_one()
        day = str(day)[:10]
        assert dg.materialize(
            [deals], resources=resources(), instance=instance, partition_key=day
        ).success
        ids = live_customer_ids(erp)
        move_customers(erp, ids[:40])
        soft_delete_customers(erp, ids[40:45])
        assert dg.materialize([contacts], resources=resources(), instance=instance).success
        main(["dlq", "list", "--limit", "10000"])
        main(["dlq", "replay", "--flow", "erp_customers_to_crm_contacts"])
        main(["audit", "show", "--key", str(ids[0])])

    pii = seeded_pii(world.erp_url) | {world.token, os.environ["HANDOFF_DLQ_KEY"]}
    assert len(pii) > 3000, "the scan looks for thousands of real values, and the secrets"
    # The control: the CRM (the destination) does hold them, and the scan finds them there.
    crm_file = (tmp_path / "crm_sandbox.sqlite").read_bytes().decode("latin-1")
    assert len(leaks(crm_file, pii)) > 1000

    out, err = capfd.readouterr()
    assert not leaks(caplog.text + out + err, pii), "PII in the logs or the CLI's output"

    scanned = 0
    for path in [*Path(dagster_home).rglob("*"), tmp_path / "state.sqlite"]:
        if path.is_file():
            text = path.read_bytes().decode("latin-1")
            assert not leaks(text, pii), f"PII in clear text in {path}"
            scanned += 1
    assert scanned >= 3, "the event log, compute logs and the state database were scanned"

    state = create_engine(world.state_url)
    with state.connect() as connection:
        for table in ("audit_log", "audit_keys", "dead_letters"):
            rows = connection.execute(sa.text(f"SELECT * FROM {table}")).all()
            assert rows, f"{table} has entries to scan"
            assert not leaks(repr(rows), pii), f"PII in clear text in {table}"
        # The audit records themselves, which the scan of the file cannot see compressed.
        bodies = connection.execute(sa.text("SELECT records FROM audit_bodies")).scalars().all()
        records = "".join(zlib.decompress(body).decode() for body in bodies)
        assert records.count("\x1finsert\x1f") > 1000, "the records of every write were scanned"
        assert not leaks(records, pii), "PII in clear text in the audit records"
    state.dispose()
    erp.dispose()


PERSON = "jane.doe@example.com"


def told(error: BaseException) -> str:
    """All an error says where it is logged (Dagster's event log keeps the same): its text and
    that of every error it was raised from."""
    return "".join(traceback.format_exception(error))


def test_a_statement_failing_mid_run_repeats_none_of_its_parameters(sql_database, caplog):
    """SQLAlchemy's errors quote the statement's parameters ("[parameters: ('jane…',)]"): the
    keys a repair reads rows by, the records a write sends. A table changed under the run fails
    a read and a write; neither error, nor any it was raised from, nor the logs, holds them."""
    caplog.set_level(logging.DEBUG)
    engine = create_engine(sql_database())
    subscribers = sa.Table(
        "subscribers",
        sa.MetaData(),
        sa.Column("email", sa.String(80), primary_key=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    subscribers.create(engine)
    source = SqlSource(engine, SourceTable(table="subscribers", key="email", deleted=None))
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE subscribers RENAME TO unsubscribed")
    with pytest.raises(SourceReadFailed) as read:
        list(source.rows_with_keys([PERSON], 10))
    assert "subscribers" in told(read.value), "the error still names what failed"

    create(engine, *ledger_columns())
    table = SqlTable(engine, LINES.target)
    table.prepare(LINES)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE ledger_lines DROP COLUMN amount")
    line = {"line_number": "L1", "amount": 1.0, "booked_on": "2025-01-02", "memo": PERSON}
    with pytest.raises(DestinationMismatch) as written:
        table.upsert([OutboundRecord(key="1", properties=line, trace_id="1")])

    for error in (read.value, written.value):
        assert PERSON not in told(error)
    assert PERSON not in caplog.text
    engine.dispose()


@pytest.mark.postgres
def test_a_row_a_source_view_fails_on_stops_the_run_without_its_value(
    postgres_database, own_state, caplog
):
    """A view casting a legacy text column fails mid-read on one row's value (an email where a
    number belongs): SQLAlchemy's error, which the run failed with as it was, quoted the value
    ('invalid input syntax for type double precision: "jane…"'), named no flow and said nothing
    of what to do."""
    caplog.set_level(logging.DEBUG)
    engine = create_engine(postgres_database())
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE raw_lines (id int PRIMARY KEY, line_number text, amount_text text, "
            "booked_on date, memo text, updated_at timestamp, deleted_at timestamp)"
        )
        connection.exec_driver_sql(
            "INSERT INTO raw_lines SELECT n, 'L' || n, CASE n WHEN 4 THEN %s ELSE n::text END, "
            "'2025-01-02', 'x', '2025-01-01'::timestamp + n * interval '1 hour', NULL "
            "FROM generate_series(1, 5) AS n",
            (PERSON,),
        )
        connection.exec_driver_sql(
            "CREATE VIEW source_lines AS SELECT id, line_number, amount_text::float8 AS amount, "
            "booked_on, memo, updated_at, deleted_at FROM raw_lines"
        )
    with syncing(engine, own_state) as sync, pytest.raises(SyncError) as stopped:
        sync.run()
    said = told(stopped.value)
    assert PERSON not in said and PERSON not in caplog.text
    # The server's complaint (read through Arrow, the failed stream gives no condition name)
    assert str(stopped.value).startswith(
        "flow test_dated_lines: the source database refused a read of source_lines: "
    )
    assert "invalid input syntax for type double precision" in str(stopped.value)
    assert "What to do: a rerun alone will not cure it" in str(stopped.value)
    engine.dispose()
