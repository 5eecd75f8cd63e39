"""Paid invoices → deals: daily partitions, a backfill range in one run, associations, voids."""

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.crm_contacts import CRM_CONTACTS
from assets.crm_deals import CRM_DEALS
from assets.erp_crm_deals import ERP_CRM_DEALS
from assets.factory import flow_asset
from definitions import defs, resources
from integrations.crm.client import CrmClient
from integrations.crm.destination import CrmObjects
from integrations.engine.state import StateStore, utcnow
from integrations.engine.sync import Sync
from integrations.http import ApiLimits
from integrations.sql.connect import create_engine
from integrations.sql.source import SqlSource
from tests.conftest import DLQ_KEY
from tests.dagster_runs import failed_once

JANUARY = {
    "dagster/asset_partition_range_start": "2025-01-01",
    "dagster/asset_partition_range_end": "2025-01-31",
}


def run_deals(instance, tags=JANUARY, partition_key=None, **options):
    return dg.materialize(
        [flow_asset(CRM_DEALS)],
        resources=resources(),
        instance=instance,
        tags=tags,
        partition_key=partition_key,
        **options,
    )


def materialize_deals(instance, tags=JANUARY, partition_key=None) -> dict[str, object]:
    result = run_deals(instance, tags, partition_key)
    assert result.success
    events = result.get_asset_materialization_events()  # one per partition, same metadata
    return {key: value.value for key, value in events[0].materialization.metadata.items()}


def paid_invoices(erp_url: str, start: str, end: str) -> dict[str, str]:
    """invoice number → customer number, for paid invoices dated in [start, end]."""
    engine = create_engine(erp_url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT i.invoice_number, c.customer_number FROM invoices i "
                "JOIN customers c ON c.customer_id = i.customer_id "
                "WHERE i.status = 'paid' AND i.invoice_date BETWEEN :start AND :end"
            ),
            {"start": start, "end": end},
        ).all()
    engine.dispose()
    return dict(rows)


def test_a_month_of_deals_in_one_run_linked_to_their_contacts(any_world, crm_client):
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        counts = materialize_deals(instance)
        runs = instance.get_runs()
        assert len(runs) == 2, "the month's 31 partitions ran as one run"

        expected = paid_invoices(any_world.erp_url, "2025-01-01", "2025-01-31")
        deals = list(crm_client.list_objects("deals", ["erp_invoice_id", "closedate", "dealstage"]))
        synced = {d["properties"]["erp_invoice_id"]: d for d in deals}
        assert set(synced) <= set(expected)
        assert counts["inserted"] == len(synced) and counts["inserted"] >= 0.8 * len(expected)
        assert all(d["properties"]["closedate"].startswith("2025-01") for d in deals)
        assert {d["properties"]["dealstage"] for d in deals} == {"closedwon"}
        refused = set(expected) - set(synced)
        assert counts["rejected"] >= len(refused), (
            "deals of customers not in the CRM are dead-lettered"
        )

        contacts = {
            c["id"]: c["properties"]["erp_customer_id"]
            for c in crm_client.list_objects("contacts", ["erp_customer_id"])
        }
        for number, deal in list(synced.items())[:20]:
            linked = crm_client.associated_ids("deals", deal["id"], "contacts")
            assert [contacts[i] for i in linked] == [expected[number]]

        again = materialize_deals(instance)
        assert again["written"] == 0, "re-running the backfill writes nothing"

        staged = dg.materialize(
            [flow_asset(ERP_CRM_DEALS)], resources=resources(), instance=instance
        )
        (event,) = staged.get_asset_materialization_events()
        back = {key: value.value for key, value in event.materialization.metadata.items()}
        assert (back["echoes"], back["inserted"]) == (len(synced), 0), "handoff's own deals"


def test_deals_under_a_crm_base_url_without_the_api_fail_once_dead_lettering_none(
    world, crm_client, monkeypatch
):
    """CRM_BASE_URL with a path the CRM has no API under: the lookup of the deals' contacts was
    answered 404, taken as the deals' fault, and every deal of the month was dead-lettered, each
    to replay; the run now fails once, saying to check CRM_BASE_URL, no deal dead-lettered."""
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        monkeypatch.setenv("CRM_BASE_URL", f"{world.crm.base_url}/v9")
        result = run_deals(instance, raise_on_error=False)
        description = failed_once(result)
        assert description.startswith(
            f"flow {CRM_DEALS.name}: CRM deals: POST /crm/v3/objects/contacts/batch/read: the CRM "
            "has no such endpoint: 404 OBJECT_NOT_FOUND"
        ), description
        assert "check that CRM_BASE_URL is the CRM's API root" in description
        store = StateStore(world.state_url, dlq_key=DLQ_KEY)
        try:
            letters = store.list_dead_letters(flow=CRM_DEALS.name, limit=100_000)
        finally:
            store.dispose()
        assert not [letter for letter in letters if letter.reason_kind == "destination-rejected"]
        monkeypatch.setenv("CRM_BASE_URL", world.crm.base_url)
        assert materialize_deals(instance)["inserted"] > 0
    assert list(crm_client.list_objects("deals"))


