"""The engine without Dagster: budgets, bisection, watermarks, DLQ resolution, the audit trail."""

from __future__ import annotations

import logging
import re

import pytest
import sqlalchemy as sa

from assets.crm_contacts import CRM_CONTACTS
from integrations.cli import main
from integrations.engine.errors import ErrorBudgetExceeded
from integrations.erp.changes import move_customers, soft_delete_customers
from integrations.sql.source import SourceSchemaError, SqlSource
from tests.contacts import sync


def test_counts_add_up_and_progress_is_logged_per_batch(world, erp, crm_client, state, caplog):
    with caplog.at_level(logging.INFO):
        result = sync(erp, crm_client, state, log=logging.getLogger("test"))
    c = result.counts
    assert c["read"] == 3000 and result.batches == 3
    assert c["skipped"] == deleted_never_synced(erp) and c["unchanged"] == 0, "a first sync"
    assert c["valid"] == c["inserted"] + c["updated"] + (c["rejected"] - contract_rejections(state))
    assert c["inserted"] == len(list(crm_client.list_objects("contacts")))
    progress = [r.getMessage() for r in caplog.records if "committed" in r.getMessage()]
    assert len(progress) == 3 and all("rows/s" in line for line in progress)
    assert result.watermark_after is not None
    with erp.connect() as connection:
        newest = connection.execute(
            sa.text(
                "SELECT updated_at, customer_id FROM customers ORDER BY updated_at DESC, customer_id DESC"
            )
        ).first()
    assert result.watermark_after.key == newest.customer_id


def test_dead_letters_are_summed_up_once_per_batch_and_kept_whole_in_the_dlq(
    world, erp, crm_client, state, caplog
):
    with caplog.at_level(logging.INFO):
        result = sync(erp, crm_client, state, log=logging.getLogger("test"))
    lines = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert 0 < len(lines) <= result.batches, "one summary per batch, not a line per letter"
    letters = state.list_dead_letters(limit=10_000)
    assert len(letters) == result.counts["rejected"], "the DLQ holds every letter"
    logged = sum(int(re.search(r": (\d+) dead-lettered in this batch", line)[1]) for line in lines)
    assert logged == result.counts["rejected"]
    for line in lines:
        # Counts per kind, a few keys each (the first of that kind), and where the rest are.
        for count, examples in re.findall(r"contract (\d+) \(e\.g\. ([^)]*)\)", line):
            assert 1 <= len(examples.split(", ")) <= min(3, int(count))
        assert "handoff dlq list --flow erp_customers_to_crm_contacts" in line
        assert not any(letter.reason in line for letter in letters), "reasons are in the DLQ"


def deleted_never_synced(erp) -> int:
    with erp.connect() as connection:
        return connection.execute(
            sa.text("SELECT count(*) FROM customers WHERE deleted_at IS NOT NULL")
        ).scalar()


def contract_rejections(state) -> int:
    return sum(letter.reason_kind == "contract" for letter in state.list_dead_letters(limit=10_000))


def test_a_refused_record_is_isolated_by_bisection(world, erp, crm_client, state):
    with erp.connect() as connection:
        number, email = connection.execute(
            sa.text(
                "SELECT customer_number, email FROM customers WHERE deleted_at IS NULL AND country IS NOT NULL "
                "AND email LIKE '%@example.com' ORDER BY updated_at LIMIT 1 OFFSET 10"
            )
        ).one()
    # Someone else already holds this email in the CRM: the sandbox answers 409 for its batch.
    crm_client.batch_upsert(
        "contacts", "erp_customer_id", [{"id": "X0000001", "properties": {"email": email}}]
    )
    result = sync(erp, crm_client, state)
    refused = [
        d for d in state.list_dead_letters(limit=10_000) if d.reason_kind == "destination-rejected"
    ]
    mine = [d for d in refused if d.payload["customer_number"] == number]
    assert (
        len(mine) == 1 and "409 CONFLICT" in mine[0].reason and "already belongs" in mine[0].reason
    )
    contacts = {
        c["properties"]["erp_customer_id"]
        for c in crm_client.list_objects("contacts", ["erp_customer_id"])
    }
    assert number not in contacts and len(contacts) == result.counts["inserted"] + 1


