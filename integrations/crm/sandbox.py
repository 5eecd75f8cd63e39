"""The CRM sandbox: the subset of the HubSpot CRM v3 objects API that handoff uses, on SQLite.

Served by `handoff crm-sandbox --port P`. Bearer-token auth, HubSpot-shaped error bodies,
`createdAt`/`updatedAt` per record (untouched when an upsert changes nothing), unique values
(email for contacts, any idProperty) enforced case-insensitively as HubSpot does.

`Idempotency-Key` on a POST is honoured as Stripe does: the same key with the same request
replays the first answer (header `Idempotent-Replayed: true`) without acting again; the same key
with a different request is refused with 422. A key is kept 24 hours, as Stripe keeps it: an older
one is a new key, and expired keys are deleted as new ones come. Faults (rate limits, 5xx, latency, dropped
connections, per-record refusals, outages) are injected by `integrations.crm.faults`. Every change
is sent as a signed webhook to a subscriber, when one is set (`integrations.crm.webhooks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from integrations.contracts.rules import EMAIL_PATTERN
from integrations.crm.client import MAX_BATCH, last_modified_property
from integrations.crm.faults import FaultInjector, Faults, Verdict
from integrations.crm.webhooks import Change, WebhookSender

OBJECT_TYPES = ("contacts", "companies", "deals", "tickets")
# Properties that must be unique per object type, besides whatever idProperty a request names.
UNIQUE_PROPERTIES = {"contacts": ("email",), "companies": (), "deals": (), "tickets": ()}
MAX_SEARCH_PAGE = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    object_type TEXT NOT NULL,
    properties TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    archived INTEGER NOT NULL DEFAULT 0,
    archived_ms INTEGER
);
CREATE INDEX IF NOT EXISTS ix_objects_modified ON objects (object_type, archived, updated_ms, id);
CREATE TABLE IF NOT EXISTS unique_values (
    object_type TEXT NOT NULL,
    property TEXT NOT NULL,
    value TEXT NOT NULL,
    object_id INTEGER NOT NULL,
    PRIMARY KEY (object_type, property, value)
);
CREATE INDEX IF NOT EXISTS ix_unique_values_object ON unique_values (object_id);
CREATE TABLE IF NOT EXISTS associations (
    from_type TEXT NOT NULL,
    from_id INTEGER NOT NULL,
    to_type TEXT NOT NULL,
    to_id INTEGER NOT NULL,
    PRIMARY KEY (from_type, from_id, to_type, to_id)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    body TEXT,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_idempotency_keys_created ON idempotency_keys (created_ms);
"""
# Stripe keeps an idempotency key 24 hours; a long-running sandbox would keep every batch's answer.
IDEMPOTENCY_KEY_LIFETIME_MS = 24 * 3600 * 1000
# Expired keys are deleted at most this often: one DELETE a minute, not one per request.
IDEMPOTENCY_SWEEP_EVERY_MS = 60 * 1000


class ApiError(Exception):
    def __init__(self, status: int, category: str, message: str, **extra: object):
        super().__init__(message)
        self.status, self.category, self.message, self.extra = status, category, message, extra

    def body(self) -> dict[str, object]:
        return {
            "status": "error",
            "message": self.message,
            "correlationId": str(uuid.uuid4()),
            "category": self.category,
            **self.extra,
        }


