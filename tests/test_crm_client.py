"""The client copes with a real flaky server: 429 + Retry-After, 5xx bursts, outages."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from integrations.crm.client import CrmClient, CrmUnavailable
from integrations.http import ApiLimits

TOKEN = "s3cret-token-value"


class FlakyCrm(ThreadingHTTPServer):
    """Answers each request with the next scripted status, then 200 with an empty upsert result."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]):
        self.script = list(script)
        self.seen: list[float] = []
        super().__init__(("127.0.0.1", 0), FlakyHandler)


class FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyCrm

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(time.monotonic())
        status, headers = self.server.script.pop(0) if self.server.script else (200, {})
        body = json.dumps(
            {"status": "COMPLETE", "results": []}
            if status == 200
            else {"status": "error", "message": "nope", "category": "RATE_LIMITS"}
        ).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def flaky():
    servers = []

    def start(script):
        server = FlakyCrm(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def url(server: FlakyCrm) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_429_waits_as_long_as_retry_after_says(flaky):
    server = flaky([(429, {"Retry-After": "1"}), (200, {})])
    CrmClient(url(server), TOKEN, ApiLimits(backoff=0.01)).batch_upsert("contacts", "email", [])
    assert len(server.seen) == 2
    assert server.seen[1] - server.seen[0] >= 0.95


def test_5xx_bursts_are_retried_with_backoff(flaky):
    server = flaky([(503, {}), (502, {}), (500, {}), (200, {})])
    CrmClient(url(server), TOKEN, ApiLimits(backoff=0.05)).batch_upsert("contacts", "email", [])
    assert len(server.seen) == 4
    gaps = [b - a for a, b in zip(server.seen, server.seen[1:], strict=False)]
    assert gaps[-1] > gaps[0], "backoff grows"


def test_an_outage_ends_in_a_clear_error_without_the_token(flaky):
    server = flaky([(503, {})] * 10)
    with pytest.raises(CrmUnavailable, match="503 Service Unavailable after 3 attempts") as caught:
        CrmClient(url(server), TOKEN, ApiLimits(retries=2, backoff=0.01)).batch_upsert(
            "contacts", "email", []
        )
    assert TOKEN not in str(caught.value)
    assert len(server.seen) == 3


def test_a_closed_port_is_unavailable_not_a_crash():
    with pytest.raises(CrmUnavailable, match="ConnectionError") as caught:
        CrmClient("http://127.0.0.1:9", TOKEN, ApiLimits(retries=1, backoff=0.01)).batch_archive(
            "contacts", ["1"]
        )
    assert TOKEN not in str(caught.value)
