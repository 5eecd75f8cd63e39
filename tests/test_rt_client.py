"""The RT5 REST2 client against a real Request Tracker: paging, refusals, credentials, and an
outage that opens the shared transport's circuit breaker."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from integrations.helpdesk.client import (
    RtAuthError,
    RtClient,
    RtReadRefused,
    RtRequestRejected,
    RtUnavailable,
)
from integrations.helpdesk.local_rt import RT_LIB
from integrations.helpdesk.support_tier import TIER_FIELD
from integrations.http import ApiLimits


def test_setup_is_idempotent_and_keeps_the_admin_password_out_of_the_config(rt):
    pid = (rt.home / "rt-server.pid").read_text()
    assert rt.start() == rt.base_url
    assert (rt.home / "rt-server.pid").read_text() == pid, "a second start restarted RT"
    assert (rt.home / "password").stat().st_mode & 0o077 == 0
    config = (rt.home / "RT_SiteConfig.d" / "99-handoff.pm").read_text()
    assert rt.password not in config


def test_users_by_name_pages_and_tells_disabled_users_apart(rt, rt_client):
    names = [f"C{n:07d}" for n in range(1, 16)]
    for name in names:
        rt_client.create_user(
            {
                "Name": name,
                "EmailAddress": f"{name.lower()}@example.com",
                "CustomFields": {TIER_FIELD: "gold"},
            }
        )
    rt_client.update_user(names[0], {"Disabled": 1})
    paging = RtClient(rt.base_url, user=rt.user, password=rt.password, page_size=4)
    found = paging.users_by_name([*names, "C9999999"], ["EmailAddress", "CustomFields"])
    assert sorted(found) == names
    assert found[names[0]]["Disabled"] == "1"
    assert {found[name]["Disabled"] for name in names[1:]} == {"0"}
    assert found[names[1]]["CustomFields"][0]["values"] == ["gold"]
    assert len([u for u in paging.all_users(["EmailAddress"]) if u["Name"] in names]) == 14


def test_rt_refusals_keep_rts_message(rt_client):
    rt_client.create_user({"Name": "C0000001", "EmailAddress": "ada@example.com"})
    with pytest.raises(RtRequestRejected, match="Email address in use"):
        rt_client.create_user({"Name": "C0000002", "EmailAddress": "ADA@example.com"})


def test_wrong_credentials_fail_clearly_without_the_password(rt):
    client = RtClient(
        rt.base_url, user=rt.user, password="not-the-password", limits=ApiLimits(retries=0)
    )
    with pytest.raises(RtAuthError, match="RT_USER") as caught:
        client.ping()
    assert "not-the-password" not in str(caught.value)


def test_ticket_search_follows_pages_and_names_requestor_and_queue(rt, rt_client):
    rt_client.create_user({"Name": "C0000007", "EmailAddress": "grace@example.com"})
    created = [
        rt_client.create_ticket(
            {"Queue": "General", "Subject": f"printer {n}", "Requestor": "grace@example.com"}
        )
        for n in range(5)
    ]
    paging = RtClient(rt.base_url, user=rt.user, password=rt.password, page_size=2)
    found = list(paging.search_tickets("Queue = 'General'", ["Status", "Queue", "Requestor"]))
    assert [int(t["id"]) for t in found] == created
    assert found[0]["Queue"]["Name"] == "General"
    assert found[0]["Requestor"][0]["Name"] == "C0000007"
    assert paging.newest_ticket_update() is not None


def test_an_rt_outage_opens_the_circuit_names_rt_and_a_probe_closes_it(rt):
    limits = ApiLimits(retries=5, backoff=0.01, failures_to_open=3, open_seconds=0.5)
    client = RtClient(rt.base_url, user=rt.user, password=rt.password, limits=limits)
    assert client.ping()
    rt.stop(graceful=False)
    with pytest.raises(RtUnavailable, match="RT circuit open after 3 consecutive") as caught:
        client.ping()
    assert rt.password not in str(caught.value)
    with pytest.raises(RtUnavailable, match="RT circuit open"):
        client.ping()  # fails fast, without calling RT
    rt.start()
    time.sleep(0.6)
    assert client.ping(), "the half-open probe reaches RT again and closes the circuit"
    assert client.api.stats()["circuit"]["state"] == "closed"


# An agent of the README's least-privilege kind: ShowTicket on one queue, not on the whole RT.
_QUEUE_AGENT = r"""
use strict; use warnings; use RT; RT::LoadConfig(); RT::Init();
my $user = RT::User->new(RT->SystemUser);
my ($ok, $msg) = $user->Create(Name => 'handoff', Password => $ENV{AGENT_PASSWORD}, Privileged => 1);
die "$msg\n" unless $ok;
my $queue = RT::Queue->new(RT->SystemUser); $queue->Load('General');
for my $right (qw(SeeQueue ShowTicket)) {
    ($ok, $msg) = $user->PrincipalObj->GrantRight(Right => $right, Object => $queue);
    die "$msg\n" unless $ok;
}
"""


def queue_agent(rt, page_size: int = 2) -> RtClient:
    """A client acting as a new agent with SeeQueue and ShowTicket on the General queue."""
    environment = {
        **os.environ,
        "RT_SITE_CONFIG": str(rt.home / "RT_SiteConfig.pm"),
        "RT_SITE_CONFIG_DIR": str(rt.home / "RT_SiteConfig.d"),
        "AGENT_PASSWORD": "agent-password-1",
    }
    subprocess.run(
        ["perl", f"-I{RT_LIB}", "-e", _QUEUE_AGENT], env=environment, check=True, text=True
    )
    return RtClient(rt.base_url, user="handoff", password="agent-password-1", page_size=page_size)


def test_ticket_search_reads_every_page_when_rt_does_not_count_them(rt, rt_client):
    # Without SQL ACL checks RT does not count what a user with queue rights may see: its
    # answers carry no page count.
    setting = rt.home / "RT_SiteConfig.d" / "50-no-sql-acl.pm"
    setting.write_text("Set($UseSQLForACLChecks, 0);\n1;\n")
    try:
        rt.reset()
        agent = queue_agent(rt)
        created = [
            rt_client.create_ticket({"Queue": "General", "Subject": f"printer {n}"})
            for n in range(5)
        ]
        found = list(agent.search_tickets("Queue = 'General'", ["Status"]))
        assert [int(ticket["id"]) for ticket in found] == created
    finally:
        setting.unlink()
        rt.reset()


def test_a_ticket_read_rt_refuses_quotes_rt_and_says_what_to_fix(rt, rt_client):
    """A read of tickets RT answers with a 4xx is RT's refusal, not an outage: its status and
    message (the address in the query masked, not where in RT's code it died) and what to fix."""
    with pytest.raises(RtReadRefused) as unparsed:
        next(rt_client.search_tickets("Requestor.EmailAddress = 'ada@example.com' AND (", []))
    assert unparsed.value.status == 400
    assert unparsed.value.what == (
        "RT GET /tickets: refused the read: 400 Wrong query, expecting a OPEN_PAREN or KEYWORD "
        "in '(Requestor.EmailAddress = 'a***@e***.com' AND (>)<--here AND id > 0'"
    )
    assert "ada@example.com" not in str(unparsed.value) and "Tickets.pm" not in str(unparsed.value)
    assert "TicketSQL" in unparsed.value.todo

    # RT_BASE_URL with REST2's path in it: RT has no /REST/2.0/REST/2.0/tickets.
    doubled = RtClient(f"{rt.base_url}/REST/2.0", user=rt.user, password=rt.password)
    with pytest.raises(RtReadRefused, match="refused the read: 404 Not Found") as missing:
        doubled.newest_ticket_update()
    assert missing.value.todo.startswith("check RT_BASE_URL")

    # RT_BASE_URL naming another path of RT's: its web UI sends to its login page.
    elsewhere = RtClient(f"{rt.base_url}/rt", user=rt.user, password=rt.password)
    with pytest.raises(RtReadRefused, match=r"redirected to /NoAuth/Login\.html") as login:
        elsewhere.newest_ticket_update()
    assert login.value.todo.startswith("check RT_BASE_URL")


def test_the_newest_ticket_change_moves_with_each_ticket_change_the_agent_may_see(rt, rt_client):
    """The sensor's exact change counter: RT's newest ticket transaction moves with a change
    made within the second of the newest LastUpdated, not with a change to a user; and for an
    agent without ShowTicketComments, whose newest transaction is a comment it may not see, it is
    the newest it may see, not none (RT leaves the comment out of a page of one)."""
    agent = queue_agent(rt)
    ticket = rt_client.create_ticket({"Queue": "General", "Subject": "printer"})
    created = rt_client.newest_ticket_change()
    rt_client.update_ticket(ticket, {"Status": "open"})
    answered = rt_client.newest_ticket_change()
    assert answered > created
    assert agent.newest_ticket_change() == answered
    rt_client.create_user({"Name": "C0000001", "EmailAddress": "ada@example.com"})
    assert rt_client.newest_ticket_change() == answered, "a user's change is no ticket's"
    comment = {"Content": "internal note", "ContentType": "text/plain"}
    assert rt_client.api.request("POST", f"/REST/2.0/ticket/{ticket}/comment", json=comment).ok
    assert rt_client.newest_ticket_change() > answered
    assert agent.newest_ticket_change() == answered