def _pairs(body: dict, shape: str, of_input) -> list[tuple[int, int]]:
    """The (from id, to id) pairs of an associations batch's inputs, each read by `of_input`;
    a 400 naming the input without the `shape` it needs."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) > MAX_BATCH:
        raise ApiError(400, "VALIDATION_ERROR", f"inputs must be a list of at most {MAX_BATCH}")
    pairs = []
    for position, item in enumerate(inputs):
        try:
            pairs += of_input(item)
        except (KeyError, TypeError, ValueError):
            raise ApiError(400, "VALIDATION_ERROR", f"inputs[{position}] needs {shape}") from None
    return pairs


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    )


def _to_ms(value: object) -> int:
    text = str(value)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


class SandboxStore:
    """The sandbox's records in one SQLite file; one lock makes each request atomic."""

    def __init__(self, path: Path):
        self.connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.executescript(SCHEMA)
        self.lock = threading.Lock()
        self.on_change = lambda changes: None  # the webhook sender's, once there is one
        self._keys_swept_ms = 0  # when expired idempotency keys were last deleted

    def close(self) -> None:
        self.connection.close()

    def _bump(self, name: str, by: int) -> None:
        self.connection.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + ?",
            (name, by, by),
        )

    def stats(self) -> dict[str, int]:
        with self.lock:
            return dict(self.connection.execute("SELECT name, value FROM counters"))

    def _find(self, object_type: str, prop: str, value: str) -> int | None:
        row = self.connection.execute(
            "SELECT object_id FROM unique_values WHERE object_type=? AND property=? AND value=?",
            (object_type, prop, value.lower()),
        ).fetchone()
        return row[0] if row else None

    def _view(self, row, properties: list[str] | None = None) -> dict[str, object]:
        object_id, object_type, props, created, updated, archived, archived_ms = row
        stored = json.loads(props)
        modified = last_modified_property(object_type)
        stored.update(
            hs_object_id=str(object_id), createdate=_iso(created), **{modified: _iso(updated)}
        )
        if properties:
            stored = {name: stored.get(name) for name in properties}
        view = {
            "id": str(object_id),
            "properties": stored,
            "createdAt": _iso(created),
            "updatedAt": _iso(updated),
            "archived": bool(archived),
        }
        if archived:
            view["archivedAt"] = _iso(archived_ms)
        return view

    def batch_upsert(
        self,
        object_type: str,
        body: dict,
        default_id_property: str | None,
        refuses=lambda object_type, id_value: False,
    ) -> tuple[int, dict]:
        """Upsert every input; inputs that `refuses` come back as per-input errors (207),
        named by their objectWriteTraceId, as HubSpot's multi-status answers do."""
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise ApiError(400, "VALIDATION_ERROR", "inputs must be a non-empty list")
        if len(inputs) > MAX_BATCH:
            raise ApiError(
                400, "VALIDATION_ERROR", f"at most {MAX_BATCH} inputs per batch, got {len(inputs)}"
            )
        started = _now_ms()
        refused = [
            position
            for position, item in enumerate(inputs)
            if isinstance(item, dict) and refuses(object_type, str(item.get("id")))
        ]
        with self.lock:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                results = [
                    self._upsert_one(object_type, item, default_id_property, position)
                    for position, item in enumerate(inputs)
                    if position not in refused
                ]
                self._bump("upsert_inputs", len(results))
                self._bump("records_changed", sum(bool(changed) for _, changed in results))
                self.connection.execute("COMMIT")
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
        self.on_change(
            [
                Change(
                    object_type,
                    int(view["id"]),
                    "creation" if view["new"] else "propertyChange",
                    changed,
                )
                for view, changed in results
                if changed
            ]
        )
        answer: dict[str, object] = {
            "status": "COMPLETE",
            "results": [view for view, _ in results],
            "startedAt": _iso(started),
            "completedAt": _iso(_now_ms()),
        }
        if refused:
            answer["numErrors"] = len(refused)
            answer["errors"] = [_refusal(position, inputs[position]) for position in refused]
        return (207 if refused else 200), answer

    def replay(self, key: str) -> tuple[str, int, dict | None] | None:
        """The first answer given under an idempotency key within its 24 hours: (fingerprint,
        status, body); none for a key that expired but is not deleted yet."""
        with self.lock:
            row = self.connection.execute(
                "SELECT fingerprint, status, body FROM idempotency_keys "
                "WHERE key = ? AND created_ms > ?",
                (key, _now_ms() - IDEMPOTENCY_KEY_LIFETIME_MS),
            ).fetchone()
        if row is None:
            return None
        return row[0], row[1], json.loads(row[2]) if row[2] else None

    def remember(self, key: str, fingerprint: str, status: int, body: dict | None) -> None:
        """Keep the first answer under a key; an expired key's answer is replaced by it."""
        now = _now_ms()
        expired_at = now - IDEMPOTENCY_KEY_LIFETIME_MS
        with self.lock:
            self._forget_expired_keys(now, expired_at)
            self.connection.execute(
                "INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE "
                "SET fingerprint = excluded.fingerprint, status = excluded.status, "
                "body = excluded.body, created_ms = excluded.created_ms "
                "WHERE idempotency_keys.created_ms <= ?",
                (key, fingerprint, status, json.dumps(body) if body else None, now, expired_at),
            )

    def _forget_expired_keys(self, now: int, expired_at: int) -> None:
        """Delete the keys past their 24 hours, once a minute at most (the caller holds the
        lock): every batch upsert stores one, and none was ever deleted."""
        if now - self._keys_swept_ms < IDEMPOTENCY_SWEEP_EVERY_MS:
            return
        self._keys_swept_ms = now
        self.connection.execute("DELETE FROM idempotency_keys WHERE created_ms <= ?", (expired_at,))

    def update(self, object_type: str, object_id: str, body: dict) -> dict:
        """HubSpot's `PATCH /crm/v3/objects/{type}/{id}`: change one live object's properties
        by its id, as a person in the CRM does (its webhooks are sent like any change)."""
        with self.lock:
            row = self.connection.execute(
                "SELECT id FROM objects WHERE id=? AND object_type=? AND archived=0",
                (object_id, object_type),
            ).fetchone()
            if row is None or not str(object_id).isdecimal():
                raise ApiError(
                    404, "OBJECT_NOT_FOUND", f"no live {object_type} object with id {object_id}"
                )
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                view, changed = self._upsert_one(object_type, body, None, 0, object_id=row[0])
                self.connection.execute("COMMIT")
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
        if changed:
            self.on_change([Change(object_type, int(view["id"]), "propertyChange", changed)])
        view.pop("new")
        return view

    def _upsert_one(
        self,
        object_type: str,
        item: object,
        default_id_property: str | None,
        position: int,
        object_id: int | None = None,
    ):
        if not isinstance(item, dict):
            raise ApiError(400, "VALIDATION_ERROR", f"inputs[{position}] must be an object")
        id_property = item.get("idProperty") or default_id_property
        id_value = item.get("id")
        properties = item.get("properties")
        if object_id is None and (not id_property or id_value in (None, "")):
            raise ApiError(400, "VALIDATION_ERROR", f"inputs[{position}] needs id and idProperty")
        if not isinstance(properties, dict):
            raise ApiError(
                400, "VALIDATION_ERROR", f"inputs[{position}].properties must be an object"
            )
        bad = [
            name
            for name, value in properties.items()
            if not isinstance(value, str | int | float | bool | None)
        ]
        if bad:
            raise ApiError(
                400,
                "VALIDATION_ERROR",
                f"inputs[{position}]: property values must be scalars: {bad}",
            )
        properties = {
            name: ("" if value is None else str(value)) for name, value in properties.items()
        }
        if object_id is None:
            properties[id_property] = str(id_value)
        email = properties.get("email")
        if object_type == "contacts" and email and not re.fullmatch(EMAIL_PATTERN, email):
            raise ApiError(
                400,
                "VALIDATION_ERROR",
                f"inputs[{position}]: email is not a valid email address",
                subCategory="INVALID_EMAIL",
            )
        existing = object_id or self._find(object_type, id_property, str(id_value))
        uniques = UNIQUE_PROPERTIES.get(object_type, ())
        if object_id is None:
            uniques = (id_property, *uniques)
        else:  # changed by its id: the unique properties it holds (its upserts' idProperty) stay
            held = self.connection.execute(
                "SELECT property FROM unique_values WHERE object_id=? AND object_type=?",
                (object_id, object_type),
            )
            uniques = (*dict.fromkeys([name for (name,) in held]), *uniques)
        for unique in uniques:
            value = properties.get(unique)
            owner = self._find(object_type, unique, value) if value else None
            if owner is not None and owner != existing:
                raise ApiError(
                    409,
                    "CONFLICT",
                    f"inputs[{position}]: {unique} already belongs to object {owner}",
                    subCategory="OBJECT_ALREADY_EXISTS",
                )
        now = _now_ms()
        changed = properties  # what a webhook reports: every property of a new object
        if existing is None:
            cursor = self.connection.execute(
                "INSERT INTO objects (object_type, properties, created_ms, updated_ms) VALUES (?, ?, ?, ?)",
                (object_type, json.dumps(properties, sort_keys=True), now, now),
            )
            object_id, new = cursor.lastrowid, True
        else:
            object_id, new = existing, False
            (stored,) = self.connection.execute(
                "SELECT properties FROM objects WHERE id=?", (existing,)
            ).fetchone()
            merged = {**json.loads(stored), **properties}
            before = json.loads(stored)
            changed = {name: value for name, value in merged.items() if before.get(name) != value}
            if changed:
                self.connection.execute(
                    "UPDATE objects SET properties=?, updated_ms=? WHERE id=?",
                    (json.dumps(merged, sort_keys=True), now, existing),
                )
                self.connection.execute(
                    "DELETE FROM unique_values WHERE object_id=? AND object_type=?",
                    (existing, object_type),
                )
            properties = merged
        if changed:
            for unique in set(uniques):
                if properties.get(unique):
                    self.connection.execute(
                        "INSERT OR REPLACE INTO unique_values VALUES (?, ?, ?, ?)",
                        (object_type, unique, properties[unique].lower(), object_id),
                    )
        row = self.connection.execute("SELECT * FROM objects WHERE id=?", (object_id,)).fetchone()
        return {**self._view(row), "new": new}, changed

    def batch_archive(self, object_type: str, body: dict) -> None:
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or len(inputs) > MAX_BATCH:
            raise ApiError(
                400, "VALIDATION_ERROR", f"inputs must be a list of at most {MAX_BATCH} ids"
            )
        ids = []
        for item in inputs:
            if not isinstance(item, dict) or not str(item.get("id", "")).isdecimal():
                raise ApiError(400, "VALIDATION_ERROR", 'each input must be {"id": "<object id>"}')
            ids.append(int(item["id"]))
        now = _now_ms()
        deleted: list[int] = []
        with self.lock:
            self.connection.execute("BEGIN IMMEDIATE")
            for object_id in ids:
                cursor = self.connection.execute(
                    "UPDATE objects SET archived=1, archived_ms=? WHERE id=? AND object_type=? AND archived=0",
                    (now, object_id, object_type),
                )
                if cursor.rowcount:
                    deleted.append(object_id)
                    self.connection.execute(
                        "DELETE FROM unique_values WHERE object_id=?", (object_id,)
                    )
            self._bump("archive_inputs", len(ids))
            self.connection.execute("COMMIT")
        self.on_change([Change(object_type, object_id, "deletion", {}) for object_id in deleted])

    def get(self, object_type: str, object_id: str, properties: list[str] | None) -> dict:
        with self.lock:
            row = self.connection.execute(
                "SELECT * FROM objects WHERE id=? AND object_type=?", (object_id, object_type)
            ).fetchone()
        if row is None or not str(object_id).isdecimal():
            raise ApiError(404, "OBJECT_NOT_FOUND", f"no {object_type} object with id {object_id}")
        return self._view(row, properties)

    def list(
        self, object_type: str, limit: int, after: int, archived: bool, properties: list[str] | None
    ):
        with self.lock:
            rows = self.connection.execute(
                "SELECT * FROM objects WHERE object_type=? AND archived=? AND id>? ORDER BY id LIMIT ?",
                (object_type, int(archived), after, limit + 1),
            ).fetchall()
        page = {"results": [self._view(row, properties) for row in rows[:limit]]}
        if len(rows) > limit:
            page["paging"] = {"next": {"after": str(rows[limit - 1][0])}}
        return page

    def batch_read(self, object_type: str, body: dict) -> tuple[int, dict]:
        """Objects by an id property; unknown ids come back as errors (207), like HubSpot."""
        id_property = body.get("idProperty") or "hs_object_id"
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or len(inputs) > MAX_BATCH:
            raise ApiError(400, "VALIDATION_ERROR", f"inputs must be a list of at most {MAX_BATCH}")
        results, missing = [], []
        with self.lock:
            for item in inputs:
                value = str(item.get("id", "")) if isinstance(item, dict) else ""
                if id_property == "hs_object_id":
                    object_id = int(value) if value.isdecimal() else None
                else:
                    object_id = self._find(object_type, id_property, value)
                row = None
                if object_id is not None:
                    row = self.connection.execute(
                        "SELECT * FROM objects WHERE id=? AND object_type=? AND archived=0",
                        (object_id, object_type),
                    ).fetchone()
                if row is None:
                    missing.append(value)
                else:
                    results.append(self._view(row, body.get("properties") or None))
        answer: dict[str, object] = {"status": "COMPLETE", "results": results}
        if missing:
            answer["numErrors"] = 1
            answer["errors"] = [
                {
                    "status": "error",
                    "category": "OBJECT_NOT_FOUND",
                    "message": f"Could not get some {object_type} objects, they may be deleted or not exist.",
                    "context": {"ids": missing},
                }
            ]
        return (207 if missing else 200), answer

    def associate(self, from_type: str, to_type: str, body: dict) -> dict:
        pairs = _pairs(
            body,
            "from.id and to.id",
            lambda item: [(int(item["from"]["id"]), int(item["to"]["id"]))],
        )
        with self.lock:
            for from_id, to_id in pairs:
                for kind, object_id in ((from_type, from_id), (to_type, to_id)):
                    exists = self.connection.execute(
                        "SELECT 1 FROM objects WHERE id=? AND object_type=? AND archived=0",
                        (object_id, kind),
                    ).fetchone()
                    if not exists:
                        raise ApiError(
                            400, "VALIDATION_ERROR", f"no {kind} object with id {object_id}"
                        )
            self.connection.executemany(
                "INSERT OR IGNORE INTO associations VALUES (?, ?, ?, ?)",
                [(from_type, from_id, to_type, to_id) for from_id, to_id in pairs],
            )
        return {
            "status": "COMPLETE",
            "results": [
                {
                    "from": {"id": str(f)},
                    "to": {"id": str(t)},
                    "associationTypes": [
                        {"category": "HUBSPOT_DEFINED", "typeId": 3, "label": None}
                    ],
                }
                for f, t in pairs
            ],
        }

    def dissociate(self, from_type: str, to_type: str, body: dict) -> None:
        """Remove every association between each pair, as HubSpot's v4 batch archive does; a pair
        not associated (any more) is no error: a retried removal changes nothing."""
        pairs = _pairs(
            body,
            'from.id and to: [{"id"}]',
            lambda item: [(int(item["from"]["id"]), int(to["id"])) for to in item["to"]],
        )
        with self.lock:
            self.connection.executemany(
                "DELETE FROM associations WHERE from_type=? AND from_id=? AND to_type=? AND to_id=?",
                [(from_type, from_id, to_type, to_id) for from_id, to_id in pairs],
            )

    def associations_of(self, from_type: str, from_id: str, to_type: str) -> dict:
        with self.lock:
            rows = self.connection.execute(
                "SELECT to_id FROM associations WHERE from_type=? AND from_id=? AND to_type=? "
                "ORDER BY to_id",
                (from_type, int(from_id) if from_id.isdecimal() else -1, to_type),
            ).fetchall()
        return {"results": [{"toObjectId": row[0], "associationTypes": []} for row in rows]}

    def search(self, object_type: str, body: dict) -> dict:
        limit = int(body.get("limit") or 10)
        if not 0 < limit <= MAX_SEARCH_PAGE:
            raise ApiError(
                400, "VALIDATION_ERROR", f"limit must be between 1 and {MAX_SEARCH_PAGE}"
            )
        offset = int(body.get("after") or 0)
        modified = last_modified_property(object_type)
        with self.lock:
            rows = self.connection.execute(
                "SELECT * FROM objects WHERE object_type=? AND archived=0 ORDER BY updated_ms, id",
                (object_type,),
            ).fetchall()
        views = [self._view(row) for row in rows]
        groups = body.get("filterGroups") or []
        if groups:
            views = [
                view for view in views if any(_matches(view, group, modified) for group in groups)
            ]
        for sort in reversed(body.get("sorts") or []):
            name = sort.get("propertyName", modified) if isinstance(sort, dict) else str(sort)
            descending = isinstance(sort, dict) and sort.get("direction") == "DESCENDING"
            views.sort(
                key=lambda view, name=name: _sort_key(view["properties"].get(name), name, modified),
                reverse=descending,
            )
        wanted = body.get("properties")
        page = views[offset : offset + limit]
        if wanted:
            for view in page:
                view["properties"] = {
                    name: view["properties"].get(name) for name in (*wanted, "hs_object_id")
                }
        answer: dict[str, object] = {"total": len(views), "results": page}
        if offset + limit < len(views):
            answer["paging"] = {"next": {"after": str(offset + limit)}}
        return answer


