"""erp/support_tickets against a real RT5: tickets made and changed through REST2 reach the ERP's
staging table by the sensor-requested run, once each, the requestor resolved to the customer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from urllib.parse import unquote_plus

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.erp_support_tickets import ERP_SUPPORT_TICKETS
from assets.factory import flow_asset
from assets.helpdesk_users import HELPDESK_USERS
from definitions import active_flows, definitions, resources
from integrations.engine.source import SourceReadFailed, SourceUnavailable
from integrations.engine.sync import Sync, SyncResult
from integrations.helpdesk.client import RtClient, rt_time
from integrations.helpdesk.source import RtTickets, updated_since
from integrations.http import ApiLimits
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from tests.dagster_runs import failed_once
from tests.rt_gateway import RtGateway

SUPPORT_TICKETS = dg.AssetKey(["erp", "support_tickets"])


def staged(erp_url: str) -> dict[int, dict[str, object]]:
    engine = create_engine(erp_url)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT * FROM support_tickets")).mappings().all()
    engine.dispose()
    return {row["ticket_id"]: dict(row) for row in rows}


def customers_with_email(erp_url: str, count: int) -> list[tuple[str, str]]:
    engine = create_engine(erp_url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT customer_number, email FROM customers WHERE deleted_at IS NULL "
                "AND email LIKE '%@example.com' AND country IS NOT NULL "
                "ORDER BY customer_id LIMIT :n"
            ),
            {"n": count},
        ).all()
    engine.dispose()
    return [(number, email) for number, email in rows]


def tick(sensor, instance, defs, cursor):
    return sensor(
        dg.build_sensor_context(
            instance=instance, cursor=cursor, resources=resources(), definitions=defs
        )
    )


def metadata(result: dg.ExecuteInJobResult) -> dict[str, object]:
    (event,) = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_tickets_arrive_once_each_by_the_sensors_runs(helpdesk_world, rt_client):
    defs = definitions(active_flows())
    sensor = defs.resolve_sensor_def("helpdesk_tickets_changed")
    with dg.instance_for_test() as instance:
        users = [flow_asset(HELPDESK_USERS)]
        assert dg.materialize(users, resources=resources(), instance=instance).success
        idle = tick(sensor, instance, defs, None)
        assert not idle.run_requests, "no tickets in RT yet: nothing to sync"

        customers = customers_with_email(helpdesk_world.erp_url, 3)
        # RT files mail from a customer's address (in any case) under the customer's user.
        requestors = [email.upper() for _, email in customers] + ["stranger@example.org"]
        tickets = [
            rt_client.create_ticket(
                {"Queue": "General", "Subject": f"question {n}", "Requestor": requestor}
            )
            for n, requestor in enumerate(requestors)
        ]
        first = tick(sensor, instance, defs, idle.cursor)
        (request,) = first.run_requests
        assert request.asset_selection == [SUPPORT_TICKETS]
        run = dg.materialize(
            [flow_asset(ERP_SUPPORT_TICKETS)],
            resources=resources(),
            instance=instance,
            tags=request.tags,
        )
        assert run.success and metadata(run)["inserted"] == 4
        rows = staged(helpdesk_world.erp_url)
        assert sorted(rows) == sorted(tickets)
        assert [rows[t]["customer_number"] for t in tickets] == [n for n, _ in customers] + [None]
        assert {row["status"] for row in rows.values()} == {"new"}
        assert {row["queue"] for row in rows.values()} == {"General"}
        assert all(row["resolved_at"] is None for row in rows.values())
        assert not tick(sensor, instance, defs, first.cursor).run_requests

        time.sleep(1.1)  # RT keeps LastUpdated to the second
        rt_client.update_ticket(tickets[0], {"Status": "resolved"})
        rt_client.update_ticket(tickets[1], {"Status": "open"})
        later = rt_client.create_ticket(
            {"Queue": "General", "Subject": "one more", "Requestor": customers[2][1]}
        )
        second = tick(sensor, instance, defs, first.cursor)
        (request,) = second.run_requests
        run = dg.materialize(
            [flow_asset(ERP_SUPPORT_TICKETS)],
            resources=resources(),
            instance=instance,
            tags=request.tags,
        )
        counts = metadata(run)
        assert (counts["inserted"], counts["updated"]) == (1, 2), "the lookback rereads, unchanged"
        rows = staged(helpdesk_world.erp_url)
        assert sorted(rows) == sorted([*tickets, later]), "each ticket once"
        assert rows[tickets[0]]["status"] == "resolved" and rows[tickets[0]]["resolved_at"]
        assert rows[tickets[1]]["status"] == "open" and rows[tickets[1]]["resolved_at"] is None
        assert rows[later]["customer_number"] == customers[2][0]
        assert not tick(sensor, instance, defs, second.cursor).run_requests


def test_the_query_asks_rt_for_a_relative_instant_so_its_time_zone_does_not_matter():
    now = datetime(2026, 11, 26, 12, 0, 0)
    assert updated_since(datetime(2026, 11, 26, 11, 0, 0), now) == (
        "LastUpdated >= 'now - 3660 seconds'"
    )


def test_a_run_an_hour_after_its_watermark_reads_the_tickets_changed_since(
    helpdesk_world, rt_client
):
    """The hourly run's query asks RT for changes since an hour and more ago: RT read "3960
    seconds ago" as the year 3959 and the run found nothing (here, an hour's lookback)."""
    (ticket,) = questions(rt_client, 1)
    spec = replace(ERP_SUPPORT_TICKETS, lookback=timedelta(hours=1))
    sync_tickets(helpdesk_world, rt_client, spec)
    rt_client.update_ticket(ticket, {"Status": "open"})
    result = sync_tickets(helpdesk_world, rt_client, spec)
    assert result.counts["updated"] == 1
    assert staged(helpdesk_world.erp_url)[ticket]["status"] == "open"


