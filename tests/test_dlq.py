"""The dead-letter queue end to end: filters, encryption at rest, replay, discard, the record's story."""

from __future__ import annotations

import json
import socket
import threading
import time

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.chinook import CHINOOK_CUSTOMERS
from assets.crm_contacts import CRM_CONTACTS
from assets.factory import flow_asset
from definitions import resources
from integrations.cli import main
from integrations.engine import state as state_module
from integrations.engine.state import BatchCommit, DeadLetter, LedgerEntry, StateStore
from integrations.sql.connect import create_engine
from tests.conftest import DLQ_KEY
from tests.contacts import sync

FLOW = CRM_CONTACTS.name


def bad_email_letter(state):
    return next(
        letter
        for letter in state.list_dead_letters(flow=FLOW, limit=None)
        if letter.reason.endswith("email is not a valid email address")
    )


def fix_email_quietly(erp, customer_id: str, email: str) -> None:
    """A fix made by hand in the ERP, without touching `updated_at`: no incremental run sees it."""
    with erp.begin() as connection:
        connection.execute(
            sa.text("UPDATE customers SET email = :email WHERE customer_id = :id"),
            {"email": email, "id": int(customer_id)},
        )


def test_a_record_fixed_at_the_source_is_replayed_once(world, erp, crm_client, state, capsys):
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    fix_email_quietly(erp, letter.record_key, f"fixed.{letter.record_key}@example.com")
    assert sync(erp, crm_client, state, run_id="run-2").written == 0, "nothing changed by date"

    sent = world.crm.store.stats()["upsert_inputs"]
    assert main(["dlq", "replay", "--id", str(letter.id)]) == 0
    out = capsys.readouterr().out
    assert "1 written, 1 left the DLQ, 0 still failing" in out
    assert world.crm.store.stats()["upsert_inputs"] == sent + 1
    replayed = state.get_dead_letter(letter.id)
    assert replayed.resolved_at is not None and replayed.resolution == "replayed"
    found = crm_client.batch_read_ids(
        "contacts", "email", [f"fixed.{letter.record_key}@example.com"]
    )
    assert len(found) == 1

    # Twice: the letter is closed, and even asked for by key nothing is written again.
    assert main(["dlq", "replay", "--id", str(letter.id)]) == 0
    assert "nothing to replay" in capsys.readouterr().out
    assert world.crm.store.stats()["upsert_inputs"] == sent + 1
    assert sync(erp, crm_client, state, run_id="run-3").written == 0

    story = state.record_history(letter.record_key, flow=FLOW)
    assert [entry["action"] for entry in story] == ["dead-letter", "replay"]
    assert story[1]["trigger"] == "replay" and "dlq replay" in story[1]["actor"]
    assert story[1]["diff"]["email"] == "f***@e***.com", "PII is masked in the trail"
    assert state.verify_audit().intact


def test_a_record_still_bad_stays_in_the_dlq_with_one_more_attempt(
    world, erp, crm_client, state, capsys
):
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    assert main(["dlq", "replay", "--id", str(letter.id)]) == 1
    assert "0 left the DLQ, 1 still failing" in capsys.readouterr().out
    again = state.get_dead_letter(letter.id)
    assert again.resolved_at is None and again.attempts == 2
    assert again.reason == letter.reason


def test_a_record_gone_from_the_source_leaves_the_dlq_and_is_not_brought_back(
    world, erp, crm_client, state, capsys
):
    """The CRM refused a record (its email was taken there); the ERP row has since been purged.
    Replay wrote the stored payload, bringing a deleted customer back to the CRM. The letter now
    closes as `gone`, audited, and nothing is written."""
    with erp.connect() as connection:
        key, email = connection.execute(
            sa.text(
                "SELECT customer_id, email FROM customers WHERE deleted_at IS NULL "
                "AND country IS NOT NULL AND email LIKE '%@example.com' ORDER BY customer_id "
                "LIMIT 1 OFFSET 5"
            )
        ).one()
    (blocker,) = crm_client.batch_upsert(
        "contacts", "erp_customer_id", [{"id": "X0000001", "properties": {"email": email}}]
    ).results
    sync(erp, crm_client, state)
    (letter,) = state.list_dead_letters(flow=FLOW, keys=[str(key)])
    assert letter.reason_kind == "destination-rejected"
    assert email not in letter.reason, "the API's message is kept with the email masked"
    with erp.begin() as connection:
        connection.execute(sa.text("DELETE FROM customers WHERE customer_id = :id"), {"id": key})
    crm_client.batch_archive("contacts", [blocker["id"]])

    assert main(["dlq", "replay", "--key", str(key)]) == 0
    assert "1 left the DLQ" in capsys.readouterr().out
    assert not crm_client.batch_read_ids("contacts", "email", [email.lower()])
    closed = state.get_dead_letter(letter.id)
    assert closed.resolved_at is not None and closed.resolution == "gone"
    story = [record["action"] for record in state.record_history(str(key), FLOW)]
    assert story[-1] == "replay"


