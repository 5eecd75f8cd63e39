"""The webhook receiver (`handoff webhooks serve`): verify, validate, store in the inbox, answer.

Every refusal is a 4xx naming its reason, decided before anything is stored: 404/405 (wrong
route), 411/413 (no length, or larger than `max_body`, refused before reading it), 415 (not
JSON), 401 (signature missing or wrong, timestamp stale), 400 (not JSON), 422 (not CRM events),
409 (a delivery id received before with other events). A delivery sent again (the sender's retry
after a lost answer, under the same id) is a 200 that stores nothing again. Well-formed events of
object types handoff does not sync are set aside, not refused (HubSpot sends no 4xx again, and the
events beside them would be lost): the 200 stores the others and counts them (`ignored`, with
their kinds, in the answer, the tally and a log line without record data). A state store that
does not answer is a 503 (the sender retries), never a lost event: the answer 200 comes only
after the inbox committed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa

from integrations.webhooks.events import (
    OBJECT_TYPE_IDS,
    NotJson,
    PayloadRefused,
    parse_delivery,
)
from integrations.webhooks.inbox import ReplayRefused, WebhookInbox
from integrations.webhooks.signatures import SignatureRefused, verify

PATH = "/webhooks/crm"
MAX_BODY = 256 * 1024  # 100 HubSpot events take about 40 KiB

logger = logging.getLogger("handoff.webhooks")


class Refusal(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class WebhookHandler(BaseHTTPRequestHandler):
    server: WebhookServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that stops sending mid-body does not hold a thread forever

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)  # request line: no secrets

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, {"status": "ok"})
        else:
            self._answer(405 if self.path == PATH else 404, {"error": "POST CRM events to " + PATH})

    def do_POST(self) -> None:
        try:
            self._answer(200, self._receive())
        except Refusal as refusal:
            self.server.note(refusal.status)
            self._answer(refusal.status, {"error": refusal.reason})

    def _receive(self) -> dict[str, object]:
        if self.path.split("?", 1)[0] != PATH:
            self.close_connection = True
            raise Refusal(404, f"no webhook route {self.path.split('?', 1)[0]}; use {PATH}")
        body = self._body()
        if self.headers.get_content_type() != "application/json":
            raise Refusal(415, "the body must be application/json")
        try:
            verified = verify(
                self.server.secrets, "POST", self.server.uri(self), self.headers, body
            )
        except SignatureRefused as error:
            raise Refusal(401, str(error)) from None
        try:
            delivery = parse_delivery(body)
        except NotJson as error:
            raise Refusal(400, str(error)) from None
        except PayloadRefused as error:
            raise Refusal(422, str(error)) from None
        try:
            accepted = self.server.inbox.accept(
                verified.delivery_id, verified.scheme, delivery.events
            )
        except ReplayRefused:
            raise Refusal(
                409, "this delivery id was received before with other events; nothing stored"
            ) from None
        except sa.exc.OperationalError as error:
            logger.error("webhook inbox unavailable: %s", type(error.orig).__name__)
            raise Refusal(503, "the inbox is unavailable; send again later") from None
        self.server.note(200, accepted.stored, accepted.duplicates, len(delivery.ignored))
        answer: dict[str, object] = {"stored": accepted.stored, "duplicates": accepted.duplicates}
        if delivery.ignored:
            answer.update(ignored=len(delivery.ignored), ignored_kinds=delivery.ignored_kinds())
            logger.warning(
                "delivery %s: %d of its events set aside, of object types handoff does not sync "
                "(%s; it syncs %s): subscribe to those object types only",
                verified.delivery_id,
                len(delivery.ignored),
                ", ".join(delivery.ignored_kinds()),
                ", ".join(f"{key} {value}" for key, value in OBJECT_TYPE_IDS.items()),
            )
        return answer

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise Refusal(411, "send a Content-Length (chunked bodies are not accepted)")
        if not length.isdecimal():
            self.close_connection = True
            raise Refusal(400, "Content-Length is not a number")
        if int(length) > self.server.max_body:
            self.close_connection = True  # the body stays unread
            raise Refusal(413, f"the body is larger than {self.server.max_body} bytes")
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            self.close_connection = True
            raise Refusal(400, "the body is shorter than its Content-Length")
        return body

    def _answer(self, status: int, body: dict[str, object]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status == 503:
            self.send_header("Retry-After", "5")
        self.end_headers()
        self.wfile.write(payload)


class WebhookServer(ThreadingHTTPServer):
    """Receives CRM webhooks on `PATH`; `secrets` are the signing secrets (several: rotation)."""

    daemon_threads = True

    def __init__(
        self,
        inbox: WebhookInbox,
        secrets: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        public_url: str | None = None,
        max_body: int = MAX_BODY,
    ):
        if not secrets:
            raise ValueError("the webhook receiver needs a signing secret: set CRM_WEBHOOK_SECRET")
        self.inbox, self.secrets, self.max_body = inbox, list(secrets), max_body
        self.public_url = public_url.rstrip("/") if public_url else None
        self.tally: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__((host, port), WebhookHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{PATH}"

    def uri(self, handler: WebhookHandler) -> str:
        """The URL as the sender called it (HubSpot signs it); behind a proxy, `public_url`."""
        base = self.public_url or f"http://{handler.headers.get('Host', '')}"
        return base + handler.path

    def note(self, status: int, stored: int = 0, duplicates: int = 0, ignored: int = 0) -> None:
        counts = (
            (str(status), 1),
            ("stored", stored),
            ("duplicates", duplicates),
            ("ignored", ignored),
        )
        with self._lock:
            for name, count in counts:
                self.tally[name] = self.tally.get(name, 0) + count

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="crm-webhooks", daemon=True)
        thread.start()
        return thread