def sync_tickets(world, client: RtClient, spec) -> SyncResult:
    erp, state = create_engine(world.erp_url), world.state()
    try:
        return Sync(
            spec,
            RtTickets(client, spec.source),
            SqlTable(erp, spec.target),
            state,
            run_id=uuid.uuid4().hex,
            actor="test",
            why="test",
        ).run()
    finally:
        erp.dispose()
        state.dispose()


def questions(rt_client: RtClient, count: int) -> list[int]:
    """`count` new tickets, and a second more: RT keeps LastUpdated to the second, so a change
    made after this comes later than them all."""
    tickets = [
        rt_client.create_ticket({"Queue": "General", "Subject": f"question {n}"})
        for n in range(count)
    ]
    time.sleep(1.1)
    return tickets


@contextmanager
def paging_by_two(rt, hook) -> Iterator[RtClient]:
    """A client reading RT two tickets a page through a gateway that calls `hook` on each
    request (a change made while a run reads RT)."""
    gateway = RtGateway(rt.base_url, hook)
    paging = RtClient(gateway.url, user=rt.user, password=rt.password, page_size=2)
    try:
        yield paging
    finally:
        paging.close()
        gateway.close()


def test_a_ticket_answered_while_the_run_reads_rt_costs_no_other_ticket(helpdesk_world, rt_client):
    rt = helpdesk_world.rt
    tickets = questions(rt_client, 6)
    searches = []

    def agent_answers_the_first_ticket_between_two_pages(method: str, path: str) -> None:
        if path.startswith("/REST/2.0/tickets"):
            searches.append(path)
            if len(searches) == 2:
                rt_client.update_ticket(tickets[0], {"Status": "open"})

    spec = replace(ERP_SUPPORT_TICKETS, lookback=timedelta(0))
    with paging_by_two(rt, agent_answers_the_first_ticket_between_two_pages) as paging:
        sync_tickets(helpdesk_world, paging, spec)
        assert len(searches) >= 2, "the run read more than one page"
        assert set(tickets[1:]) <= set(staged(helpdesk_world.erp_url)), (
            "a ticket the pages skipped is never staged"
        )
        sync_tickets(helpdesk_world, paging, spec)
        rows = staged(helpdesk_world.erp_url)
        assert sorted(rows) == tickets
        assert rows[tickets[0]]["status"] == "open", "the answered ticket as it is now"