def test_a_letter_discarded_while_its_replay_waited_for_the_flow_is_not_sent(
    world, erp, crm_client, state, capsys
):
    """`handoff dlq replay` chose its letters, then waited for the flow a run held; a letter
    discarded meanwhile was sent all the same (a record someone chose not to sync, in the CRM)."""
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    fixed = f"fixed.{letter.record_key}@example.com"
    fix_email_quietly(erp, letter.record_key, fixed)
    sent = world.crm.store.stats()["upsert_inputs"]
    said: list[int] = []
    with state.flow_lock(FLOW, wait=5):  # a run of the flow under way
        replay = threading.Thread(target=lambda: said.append(main(["dlq", "replay"])))
        replay.start()
        time.sleep(3)  # the replay has chosen its letters and waits for the flow
        assert main(["dlq", "discard", "--id", str(letter.id), "--reason", "customer left"]) == 0
    replay.join(timeout=120)
    assert not replay.is_alive() and said
    assert world.crm.store.stats()["upsert_inputs"] == sent, "nothing sent"
    assert not crm_client.batch_read_ids("contacts", "email", [fixed])
    assert state.get_dead_letter(letter.id).resolution == "discarded"


def test_discard_closes_letters_with_an_audited_reason(world, erp, crm_client, state, capsys):
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    with pytest.raises(SystemExit):  # a discard without a reason is refused
        main(["dlq", "discard", "--id", str(letter.id)])
    capsys.readouterr()
    assert main(["dlq", "discard", "--id", str(letter.id), "--reason", "customer left"]) == 0
    assert "discarded 1 dead letters" in capsys.readouterr().out
    assert state.get_dead_letter(letter.id).resolution == "discarded"
    assert main(["audit", "show", "--key", letter.record_key, "--json"]) == 0
    story = json.loads(capsys.readouterr().out)
    discard = story["history"][-1]
    assert discard["action"] == "discard" and discard["trigger"] == "customer left"
    assert story["dead_letters"][0]["resolution"] == "discarded"
    assert state.verify_audit().intact
    # The discard sticks: a run that reads the record again as it was opens no new letter (it
    # did, counted against the error budget, and the age alert fired again).
    again = sync(erp, crm_client, state, "run-2", full=True)
    assert letter.record_key not in {d.record_key for d in state.list_dead_letters(limit=None)}
    assert again.counts["held"] >= 1


def test_list_all_tells_open_letters_from_closed_ones(world, erp, crm_client, state, capsys):
    """`dlq list --all` showed open and closed letters alike, in the table and in --json: no
    resolution, no time it closed."""
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    state.discard_dead_letters([letter], actor="ops", why="customer left", run_id="d")

    assert main(["dlq", "list", "--all", "--json", "--limit", "10000"]) == 0
    listed = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    closed = listed.pop(letter.id)
    assert closed["resolution"] == "discarded"
    assert closed["resolved_at"] == state.get_dead_letter(letter.id).resolved_at.isoformat(
        timespec="seconds"
    )
    assert listed and all(
        row["resolution"] is row["resolved_at"] is None for row in listed.values()
    )

    assert main(["dlq", "list", "--all", "--key", letter.record_key]) == 0
    table = capsys.readouterr().out
    assert f"discarded {closed['resolved_at']}" in table
    assert main(["dlq", "list", "--all", "--id", str(next(iter(listed)))]) == 0
    assert "  open  " in capsys.readouterr().out


