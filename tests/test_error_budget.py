"""A run the error budget stopped keeps the flow stopped until someone acknowledges it: its dead
letters replayed or discarded, or going on approved (`handoff budget clear`, or run config).
Held, those letters no longer count against the budget: a rerun with nothing fixed went through,
with a third of a batch in the DLQ."""

from __future__ import annotations

import logging
import os

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.crm_contacts import CRM_CONTACTS
from assets.factory import flow_asset
from definitions import resources
from integrations.cli import main
from integrations.engine.errors import ErrorBudgetExceeded, ErrorBudgetTripStands
from integrations.engine.state import (
    AuditRecord,
    BatchCommit,
    BudgetTrip,
    DeadLetter,
    StateStore,
    utcnow,
)
from tests.conftest import DLQ_KEY
from tests.contacts import sync
from tests.test_alerts import alert_on_failure

FLOW = CRM_CONTACTS.name


def first_batch(erp) -> list[int]:
    with erp.connect() as connection:
        return list(
            connection.execute(
                sa.text("SELECT customer_id FROM customers ORDER BY updated_at, customer_id")
            ).scalars()
        )[: CRM_CONTACTS.batch_size]


def break_emails(erp) -> list[int]:
    """A third of the first batch's emails made invalid (" at " for "@"): the budget stops the
    first run at that batch; the other batches are as seeded, within the budget."""
    broken = [key for key in first_batch(erp) if key % 3 == 0]
    with erp.begin() as connection:
        connection.execute(
            sa.text("UPDATE customers SET email = replace(email, '@', ' at ') WHERE customer_id = :id"),
            [{"id": key} for key in broken],
        )  # fmt: skip
    return broken


def mend_emails_quietly(erp, broken: list[int]) -> None:
    """The emails put back, `updated_at` untouched: no run would see it, a replay does."""
    with erp.begin() as connection:
        connection.execute(
            sa.text("UPDATE customers SET email = replace(email, ' at ', '@') WHERE customer_id = :id"),
            [{"id": key} for key in broken],
        )  # fmt: skip


def assert_no_pii_or_secret(text: str, state: StateStore) -> None:
    pii = CRM_CONTACTS.source_contract.pii_fields
    values = {
        str(letter.payload.get(name))
        for letter in state.list_dead_letters(flow=FLOW, include_resolved=True, limit=None)
        for name in pii
        if len(str(letter.payload.get(name) or "")) >= 5
    }
    assert values and not [value for value in values if value in text]
    assert os.environ["CRM_ACCESS_TOKEN"] not in text and DLQ_KEY not in text


def budget_audit(state: StateStore) -> list[dict[str, object]]:
    return [
        entry
        for entry in state.audit_entries(FLOW)
        if entry["action"] in ("budget_trip", "budget_clear")
    ]


def test_a_tripped_budget_stops_every_rerun_until_going_on_is_approved(
    any_world, erp, crm_client, state, capsys
):
    break_emails(erp)
    with pytest.raises(ErrorBudgetExceeded) as tripped:
        sync(erp, crm_client, state)
    assert f"handoff budget clear --flow {FLOW}" in str(tripped.value)
    (trip,) = state.standing_budget_trips()
    assert (trip.flow, trip.run_id) == (FLOW, "run-1")
    assert trip.letters == trip.open_letters == state.count_open_dead_letters(FLOW) > 300

    # Nothing changed: the rerun stops before reading, saying what tripped and what to do.
    with pytest.raises(ErrorBudgetTripStands) as stands:
        sync(erp, crm_client, state, run_id="run-2")
    message = str(stands.value)
    assert message.startswith(f"flow {FLOW}: the error budget stopped run run-1 at ")
    assert f"{trip.failed} of {trip.seen} rows ({trip.share:.1%}) failed" in message
    assert "email is not a valid email address" in message, "the top reasons"
    assert f"{trip.letters} of the {trip.letters} dead letters it left are still open" in message
    for todo in (
        f"handoff dlq list --flow {FLOW}",
        f"handoff dlq replay --flow {FLOW}",
        "handoff dlq discard",
        f"handoff budget clear --flow {FLOW} --why",
        "acknowledge_budget_trip",
    ):
        assert todo in message
    assert_no_pii_or_secret(message, state)
    assert list(crm_client.list_objects("contacts")) == [] and state.watermark(FLOW) is None

    assert main(["budget", "list"]) == 0
    assert f"{FLOW}: tripped by run run-1" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an approval without a why is refused
        main(["budget", "clear", "--flow", FLOW])
    why = "the ERP import is being fixed upstream; sync the rest"
    assert main(["budget", "clear", "--flow", FLOW, "--why", why]) == 0
    assert f"{trip.letters} open dead letters stay in the DLQ" in capsys.readouterr().out

    goes_on = sync(erp, crm_client, state, run_id="run-3")
    assert goes_on.counts["held"] >= trip.letters and goes_on.counts["inserted"] > 1500
    assert state.count_open_dead_letters(FLOW) >= trip.letters, "the letters stay in the DLQ"
    assert sync(erp, crm_client, state, run_id="run-4").written == 0
    assert state.standing_budget_trips() == []

    tripping, clearing = budget_audit(state)
    assert (tripping["action"], tripping["run_id"], tripping["actor"]) == (
        "budget_trip",
        "run-1",
        "test",
    )
    assert tripping["detail"]["dead_letters"] == trip.letters
    assert clearing["action"] == "budget_clear" and clearing["why"] == why
    assert "via handoff budget clear" in clearing["actor"]
    assert clearing["detail"]["resolution"] == "approved"
    assert clearing["detail"]["tripped_by_run"] == "run-1"
    assert state.verify_audit().intact