def test_a_ticket_created_while_the_run_reads_rt_is_not_passed_by_the_watermark(
    helpdesk_world, rt_client
):
    """The run lists the matches, then reads them. A ticket created after the listing, then a
    listed one answered: the answered one was served last as it was now, its new time moving the
    watermark past the new ticket, which no list of the run held (never staged once the run
    outlasted the lookback and RT's clock margin). The answered one is the next run's."""
    rt = helpdesk_world.rt
    tickets = questions(rt_client, 4)
    created: list[int] = []

    def a_ticket_comes_then_an_agent_answers_once_the_run_has_listed(method, path) -> None:
        if "id = " in unquote_plus(path) and not created:  # the first read of listed ids
            created.append(rt_client.create_ticket({"Queue": "General", "Subject": "new"}))
            time.sleep(1.1)  # RT keeps seconds: the answer comes after the new ticket
            rt_client.update_ticket(tickets[0], {"Status": "open"})

    spec = replace(ERP_SUPPORT_TICKETS, lookback=timedelta(0))
    with paging_by_two(rt, a_ticket_comes_then_an_agent_answers_once_the_run_has_listed) as paging:
        result = sync_tickets(helpdesk_world, paging, spec)
        (new,) = created
        (listed,) = rt_client.search_tickets(f"id = {new}", ["LastUpdated"])
        assert new in staged(helpdesk_world.erp_url) or (
            result.watermark_after.updated_at < rt_time(listed["LastUpdated"])
        ), "the watermark passed a ticket the run never staged"
        sync_tickets(helpdesk_world, paging, spec)
        rows = staged(helpdesk_world.erp_url)
        assert sorted(rows) == sorted([*tickets, new])
        assert rows[tickets[0]]["status"] == "open", "the answered ticket as it is now"


def test_a_ticket_answered_while_the_run_lists_is_not_passed_by_a_later_change(
    helpdesk_world, rt_client, monkeypatch
):
    """A listed ticket answered while the run still lists, then another ticket changed later
    and listed with that time: the answered one is left to the next run, so the run must serve
    nothing changed after it (served, the later time moved the watermark past the answer by
    more than the lookback and clock margin: never read). A listing outlasting them takes a big
    RT; here the lookback and margin are nought and the two changes seconds apart."""
    monkeypatch.setattr("integrations.helpdesk.source.CLOCK_MARGIN", timedelta(0))
    rt = helpdesk_world.rt
    tickets = questions(rt_client, 4)
    listings: list[str] = []

    def answers_come_between_two_pages_of_the_listing(method, path) -> None:
        if "id = " not in unquote_plus(path) and path.startswith("/REST/2.0/tickets"):
            listings.append(path)
            if len(listings) == 2:  # the first page (tickets 0 and 1) is listed
                rt_client.update_ticket(tickets[0], {"Status": "open"})
                time.sleep(2.1)
                rt_client.update_ticket(tickets[3], {"Status": "stalled"})

    spec = replace(ERP_SUPPORT_TICKETS, lookback=timedelta(0))
    with paging_by_two(rt, answers_come_between_two_pages_of_the_listing) as paging:
        sync_tickets(helpdesk_world, paging, spec)
        sync_tickets(helpdesk_world, paging, spec)
        rows = staged(helpdesk_world.erp_url)
        assert sorted(rows) == tickets
        assert rows[tickets[3]]["status"] == "stalled"
        assert rows[tickets[0]]["status"] == "open", "the answer is never read"


def test_a_customer_whose_rt_user_is_named_in_another_case_is_the_tickets_customer(
    helpdesk_world, rt_client
):
    # An agent made the customer's user by hand as "c…": RT holds that user as the customer's
    # (helpdesk/users writes to it) and files the customer's mail under it.
    ((number, email),) = customers_with_email(helpdesk_world.erp_url, 1)
    rt_client.create_user({"Name": number.lower(), "EmailAddress": email})
    ticket = rt_client.create_ticket({"Queue": "General", "Subject": "hello", "Requestor": email})
    sync_tickets(helpdesk_world, rt_client, ERP_SUPPORT_TICKETS)
    assert staged(helpdesk_world.erp_url)[ticket]["customer_number"] == number


class NamingClient(RtClient):
    """The real client, noting every ticket RT named in an answer of LastUpdated alone (the
    read's listings, as opposed to its reads of whole tickets)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.named: set[int] = set()

    def _collection(self, method, path, params, body=None) -> dict:
        answer = super()._collection(method, path, params, body)
        if ("fields", "LastUpdated") in params:
            self.named.update(int(ticket["id"]) for ticket in answer.get("items", []))
        return answer


def test_a_first_read_holds_about_a_page_of_tickets_never_every_ticket(rt, rt_client, monkeypatch):
    """Listing every ticket's (LastUpdated, id) before reading any held the whole RT in memory.
    At each batch served, the tickets the read has named but not served yet stay within two
    pages (a window and the look at where the next one ends), however many tickets RT holds.
    Three seconds apart, each second's tickets are further than the clock margin (2 s here, one
    clock on this machine) from the others, which RT's widened bounds would name too."""
    monkeypatch.setattr("integrations.helpdesk.source.CLOCK_MARGIN", timedelta(seconds=2))
    tickets = []
    for second in range(3):
        tickets += [
            rt_client.create_ticket({"Queue": "General", "Subject": f"q {second}.{n}"})
            for n in range(3)
        ]
        time.sleep(3.5)
    page = 2
    naming = NamingClient(rt.base_url, user=rt.user, password=rt.password, page_size=page)
    served, ahead = [], []
    for frame in RtTickets(naming, ERP_SUPPORT_TICKETS.source).batches(None, batch_size=page):
        served += frame["id"].tolist()
        ahead.append(len(naming.named - set(served)))
    listed = rt_client.search_tickets("id > 0", ["LastUpdated"])
    assert served == [i for _, i in sorted((t["LastUpdated"], int(t["id"])) for t in listed)]
    assert sorted(served) == tickets, "each ticket once"
    assert max(ahead) <= 2 * page, f"the read held {max(ahead)} tickets ahead of a {page}-page"