def test_filters_by_kind_and_age(world, erp, crm_client, state, capsys):
    sync(erp, crm_client, state)
    assert main(["dlq", "list", "--kind", "contract", "--json", "--limit", "10000"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed and {row["kind"] for row in listed} == {"contract"}
    assert main(["dlq", "list", "--kind", "destination-rejected"]) == 0
    assert "no dead letters match" in capsys.readouterr().out
    assert main(["dlq", "list", "--older-than", "1h"]) == 0
    assert "no dead letters match" in capsys.readouterr().out


def test_a_flow_is_named_by_its_name_or_its_assets_key(world, erp, crm_client, state, capsys):
    """The UI shows asset keys, the CLI took flow names only: `--flow crm/contacts` matched
    nothing, and said so as if the flow had no letters."""
    sync(erp, crm_client, state)
    assert main(["dlq", "list", "--flow", "crm/contacts", "--json", "--limit", "10000"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed and {row["flow"] for row in listed} == {FLOW}
    assert main(["dlq", "list", "--flow", "crm/nothing"]) == 0
    said = capsys.readouterr().out
    assert "no dead letters match in crm/nothing (no flow is named so; the flows: " in said
    assert FLOW in said


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_a_limit_below_one_is_refused_saying_so(world, state, capsys, limit):
    """`--limit 0` said "no dead letters match" with letters open; a negative limit listed some
    of them on SQLite, and failed with a traceback of SQL on PostgreSQL."""
    letter = DeadLetter(FLOW, "1", "contract", "erp.customer@v1: planted", {})
    state.commit_batch(BatchCommit(FLOW, "run", dead_letters=[letter]))
    with pytest.raises(SystemExit) as refused:
        main(["dlq", "list", "--limit", limit])
    assert refused.value.code == 2
    assert f"--limit: {limit} is not a whole number, 1 or more" in capsys.readouterr().err
    assert main(["dlq", "list", "--limit", "1"]) == 0
    assert "erp.customer@v1: planted" in capsys.readouterr().out


def test_payloads_are_encrypted_at_rest_and_shown_masked(world, erp, crm_client, state, capsys):
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    with state.engine.connect() as connection:
        raw = connection.execute(
            sa.text("SELECT payload FROM dead_letters WHERE id = :id"), {"id": letter.id}
        ).scalar_one()
    assert letter.payload["email"] not in raw and letter.payload["last_name"] not in raw
    assert raw.startswith("gAAAA"), "a Fernet token"
    assert StateStore(world.state_url).get_dead_letter(letter.id).payload is None
    assert main(["dlq", "show", str(letter.id)]) == 0
    shown = capsys.readouterr().out
    assert letter.payload["last_name"] not in shown and letter.correlation_id in shown


def test_replay_through_dagster_run_config(world, erp, crm_client, state):
    with dg.instance_for_test() as instance:
        asset = flow_asset(CRM_CONTACTS)
        assert dg.materialize([asset], resources=resources(), instance=instance).success
        store = state
        letter = bad_email_letter(store)
        fix_email_quietly(erp, letter.record_key, f"fixed.{letter.record_key}@example.com")
        replay = dg.materialize(
            [asset],
            resources=resources(),
            instance=instance,
            run_config={"ops": {"crm__contacts": {"config": {"replay": True}}}},
        )
        assert replay.success
        (event,) = replay.get_asset_materialization_events()
        metadata = event.materialization.metadata
        assert metadata["inserted"].value == 1
        assert metadata["dead_letters_open"].value == store.count_open_dead_letters(FLOW)
        assert store.get_dead_letter(letter.id).resolution == "replayed"


def set_chinook_email(chinook_url: str, customer_id: int, email: str) -> None:
    engine = create_engine(chinook_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text('UPDATE "Customer" SET "Email" = :email WHERE "CustomerId" = :id'),
            {"email": email, "id": customer_id},
        )
    engine.dispose()


def finance_email(world, customer_id: int) -> str:
    """The email the finance database holds for a Chinook customer."""
    finance = create_engine(f"sqlite:///{world.home / 'finance.sqlite'}")
    with finance.connect() as connection:
        email = connection.execute(
            sa.text("SELECT email FROM chinook_customers WHERE customer_id = :id"),
            {"id": customer_id},
        ).scalar_one()
    finance.dispose()
    return email


def chinook_letter_fixed_at_the_source(chinook_url: str, state: StateStore) -> DeadLetter:
    """Chinook's customer 4 refused into the embedded finance database, then fixed in Chinook."""
    set_chinook_email(chinook_url, 4, "not-an-address")
    with dg.instance_for_test() as instance:
        run = dg.materialize(
            [flow_asset(CHINOOK_CUSTOMERS)], resources=resources(), instance=instance
        )
        assert run.success
    (letter,) = state.list_dead_letters(CHINOOK_CUSTOMERS.name)
    set_chinook_email(chinook_url, 4, "bjorn@example.no")
    return letter


CHINOOK_CUSTOMER_ONE = {  # where Luís Gonçalves lives, and his fax: PII Chinook leaves undeclared
    "Address": "Av. Brigadeiro Faria Lima, 2170",
    "PostalCode": "12227-000",
    "Fax": "+55 (12) 3923-5566",
    "State": "SP",
}


def test_chinook_addresses_and_undeclared_columns_are_masked(world, state, chinook_copy, capsys):
    """Chinook's customer contract left Address, PostalCode, Fax and State undeclared: `dlq
    show` and the contract check's samples printed them in clear. They are PII now, and `dlq
    show` and the samples mask any column a flow with PII does not declare (here SupportRepId:
    the samples showed it in clear)."""
    set_chinook_email(chinook_copy, 1, "luis at embraer")
    with dg.instance_for_test() as instance:
        run = dg.materialize(
            [flow_asset(CHINOOK_CUSTOMERS)], resources=resources(), instance=instance
        )
    (check,) = [c for c in run.get_asset_check_evaluations() if c.check_name == "contract"]
    (sample,) = check.metadata["samples"].value
    (letter,) = state.list_dead_letters(CHINOOK_CUSTOMERS.name)
    assert main(["dlq", "show", str(letter.id)]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)["payload (PII masked)"]
    for text in (out, json.dumps(sample, ensure_ascii=False)):
        assert not [value for value in CHINOOK_CUSTOMER_ONE.values() if f'"{value}"' in text]
    assert {name: shown[name] for name in CHINOOK_CUSTOMER_ONE} == {
        "Address": "A***",
        "PostalCode": "1***",
        "Fax": "+***",
        "State": "S***",
    }
    assert shown["SupportRepId"] == "3***", "a column no contract names"
    assert sample["record"]["SupportRepId"] == "3***", "so in the check's samples too"
    assert (shown["CustomerId"], shown["Country"]) == (1, "Brazil"), "declared, not PII"


def test_replay_opens_each_flows_own_source_and_sql_destination(
    world, erp, crm_client, state, chinook_copy, capsys
):
    """`dlq replay` crashed with a traceback (no command-line wiring for 'finance') on every
    flow with a SQL destination, and read every flow's source from ERP_DATABASE_URL; without
    --flow the first such flow ended the loop, and later flows' letters were never replayed."""
    chinook = chinook_letter_fixed_at_the_source(chinook_copy, state)
    sync(erp, crm_client, state)
    contact = bad_email_letter(state)
    fix_email_quietly(erp, contact.record_key, f"fixed.{contact.record_key}@example.com")

    assert main(["dlq", "replay", "--id", str(chinook.id), "--id", str(contact.id)]) == 0
    out = capsys.readouterr().out
    for flow in (CHINOOK_CUSTOMERS.name, FLOW):
        assert f"{flow}: replayed 1" in out and "1 written, 1 left the DLQ" in out
    landed = finance_email(world, customer_id=4)
    assert landed == "bjorn@example.no"
    assert state.get_dead_letter(chinook.id).resolution == "replayed"
    assert state.get_dead_letter(contact.id).resolution == "replayed"


def test_a_flow_that_cannot_be_opened_is_reported_and_the_others_are_replayed(
    world, erp, crm_client, state, chinook_copy, tmp_path, capsys, monkeypatch
):
    """One flow's fault (a finance database without its table, a missing CRM token) ended the
    replay with a traceback, and the flows after it were never replayed. Now each is named with
    what to do, the others replay, and the exit is non-zero."""
    chinook = chinook_letter_fixed_at_the_source(chinook_copy, state)
    sync(erp, crm_client, state)
    contact = bad_email_letter(state)
    fix_email_quietly(erp, contact.record_key, f"fixed.{contact.record_key}@example.com")
    both = ["dlq", "replay", "--id", str(chinook.id), "--id", str(contact.id)]

    monkeypatch.setenv("FINANCE_DATABASE_URL", f"sqlite:///{tmp_path / 'tableless.sqlite'}")
    assert main(both) == 1
    out, err = capsys.readouterr()
    assert f"flow {CHINOOK_CUSTOMERS.name}: the destination has no table" in err
    assert "What to do: create it" in err and "Traceback" not in err
    assert f"{FLOW}: replayed 1" in out and "1 left the DLQ" in out
    assert state.get_dead_letter(chinook.id).resolved_at is None

    monkeypatch.delenv("FINANCE_DATABASE_URL")
    monkeypatch.delenv("CRM_ACCESS_TOKEN")
    assert main(["dlq", "replay"]) == 1
    out, err = capsys.readouterr()
    assert f"{CHINOOK_CUSTOMERS.name}: replayed 1" in out and "1 left the DLQ" in out
    assert f"flow {FLOW}: CRM_ACCESS_TOKEN is not set" in err and "What to do: set it" in err
    assert f"flows not replayed, their letters left as they are: {FLOW}" in err


def refuse_with_a_value(state: StateStore, table: str, value: str, sqlstate: str) -> None:
    """A trigger on the state store's `table` refusing every write with `sqlstate`, its message
    quoting `value` as PostgreSQL's own messages quote one."""
    with state.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse_entry() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'entry refused for the contact: \"%%\"', TG_ARGV[0] "
            f"USING ERRCODE = '{sqlstate}'; END $$"
        )
        connection.exec_driver_sql(
            f"CREATE TRIGGER refuse_entry BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION refuse_entry('{value}')"
        )


@pytest.mark.postgres
@pytest.mark.parametrize("any_world", ["postgres"], indirect=True)
@pytest.mark.parametrize(
    ("sqlstate", "complaint"),
    [
        ("54000", "ProgramLimitExceeded"),  # an OperationalError to SQLAlchemy
        ("23514", "CheckViolation"),  # an IntegrityError
        ("22001", "StringDataRightTruncation"),  # a DataError
    ],
)
def test_a_database_refusal_that_quotes_a_value_is_reported_with_it_masked(
    any_world, crm_client, capsys, sqlstate, complaint
):
    """A replay stopped by a database error no connector words (here the state store's own
    check refusing the ledger entry) printed the driver's first line as it was, quoting the
    customer's email; one SQLAlchemy calls an IntegrityError or a DataError ended the replay
    with a traceback quoting it."""
    erp, state = create_engine(any_world.erp_url), StateStore(any_world.state_url, dlq_key=DLQ_KEY)
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    email = f"fixed.{letter.record_key}@example.com"
    fix_email_quietly(erp, letter.record_key, email)
    refuse_with_a_value(state, "ledger", email, sqlstate)

    assert main(["dlq", "replay", "--id", str(letter.id)]) == 1
    err = capsys.readouterr().err
    assert email not in err
    assert f"flow {FLOW}: a database refused the replay: {complaint}: " in err
    assert 'entry refused for the contact: "…"' in err
    assert "What to do: fix what the database names" in err and f"--flow {FLOW}" in err
    assert state.get_dead_letter(letter.id).resolved_at is None
    state.dispose()
    erp.dispose()


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "command",
    [
        ["dlq", "list"],
        ["dlq", "show", "1"],
        ["dlq", "replay"],
        ["dlq", "discard", "--flow", FLOW, "--reason", "known"],
        ["budget", "list"],
        ["budget", "clear", "--flow", FLOW, "--why", "known"],
        ["audit", "verify"],
        ["audit", "show", "--key", "1"],
        ["webhooks", "status"],
    ],
)
def test_every_command_reports_a_state_store_that_does_not_answer(command, monkeypatch, capsys):
    """Every command but a replay's flows ended with a traceback when the state store did not
    answer; each now says so in one line, with what to do, and exits 1."""
    state_url = f"postgresql://postgres@127.0.0.1:{closed_port()}/handoff_state"
    monkeypatch.setenv("HANDOFF_STATE_URL", state_url)

    assert main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"handoff {' '.join(command[:2])}: ") and err.count("\n") == 1
    assert "Connection refused" in err and "Traceback" not in err
    assert "What to do: check HANDOFF_STATE_URL" in err


def test_a_replay_without_the_dlq_key_sends_nothing_and_says_which_key(
    world, erp, crm_client, state, monkeypatch, capsys
):
    """Without HANDOFF_DLQ_KEY a replay sent the record, then failed writing its letter again,
    advising a new key, which cannot read the letters written under the flows' own."""
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    sent = world.crm.store.stats()["upsert_inputs"]
    monkeypatch.delenv("HANDOFF_DLQ_KEY")

    assert main(["dlq", "replay", "--id", str(letter.id)]) == 1
    err = capsys.readouterr().err
    assert "HANDOFF_DLQ_KEY is not set" in err and "the key the flows run with" in err
    assert "nothing was replayed" in err and "Traceback" not in err
    assert world.crm.store.stats()["upsert_inputs"] == sent
    assert state.get_dead_letter(letter.id).attempts == letter.attempts


@pytest.mark.parametrize("command", [["dlq", "list"], ["audit", "verify"], ["budget", "list"]])
def test_a_dlq_key_that_is_no_key_is_reported_in_one_line(command, tmp_path, monkeypatch, capsys):
    """A HANDOFF_DLQ_KEY that is no Fernet key ended every command with a traceback."""
    monkeypatch.setenv("HANDOFF_STATE_URL", f"sqlite:///{tmp_path / 'state.sqlite'}")
    monkeypatch.setenv("HANDOFF_DLQ_KEY", "not-a-key")

    assert main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"handoff {' '.join(command[:2])}: ") and err.count("\n") == 1
    assert "HANDOFF_DLQ_KEY is not a Fernet key" in err and "`handoff dlq keygen`" in err
    assert "Traceback" not in err and "not-a-key" not in err


