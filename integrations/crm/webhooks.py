"""The CRM sandbox's webhooks: a signed POST of HubSpot-style events to a subscriber on every change.

As HubSpot does: events are batched (at most 100 a request), one `creation` or `deletion` per
object and one `propertyChange` per changed property; delivery is at least once (a failed
request is sent again with a fresh timestamp, so a new signature, and the same event ids, and
under Standard Webhooks the same `webhook-id`, as its specification says a retry keeps). The
signing secret comes from the environment (`CRM_WEBHOOK_SECRET`, read by the CLI); the admin
endpoint `POST /_sandbox/webhooks` sets the subscriber URL and scheme, never the secret.
"""

from __future__ import annotations

import json
import queue
import secrets as random_ids
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import requests

from integrations.webhooks.signatures import hubspot_headers, standard_headers

SCHEMES = ("hubspot", "standard")
SINGULAR = {"contacts": "contact", "companies": "company", "deals": "deal", "tickets": "ticket"}
QUIET_PROPERTIES = {"lastmodifieddate", "hs_lastmodifieddate", "createdate", "hs_object_id"}
MAX_EVENTS = 100
PORTAL_ID = 62515  # the sandbox's pretend account


@dataclass(frozen=True)
class Change:
    """What one write did to one object: `created`, `deleted`, or the properties it changed."""

    object_type: str
    object_id: int
    action: str  # creation, propertyChange, deletion
    properties: dict[str, str]


def events_of(changes: Sequence[Change], now_ms: int) -> list[dict[str, object]]:
    """HubSpot's event payloads for these changes."""
    events = []
    for change in changes:
        kind = SINGULAR.get(change.object_type)
        if kind is None:
            continue
        common = {
            "portalId": PORTAL_ID,
            "appId": 1,
            "subscriptionId": 1,
            "occurredAt": now_ms,
            "attemptNumber": 0,
            "objectId": change.object_id,
            "changeSource": "CRM",
        }
        if change.action != "propertyChange":
            events.append(
                {
                    **common,
                    "eventId": random_ids.randbits(62),
                    "subscriptionType": f"{kind}.{change.action}",
                }
            )
            continue
        for name, value in sorted(change.properties.items()):
            if name not in QUIET_PROPERTIES:
                events.append(
                    {
                        **common,
                        "eventId": random_ids.randbits(62),
                        "subscriptionType": f"{kind}.propertyChange",
                        "propertyName": name,
                        "propertyValue": value,
                    }
                )
    return events


class WebhookSender:
    """Sends events to the subscriber from a background thread, retrying until it answers."""

    def __init__(
        self,
        secrets: Sequence[str],
        url: str | None = None,
        scheme: str = "hubspot",
        attempts: int = 8,
        backoff: float = 0.2,
    ):
        self.secrets = list(secrets)
        self.url, self.scheme = None, "hubspot"
        self.attempts, self.backoff = attempts, backoff
        self.stats = {"events": 0, "deliveries": 0, "retries": 0, "refused": 0, "given_up": 0}
        self._queue: queue.Queue[dict] = queue.Queue()
        self._busy = threading.Lock()
        self._session = requests.Session()
        self._worker: threading.Thread | None = None
        self.subscribe(url, scheme)

    def subscribe(self, url: str | None, scheme: str = "hubspot") -> dict[str, object]:
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}")
        if url and not self.secrets:
            raise ValueError("webhooks need a signing secret: set CRM_WEBHOOK_SECRET")
        if url and scheme == "standard" and not any(s.startswith("whsec_") for s in self.secrets):
            raise ValueError("Standard Webhooks need a whsec_ secret in CRM_WEBHOOK_SECRET")
        self.url, self.scheme = url or None, scheme
        if self.url and self._worker is None:  # a sandbox without a subscriber runs no thread
            self._worker = threading.Thread(
                target=self._work, name="crm-sandbox-webhooks", daemon=True
            )
            self._worker.start()
        return self.describe()

    def describe(self) -> dict[str, object]:
        return {"url": self.url, "scheme": self.scheme, **self.stats}

    def notify(self, changes: Sequence[Change]) -> None:
        if self.url:
            for event in events_of(changes, time.time_ns() // 1_000_000):
                self._queue.put(event)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once every queued event was delivered or given up (tests and demos)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    def _work(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_EVENTS:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._deliver(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _deliver(self, events: list[dict]) -> None:
        url = self.url
        if not url:
            return
        message_id = f"msg_{uuid.uuid4().hex}"
        for attempt in range(self.attempts):
            body = json.dumps([{**event, "attemptNumber": attempt} for event in events]).encode()
            if self.scheme == "hubspot":
                signed = hubspot_headers(self.secrets[0], "POST", url, body)
            else:
                ids = [s for s in self.secrets if s.startswith("whsec_")]
                signed = standard_headers(ids, message_id, body)
            try:
                response = self._session.post(
                    url,
                    data=body,
                    headers={"Content-Type": "application/json", **signed},
                    timeout=10,
                )
            except requests.RequestException:
                response = None
            if response is not None and response.ok:
                self.stats["deliveries"] += 1
                self.stats["events"] += len(events)
                return
            if (
                response is not None
                and 400 <= response.status_code < 500
                and (response.status_code != 429)
            ):
                self.stats["refused"] += 1  # the subscriber will not take it: retrying is useless
                return
            self.stats["retries"] += 1
            time.sleep(self.backoff * 2**attempt)
        self.stats["given_up"] += 1