def test_replaying_and_discarding_the_trips_letters_lets_the_runs_go_on(
    world, erp, crm_client, state, capsys
):
    broken = break_emails(erp)
    with pytest.raises(ErrorBudgetExceeded):
        sync(erp, crm_client, state)
    (trip,) = state.standing_budget_trips()

    # A replay goes on while the trip stands: it is how the letters are fixed.
    mend_emails_quietly(erp, broken)
    assert main(["dlq", "replay", "--flow", FLOW]) == 1, "the seed's own bad rows still fail"
    replayed = capsys.readouterr().out
    still = state.count_open_dead_letters(FLOW)
    assert f"{trip.letters - still} left the DLQ, {still} still failing" in replayed
    assert trip.letters - still > 250 and still > 0
    assert len(list(crm_client.list_objects("contacts"))) == trip.letters - still

    with pytest.raises(ErrorBudgetTripStands) as stands:
        sync(erp, crm_client, state, run_id="run-2")
    assert f"{still} of the {trip.letters} dead letters it left are still open" in str(stands.value)

    reason = "known bad rows in the ERP, reported to its owners"
    assert main(["dlq", "discard", "--flow", FLOW, "--reason", reason]) == 0
    assert "run-1 is open any more: the trip is cleared, runs go on" in capsys.readouterr().out
    goes_on = sync(erp, crm_client, state, run_id="run-3")
    assert goes_on.counts["inserted"] > 1500 and goes_on.counts["held"] == still

    _, clearing = budget_audit(state)
    assert clearing["why"] == reason and "via handoff dlq discard" in clearing["actor"]
    assert clearing["detail"] == {
        **clearing["detail"],
        "resolution": "settled",
        "dead_letters": trip.letters,
        "dead_letters_open": 0,
    }
    assert state.verify_audit().intact