@pytest.mark.postgres
@pytest.mark.parametrize("any_world", ["postgres"], indirect=True)
def test_a_refusal_outside_a_replay_is_reported_with_its_value_masked(
    any_world, crm_client, capsys
):
    """A discard the state store refused (here its check on the letters, quoting the email)
    ended with a traceback quoting the value; it is now one line, the value masked."""
    erp, state = create_engine(any_world.erp_url), StateStore(any_world.state_url, dlq_key=DLQ_KEY)
    sync(erp, crm_client, state)
    letter = bad_email_letter(state)
    email = f"known.{letter.record_key}@example.com"
    refuse_with_a_value(state, "dead_letters", email, "23514")

    assert main(["dlq", "discard", "--id", str(letter.id), "--reason", "known"]) == 1
    err = capsys.readouterr().err
    assert email not in err and err.count("\n") == 1
    assert err.startswith("handoff dlq discard: a database refused the command: CheckViolation: ")
    assert 'entry refused for the contact: "…"' in err
    assert "What to do: fix what the database names" in err
    assert state.get_dead_letter(letter.id).resolved_at is None
    state.dispose()
    erp.dispose()


@pytest.mark.postgres
def test_any_number_of_letters_are_looked_up_by_id_or_key(postgres_database):
    """A replay of 70,000 letters ran, then failed to count them: one parameter per id is past
    PostgreSQL's 65,535 (and the CLI counted at most 100 still failing)."""
    store = StateStore(postgres_database(), dlq_key=DLQ_KEY)
    letters = [
        DeadLetter("f", str(n), "contract", "bad", {}, content_hash="h") for n in range(70_000)
    ]
    store.commit_batch(BatchCommit("f", "r", dead_letters=letters))
    ids = [letter.id for letter in store.list_dead_letters("f", limit=None)]
    assert len(store.list_dead_letters("f", ids=ids, limit=None)) == 70_000
    assert len(store.list_dead_letters("f", keys=[str(n) for n in range(70_000)], limit=5)) == 5
    assert [letter.id for letter in store.list_dead_letters("f", ids=ids[-2:])] == ids[-2:]
    store.dispose()