def test_the_error_budget_stops_a_mostly_bad_sync_before_it_loads(world, erp, crm_client, state):
    with erp.begin() as connection:
        connection.execute(
            sa.text("UPDATE customers SET email = 'broken' WHERE customer_id % 3 = 0")
        )
    with pytest.raises(ErrorBudgetExceeded) as caught:
        sync(erp, crm_client, state)
    message = str(caught.value)
    assert "erp_customers_to_crm_contacts" in message and "error budget of 10%" in message
    assert (
        "handoff dlq list --flow erp_customers_to_crm_contacts" in message
        and "broken" not in message
    )
    assert list(crm_client.list_objects("contacts")) == [], (
        "nothing of the failing batch was loaded"
    )
    assert state.watermark(CRM_CONTACTS.name) is None
    assert state.count_open_dead_letters(CRM_CONTACTS.name) > 300, "the rejected rows are kept"


def test_a_fixed_source_row_leaves_the_dlq_when_it_lands(world, erp, crm_client, state):
    sync(erp, crm_client, state)
    letter = next(
        d for d in state.list_dead_letters(limit=10_000) if "email is not a valid" in d.reason
    )
    again = sync(erp, crm_client, state, run_id="run-2", full=True)
    assert again.counts["held"] >= 1 and again.written == 0, "unchanged bad rows are not re-judged"
    with erp.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE customers SET email = :email, updated_at = CURRENT_TIMESTAMP WHERE customer_id = :id"
            ),
            {"email": f"fixed.{letter.record_key}@example.com", "id": int(letter.record_key)},
        )
    move_customers(erp, [int(letter.record_key)])
    fixed = sync(erp, crm_client, state, run_id="run-3")
    assert fixed.counts["inserted"] == 1
    assert state.get_dead_letter(letter.id).resolved_at is not None


def test_the_audit_trail_is_append_only(world, erp, crm_client, state):
    sync(erp, crm_client, state)
    entries = state.audit_entries(CRM_CONTACTS.name)
    assert [e["action"] for e in entries] == ["sync_batch"] * 3
    assert entries[0]["actor"] == "test" and entries[0]["why"] == "manual"
    for statement in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"):
        with (
            pytest.raises(sa.exc.DatabaseError, match="append-only"),
            state.engine.begin() as connection,
        ):
            connection.execute(sa.text(statement))


def test_configured_identifiers_are_checked_against_the_schema(erp):
    from integrations.engine.spec import SourceTable

    with pytest.raises(SourceSchemaError, match="no column"):
        SqlSource(erp, SourceTable("customers", key="customer_id; DROP TABLE customers"))
    with pytest.raises(SourceSchemaError, match="not in the source"):
        SqlSource(erp, SourceTable("clients", key="id"))


def test_dlq_cli_lists_and_shows_with_masked_pii(world, erp, crm_client, state, capsys):
    sync(erp, crm_client, state)
    assert main(["dlq", "list", "--limit", "20"]) == 0
    assert "(showing the first 20 that match" in capsys.readouterr().out
    kinds = {letter.reason_kind for letter in state.list_dead_letters(limit=None)}
    assert main(["dlq", "list", "--kind", "contract", "--limit", "10000"]) == 0
    assert "showing" not in capsys.readouterr().out, "all that match are shown"
    assert "contract" in kinds
    assert main(["dlq", "list", "--limit", "10000"]) == 0
    listing = capsys.readouterr().out
    letters = state.list_dead_letters(limit=10_000)
    assert len(listing.strip().splitlines()) == len(letters) + 1
    raw_emails = [
        d.payload["email"] for d in letters if d.payload.get("email") and "@" in d.payload["email"]
    ]
    assert raw_emails and not any(email in listing for email in raw_emails)
    assert main(["dlq", "show", str(letters[0].id)]) == 0
    shown = capsys.readouterr().out
    assert letters[0].reason in shown and letters[0].payload["last_name"] not in shown
    assert main(["dlq", "show", "999999"]) == 1


def test_an_email_clash_across_batches_is_caught_before_the_crm_and_freed_by_archiving(
    world, erp, crm_client, state
):
    first = sync(erp, crm_client, state)
    clashes = [
        d for d in state.list_dead_letters(limit=10_000) if "already used by record" in d.reason
    ]
    assert clashes, "the seed has case duplicates in different batches"
    assert not [
        d for d in state.list_dead_letters(limit=10_000) if d.reason_kind == "destination-rejected"
    ]
    assert world.crm.store.stats()["upsert_inputs"] == first.written, (
        "nothing was refused by the CRM"
    )

    loser = clashes[0]
    holder = loser.reason.split("already used by record ")[1].split(" ")[0]
    soft_delete_customers(erp, [int(holder)])
    move_customers(erp, [int(loser.record_key)])
    after = sync(erp, crm_client, state, run_id="run-2")
    assert (after.counts["archived"], after.counts["inserted"]) == (1, 1)
    assert state.get_dead_letter(loser.id).resolved_at is not None
