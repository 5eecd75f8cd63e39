"""Content hashes that stay stable across library versions: md5 of a canonical JSON encoding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping


def canonical_json(record: Mapping[str, object]) -> str:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )


def content_hash(record: Mapping[str, object]) -> str:
    return hashlib.md5(canonical_json(record).encode("utf-8"), usedforsecurity=False).hexdigest()


def idempotency_key(flow: str, key: str, digest: str) -> str:
    """The write's identity: the same flow, record and content always give the same key."""
    return hashlib.sha256(f"{flow}\x1f{key}\x1f{digest}".encode()).hexdigest()[:32]
