"""Content hashes that stay stable across library versions: md5 of a canonical JSON encoding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

# One encoder for every call (json.dumps with options builds a new one each time); the same text.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
).encode


# `json.dumps(value, sort_keys=True, default=str)`, without building an encoder per call.
sorted_json = json.JSONEncoder(sort_keys=True, default=str).encode


def canonical_json(record: Mapping[str, object]) -> str:
    return _CANONICAL(record)


def content_hash(record: Mapping[str, object]) -> str:
    return hashlib.md5(canonical_json(record).encode("utf-8"), usedforsecurity=False).hexdigest()


def field_hashes(records: Sequence[Mapping[str, object]]) -> list[dict[str, str]]:
    """A short hash per field of each record (md5 of `{"v": value}`, canonically encoded): enough
    to tell which fields a later write changes. Each distinct value of a field is hashed once."""
    memo: dict[tuple[type, object], str] = {}

    def digest(value: object) -> str:
        # The type is part of the key: 1, 1.0 and True are equal in a dict but encode differently.
        try:
            known = memo.get((value.__class__, value))
        except TypeError:  # an unhashable value (a list): hashed every time
            return _field_digest(value)
        if known is None:
            known = memo[(value.__class__, value)] = _field_digest(value)
        return known

    return [{name: digest(value) for name, value in record.items()} for record in records]


def _field_digest(value: object) -> str:
    text = '{"v":' + _CANONICAL(value) + "}"
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()[:12]


def idempotency_key(flow: str, key: str, digest: str) -> str:
    """The write's identity: the same flow, record and content always give the same key."""
    return hashlib.sha256(f"{flow}\x1f{key}\x1f{digest}".encode()).hexdigest()[:32]