@pytest.mark.postgres
def test_a_discard_of_two_flows_beside_a_commit_is_no_deadlock(postgres_database, monkeypatch):
    """A discard resolved flow A, audited it (the audit trail's lock), then resolved flow B,
    while a commit of B held B's letters and waited for that lock: PostgreSQL broke the deadlock
    by failing one, reported as the state store unavailable."""
    url = postgres_database()
    store = StateStore(url, dlq_key=DLQ_KEY)
    for flow, key in (("flow_a", "1"), ("flow_b", "7")):
        store.commit_batch(
            BatchCommit(flow, "r0", dead_letters=[DeadLetter(flow, key, "contract", "bad", {})])
        )
    letters = store.list_dead_letters()
    committing = threading.Event()
    close, append = StateStore._discard, StateStore._append_audit

    def closing(connection, flow, ids, now):
        if threading.current_thread().name == "discard" and flow == "flow_b":
            committing.wait(10)  # the commit of flow_b holds its letter now
        return close(connection, flow, ids, now)

    def appending(connection, **entry):
        if threading.current_thread().name == "commit":
            committing.set()
            time.sleep(0.5)
        return append(connection, **entry)

    monkeypatch.setattr(StateStore, "_discard", staticmethod(closing))
    monkeypatch.setattr(StateStore, "_append_audit", staticmethod(appending))
    discarding, committer = StateStore(url, dlq_key=DLQ_KEY), StateStore(url, dlq_key=DLQ_KEY)
    failures = []

    def discard():
        try:
            discarding.discard_dead_letters(letters, actor="ops", why="cleanup", run_id="d")
        except Exception as error:  # the test reports any
            failures.append(error)

    def commit():
        time.sleep(0.3)  # the discard has audited flow_a
        try:
            committer.commit_batch(
                BatchCommit(
                    "flow_b",
                    "r1",
                    dead_letters=[DeadLetter("flow_b", "7", "contract", "still bad", {})],
                ),
                audit={"actor": "t", "action": "sync_batch", "why": "t", "detail": {}},
            )
        except Exception as error:
            failures.append(error)

    threads = [threading.Thread(target=discard, name="discard")]
    threads.append(threading.Thread(target=commit, name="commit"))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for opened in (store, discarding, committer):
        opened.dispose()