def test_a_voided_invoice_archives_its_deal_when_its_day_is_rewritten(world, crm_client):
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        materialize_deals(instance)
        deal = next(iter(crm_client.list_objects("deals", ["erp_invoice_id", "closedate"])))
        number, day = deal["properties"]["erp_invoice_id"], deal["properties"]["closedate"]
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE invoices SET status = 'void' WHERE invoice_number = :n"),
                {"n": number},
            )
        engine.dispose()
        counts = materialize_deals(instance, tags=None, partition_key=day)
        assert (counts["archived"], counts["written"]) == (1, 1)
        archived = list(crm_client.list_objects("deals", ["erp_invoice_id"], archived=True))
        assert [d["properties"]["erp_invoice_id"] for d in archived] == [number]


def test_an_invoice_paid_after_its_day_ran_becomes_a_deal_by_a_run_of_its_day(world, crm_client):
    """A day's deals were synced once, by the schedule, when the day was over: an invoice paid a
    week later was never in scope of a run again, and never became a deal. The flow's
    changed-days sensor requests a run of its day."""
    sensor = defs.resolve_sensor_def(f"{CRM_DEALS.name}_changed_days")

    def tick(instance, cursor):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources=resources(), definitions=defs
        )
        return sensor(context)

    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        materialize_deals(instance)
        idle = tick(instance, None)
        assert not idle.run_requests, "nothing changed since the backfill"
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            number, day = connection.execute(
                sa.text(
                    "SELECT invoice_number, invoice_date FROM invoices WHERE status = 'open' "
                    "AND invoice_date BETWEEN '2025-01-01' AND '2025-01-31' LIMIT 1"
                )
            ).one()
            connection.execute(
                sa.text(
                    "UPDATE invoices SET status = 'paid', updated_at = :now "
                    "WHERE invoice_number = :n"
                ),
                {"n": number, "now": utcnow() + timedelta(seconds=1)},
            )
        engine.dispose()
        (request,) = tick(instance, idle.cursor).run_requests
        assert request.partition_key == str(day)[:10]
        materialize_deals(instance, tags=None, partition_key=request.partition_key)
        deals = crm_client.list_objects("deals", ["erp_invoice_id"])
        assert number in {deal["properties"]["erp_invoice_id"] for deal in deals}


def test_deals_are_daily_partitioned_with_a_single_run_backfill_policy():
    deals = defs.resolve_assets_def(dg.AssetKey(["crm", "deals"]))
    assert isinstance(deals.partitions_def, dg.DailyPartitionsDefinition)
    assert deals.backfill_policy == dg.BackfillPolicy.single_run()
    assert defs.resolve_schedule_def("erp_paid_invoices_to_crm_deals_schedule")


