"""The RT5 REST2 client against a real Request Tracker, and its transport against real HTTP
servers that answer 429 and 503."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from integrations.helpdesk.client import (
    RtAuthError,
    RtClient,
    RtRequestRejected,
    RtUnavailable,
)
from integrations.helpdesk.support_tier import TIER_FIELD


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
    client = RtClient(rt.base_url, user=rt.user, password="not-the-password", retries=0)
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


class FlakyServer(ThreadingHTTPServer):
    """Answers `failures` times with `status` (Retry-After: 0), then 200 with JSON."""

    def __init__(self, status: int, failures: int):
        self.status, self.failures, self.requests = status, failures, 0
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyServer

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests += 1
        if self.server.requests <= self.server.failures:
            self.send_response(self.server.status)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"Version": "5.0.3", "Plugins": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("status", [429, 503])
def test_transient_answers_are_retried(status):
    server = FlakyServer(status, failures=2)
    try:
        client = RtClient(server.url, user="u", password="p", retries=3, backoff=0.01)
        assert client.ping()["Version"] == "5.0.3"
        assert server.requests == 3
    finally:
        server.shutdown()
        server.server_close()


def test_an_rt_that_keeps_failing_is_unavailable_and_named():
    server = FlakyServer(503, failures=100)
    try:
        client = RtClient(server.url, user="u", password="secret-pw", retries=2, backoff=0.01)
        with pytest.raises(RtUnavailable, match="RT GET /rt: answered 503") as caught:
            client.ping()
        assert "secret-pw" not in str(caught.value)
    finally:
        server.shutdown()
        server.server_close()
