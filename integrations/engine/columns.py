"""A batch's records a column at a time: JSON-ready values, their canonical JSON text, content
hashes and field hashes, without a Python dict per record (the hot path of a million-row sync).

The texts are exactly what `hashing.canonical_json` gives value by value, so a record's content
hash here equals `hashing.content_hash` of the same record as a dict.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal

import numpy as np
import pandas as pd

from integrations.engine.hashing import canonical_json

# One encoder for a whole column; the same options as hashing's canonical encoding.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
# What that encoder makes of one str (ensure_ascii=False): json's own C function, value by value.
_ENCODE_STR = json.encoder.encode_basestring
# Field hashes are SipHash-2-4 (pandas' `hash_array`, in C) of each value's canonical text under
# this fixed key: a standard function of the text, so they stay comparable across versions.
_FIELD_HASH_KEY = "handoff.fields.1"


def ready_columns(frame: pd.DataFrame) -> dict[str, list[object]]:
    """Each column as JSON-ready values: Python scalars, None for nulls (a NaN a source kept
    apart from them stays NaN), ISO text for dates and timestamps (a zoned one as UTC, without
    the zone, as handoff's times are), exact text for decimals."""
    return {name: ready_values(frame[name]) for name in frame.columns}


def ready_values(column: pd.Series) -> list[object]:
    missing = column.isna().to_numpy()
    if pd.api.types.is_datetime64_any_dtype(column):
        wall = column.dt.tz_convert("UTC").dt.tz_localize(None) if column.dt.tz else column
        values = np.datetime_as_string(wall.to_numpy(dtype="datetime64[us]"), unit="us").tolist()
    elif isinstance(column.dtype, np.dtype) and column.dtype != object:
        values = column.to_numpy().tolist()  # numpy scalars become Python ones
    else:
        values = column.to_numpy(dtype=object).tolist()
        kinds = set(map(type, values))
        if Decimal in kinds:  # a NUMERIC's 'NaN' is a value, not a null
            for at in missing.nonzero()[0]:
                missing[at] = not _is_nan_decimal(values[at])
        if any(issubclass(kind, np.generic) for kind in kinds):  # numpy scalars: Python ones
            values = [value.item() if isinstance(value, np.generic) else value for value in values]
        sample = next((v for v, gone in zip(values, missing, strict=True) if not gone), None)
        if isinstance(sample, date | Decimal):
            values = [_plain(value) for value in values]
    if missing.any():
        values = [None if gone else value for value, gone in zip(values, missing, strict=True)]
    return values


def _is_nan_decimal(value: object) -> bool:
    return isinstance(value, Decimal) and value.is_nan()


def _plain(value: object) -> object:
    if isinstance(value, date):
        return value.isoformat()
    return str(value) if isinstance(value, Decimal) else value


def records(columns: Mapping[str, Sequence[object]]) -> list[dict[str, object]]:
    """The columns as one dict per record."""
    names = list(columns)
    return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def json_texts(values: Sequence[object]) -> list[str]:
    """Each value's canonical JSON text; a column of text or of numbers is encoded in one call."""
    present = [value for value in values if value is not None]
    kinds = set(map(type, present))
    if not present:
        return ["null"] * len(values)
    if kinds == {str}:  # the function the encoder itself applies to each str
        pieces = list(map(_ENCODE_STR, present))
    elif kinds <= {int, float, bool}:
        pieces = _ENCODE(present)[1:-1].split(",")
    else:
        pieces = [canonical_json(value) for value in present]
    if len(present) == len(values):
        return pieces
    found = iter(pieces)
    return ["null" if value is None else next(found) for value in values]


def record_texts(texts: Mapping[str, Sequence[str]]) -> list[str]:
    """Each record's canonical JSON (keys sorted), from its values' texts."""
    names = sorted(texts)
    template = "{" + ",".join(canonical_json(name).replace("%", "%%") + ":%s" for name in names)
    template += "}"
    return [template % row for row in zip(*(texts[name] for name in names), strict=True)]


def content_hashes(record_texts: Sequence[str]) -> list[str]:
    """md5 of each record's canonical JSON: `hashing.content_hash`, record by record."""
    return [
        hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()
        for text in record_texts
    ]


def field_hashes(texts: Mapping[str, Sequence[str]]) -> list[str]:
    """Per record, a short hash of each field's value, as `names:hashes` (8 hex digits naming the
    sorted field names, then 8 per field in that order): enough to tell which fields a later write
    changes, in a few dozen bytes of the ledger."""
    names = sorted(texts)
    if not names:
        return []
    hashed = np.column_stack(
        [
            pd.util.hash_array(
                np.asarray(texts[name], dtype=object), hash_key=_FIELD_HASH_KEY, categorize=False
            )
            >> np.uint64(32)
            for name in names
        ]
    ).astype(">u4")
    width = 4 * len(names)
    packed = hashed.tobytes()
    prefix = _names_digest(names) + ":"
    return [prefix + packed[at : at + width].hex() for at in range(0, len(packed), width)]


def changed_fields(before: str | None, after: str, names: Sequence[str]) -> list[str] | None:
    """The fields (of sorted `names`) whose hashes differ between two `field_hashes`; None when
    `before` cannot tell (none kept, other fields, an older format)."""
    prefix = _names_digest(names) + ":"
    if not before or not before.startswith(prefix) or len(before) != len(after):
        return None
    start = len(prefix)
    return [
        name
        for i, name in enumerate(names)
        if before[start + 8 * i : start + 8 * (i + 1)] != after[start + 8 * i : start + 8 * (i + 1)]
    ]


def _names_digest(names: Sequence[str]) -> str:
    return hashlib.md5(",".join(names).encode(), usedforsecurity=False).hexdigest()[:8]
