"""The webhook receiver over real HTTP: what it refuses (and stores nothing of), what it accepts."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time

import pytest
import requests

from integrations.webhooks.inbox import WebhookInbox
from integrations.webhooks.signatures import (
    SignatureRefused,
    hubspot_headers,
    parse_secrets,
    standard_headers,
    verify,
)
from tests.webhooks import deliver, event, receiver, signed

SECRET = os.environ["CRM_WEBHOOK_SECRET"]  # a whsec_ secret, set by conftest


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def server(tmp_path):
    with receiver(f"sqlite:///{tmp_path / 'state.sqlite'}", [SECRET], max_body=8192) as server:
        yield server


def stored(server) -> dict[str, int]:
    return server.inbox.counts()


def post(server, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(server.url, data=body, headers=headers, timeout=10)


def test_a_valid_delivery_is_stored_once_and_sent_again_stores_nothing_more(server):
    body = json.dumps([event(101), event(102, "deal.propertyChange", propertyName="amount")])
    headers = signed(server.url, SECRET, body.encode())
    first = post(server, body.encode(), headers)
    assert first.status_code == 200 and first.json() == {"stored": 2, "duplicates": 0}
    again = post(server, body.encode(), headers)
    assert again.status_code == 200 and again.json() == {"stored": 0, "duplicates": 2}
    assert stored(server) == {"deliveries": 1, "events": 2, "waiting": 2}


def test_a_standard_webhooks_retry_keeps_its_id_and_is_acknowledged_not_refused(server):
    """The sender lost the first answer and retries: same webhook-id, a new timestamp and
    signature. A non-2xx would have it retry for days and disable the endpoint."""
    body = json.dumps([event(201)]).encode()
    first = standard_headers([SECRET], "msg_lost_answer", body, now=time.time() - 5)
    assert post(server, body, {"Content-Type": "application/json", **first}).status_code == 200
    retry = standard_headers([SECRET], "msg_lost_answer", body)
    answer = post(server, body, {"Content-Type": "application/json", **retry})
    assert answer.status_code == 200 and answer.json() == {"stored": 0, "duplicates": 1}
    other = json.dumps([event(202)]).encode()
    reused = standard_headers([SECRET], "msg_lost_answer", other)
    refused = post(server, other, {"Content-Type": "application/json", **reused})
    assert refused.status_code == 409 and "other events" in refused.json()["error"]
    assert stored(server) == {"deliveries": 1, "events": 1, "waiting": 1}


def bad_requests(url: str) -> dict[str, tuple[int, str, bytes, dict[str, str]]]:
    """Each way a request can be wrong: (status, reason fragment, body, headers)."""
    good = json.dumps([event(7)]).encode()
    old = time.time() - 301
    unsupported = json.dumps([event(7, "contact.explosion")]).encode()
    no_object = json.dumps([{**event(7), "objectId": None}]).encode()
    too_many = json.dumps([event(n) for n in range(101)]).encode()
    return {
        "forged (another key)": (401, "matches none", good, signed(url, new_secret(), good)),
        "forged hubspot": (401, "matches none", good, signed(url, "guess", good, "hubspot")),
        "body changed after signing": (
            401,
            "matches none",
            good.replace(b"7", b"8"),
            signed(url, SECRET, good),
        ),
        "unsigned": (401, "unsigned", good, {"Content-Type": "application/json"}),
        "stale timestamp": (401, "minutes", good, signed(url, SECRET, good, now=old)),
        "stale hubspot timestamp": (
            401,
            "minutes",
            good,
            signed(url, SECRET, good, "hubspot", now=old),
        ),
        "future timestamp": (
            401,
            "minutes",
            good,
            signed(url, SECRET, good, now=time.time() + 400),
        ),
        "oversized": (413, "larger", b"[" + b" " * 9000 + b"]", signed(url, SECRET, b"[]")),
        "not JSON": (400, "not JSON", b"{oops", signed(url, SECRET, b"{oops")),
        "not UTF-8": (400, "not JSON", b"\xff\xfe", signed(url, SECRET, b"\xff\xfe")),
        "empty array": (422, "non-empty", b"[]", signed(url, SECRET, b"[]")),
        "unknown event type": (
            422,
            "not a CRM event",
            unsupported,
            signed(url, SECRET, unsupported),
        ),
        "no object id": (422, "objectId", no_object, signed(url, SECRET, no_object)),
        "more than 100 events": (422, "at most 100", too_many, signed(url, SECRET, too_many)),
        # isdigit() takes it, int() does not: the connection dropped without an answer.
        "timestamp in superscript digits": (
            401,
            "not a whole number",
            good,
            {**signed(url, SECRET, good), "webhook-timestamp": "\u00b2"},
        ),
        "wrong content type": (
            415,
            "application/json",
            good,
            {**signed(url, SECRET, good), "Content-Type": "text/plain"},
        ),
    }


CASES = list(bad_requests("http://x"))


@pytest.mark.parametrize("case", CASES)
def test_bad_requests_get_their_4xx_with_a_reason_and_nothing_is_stored(tmp_path, case):
    # Oversized and 100-event bodies need room: the size limit here is the default 256 KiB,
    # except for `oversized`, which a small limit makes cheap.
    options = {"max_body": 8192} if case == "oversized" else {}
    with receiver(f"sqlite:///{tmp_path / 'state.sqlite'}", [SECRET], **options) as server:
        status, fragment, body, headers = bad_requests(server.url)[case]
        answer = post(server, body, headers)
        assert answer.status_code == status, answer.text
        assert fragment in answer.json()["error"]
        assert SECRET not in answer.text
        assert stored(server) == {"deliveries": 0, "events": 0, "waiting": 0}


def test_wrong_routes_and_a_missing_length_are_refused(server):
    assert requests.get(server.url, timeout=5).status_code == 405
    assert requests.post(server.url + "/other", data=b"[]", timeout=5).status_code == 404
    chunked = requests.post(
        server.url,
        data=iter([b"[]"]),
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert chunked.status_code == 411
    assert requests.get(server.url.replace("/webhooks/crm", "/healthz"), timeout=5).ok


def test_rotation_accepts_the_old_and_the_new_secret_on_both_schemes(tmp_path):
    old, new = new_secret(), new_secret()
    with receiver(f"sqlite:///{tmp_path / 'state.sqlite'}", [new, old]) as server:
        session = requests.Session()
        for secret in (old, new):
            for scheme in ("standard", "hubspot"):
                answer, _, _ = deliver(session, server.url, secret, [event(1)], scheme)
                assert answer.status_code == 200, (scheme, answer.text)
        # A sender mid-rotation signs with both keys: one known signature is enough.
        body = json.dumps([event(2)]).encode()
        headers = standard_headers([new_secret(), new], "msg_both", body)
        assert post(server, body, {"Content-Type": "application/json", **headers}).ok
        assert stored(server)["events"] == 5


def test_signatures_are_checked_over_method_uri_body_and_timestamp():
    secret, body, now = "client-secret", b"[]", time.time()
    url = "https://hooks.example.com/webhooks/crm"
    headers = hubspot_headers(secret, "POST", url, body, now=now)
    assert verify([secret], "POST", url, headers, body, now=now).scheme == "hubspot-v3"
    for method, uri in (("PUT", url), ("POST", url + "?x=1")):
        with pytest.raises(SignatureRefused):
            verify([secret], method, uri, headers, body, now=now)
    with pytest.raises(SignatureRefused, match="minutes"):
        verify([secret], "POST", url, headers, body, now=now + 301)
    assert parse_secrets(" a, b  c ") == ["a", "b", "c"]
    # HubSpot signs the URI with escapes such as %3A and %40 decoded.
    escaped = url + "?portal=a%3Ab%40c"
    decoded = hubspot_headers(secret, "POST", url + "?portal=a:b@c", body, now=now)
    assert verify([secret], "POST", escaped, decoded, body, now=now).scheme == "hubspot-v3"


def test_the_inbox_counts_an_event_sent_again_under_a_new_delivery_as_a_duplicate(tmp_path):
    inbox = WebhookInbox(f"sqlite:///{tmp_path / 'state.sqlite'}")
    with receiver(inbox.engine.url.render_as_string(), [SECRET]) as server:
        session = requests.Session()
        same = event(5, event_id=42)
        first, _, _ = deliver(session, server.url, SECRET, [same])
        retry, _, _ = deliver(session, server.url, SECRET, [same, event(6)], "hubspot")
        assert first.json() == {"stored": 1, "duplicates": 0}
        assert retry.json() == {"stored": 1, "duplicates": 1}
    assert inbox.counts() == {"deliveries": 2, "events": 2, "waiting": 2}
    inbox.dispose()


def test_an_association_change_is_stored_and_the_delivery_it_came_in_is_not_refused(server):
    """HubSpot's association changes name their objects as fromObjectId and toObjectId, with no
    objectId: the whole delivery was refused (422, never retried), losing every event it carried."""
    linked = {
        key: value
        for key, value in event(0, "contact.associationChange").items()
        if key != "objectId"
    }
    linked.update(
        associationType="CONTACT_TO_COMPANY",
        fromObjectId=301,
        toObjectId=9001,
        associationRemoved=False,
        isPrimaryAssociation=True,
    )
    body = json.dumps([event(302, "contact.propertyChange", propertyName="city"), linked])
    answer = post(server, body.encode(), signed(server.url, SECRET, body.encode(), "hubspot"))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"stored": 2, "duplicates": 0}
    stored_events = [(e.subscription_type, e.object_id) for e in server.inbox.after(0, 10)]
    assert stored_events == [("contact.propertyChange", 302), ("contact.associationChange", 301)]


def generic(object_id: int, action: str, type_id: str, **extra) -> dict:
    """An event of HubSpot's generic subscription types: `object.<action>`, the object type by
    its id in `objectTypeId`, as apps on HubSpot's newer platform receive them."""
    return event(object_id, f"object.{action}", objectTypeId=type_id, **extra)