def test_a_ticket_answered_after_the_run_read_it_is_staged_as_answered_and_not_refused(
    helpdesk_world, rt_client
):
    """The walk meets a ticket read, then changed, again at its new time: both in one batch, the
    contract refused the batch's two rows of one id."""
    rt = helpdesk_world.rt
    tickets = questions(rt_client, 4)
    reads = []

    def agent_answers_the_first_ticket_once_read(method, path) -> None:
        if "id = " in unquote_plus(path):
            reads.append(path)
            if len(reads) == 2:  # the first page of tickets (the first two) has been read
                rt_client.update_ticket(tickets[0], {"Status": "open"})

    with paging_by_two(rt, agent_answers_the_first_ticket_once_read) as paging:
        result = sync_tickets(helpdesk_world, paging, ERP_SUPPORT_TICKETS)
    state = helpdesk_world.state()
    try:
        letters = state.list_dead_letters(flow=ERP_SUPPORT_TICKETS.name, limit=100)
    finally:
        state.dispose()
    assert letters == [], "a ticket read twice is no refusal"
    rows = staged(helpdesk_world.erp_url)
    assert sorted(rows) == tickets and result.counts["inserted"] == 4
    assert rows[tickets[0]]["status"] == "open", "the answered ticket as it is now"


def test_a_read_rt_refuses_fails_the_run_once_saying_what_to_fix(helpdesk_world, monkeypatch):
    """Wrong credentials (RT answers 401), then a user without the rights to read tickets behind
    a proxy that says so (403): the run said "unavailable ... rerun when the source answers" and
    Dagster retried it, each refused alike; it now fails once, quoting RT, saying what to fix."""
    prefix = f"flow {ERP_SUPPORT_TICKETS.name}: RT tickets: RT GET /tickets: "
    fix = "What to do: a rerun alone will not cure it: "
    monkeypatch.setenv("RT_PASSWORD", "not-the-password")
    with dg.instance_for_test() as instance:
        run = dg.materialize(
            [flow_asset(ERP_SUPPORT_TICKETS)],
            resources=resources(),
            instance=instance,
            raise_on_error=False,
        )
    description = failed_once(run)
    assert description.startswith(
        f"{prefix}refused the credentials: 401 Unauthorized. {fix}check RT_USER and RT_PASSWORD, "
        "or RT_TOKEN"
    )
    assert "not-the-password" not in description and "unavailable" not in description

    rt = helpdesk_world.rt
    monkeypatch.setenv("RT_PASSWORD", rt.password)
    gateway = RtGateway(rt.base_url, lambda method, path: 403 if "/tickets" in path else None)
    monkeypatch.setenv("RT_BASE_URL", gateway.url)
    try:
        with dg.instance_for_test() as instance:
            run = dg.materialize(
                [flow_asset(ERP_SUPPORT_TICKETS)],
                resources=resources(),
                instance=instance,
                raise_on_error=False,
            )
    finally:
        gateway.close()
    description = failed_once(run)
    assert description.startswith(
        f"{prefix}refused the read: 403 Forbidden. {fix}give the RT user handoff reads as "
        "(RT_USER, or RT_TOKEN's owner) the rights SeeQueue and ShowTicket"
    )
    assert "unavailable" not in description


