"""Helpers for webhook tests: a receiver on a free port, and deliveries signed as the CRM signs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import requests

from integrations.crm.webhooks import PORTAL_ID
from integrations.webhooks.inbox import WebhookInbox
from integrations.webhooks.server import WebhookServer
from integrations.webhooks.signatures import hubspot_headers, standard_headers


@contextmanager
def receiver(state_url: str, secrets: list[str], **options) -> Iterator[WebhookServer]:
    """`handoff webhooks serve`, in a thread, on a free port of 127.0.0.1."""
    inbox = WebhookInbox(state_url)
    server = WebhookServer(inbox, secrets, port=0, **options)
    server.start_in_thread()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        inbox.dispose()


def event(object_id: int, kind: str = "contact.creation", event_id: int | None = None, **extra):
    return {
        "eventId": event_id if event_id is not None else uuid.uuid4().int >> 66,
        "subscriptionId": 1,
        "portalId": PORTAL_ID,
        "appId": 1,
        "occurredAt": int(time.time() * 1000),
        "subscriptionType": kind,
        "attemptNumber": 0,
        "objectId": object_id,
        "changeSource": "CRM",
        **extra,
    }


def signed(
    url: str, secret: str, body: bytes, scheme: str = "standard", now: float | None = None
) -> dict[str, str]:
    """Headers of a delivery of `body` to `url`, signed with `secret`, as of `now`."""
    if scheme == "hubspot":
        headers = hubspot_headers(secret, "POST", url, body, now=now)
    else:
        headers = standard_headers([secret], f"msg_{uuid.uuid4().hex}", body, now=now)
    return {"Content-Type": "application/json", **headers}


def deliver(
    session: requests.Session, url: str, secret: str, events, scheme: str = "standard"
) -> tuple[requests.Response, bytes, dict[str, str]]:
    body = json.dumps(events).encode()
    headers = signed(url, secret, body, scheme)
    return session.post(url, data=body, headers=headers, timeout=10), body, headers
