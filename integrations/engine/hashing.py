"""Content hashes that stay stable across library versions: md5 of a canonical JSON encoding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

# One encoder for every call (json.dumps with options builds a new one each time); the same text.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
).encode


# `json.dumps(value, sort_keys=True, default=str)`, without building an encoder per call.
sorted_json = json.JSONEncoder(sort_keys=True, default=str).encode


def canonical_json(record: object) -> str:
    return _CANONICAL(record)


def content_hash(record: Mapping[str, object]) -> str:
    """md5 of the canonical JSON's UTF-8; a lone surrogate (a source's bytes that were no UTF-8,
    kept for the dead letter that refuses them) is hashed as its code point, not an error."""
    text = canonical_json(record).encode("utf-8", "surrogatepass")
    return hashlib.md5(text, usedforsecurity=False).hexdigest()


def idempotency_key(flow: str, key: str, digest: str) -> str:
    """The write's identity: the same flow, record and content always give the same key."""
    return hashlib.sha256(f"{flow}\x1f{key}\x1f{digest}".encode()).hexdigest()[:32]