def test_rt_out_of_reach_or_failing_is_still_unavailable_to_rerun(helpdesk_world):
    """What a rerun can cure stays SourceUnavailable: RT answering 503 (after the retries) and
    RT not reached at all; the 4xx of a read is SourceReadFailed."""
    rt = helpdesk_world.rt
    answers = {"status": 503}
    gateway = RtGateway(rt.base_url, lambda method, path: answers["status"])
    limits = ApiLimits(retries=1, backoff=0.01)
    client = RtClient(gateway.url, user=rt.user, password=rt.password, limits=limits)
    source = RtTickets(client, ERP_SUPPORT_TICKETS.source)
    try:
        with pytest.raises(SourceUnavailable, match="503"):
            source.high_water_mark()
        answers["status"] = 400
        with pytest.raises(SourceReadFailed, match="refused the read: 400 Bad Request"):
            source.high_water_mark()
    finally:
        client.close()
        gateway.close()
    nowhere = RtClient(gateway.url, user=rt.user, password=rt.password, limits=limits)
    with pytest.raises(SourceUnavailable, match="ConnectionError"):
        RtTickets(nowhere, ERP_SUPPORT_TICKETS.source).high_water_mark()


def test_a_ticket_answered_within_the_second_a_run_synced_up_to_gets_a_run(
    helpdesk_world, rt_client, monkeypatch
):
    """RT keeps LastUpdated to the second. A run reads a ticket answered at second S, moving its
    watermark to S; another ticket, answered within S once the run had listed what it reads, is
    left to the next run. RT's newest LastUpdated, S, equalled the watermark, and the sensor
    skipped until another change or the hourly run. Both answers fall within one second: the
    first as the run lists the tickets it reads (the start of a second), the second as it reads
    them; a sensor tick then, from before the run or from between the two answers, requests a
    run, which stages the second answer."""
    rt = helpdesk_world.rt
    first, second = questions(rt_client, 2)
    gateway_hook = {"armed": False}
    between: dict[str, object] = {}  # RT's newest change between the answers, as a tick saw it

    def two_answers_within_one_second_around_the_runs_read(method: str, path: str) -> None:
        query = unquote_plus(path)
        if not gateway_hook["armed"] or not path.startswith("/REST/2.0/tickets?"):
            return
        lists_what_it_reads = "fields=LastUpdated&" in query and "orderby=LastUpdated" not in query
        if lists_what_it_reads and not between:
            time.sleep(1.02 - time.time() % 1)  # RT's clock is this machine's
            rt_client.update_ticket(first, {"Status": "open"})
            between["change_counter"] = rt_client.newest_ticket_change()
        elif "id = " in query and between:  # it reads the tickets listed
            rt_client.update_ticket(second, {"Status": "open"})
            gateway_hook["armed"] = False

    gateway = RtGateway(rt.base_url, two_answers_within_one_second_around_the_runs_read)
    monkeypatch.setenv("RT_BASE_URL", gateway.url)
    defs = definitions(active_flows())
    sensor = defs.resolve_sensor_def("helpdesk_tickets_changed")
    try:
        with dg.instance_for_test() as instance:

            def sync(request: dg.RunRequest) -> None:
                assets = [flow_asset(ERP_SUPPORT_TICKETS)]
                run = dg.materialize(
                    assets, resources=resources(), instance=instance, tags=request.tags
                )
                assert run.success

            start = tick(sensor, instance, defs, None)
            (request,) = start.run_requests
            sync(request)
            before = tick(sensor, instance, defs, start.cursor)
            assert not before.run_requests

            gateway_hook["armed"] = True
            sync(request)
            answered = {
                int(t["id"]): rt_time(t["LastUpdated"])
                for t in rt_client.search_tickets("id > 0", ["LastUpdated"])
            }
            state = helpdesk_world.state()
            try:
                watermark = state.watermark(ERP_SUPPORT_TICKETS.name)
            finally:
                state.dispose()
            assert answered[first] == answered[second] == watermark.updated_at, (
                "RT took over a second for four requests: the answers fell in two seconds"
            )
            assert staged(helpdesk_world.erp_url)[second]["status"] == "new", "left to the next run"

            second_s = watermark.updated_at.isoformat()
            mid_run = json.dumps({"high_water_mark": second_s, **between})
            for cursor in (before.cursor, mid_run):
                after = tick(sensor, instance, defs, cursor)
                (request,) = after.run_requests
                # Not the key a tick between the answers requested: Dagster requests one once.
                assert request.run_key != f"helpdesk_tickets:{second_s}:{between['change_counter']}"
            sync(request)
            assert staged(helpdesk_world.erp_url)[second]["status"] == "open"
            assert not tick(sensor, instance, defs, after.cursor).run_requests
    finally:
        gateway.close()
