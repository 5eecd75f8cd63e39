"""Arbitrary rows through extract → validate → load: no crash, every bad row in the DLQ with a
reason, every good row synced.

The source table is SQLite without declared types or constraints, so it holds what a broken
system of record can: wrong types, huge strings, unicode, NULs, missing keys, repeated keys.
Good rows are planted among the junk with keys and emails no junk row can produce.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assets.crm_contacts import CRM_CONTACTS
from integrations.crm.client import CrmClient
from integrations.crm.destination import CrmObjects
from integrations.crm.sandbox import SandboxServer
from integrations.engine.spec import ErrorBudget
from integrations.engine.state import StateStore
from integrations.engine.sync import Sync
from integrations.erp.schema import customers
from integrations.http import ApiLimits
from integrations.sql.connect import create_engine
from integrations.sql.source import SqlSource
from tests.conftest import DLQ_KEY

COLUMNS = tuple(customers.c.keys())  # the ERP's columns, without their types
# Judge routing, not the budget: a fuzzed batch is mostly junk on purpose.
SPEC = dataclasses.replace(
    CRM_CONTACTS, batch_size=16, error_budget=ErrorBudget(max_share=1.0), archive_deleted=False
)
START = datetime(2026, 1, 1)

junk_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
) | st.sampled_from(["", " ", "\x00", "x" * 70_000, "Zoë 🚀", "NULL", "None", "' OR 1=1 --"])
junk_value = st.none() | st.integers(-(2**63), 2**63 - 1) | st.floats() | junk_text | st.booleans()
junk_key = (
    st.none()
    | st.integers(1, 40)  # small: repeats within a batch are likely
    | junk_text.filter(lambda text: not text.strip().isdigit())
    | st.just("9" * 300)
)


@st.composite
def junk_row(draw) -> dict[str, object]:
    row = {name: draw(junk_value) for name in COLUMNS}
    row["customer_id"] = draw(junk_key)
    row["email"] = draw(junk_value | st.just("dup@example.com"))
    row["deleted_at"] = None  # like the cursor, bookkeeping the engine relies on
    return row


@st.composite
def good_row(draw, number: int) -> dict[str, object]:
    return {
        "customer_id": 100_000 + number,
        "customer_number": f"C{100_000 + number:07d}",
        "first_name": draw(st.sampled_from(["Ana", "Zoë", "李", "O'Neil"])),
        "last_name": draw(st.sampled_from(["Ito", "Müller", "N'Dour"])),
        "email": f"good{number}@planted.example",
        "phone": draw(st.none() | st.just("+44 20 7946 0000")),
        "company_name": None,
        "city": draw(st.none() | st.just("Lyon")),
        "country": "FR",
        "organisation_id": None,
        "created_at": START.isoformat(sep=" "),
        "deleted_at": None,
    }


@st.composite
def source_rows(draw) -> tuple[list[dict[str, object]], set[str]]:
    good = [draw(good_row(i)) for i in range(draw(st.integers(0, 12)))]
    junk = draw(st.lists(junk_row(), max_size=30))
    rows = draw(st.permutations(good + junk))
    for position, row in enumerate(rows):  # the cursor column is the source's own bookkeeping
        row["updated_at"] = (START + timedelta(seconds=position)).isoformat(sep=" ")
    return rows, {str(row["customer_id"]) for row in good}


def usable(key: object) -> bool:
    """What the engine can key a record by: present, printable, at most 200 characters."""
    text = "" if key is None else str(key)
    return bool(text.strip()) and len(text) <= 200 and all(ord(c) >= 32 for c in text)


def load_source(path: Path, rows: list[dict[str, object]]) -> str:
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE TABLE customers ({', '.join(COLUMNS)})")
        if rows:
            connection.execute(
                sa.text(
                    f"INSERT INTO customers VALUES ({', '.join(':' + name for name in COLUMNS)})"
                ),
                rows,
            )
    engine.dispose()
    return url


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source_rows())
def test_every_row_lands_or_is_dead_lettered_with_a_reason(example):
    rows, good_keys = example
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sandbox = SandboxServer(folder / "crm.sqlite", token)
        sandbox.start_in_thread()
        erp = create_engine(load_source(folder / "erp.sqlite", rows))
        state = StateStore(f"sqlite:///{folder / 'state.sqlite'}", dlq_key=DLQ_KEY)
        client = CrmClient(sandbox.base_url, token, ApiLimits(retries=1, backoff=0.01))
        try:
            result = Sync(
                SPEC,
                SqlSource(erp, SPEC.source),
                CrmObjects.for_target(client, SPEC.target),
                state,
                run_id="fuzz",
                actor="hypothesis",
                why="test",
            ).run()

            letters = state.list_dead_letters(flow=SPEC.name, limit=None)
            synced = set(state.ledger_entries(SPEC.name, list(good_keys)))
            with state.engine.connect() as connection:
                ledger = set(connection.execute(sa.text("SELECT record_key FROM ledger")).scalars())
            assert result.counts["read"] == len(rows)
            assert synced == good_keys, "every planted good row is synced"
            assert all(letter.reason and letter.reason_kind for letter in letters)
            # Every row is accounted for: its key is synced or dead-lettered (a key repeated
            # across batches is one record: its latest row counts), and each row without a
            # usable key has a dead letter of its own.
            lettered = {letter.record_key for letter in letters}
            keyed = {str(row["customer_id"]) for row in rows if usable(row["customer_id"])}
            assert keyed <= ledger | lettered
            unkeyed = [row for row in rows if not usable(row["customer_id"])]
            assert len([k for k in lettered if k.startswith("!unkeyed:")]) == len(unkeyed)
            crm = {
                c["properties"]["erp_customer_id"]
                for c in client.list_objects("contacts", ["erp_customer_id"])
            }
            assert len(crm) == len(ledger), "the CRM holds exactly what the ledger says"
        finally:
            client.close()
            state.dispose()
            erp.dispose()
            sandbox.shutdown()
            sandbox.server_close()