def _refusal(position: int, item: dict) -> dict[str, object]:
    """A per-input error in HubSpot's multi-status shape, naming the input by its trace id."""
    context: dict[str, list[str]] = {"id": [str(item.get("id"))]}
    if item.get("objectWriteTraceId"):
        context["objectWriteTraceId"] = [str(item["objectWriteTraceId"])]
    return {
        "status": "error",
        "category": "VALIDATION_ERROR",
        "subCategory": "INVALID_PROPERTY_VALUE",
        "message": f"inputs[{position}] (id {item.get('id')}): Property values were not valid: "
        "the record was refused by a CRM-side validation rule",
        "context": context,
    }


def _unauthenticated() -> ApiError:
    """HubSpot's answer to a request without a token it takes."""
    return ApiError(
        401,
        "INVALID_AUTHENTICATION",
        "Authentication credentials not found or invalid. Send 'Authorization: Bearer <token>'.",
    )


def _refused(status: int, path: str, access: str = "read") -> ApiError:
    """HubSpot's answer to a read or a write (`access`) it refuses: a token without the object
    type's scope for it (403, the scope named in `errors`), a token it does not take (401), a
    search naming a property the object type does not have (400), or another 4xx; `path` is a
    /crm/v3/objects/<type>/... or /crm/v4/associations/<type>/... path."""
    parts = path.split("/")
    object_type = parts[4] if len(parts) > 4 else "objects"
    if status == 401:
        return _unauthenticated()
    if status == 403:
        return ApiError(
            403,
            "MISSING_SCOPES",
            "This app hasn't been granted all required scopes to make this call. Read more "
            "about required scopes here: https://developers.hubspot.com/scopes.",
            errors=[
                {
                    "message": "One or more of the following scopes are required.",
                    "context": {"requiredGranularScopes": [f"crm.objects.{object_type}.{access}"]},
                }
            ],
            links={"scopes": "https://developers.hubspot.com/scopes"},
        )
    if status == 400:
        return ApiError(
            400,
            "VALIDATION_ERROR",
            "There was a problem with the request.",
            errors=[
                {
                    "message": f"A property named in the request does not exist for "
                    f"{object_type} (injected by the sandbox)",
                    "code": "PROPERTY_DOESNT_EXIST",
                }
            ],
        )
    category = "OBJECT_NOT_FOUND" if status == 404 else "ERROR"
    return ApiError(status, category, f"{HTTPStatus(status).phrase} (injected by the sandbox)")


