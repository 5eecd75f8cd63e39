"""CRM → ERP: a change in the CRM sandbox reaches the ERP's staging tables through a signed webhook,
the inbox, the crm_webhooks sensor and the run it requests; a burst of 1,000 events (10%
duplicates) is stored once each and leads to the right rows."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import dagster as dg
import pandera.pandas as pa
import pytest
import requests
import sqlalchemy as sa
from pandera.typing import Series

from assets.checks import reconciliation_check
from assets.crm_contacts import CRM_CONTACTS
from assets.erp_crm_contact_updates import ERP_CRM_CONTACT_UPDATES
from assets.erp_crm_deals import ERP_CRM_DEALS
from assets.factory import flow_asset
from definitions import active_flows, definitions, resources
from integrations.contracts import Contract
from integrations.contracts.crm_contact_object import CrmContactObjectV2
from integrations.crm.faults import Faults
from integrations.sql.connect import create_engine
from tests.webhooks import event, receiver, signed

SECRET = os.environ["CRM_WEBHOOK_SECRET"]
CONTACT_UPDATES = dg.AssetKey(["erp", "crm_contact_updates"])
DEALS = dg.AssetKey(["erp", "crm_deals"])
ASSETS = [flow_asset(ERP_CRM_CONTACT_UPDATES), flow_asset(ERP_CRM_DEALS)]


def staged(erp_url: str, table: str, key: str) -> dict[int, dict[str, object]]:
    engine = create_engine(erp_url)
    with engine.connect() as connection:
        rows = connection.execute(sa.text(f"SELECT * FROM {table}")).mappings().all()
    engine.dispose()
    return {row[key]: dict(row) for row in rows}


def tick(instance, cursor):
    defs = definitions(active_flows())
    sensor = defs.resolve_sensor_def("crm_webhooks")
    return sensor(
        dg.build_sensor_context(
            instance=instance, cursor=cursor, resources=resources(), definitions=defs
        )
    )


def run(instance, request: dg.RunRequest) -> dg.ExecuteInJobResult:
    result = dg.materialize(
        ASSETS,
        selection=request.asset_selection,
        resources=resources(),
        instance=instance,
        tags=request.tags,
    )
    assert result.success
    return result


def counts(result: dg.ExecuteInJobResult) -> dict[str, dict[str, object]]:
    return {
        event.asset_key.to_user_string(): {
            key: value.value for key, value in event.materialization.metadata.items()
        }
        for event in result.get_asset_materialization_events()
    }


def created(crm_client, object_type: str, id_property: str, inputs: list[dict]) -> list[int]:
    """The CRM ids of these objects, upserted 100 at a time."""
    return [
        int(item["id"])
        for start in range(0, len(inputs), 100)
        for item in crm_client.batch_upsert(
            object_type, id_property, inputs[start : start + 100]
        ).results
    ]


def subscribe(world, url: str, scheme: str) -> None:
    answer = requests.post(
        f"{world.crm.base_url}/_sandbox/webhooks",
        json={"url": url, "scheme": scheme},
        headers={"Authorization": f"Bearer {world.token}"},
        timeout=5,
    )
    assert answer.ok, answer.text


def test_a_crm_change_reaches_the_erp_by_webhook_inbox_sensor_and_run(
    world, crm_client, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    with receiver(world.state_url, [SECRET]) as server, dg.instance_for_test() as instance:
        assert not tick(instance, None).run_requests, "an empty inbox asks for nothing"
        subscribe(world, server.url, "hubspot")
        contacts = crm_client.batch_upsert(
            "contacts",
            "email",
            [
                {"id": "ada@example.com", "properties": {"firstname": "Ada", "country": "gb"}},
                {"id": "Bob@Example.com", "properties": {"firstname": "Bob", "country": "FR"}},
                # Not a country code: the staging contract refuses it, the DLQ keeps it.
                {"id": "cy@example.com", "properties": {"firstname": "Cy", "country": "France"}},
            ],
        ).results
        (deal,) = crm_client.batch_upsert(
            "deals",
            "dealname",
            [
                {
                    "id": "Big one",
                    "properties": {"amount": "1200.50", "dealstage": "appointmentscheduled"},
                }
            ],
        ).results
        assert world.crm.webhooks.wait_idle()
        assert server.inbox.counts()["events"] == 4, "a creation event per object"

        first = tick(instance, None)
        (request,) = first.run_requests
        assert set(request.asset_selection) == {CONTACT_UPDATES, DEALS}
        assert server.inbox.counts()["waiting"] == 4, "consumed once the cursor is committed"
        metadata = counts(run(instance, request))
        assert metadata["erp/crm_contact_updates"]["inserted"] == 2
        assert metadata["erp/crm_contact_updates"]["rejected"] == 1
        assert metadata["erp/crm_deals"]["inserted"] == 1

        rows = staged(world.erp_url, "crm_contact_updates", "crm_contact_id")
        ids = {item["properties"]["email"].lower(): int(item["id"]) for item in contacts}
        assert set(rows) == {ids["ada@example.com"], ids["bob@example.com"]}
        assert rows[ids["bob@example.com"]]["email"] == "bob@example.com"
        assert rows[ids["ada@example.com"]]["country"] == "GB"
        deals = staged(world.erp_url, "crm_deals", "crm_deal_id")
        assert float(deals[int(deal["id"])]["amount"]) == 1200.50
        assert deals[int(deal["id"])]["dealstage"] == "appointmentscheduled"

        idle = tick(instance, first.cursor)
        assert not idle.run_requests
        assert server.inbox.counts()["waiting"] == 0

        # A salesperson moves Ada to Lyon: one propertyChange event, one run, one row updated.
        crm_client.batch_upsert(
            "contacts", "email", [{"id": "ada@example.com", "properties": {"city": "Lyon"}}]
        )
        assert world.crm.webhooks.wait_idle()
        second = tick(instance, idle.cursor)
        (request,) = second.run_requests
        assert request.asset_selection == [CONTACT_UPDATES]
        metadata = counts(run(instance, request))["erp/crm_contact_updates"]
        assert (metadata["inserted"], metadata["updated"]) == (0, 1)
        rows = staged(world.erp_url, "crm_contact_updates", "crm_contact_id")
        assert rows[ids["ada@example.com"]]["city"] == "Lyon"
        assert not tick(instance, second.cursor).run_requests

    key = SECRET.removeprefix("whsec_")
    out, err = capfd.readouterr()
    state = (world.home / "state.sqlite").read_bytes().decode("latin-1")
    for text in (caplog.text + out + err, state):
        assert key not in text, "the webhook signing secret leaked"


def test_a_contact_edited_while_the_run_reads_the_crm_is_staged_once_and_costs_no_other(
    world, crm_client
):
    numbers = [f"C{n:07d}" for n in range(250)]
    for start in range(0, 250, 100):
        crm_client.batch_upsert(
            "contacts",
            "erp_customer_id",
            [
                {"id": number, "properties": {"email": f"{number}@example.com", "country": "FR"}}
                for number in numbers[start : start + 100]
            ],
        )
        time.sleep(0.002)
    # Each request waits 0.3 s before it is served: the edit lands between two search pages.
    world.crm.faults.configure(Faults(latency=0.3))
    before_run = world.crm.faults.counts["requests"]

    def salesperson_edits_an_already_read_contact():
        while world.crm.faults.counts["requests"] < before_run + 2:  # the second page's
            time.sleep(0.005)
        edit = {"inputs": [{"id": numbers[10], "properties": {"city": "Lyon"}}]}
        world.crm.store.batch_upsert("contacts", edit, "erp_customer_id")

    editor = threading.Thread(target=salesperson_edits_an_already_read_contact)
    editor.start()
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [flow_asset(ERP_CRM_CONTACT_UPDATES)], resources=resources(), instance=instance
        )
    editor.join()
    metadata = counts(result)["erp/crm_contact_updates"]
    assert (metadata["inserted"], metadata["rejected"]) == (250, 0), metadata
    rows = staged(world.erp_url, "crm_contact_updates", "erp_customer_id")
    assert set(rows) == set(numbers), "a contact the search skipped is never staged"
    assert rows[numbers[10]]["city"] == "Lyon", "the edited contact as it is now"


def test_the_sandbox_signs_with_standard_webhooks_too_and_reports_each_kind_of_change(
    world, crm_client
):
    with receiver(world.state_url, [SECRET]) as server:
        subscribe(world, server.url, "standard")
        (eve,) = created(
            crm_client, "contacts", "email", [{"id": "eve@example.com", "properties": {}}]
        )
        crm_client.batch_upsert(
            "contacts", "email", [{"id": "eve@example.com", "properties": {"city": "Oslo"}}]
        )
        crm_client.batch_upsert(
            "contacts", "email", [{"id": "eve@example.com", "properties": {"city": "Oslo"}}]
        )  # nothing changed: no event
        crm_client.batch_archive("contacts", [str(eve)])
        assert world.crm.webhooks.wait_idle()
        assert world.crm.webhooks.describe()["refused"] == 0
        seen = [(e.subscription_type, e.object_id) for e in server.inbox.after(0, 10)]
        assert seen == [
            ("contact.creation", eve),
            ("contact.propertyChange", eve),
            ("contact.deletion", eve),
        ]


def test_a_burst_of_1000_events_with_10_percent_duplicates_is_stored_once_each(
    any_world, crm_client, figures
):
    world = any_world  # the inbox and the ERP on SQLite, then on PostgreSQL
    contacts = created(
        crm_client,
        "contacts",
        "email",
        [{"id": f"burst{n}@example.com", "properties": {"firstname": f"B{n}"}} for n in range(700)],
    )
    deals = created(
        crm_client,
        "deals",
        "dealname",
        [
            {"id": f"Deal {n}", "properties": {"amount": str(n), "dealstage": "qualified"}}
            for n in range(200)
        ],
    )
    events = [event(object_id) for object_id in contacts] + [
        event(object_id, "deal.creation") for object_id in deals
    ]
    chooser = random.Random(4)
    with receiver(world.state_url, [SECRET]) as server, dg.instance_for_test() as instance:
        # 900 deliveries of one event each, HubSpot- and Standard-signed in turn; then 50 sent
        # again as they were and 50 retries of an event under a new delivery (200, not stored).
        deliveries = []
        for n, item in enumerate(events):
            body = json.dumps([item]).encode()
            deliveries.append(
                (body, signed(server.url, SECRET, body, ("standard", "hubspot")[n % 2]))
            )
        replays = chooser.sample(deliveries, 50)
        retries = []
        for item in chooser.sample(events, 50):
            body = json.dumps([item]).encode()
            retries.append((body, signed(server.url, SECRET, body)))
        burst = deliveries + replays + retries
        chooser.shuffle(burst)
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))

        def send(delivery):
            body, headers = delivery
            return session.post(server.url, data=body, headers=headers, timeout=30)

        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, burst))
        seconds = time.perf_counter() - started

        statuses = [answer.status_code for answer in answers]
        assert len(burst) == 1000
        assert statuses.count(200) == 1000
        accepted = [answer.json() for answer in answers]
        assert sum(a["stored"] for a in accepted) == 900
        assert sum(a["duplicates"] for a in accepted) == 100
        assert server.inbox.counts() == {"deliveries": 950, "events": 900, "waiting": 900}
        figures.append(
            f"burst ({world.state_url.split(':')[0]} inbox): 1000 deliveries in {seconds:.2f} s "
            f"({1000 / seconds:.0f}/s), 900 stored, 50 resent deliveries and 50 retried events "
            "counted as duplicates"
        )

        (request,) = tick(instance, None).run_requests
        metadata = counts(run(instance, request))
        assert metadata["erp/crm_contact_updates"]["inserted"] == 700
        assert metadata["erp/crm_deals"]["inserted"] == 200
    assert set(staged(world.erp_url, "crm_contact_updates", "crm_contact_id")) == set(contacts)
    assert set(staged(world.erp_url, "crm_deals", "crm_deal_id")) == set(deals)


def test_what_handoff_wrote_to_the_crm_is_not_staged_back_until_a_person_changes_it(
    world, crm_client
):
    """handoff's own writes to the CRM came back through its changes: every contact synced from
    the ERP was staged for the ERP's owners as if a salesperson had changed it."""
    with dg.instance_for_test() as instance:
        written = counts(
            dg.materialize([flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance)
        )["crm/contacts"]["inserted"]
        assert written > 100

        echoed = counts(run_updates(instance))["erp/crm_contact_updates"]
        assert (echoed["inserted"], echoed["echoes"], echoed["rejected"]) == (0, written, 0)
        assert staged(world.erp_url, "crm_contact_updates", "crm_contact_id") == {}
        assert reconciled(instance).passed, "echoes are on neither side"

        # A salesperson moves one contact and clears another's phone: each is a change now.
        by_number = {
            c["properties"]["erp_customer_id"]: c
            for c in crm_client.list_objects("contacts", properties=["erp_customer_id", "phone"])
        }
        phoned = next(n for n, c in sorted(by_number.items()) if c["properties"]["phone"])
        moved = next(n for n in sorted(by_number) if n != phoned)
        crm_client.batch_upsert(
            "contacts",
            "erp_customer_id",
            [
                {"id": moved, "properties": {"city": "Lyon"}},
                {"id": phoned, "properties": {"phone": ""}},
            ],
        )
        changed = counts(run_updates(instance))["erp/crm_contact_updates"]
        assert (changed["inserted"], changed["echoes"]) == (2, written - 2)
        rows = staged(world.erp_url, "crm_contact_updates", "erp_customer_id")
        assert set(rows) == {moved, phoned} and rows[moved]["city"] == "Lyon"

        # The ERP's owners take the move in, and handoff writes the ERP's record back over it:
        # the staged row follows the CRM (an echo now, but of a record staged before).
        engine = create_engine(world.erp_url)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE customers SET city = 'Paris', updated_at = :now "
                    "WHERE customer_number = :number"
                ),
                {"now": datetime.now(UTC).replace(tzinfo=None), "number": moved},
            )
        engine.dispose()
        assert (
            counts(
                dg.materialize([flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance)
            )["crm/contacts"]["updated"]
            == 1
        )
        followed = counts(run_updates(instance))["erp/crm_contact_updates"]
        assert (followed["updated"], followed["inserted"]) == (1, 0)
        rows = staged(world.erp_url, "crm_contact_updates", "erp_customer_id")
        assert rows[moved]["city"] == "Paris"
        assert reconciled(instance).passed


def test_echoes_count_among_the_rows_the_error_budget_judges(world, crm_client):
    """Echoes passed the contract as unchanged records do, but the error budget left them out
    of the rows it judged: a few bad contacts among the CRM's new ones beside hundreds of
    handoff's own tripped the budget and stopped the flow."""
    with dg.instance_for_test() as instance:
        written = counts(
            dg.materialize([flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance)
        )["crm/contacts"]["inserted"]
        assert written > 100
        people = [
            {"id": f"person{n}@example.com", "properties": {"firstname": "P", "country": "FR"}}
            for n in range(18)
        ] + [  # not a country code: refused by the staging contract
            {"id": f"typo{n}@example.com", "properties": {"firstname": "T", "country": "France"}}
            for n in range(3)
        ]
        created(crm_client, "contacts", "email", people)
        result = dg.materialize(
            [flow_asset(ERP_CRM_CONTACT_UPDATES)],
            resources=resources(),
            instance=instance,
            raise_on_error=False,
        )
        assert result.success, "3 rejected of the run's 21 + echoes is within the budget"
        staging = counts(result)["erp/crm_contact_updates"]
        assert (staging["inserted"], staging["rejected"], staging["echoes"]) == (18, 3, written)


def reconciled(instance) -> dg.AssetCheckEvaluation:
    result = dg.materialize(
        [
            flow_asset(ERP_CRM_CONTACT_UPDATES),
            reconciliation_check(ERP_CRM_CONTACT_UPDATES, CONTACT_UPDATES),
        ],
        resources=resources(),
        instance=instance,
        selection=dg.AssetSelection.checks(dg.AssetCheckKey(CONTACT_UPDATES, "reconciliation")),
    )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def run_updates(instance) -> dg.ExecuteInJobResult:
    result = dg.materialize(
        [flow_asset(ERP_CRM_CONTACT_UPDATES)], resources=resources(), instance=instance
    )
    assert result.success
    return result


def test_an_echo_is_told_only_by_the_fields_both_flows_name():
    """A staging flow reading a field the writer never writes (a job title salespeople keep)
    would have taken a change to it for an echo, and never staged it."""

    class ContactWithTitleV1(CrmContactObjectV2):
        jobtitle: Series[str] = pa.Field(nullable=True)

    titled = Contract("crm.contact_object", 2, ContactWithTitleV1)
    with pytest.raises(ValueError, match=re.escape("fields this flow reads (['jobtitle'])")):
        dataclasses.replace(ERP_CRM_CONTACT_UPDATES, source_contract=titled)
    alone = dataclasses.replace(ERP_CRM_CONTACT_UPDATES, source_contract=titled, echo_of=None)
    assert alone.echo_of is None, "without echo_of, every version is staged"