def test_a_mass_exit_from_the_flows_scope_stops_at_the_archive_guard(world, crm_client):
    """Every January invoice voided at once leaves the flow's scope (paid invoices): their deals
    would all be archived. The guard counted soft deletes only, so the run archived them all."""
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success
        synced = materialize_deals(instance)["inserted"]
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE invoices SET status = 'void'"))
        engine.dispose()
        stopped = run_deals(instance, raise_on_error=False)
        assert not stopped.success
        (failure,) = [e for e in stopped.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "above the archive guard" in failure.step_failure_data.user_failure_data.description
        assert list(crm_client.list_objects("deals", ["erp_invoice_id"], archived=True)) == []

        allow = {"ops": {"crm__deals": {"config": {"allow_mass_archive": True}}}}
        allowed = run_deals(instance, run_config=allow)
        assert allowed.success
        archived = list(crm_client.list_objects("deals", ["erp_invoice_id"], archived=True))
        assert len(archived) == synced


def move_invoice(erp_url: str, number: str, customer_number: str) -> None:
    """The ERP corrects who an invoice was for: it now belongs to another customer."""
    engine = create_engine(erp_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE invoices SET customer_id = (SELECT customer_id FROM customers "
                "WHERE customer_number = :customer), updated_at = CURRENT_TIMESTAMP "
                "WHERE invoice_number = :n"
            ),
            {"customer": customer_number, "n": number},
        )
    engine.dispose()


@dataclass(frozen=True)
class MovedDeal:
    """A synced deal whose invoice the ERP moved to another customer, with a contact a
    salesperson linked it to by hand."""

    id: str
    number: str  # its invoice's
    day: str
    old: str  # the contact of the customer the invoice was for
    new: str  # the new customer's contact
    by_hand: str
    customers: dict[str, str]  # contact id → customer number


def a_moved_deal(world, crm_client, instance) -> MovedDeal:
    assert dg.materialize(
        [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
    ).success
    materialize_deals(instance)
    contacts = {
        c["id"]: c["properties"]["erp_customer_id"]
        for c in crm_client.list_objects("contacts", ["erp_customer_id"])
    }
    deal = next(iter(crm_client.list_objects("deals", ["erp_invoice_id", "closedate"])))
    (old,) = crm_client.associated_ids("deals", deal["id"], "contacts")
    new, by_hand = [i for i in contacts if i != old][:2]
    crm_client.associate("deals", "contacts", [(deal["id"], by_hand)], "by hand")
    move_invoice(world.erp_url, deal["properties"]["erp_invoice_id"], contacts[new])
    number = deal["properties"]["erp_invoice_id"]
    return MovedDeal(
        deal["id"], number, deal["properties"]["closedate"], old, new, by_hand, contacts
    )


def linked_contacts(crm_client, deal: MovedDeal) -> list[str]:
    return sorted(crm_client.associated_ids("deals", deal.id, "contacts"))


def test_a_deal_whose_invoice_moves_to_another_customer_leaves_the_old_contact(world, crm_client):
    """The deal stayed linked to the old customer's contact (links were only ever added): the
    CRM showed it under both customers. A link a salesperson made by hand stays."""
    with dg.instance_for_test() as instance:
        deal = a_moved_deal(world, crm_client, instance)
        counts = materialize_deals(instance, tags=None, partition_key=deal.day)
        assert counts["updated"] == 1
        assert linked_contacts(crm_client, deal) == sorted([deal.new, deal.by_hand])

        again = materialize_deals(instance, tags=None, partition_key=deal.day)
        assert again["written"] == 0
        assert linked_contacts(crm_client, deal) == sorted([deal.new, deal.by_hand])


def test_a_deal_moved_back_and_forth_is_linked_to_its_customer_each_time(world, crm_client):
    """Moved back to a contact it left, then again: each link is made anew. Its idempotency key
    was the same in every run for the same content, so the CRM replayed the first run's answer
    for the third run's link instead of linking again: the deal was left with no customer."""
    with dg.instance_for_test() as instance:
        deal = a_moved_deal(world, crm_client, instance)
        for contact in (deal.new, deal.old, deal.new):
            move_invoice(world.erp_url, deal.number, deal.customers[contact])
            materialize_deals(instance, tags=None, partition_key=deal.day)
            assert linked_contacts(crm_client, deal) == sorted([contact, deal.by_hand])


def _die(*_args, **_kwargs) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_between_the_link_and_the_unlink(destination: CrmObjects) -> None:
    destination.client.dissociate = _die


def kill_before_the_ledger_commit(destination: CrmObjects) -> None:
    upsert = destination.upsert

    def written_then_killed(records):
        upsert(records)
        _die()

    destination.upsert = written_then_killed


def day_killed(world, day: str, arm: Callable[[CrmObjects], None]) -> None:
    """Sync the day in a child process that SIGKILLs itself where `arm` says."""
    pid = os.fork()
    if pid == 0:  # the child: its own connections, never the parent's
        try:
            client = CrmClient(world.crm.base_url, world.token, ApiLimits(retries=0))
            destination = CrmObjects.for_target(client, CRM_DEALS.target)
            arm(destination)
            source = SqlSource(create_engine(world.erp_url), CRM_DEALS.source)
            state = StateStore(world.state_url, dlq_key=DLQ_KEY)
            start = datetime.fromisoformat(day)
            sync = Sync(CRM_DEALS, source, destination, state, run_id="killed", actor="t", why="t")
            sync.run_window(start, start + timedelta(days=1))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize(
    "arm", [kill_between_the_link_and_the_unlink, kill_before_the_ledger_commit]
)
def test_a_moved_deal_killed_mid_write_ends_linked_as_if_never_killed(world, crm_client, arm):
    """Killed after the CRM linked the new contact (and maybe unlinked the old one) but before
    the ledger noted it: the rerun ends with the same links as a run never killed."""
    with dg.instance_for_test() as instance:
        deal = a_moved_deal(world, crm_client, instance)
        day_killed(world, deal.day, arm)
        materialize_deals(instance, tags=None, partition_key=deal.day)
        assert linked_contacts(crm_client, deal) == sorted([deal.new, deal.by_hand])
        again = materialize_deals(instance, tags=None, partition_key=deal.day)
        assert again["written"] == 0