def _sort_key(value: object, name: str, modified: str):
    if name in (modified, "createdate") and value:
        return _to_ms(value)
    return "" if value is None else str(value)


_OPERATORS = {
    "EQ": lambda a, b: a == b,
    "NEQ": lambda a, b: a != b,
    "GT": lambda a, b: a > b,
    "GTE": lambda a, b: a >= b,
    "LT": lambda a, b: a < b,
    "LTE": lambda a, b: a <= b,
}


def _matches(view: dict, group: dict, modified: str) -> bool:
    for rule in group.get("filters", []):
        name, operator = rule.get("propertyName"), rule.get("operator")
        if operator == "HAS_PROPERTY":
            if not view["properties"].get(name):
                return False
            continue
        if operator not in _OPERATORS:
            raise ApiError(400, "VALIDATION_ERROR", f"unsupported filter operator {operator!r}")
        value = view["properties"].get(name)
        if value is None:
            return False
        wanted = rule.get("value")
        if name in (modified, "createdate"):
            value, wanted = _to_ms(value), _to_ms(wanted)
        elif isinstance(value, str) and isinstance(wanted, str):
            value, wanted = value.lower(), wanted.lower()
        if not _OPERATORS[operator](value, wanted):
            return False
    return True


class SandboxHandler(BaseHTTPRequestHandler):
    server: SandboxServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # one small response must not wait 40 ms for a delayed ACK

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        injector = self.server.faults
        verdict = Verdict() if url.path.startswith("/_sandbox/") else injector.judge()
        if verdict.status:
            self._send_fault(verdict)
            return
        if verdict.delay:
            time.sleep(verdict.delay)
        headers: dict[str, str] = {}
        try:
            self._authorise()
            if not url.path.startswith("/_sandbox/"):
                self._refuse(method, url.path)
            status, body = self._once(method, url, query, raw, headers)
        except ApiError as error:
            status, body = error.status, error.body()
        except Exception as error:  # a bug in the sandbox must still answer like an API
            status, body = 500, ApiError(500, "INTERNAL_ERROR", f"{type(error).__name__}").body()
        if verdict.drop:
            self.close_connection = True  # done, but the answer is lost on the way
            return
        with contextlib.suppress(OSError):  # the client gave up waiting (a slow answer)
            self._send(status, body, headers)

    def _once(self, method, url, query, raw: bytes, headers: dict[str, str]):
        """Serve the request, honouring an Idempotency-Key on a POST as Stripe does."""
        key = self.headers.get("Idempotency-Key")
        path = url.path.rstrip("/")
        if method != "POST" or not key:
            return self._route(method, path, query, raw)
        store = self.server.store
        fingerprint = hashlib.sha256(f"{path}?{url.query}\n".encode() + raw).hexdigest()
        with self.server.idempotency_lock:
            first = store.replay(key)
            if first is not None:
                if first[0] != fingerprint:
                    raise ApiError(
                        422,
                        "VALIDATION_ERROR",
                        "this Idempotency-Key was used with a different request; use a new key "
                        "for a different request",
                        subCategory="IDEMPOTENCY_KEY_REUSED",
                    )
                self.server.faults.count("idempotent_replays")
                headers["Idempotent-Replayed"] = "true"
                return first[1], first[2]
            try:
                status, body = self._route(method, path, query, raw)
            except ApiError as error:  # a refusal is an answer too: replayed as given
                status, body = error.status, error.body()
            store.remember(key, fingerprint, status, body)
            return status, body

    def _send_fault(self, verdict: Verdict) -> None:
        if verdict.status == 429:
            error = ApiError(
                429,
                "RATE_LIMITS",
                "You have reached your secondly limit.",
                errorType="RATE_LIMIT",
                policyName="SECONDLY",
            )
            self._send(429, error.body(), {"Retry-After": str(verdict.retry_after)})
            return
        phrase = HTTPStatus(verdict.status).phrase
        error = ApiError(verdict.status, "INTERNAL_ERROR", f"{phrase} (injected by the sandbox)")
        self._send(verdict.status, error.body())

    def _authorise(self) -> None:
        header = self.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), self.server.token.encode()):
            raise _unauthenticated()

    def _refuse(self, method: str, path: str) -> None:
        """A read of CRM objects (a list, a get, a search, a batch read) answered with the
        faults' `refuse_reads` status, a write (anything else) with their `refuse_writes`, once
        the token is checked, as HubSpot answers them."""
        path = path.rstrip("/")
        if not path.startswith("/crm/"):
            return
        faults = self.server.faults
        if method == "GET" or path.endswith(("/search", "/batch/read")):
            if status := faults.refuses_read():
                raise _refused(status, path, "read")
        elif status := faults.refuses_write():
            raise _refused(status, path, "write")

    def _route(self, method: str, path: str, query: dict, raw: bytes) -> tuple[int, dict | None]:
        store = self.server.store
        if path == "/_sandbox/stats" and method == "GET":
            return 200, store.stats()
        if path == "/_sandbox/traffic" and method == "GET":
            return 200, self.server.faults.traffic()
        if path == "/_sandbox/webhooks":
            if method == "POST":
                body = self._json(raw)
                try:
                    return 200, self.server.webhooks.subscribe(
                        body.get("url"), body.get("scheme", "hubspot")
                    )
                except ValueError as error:
                    raise ApiError(400, "VALIDATION_ERROR", str(error)) from None
            return 200, self.server.webhooks.describe()
        if path == "/_sandbox/faults":
            if method == "POST":
                try:
                    faults = Faults.from_json(self._json(raw), self.server.faults.faults)
                except (TypeError, ValueError) as error:
                    raise ApiError(400, "VALIDATION_ERROR", str(error)) from None
                return 200, self.server.faults.configure(faults)
            return 200, self.server.faults.describe()
        association = re.fullmatch(
            r"/crm/v4/associations/([a-z_]+)/([a-z_]+)/batch/associate/default", path
        )
        if association and method == "POST":
            return 200, store.associate(*association.groups(), self._json(raw))
        removal = re.fullmatch(r"/crm/v4/associations/([a-z_]+)/([a-z_]+)/batch/archive", path)
        if removal and method == "POST":
            store.dissociate(*removal.groups(), self._json(raw))
            return 204, None
        listed = re.fullmatch(r"/crm/v4/objects/([a-z_]+)/(\d+)/associations/([a-z_]+)", path)
        if listed and method == "GET":
            return 200, store.associations_of(*listed.groups())
        match = re.fullmatch(r"/crm/v3/objects/([a-z_]+)(?:/([^/]+))?(?:/([a-z]+))?", path)
        if not match:
            raise ApiError(404, "OBJECT_NOT_FOUND", f"no route for {method} {path}")
        object_type, second, third = match.groups()
        if object_type not in OBJECT_TYPES:
            raise ApiError(404, "OBJECT_NOT_FOUND", f"unknown object type {object_type!r}")
        properties = (
            ",".join(query.get("properties", [])).split(",") if query.get("properties") else None
        )
        if method == "GET" and second is None:
            limit = int(query.get("limit", ["10"])[0])
            after = int(query.get("after", ["0"])[0] or 0)
            archived = query.get("archived", ["false"])[0].lower() == "true"
            return 200, store.list(
                object_type, min(max(limit, 1), 100), after, archived, properties
            )
        if method == "GET" and third is None:
            return 200, store.get(object_type, second, properties)
        if method == "PATCH" and second is not None and third is None:
            return 200, store.update(object_type, second, self._json(raw))
        if method != "POST":
            raise ApiError(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}")
        body = self._json(raw)
        if (second, third) == ("batch", "upsert"):
            id_property = query.get("idProperty", [None])[0]
            return store.batch_upsert(object_type, body, id_property, self.server.faults.refuses)
        if (second, third) == ("batch", "read"):
            return store.batch_read(object_type, body)
        if (second, third) == ("batch", "archive"):
            store.batch_archive(object_type, body)
            return 204, None
        if second == "search" and third is None:
            return 200, store.search(object_type, body)
        raise ApiError(404, "OBJECT_NOT_FOUND", f"no route for {method} {path}")

    @staticmethod
    def _json(raw: bytes) -> dict:
        try:
            body = json.loads(raw or b"{}")
        except ValueError as error:
            raise ApiError(
                400, "VALIDATION_ERROR", f"the body is not valid JSON: {error.msg}"
            ) from None
        if not isinstance(body, dict):
            raise ApiError(400, "VALIDATION_ERROR", "the body must be a JSON object")
        return body

    def _send(self, status: int, body: dict | None, headers: dict[str, str] | None = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if payload:
            self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        path: Path,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        faults: Faults | None = None,
        webhook_secrets: Sequence[str] = (),
        webhook_url: str | None = None,
        webhook_scheme: str = "hubspot",
    ):
        if not token:
            raise ValueError("the CRM sandbox needs a token: set CRM_ACCESS_TOKEN")
        self.store = SandboxStore(path)
        self.webhooks = WebhookSender(webhook_secrets, webhook_url, webhook_scheme)
        self.store.on_change = self.webhooks.notify
        self.faults = FaultInjector(faults)
        self.idempotency_lock = threading.Lock()
        self.token = token
        self.verbose = verbose
        super().__init__((host, port), SandboxHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="crm-sandbox", daemon=True)
        thread.start()
        return thread

    def server_close(self) -> None:
        super().server_close()
        self.store.close()