def test_generic_object_events_are_stored_as_the_object_types_they_name(server):
    """HubSpot's `object.creation`/`object.propertyChange`/`object.deletion` (objectTypeId
    "0-1" contacts, "0-2" companies, "0-3" deals) were refused as "not a CRM event type": a
    newer app's every delivery answered 422, never retried, each change it carried lost."""
    linked = {k: v for k, v in generic(0, "associationChange", "").items() if k != "objectId"}
    del linked["objectTypeId"]
    linked.update(fromObjectTypeId="0-3", toObjectTypeId="0-1", fromObjectId=405, toObjectId=9)
    events = [
        generic(401, "creation", "0-1"),
        generic(402, "propertyChange", "0-1", propertyName="city", propertyValue="Oslo"),
        generic(403, "propertyChange", "0-2", propertyName="domain", propertyValue="a.example"),
        generic(404, "deletion", "0-3"),
        linked,
    ]
    body = json.dumps(events).encode()
    answer = post(server, body, signed(server.url, SECRET, body, "hubspot"))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"stored": 5, "duplicates": 0}
    assert [
        (e.subscription_type, e.object_type, e.object_id) for e in server.inbox.after(0, 10)
    ] == [
        ("object.creation", "contacts", 401),
        ("object.propertyChange", "contacts", 402),
        ("object.propertyChange", "companies", 403),
        ("object.deletion", "deals", 404),
        ("object.associationChange", "deals", 405),
    ]


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (
            generic(501, "creation", "custom_thing"),
            "events[1].objectTypeId 'custom_thing' is not an object type id (e.g. '0-1'",
        ),
        (
            {k: v for k, v in generic(502, "deletion", "0-1").items() if k != "objectTypeId"},
            "events[1].objectTypeId must name the object type of an object.deletion event",
        ),
        (generic(503, "privacyDeletion", "0-1"), "'object.privacyDeletion' is not a CRM event"),
        (
            {k: v for k, v in generic(504, "creation", "2-143967026").items() if k != "eventId"},
            "events[1].eventId must be a non-negative whole number",
        ),
        (
            {k: v for k, v in event(505, "product.creation").items() if k != "objectId"},
            "events[1].objectId must be a non-negative whole number",
        ),
    ],
    ids=[
        "not an object type id",
        "no object type",
        "no generic privacy deletion",
        "an ignored type's event without an id",
        "an ignored legacy event without an object id",
    ],
)
def test_a_delivery_with_a_malformed_event_is_refused_whole_saying_which(server, bad, fragment):
    """An event of a type handoff does not sync is checked as any other: one that is malformed
    (no id, no object type) has its delivery refused, nothing of it stored."""
    body = json.dumps([generic(500, "creation", "0-1"), bad]).encode()
    answer = post(server, body, signed(server.url, SECRET, body, "hubspot"))
    assert answer.status_code == 422 and fragment in answer.json()["error"], answer.text
    assert stored(server) == {"deliveries": 0, "events": 0, "waiting": 0}


