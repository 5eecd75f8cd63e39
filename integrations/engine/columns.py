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
# Field hashes are SipHash-2-4 (pandas' `hash_array`, in C) of each value's canonical text under
# this fixed key: a standard function of the text, so they stay comparable across versions.
_FIELD_HASH_KEY = "handoff.fields.1"


def ready_columns(frame: pd.DataFrame) -> dict[str, list[object]]:
    """Each column as JSON-ready values: Python scalars, None for nulls, ISO text for dates and
    timestamps, exact text for decimals."""
    return {name: ready_values(frame[name]) for name in frame.columns}


def ready_values(column: pd.Series) -> list[object]:
    missing = column.isna().to_numpy()
    if pd.api.types.is_datetime64_any_dtype(column):
        wall = column.dt.tz_localize(None) if column.dt.tz is not None else column
        values = np.datetime_as_string(wall.to_numpy(dtype="datetime64[us]"), unit="us").tolist()
    elif isinstance(column.dtype, np.dtype) and column.dtype != object:
        values = column.to_numpy().tolist()  # numpy scalars become Python ones
    else:
        values = column.to_numpy(dtype=object).tolist()
        kinds = set(map(type, values))
        if any(issubclass(kind, np.generic) for kind in kinds):  # numpy scalars: Python ones
            values = [value.item() if isinstance(value, np.generic) else value for value in values]
        sample = next((v for v, gone in zip(values, missing, strict=True) if not gone), None)
        if isinstance(sample, date | Decimal):
            values = [_plain(value) for value in values]
    if missing.any():
        values = [None if gone else value for value, gone in zip(values, missing, strict=True)]
    return values


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
    if kinds == {str}:
        # Inside a JSON string every quote is escaped, so `","` occurs only between elements.
        pieces = [f'"{piece}"' for piece in _ENCODE(present)[2:-2].split('","')]
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
    """Per record, a short hash of each field's value, as `name,name,…|hex…` (16 hex digits per
    field in the names' order): enough to tell which fields a later write changes."""
    names = sorted(texts)
    if not names:
        return []
    hashed = np.column_stack(
        [
            pd.util.hash_array(
                np.asarray(texts[name], dtype=object), hash_key=_FIELD_HASH_KEY, categorize=False
            )
            for name in names
        ]
    ).astype(">u8")
    width = 8 * len(names)
    packed = hashed.tobytes()
    prefix = ",".join(names) + "|"
    return [prefix + packed[at : at + width].hex() for at in range(0, len(packed), width)]


def parse_field_hashes(text: str | None) -> dict[str, str]:
    """`field_hashes`' text back as {field: hash}; {} for none (or an older format)."""
    if not text or "|" not in text:
        return {}
    names, _, digits = text.rpartition("|")
    fields = names.split(",")
    if len(digits) != 16 * len(fields):
        return {}
    return {name: digits[16 * i : 16 * (i + 1)] for i, name in enumerate(fields)}