@pytest.mark.postgres
def test_two_runs_letting_one_record_at_once_open_one_letter(postgres_database, monkeypatch):
    """A backfill beside a scheduled run, both refusing record 42: each looked for its open
    letter before the other committed, found none, and opened one (counted twice)."""
    url = postgres_database()
    StateStore(url, dlq_key=DLQ_KEY).dispose()
    looked = threading.Event()
    write = state_module.bulk_write

    def pausing(connection, table, *args, **kwargs):
        if table is state_module.dead_letters and threading.current_thread().name == "first":
            looked.set()
            time.sleep(1)  # the second run looks meanwhile
        return write(connection, table, *args, **kwargs)

    monkeypatch.setattr(state_module, "bulk_write", pausing)

    def run(name: str) -> None:
        if name == "second":
            looked.wait(10)
        store = StateStore(url, dlq_key=DLQ_KEY)
        letter = DeadLetter("people", "42", "contract", "bad", {}, content_hash=name)
        store.commit_batch(BatchCommit("people", name, dead_letters=[letter]))
        store.dispose()

    threads = [
        threading.Thread(target=run, args=(name,), name=name) for name in ("first", "second")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = StateStore(url, dlq_key=DLQ_KEY)
    (letter,) = store.list_dead_letters(flow="people")
    assert letter.attempts == 2
    store.dispose()


def test_a_discard_is_history_once_the_record_synced_and_a_repair_passes_it(own_state):
    """A discard held the record's content for good: after the record synced (say it changed,
    then came back to the discarded content) it was held again, the destination left stale; a
    repair, sent because reconciliation found the record missing, was held too."""
    letter = DeadLetter("f", "1", "destination-rejected", "refused", {}, content_hash="h")
    own_state.commit_batch(BatchCommit("f", "r1", dead_letters=[letter]))
    (opened,) = own_state.list_dead_letters("f")
    own_state.discard_dead_letters([opened], actor="ops", why="known", run_id="d")
    assert own_state.held_letter_hashes("f", ["1"]) == ({}, {"1": "h"})
    synced = {"1": LedgerEntry("other", "1", False, None)}
    own_state.commit_batch(BatchCommit("f", "r2", synced=synced))
    assert own_state.held_letter_hashes("f", ["1"]) == ({}, {})


def test_a_letter_of_a_row_without_a_key_closes_once_the_source_gives_it_one(
    world, state, chinook_copy, capsys
):
    """A legacy copy of Chinook's customers without its primary key, one customer's id lost.
    `dlq replay` judged the stored row again, refused it again, and said only "still failing";
    once the id was back, no replay synced the customer or closed the letter. It now says the
    source must give the row its key, and once it has, replays it and closes the letter."""
    chinook = create_engine(chinook_copy)
    with chinook.begin() as connection:
        connection.exec_driver_sql('CREATE TABLE "Legacy" AS SELECT * FROM "Customer"')
        connection.exec_driver_sql('DROP TABLE "Customer"')
        connection.exec_driver_sql('ALTER TABLE "Legacy" RENAME TO "Customer"')
        connection.exec_driver_sql(
            'UPDATE "Customer" SET "CustomerId" = NULL WHERE "CustomerId" = 4'
        )
    with dg.instance_for_test() as instance:
        run = dg.materialize(
            [flow_asset(CHINOOK_CUSTOMERS)], resources=resources(), instance=instance
        )
        assert run.success
    (letter,) = state.list_dead_letters(CHINOOK_CUSTOMERS.name)
    assert letter.record_key.startswith("!unkeyed:")

    assert main(["dlq", "replay", "--flow", CHINOOK_CUSTOMERS.name]) == 1
    out = capsys.readouterr().out
    assert "0 left the DLQ, 1 still failing" in out
    assert "1 of them hold a source row that is still without a usable key" in out
    assert "give each row its key in the source" in out

    with chinook.begin() as connection:
        connection.exec_driver_sql(
            """UPDATE "Customer" SET "CustomerId" = 4 WHERE "Email" = 'bjorn.hansen@yahoo.no'"""
        )
    chinook.dispose()
    assert main(["dlq", "replay", "--flow", CHINOOK_CUSTOMERS.name]) == 0
    assert "1 written, 1 left the DLQ, 0 still failing" in capsys.readouterr().out
    assert state.get_dead_letter(letter.id).resolution == "gone"
    landed = finance_email(world, customer_id=4)
    assert landed == "bjorn.hansen@yahoo.no"


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["list", "--older-than", "1000000d"], "'1000000d' is older than any dead letter"),
        (["list", "--older-than", "²h"], "'²h' is not an age like 90s, 30m, 2h or 7d"),
        (["list", "--limit", "²"], "² is not a whole number, 1 or more"),
        (["show", "99999999999999999999"], "99999999999999999999 is no dead letter's id"),
        (["replay", "--id", "99999999999999999999"], "is no dead letter's id"),
    ],
)
def test_an_age_or_id_no_letter_can_have_is_refused_in_one_line(world, capsys, command, said):
    """Each ended in a traceback: a time before year 1, int() of a superscript digit (which
    isdigit() takes), an id beyond SQLite's INTEGER."""
    with pytest.raises(SystemExit) as refused:
        main(["dlq", *command])
    assert refused.value.code == 2
    assert said in capsys.readouterr().err


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_state_url(request, tmp_path):
    """A state store that two processes (here two engines, each its own connection) share."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_database")()
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


def test_a_discard_racing_a_replay_that_closed_the_letter_audits_no_discard(
    shared_state_url, monkeypatch, capsys
):
    """`handoff dlq discard` chose a letter while a replay's commit, closing it, was under way;
    its update then found the letter closed (it waited for the replay's row lock), yet the
    discard was audited for it all the same: the trail said a record that landed was thrown
    away. Here the replay's commit is held open until the discard waits behind it."""
    store = StateStore(shared_state_url, dlq_key=DLQ_KEY)
    letter = DeadLetter("people", "42", "contract", "bad email", {}, content_hash="h")
    store.commit_batch(BatchCommit("people", "r1", dead_letters=[letter]))
    (letter,) = store.list_dead_letters("people")
    replaying = StateStore(shared_state_url, dlq_key=DLQ_KEY)
    committing, release, updating = threading.Event(), threading.Event(), threading.Event()

    @sa.event.listens_for(replaying.engine, "commit")
    def _held_open(_connection):  # before the database commits: the letter's row stays locked
        committing.set()
        release.wait(30)

    def _updating(_connection, _cursor, statement, *_args):
        if threading.current_thread().name == "discard" and statement.startswith("UPDATE"):
            updating.set()

    replay = BatchCommit(
        "people",
        "replay-1",
        synced={"42": LedgerEntry("h2", "d42", False)},
        resolution="replayed",
        audit_records=[state_module.AuditRecord("people", "42", "replay", "replay-1:42")],
    )
    audit = {"actor": "ops", "action": "replay", "why": "replay", "detail": {}}
    monkeypatch.setenv("HANDOFF_STATE_URL", shared_state_url)
    said: list[int] = []
    threads = [
        threading.Thread(target=lambda: replaying.commit_batch(replay, audit), name="replay"),
        threading.Thread(
            target=lambda: said.append(
                main(["dlq", "discard", "--id", str(letter.id), "--reason", "customer left"])
            ),
            name="discard",
        ),
    ]
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", _updating)
    try:
        threads[0].start()
        assert committing.wait(10), "the replay reached its commit"
        threads[1].start()  # lists the letter open (the replay has not committed), then waits
        assert updating.wait(10), "the discard reached its update"
        if store.engine.dialect.name == "postgresql":
            waiting = sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE dead_letters%'"
            )
            deadline = time.monotonic() + 10
            with store.engine.connect() as connection:
                while not connection.execute(waiting).scalar():
                    assert time.monotonic() < deadline, "the discard waits for the replay's row"
                    time.sleep(0.05)
                    connection.rollback()
        else:
            time.sleep(0.5)  # in SQLite's busy wait for the replay's write lock
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", _updating)
    assert store.get_dead_letter(letter.id).resolution == "replayed"
    assert [entry["action"] for entry in store.audit_entries("people")] == ["replay"]
    assert [told["action"] for told in store.record_history("42", "people")] == ["replay"]
    assert store.verify_audit().intact
    out = capsys.readouterr().out
    assert said == [0] and "discarded 0 dead letters" in out
    assert (
        "1 closed meanwhile (by a replay, a run or another discard), left as they are: "
        f"ids {letter.id}" in out
    )
    for opened in (store, replaying):
        opened.dispose()