def test_events_of_object_types_handoff_does_not_sync_are_set_aside_and_the_others_stored(
    server, caplog
):
    """A delivery with one event of a custom object ("2-…") or of a legacy object type handoff
    does not know (`product.creation`) was refused whole (422); HubSpot does not send a 4xx
    again, so the contact and deal changes beside it were lost until a scheduled run. They are
    stored and the delivery answered 200, the others counted as ignored, by kind, in the answer,
    the receiver's tally and a log line carrying no property value."""
    events = [
        generic(601, "creation", "0-1"),
        generic(602, "propertyChange", "2-143967026", propertyName="vin", propertyValue="WVW123"),
        event(603, "product.creation"),
        event(604, "deal.propertyChange", propertyName="amount", propertyValue="4200"),
        generic(605, "creation", "2-143967026"),
        generic(606, "deletion", "0-46"),
    ]
    body = json.dumps(events).encode()
    with caplog.at_level("WARNING", logger="handoff.webhooks"):
        answer = post(server, body, signed(server.url, SECRET, body, "hubspot"))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "stored": 2,
        "duplicates": 0,
        "ignored": 4,
        "ignored_kinds": [
            "object.creation 2-143967026",
            "object.deletion 0-46",
            "object.propertyChange 2-143967026",
            "product.creation",
        ],
    }
    assert [(e.object_type, e.object_id) for e in server.inbox.after(0, 10)] == [
        ("contacts", 601),
        ("deals", 604),
    ]
    assert stored(server) == {"deliveries": 1, "events": 2, "waiting": 2}
    assert server.tally["ignored"] == 4 and server.tally["stored"] == 2
    (line,) = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert "4 of its events set aside, of object types handoff does not sync" in line
    assert "product.creation" in line and "0-1 contacts" in line
    assert "WVW123" not in line and "vin" not in line and "4200" not in line

    only_ignored = json.dumps([generic(607, "creation", "2-143967026")]).encode()
    answer = post(server, only_ignored, signed(server.url, SECRET, only_ignored, "hubspot"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored"] == 0 and answer.json()["ignored"] == 1
    assert stored(server) == {"deliveries": 2, "events": 2, "waiting": 2}
