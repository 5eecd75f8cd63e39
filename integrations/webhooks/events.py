"""CRM webhook events as HubSpot sends them, validated at the edge before anything is stored.

A delivery is a JSON array of up to 100 events (HubSpot), or one event object (one Standard
Webhooks message). Each event names what changed, never the whole record: the flow reads the
record from the CRM's API, so a lost or reordered event costs nothing but latency.

Two forms of subscription type: the legacy one names the object (`contact.propertyChange`);
HubSpot's generic one (apps on its newer platform) is `object.<action>`
(`object.propertyChange`) and names the object type by id in `objectTypeId` (`"0-1"` contacts;
an association change's own object in `fromObjectTypeId`). Both come to the same event.

An event of an object type handoff does not sync (a custom object's `2-…`, a note, a legacy
`product.creation`) is checked like any other and then set aside, counted, not stored: refusing
its delivery would lose the events beside it, since HubSpot does not send a 4xx again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

MAX_EVENTS = 100  # HubSpot batches at most 100 events per request
OBJECT_TYPES = {"contact": "contacts", "company": "companies", "deal": "deals", "ticket": "tickets"}
ACTIONS = {
    "creation",
    "deletion",
    "propertyChange",
    "merge",
    "restore",
    "associationChange",
    "privacyDeletion",
}
# HubSpot's ids of the standard object types, as a generic (`object.*`) event names them.
OBJECT_TYPE_IDS = {"0-1": "contacts", "0-2": "companies", "0-3": "deals", "0-5": "tickets"}
GENERIC = "object"
# HubSpot sends privacy deletions in the legacy form only (`contact.privacyDeletion`).
GENERIC_ACTIONS = ACTIONS - {"privacyDeletion"}
# What a type handoff does not sync looks like: HubSpot's object type ids, a legacy object name.
_TYPE_ID = re.compile(r"\d{1,3}-\d{1,20}")
_LEGACY_NAME = re.compile(r"[a-z][a-z_]{0,39}")
_EARLIEST_MS = 946_684_800_000  # 2000-01-01: an occurredAt before it is not a real event


class PayloadRefused(ValueError):
    """The body is not a delivery of CRM events; the message says what is wrong and where."""


class NotJson(PayloadRefused):
    """The body does not parse as JSON at all."""


@dataclass(frozen=True)
class CrmEvent:
    """One change in the CRM: `object_type` is the API's plural (`contacts`, `deals`)."""

    event_key: str
    subscription_type: str
    object_type: str
    object_id: int
    occurred_at: datetime
    property_name: str | None


@dataclass(frozen=True)
class IgnoredEvent:
    """A valid event of an object type handoff does not sync: `kind` is its subscription type,
    with a generic event's object type id (`object.creation 2-143967026`); no record data."""

    kind: str


@dataclass(frozen=True)
class Delivery:
    """A delivery's events handoff syncs, and those it sets aside."""

    events: list[CrmEvent]
    ignored: list[IgnoredEvent]

    def ignored_kinds(self) -> list[str]:
        """What was set aside, each kind once, for the sender's answer and the log."""
        return sorted({event.kind for event in self.ignored})


def _whole(event: dict, name: str, where: str, required: bool = True) -> int | None:
    value = event.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PayloadRefused(f"{where}.{name} must be a non-negative whole number")
    return value


def _generic_object_type(event: dict, action: str, where: str) -> tuple[str | None, str]:
    """The object type a generic (`object.*`) event is about, by its `objectTypeId` (an
    association change's own object: `fromObjectTypeId`, when it has no `objectTypeId`), and
    that id; None for one handoff does not sync (a custom object's "2-…", a note's "0-46"):
    stored, it would request runs of no flow."""
    name = (
        "fromObjectTypeId"
        if action == "associationChange" and "objectTypeId" not in event
        else "objectTypeId"
    )
    type_id = event.get(name)
    if not isinstance(type_id, str) or not type_id:
        raise PayloadRefused(
            f"{where}.{name} must name the object type of an object.{action} event (e.g. "
            "'0-1' for contacts)"
        )
    if type_id not in OBJECT_TYPE_IDS and not _TYPE_ID.fullmatch(type_id):
        raise PayloadRefused(
            f"{where}.{name} {type_id[:40]!r} is not an object type id (e.g. '0-1' for contacts)"
        )
    return OBJECT_TYPE_IDS.get(type_id), type_id


def _event(event: object, where: str) -> CrmEvent | IgnoredEvent:
    if not isinstance(event, dict):
        raise PayloadRefused(f"{where} must be an object")
    subscription = event.get("subscriptionType")
    if not isinstance(subscription, str) or subscription.count(".") != 1:
        raise PayloadRefused(
            f"{where}.subscriptionType must look like 'contact.propertyChange' or "
            "'object.propertyChange'"
        )
    kind, action = subscription.split(".")
    ignored = IgnoredEvent(subscription)
    if kind == GENERIC and action in GENERIC_ACTIONS:
        object_type, type_id = _generic_object_type(event, action, where)
        ignored = IgnoredEvent(f"{subscription} {type_id}")
    elif kind in OBJECT_TYPES and action in ACTIONS:
        object_type = OBJECT_TYPES[kind]
    elif kind != GENERIC and _LEGACY_NAME.fullmatch(kind) and action in ACTIONS:
        object_type = None  # a legacy event of an object handoff does not sync (`product.…`)
    else:
        raise PayloadRefused(f"{where}.subscriptionType {subscription!r} is not a CRM event type")
    event_id = _whole(event, "eventId", where)
    # HubSpot names an association change's objects fromObjectId and toObjectId, not objectId.
    linked = action == "associationChange" and "objectId" not in event
    object_id = _whole(event, "fromObjectId" if linked else "objectId", where)
    occurred = _whole(event, "occurredAt", where)
    portal = _whole(event, "portalId", where, required=False)
    if occurred < _EARLIEST_MS or occurred > 4_102_444_800_000:
        raise PayloadRefused(f"{where}.occurredAt must be epoch milliseconds")
    name = event.get("propertyName")
    if action == "propertyChange" and (not isinstance(name, str) or not 0 < len(name) <= 100):
        raise PayloadRefused(f"{where}.propertyName must name the changed property")
    if object_type is None:
        return ignored
    return CrmEvent(
        event_key=f"{portal or 0}:{event_id}",
        subscription_type=subscription,
        object_type=object_type,
        object_id=object_id,
        occurred_at=datetime.fromtimestamp(occurred / 1000, UTC).replace(tzinfo=None),
        property_name=name if action == "propertyChange" else None,
    )


def parse_delivery(body: bytes) -> Delivery:
    """The events of one delivery, those of object types handoff does not sync set aside, or
    `PayloadRefused` naming the first problem."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise NotJson(f"the body is not JSON: {error}") from None
    events = [payload] if isinstance(payload, dict) else payload
    if not isinstance(events, list) or not events:
        raise PayloadRefused("the body must be an event object or a non-empty array of them")
    if len(events) > MAX_EVENTS:
        raise PayloadRefused(f"at most {MAX_EVENTS} events per delivery, got {len(events)}")
    parsed = [_event(event, f"events[{n}]") for n, event in enumerate(events)]
    return Delivery(
        [event for event in parsed if isinstance(event, CrmEvent)],
        [event for event in parsed if isinstance(event, IgnoredEvent)],
    )