def test_through_dagster_a_standing_trip_fails_each_run_until_run_config_acknowledges_it(
    world, erp, state, alert_receiver
):
    break_emails(erp)
    asset = flow_asset(CRM_CONTACTS)

    def materialize(instance, **config) -> dg.ExecuteInJobResult:
        return dg.materialize(
            [asset],
            resources=resources(),
            instance=instance,
            run_config={"ops": {"crm__contacts": {"config": config}}},
            raise_on_error=False,
        )

    def failure(result: dg.ExecuteInJobResult):
        (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        return event.step_failure_data.user_failure_data

    with dg.instance_for_test() as instance:
        first = materialize(instance)
        assert not first.success
        assert failure(first).metadata["error_budget_trip"].value["run_id"] == first.run_id

        rerun = materialize(instance)
        assert not rerun.success and not rerun.get_asset_materialization_events()
        stopped = failure(rerun)
        assert stopped.description.startswith(
            f"flow {FLOW}: the error budget stopped run {first.run_id} at "
        )
        assert "handoff budget clear" in stopped.metadata["what_to_do"].value
        trip = stopped.metadata["error_budget_trip"].value
        assert trip["dead_letters_open"] == state.count_open_dead_letters(FLOW) > 300
        assert "erp.customer@v2: email is not a valid email address" in trip["top_reasons"]
        assert_no_pii_or_secret(stopped.description, state)

        alert_on_failure(instance, rerun)
        (alert,) = alert_receiver.received
        assert f"the error budget stopped run {first.run_id}" in alert["text"]
        assert "handoff budget clear" in alert["text"]
        assert_no_pii_or_secret(alert["text"], state)

        assert materialize(instance, replay=True).success, "a replay goes on while tripped"
        (standing,) = state.standing_budget_trips(FLOW)

        acknowledged = materialize(instance, acknowledge_budget_trip=True)
        assert acknowledged.success
        (done,) = acknowledged.get_asset_materialization_events()
        assert done.materialization.metadata["held"].value >= standing.open_letters > 300
        assert materialize(instance).success, "the trip does not come back"

    clearing = budget_audit(state)[-1]
    assert clearing["actor"] == f"dagster run {acknowledged.run_id}" and clearing["why"] == "manual"
    assert clearing["detail"]["resolution"] == "approved"
    assert clearing["detail"]["tripped_by_run"] == first.run_id
    assert state.verify_audit().intact


def test_a_run_stopped_while_its_threads_wind_down_leaves_its_trip(
    world, erp, crm_client, state, monkeypatch
):
    """The trip was kept only once the stopped run's threads had wound down (the last batch's
    commit): a run terminated meanwhile left none, and its rerun, nothing fixed, went through."""
    break_emails(erp)
    keep = StateStore.trip_budget

    def terminated_once_kept(store, trip, **who):
        if trip.id is not None:  # the letters of the last commits joining it: the run ends here
            raise KeyboardInterrupt
        return keep(store, trip, **who)

    monkeypatch.setattr(StateStore, "trip_budget", terminated_once_kept)
    with pytest.raises(KeyboardInterrupt):
        sync(erp, crm_client, state)
    monkeypatch.setattr(StateStore, "trip_budget", keep)
    with pytest.raises(ErrorBudgetTripStands):
        sync(erp, crm_client, state, run_id="run-2")


def test_the_batch_the_budget_stops_the_run_at_has_its_dead_letters_summed_up_in_the_log(
    world, erp, crm_client, state, caplog
):
    """The batch that trips the budget keeps its letters, but its summary line came only after
    the load the trip skips: a run stopped at its first batch logged no dead letter at all."""
    break_emails(erp)
    with caplog.at_level(logging.INFO), pytest.raises(ErrorBudgetExceeded):
        sync(erp, crm_client, state, log=logging.getLogger("test"))
    lines = [
        r.getMessage() for r in caplog.records if "dead-lettered in this batch" in r.getMessage()
    ]
    assert len(lines) == 1, "one summary for the batch the run stopped at"
    letters = state.list_dead_letters(flow=FLOW, limit=None)  # all the first batch's
    assert f": {len(letters)} dead-lettered in this batch: contract {len(letters)}" in lines[0]
    assert_no_pii_or_secret(lines[0], state)


def test_the_budget_and_audit_commands_take_a_flow_by_its_assets_key(world, state, capsys):
    """The UI shows asset keys: `budget list --flow crm/contacts` said no trip stood while one
    did, `budget clear` refused the flow, and `audit show` found no record."""
    letter = DeadLetter(FLOW, "7", "contract", "erp.customer@v1: planted", {})
    state.commit_batch(BatchCommit(FLOW, "run-1", dead_letters=[letter]))
    lettered = AuditRecord(FLOW, "7", "dead-letter", f"run-1:{FLOW}:7")
    state.append_audit(
        [lettered], actor="test", action="sync", why="manual", detail={}, run_id="run-1", flow=FLOW
    )
    trip = BudgetTrip(FLOW, "run-1", utcnow(), failed=1, seen=2, max_share=0.1, reasons={})
    state.trip_budget(trip, actor="test", why="test")

    assert main(["budget", "list", "--flow", "crm/contacts"]) == 0
    assert f"{FLOW}: tripped by run run-1" in capsys.readouterr().out
    assert main(["audit", "show", "--key", "7", "--flow", "crm/contacts"]) == 0
    assert "dead-letter run run-1" in capsys.readouterr().out
    assert main(["budget", "clear", "--flow", "crm/contacts", "--why", "checked"]) == 0
    assert f"{FLOW}: cleared the error budget's trip of run run-1" in capsys.readouterr().out
    assert main(["budget", "list", "--flow", "crm/nothing"]) == 0
    assert "(no flow is named so; the flows: " in capsys.readouterr().out
