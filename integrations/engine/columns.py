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
from types import NoneType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from integrations.engine.hashing import canonical_json

# One encoder for a whole column; the same options as hashing's canonical encoding.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
# What that encoder makes of one str (ensure_ascii=False): json's own C function, value by value.
_ENCODE_STR = json.encoder.encode_basestring
# What a column of text holds: JSON-ready as it is.
_TEXT = frozenset({str, NoneType})
# The times Arrow writes as numpy does (but for the "T"): numpy's years have at least four digits.
_ARROW_YEARS = (np.datetime64("0000-01-01", "us"), np.datetime64("10000-01-01", "us"))
# Field hashes are SipHash-2-4 (pandas' `hash_array`, in C) of each value's canonical text under
# this fixed key: a standard function of the text, so they stay comparable across versions.
_FIELD_HASH_KEY = "handoff.fields.1"


def ready_columns(frame: pd.DataFrame) -> dict[str, list[object]]:
    """Each column as JSON-ready values: Python scalars, None for nulls (a NaN a source kept
    apart from them stays NaN), ISO text for dates and timestamps (a zoned one as UTC, without
    the zone, as handoff's times are), exact text for decimals."""
    return {name: ready_values(frame[name]) for name in frame.columns}


def ready_values(column: pd.Series) -> list[object]:
    """A column's JSON-ready values (see `ready_columns`). Text beside None, most of a batch,
    is returned as it is, without looking for nulls (a pass of pandas' over every value)."""
    if pd.api.types.is_datetime64_any_dtype(column):
        wall = column.dt.tz_convert("UTC").dt.tz_localize(None) if column.dt.tz else column
        values = _iso_times(wall.to_numpy(dtype="datetime64[us]"))
    elif isinstance(column.dtype, np.dtype) and column.dtype != object:
        values = column.to_numpy().tolist()  # numpy scalars become Python ones
    else:
        values = column.to_numpy(dtype=object).tolist()
        kinds = set(map(type, values))
        if kinds <= _TEXT:
            return values
        return _ready_objects(values, kinds, column.isna().to_numpy())
    return _nulls_as_none(values, column.isna().to_numpy())


def _iso_times(moments: np.ndarray) -> list[str | None]:
    """Times in microseconds as ISO 8601 text, as numpy writes them (NaT aside: a null). Arrow
    writes the years 0 to 9999 alike, with a space for the "T", in half numpy's time."""
    if not ((moments >= _ARROW_YEARS[0]) & (moments < _ARROW_YEARS[1]) | np.isnat(moments)).all():
        return np.datetime_as_string(moments, unit="us").tolist()
    texts = pa.array(moments, from_pandas=True).cast(pa.string())
    return pc.replace_substring(texts, " ", "T", max_replacements=1).to_pylist()


def _ready_objects(values: list[object], kinds: set[type], missing: np.ndarray) -> list[object]:
    """Python objects (or pandas' scalars of an extension type) as JSON-ready values."""
    if Decimal in kinds:  # a NUMERIC's 'NaN' is a value, not a null
        for at in missing.nonzero()[0]:
            missing[at] = not _is_nan_decimal(values[at])
    if any(issubclass(kind, np.generic) for kind in kinds):  # numpy scalars: Python ones
        values = [value.item() if isinstance(value, np.generic) else value for value in values]
    sample = next((v for v, gone in zip(values, missing, strict=True) if not gone), None)
    if isinstance(sample, date | Decimal):
        values = [_plain(value) for value in values]
    return _nulls_as_none(values, missing)


def _nulls_as_none(values: list[object], missing: np.ndarray) -> list[object]:
    if missing.any():
        return [None if gone else value for value, gone in zip(values, missing, strict=True)]
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
    kinds = set(map(type, values))
    present = (
        [value for value in values if value is not None] if NoneType in kinds else list(values)
    )
    kinds.discard(NoneType)
    if not kinds:
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


def texts_of(values: Mapping[str, Sequence[object]]) -> dict[str, list[str]]:
    """Each column's values' canonical JSON texts (`json_texts`)."""
    return {name: json_texts(column) for name, column in values.items()}


def record_texts(texts: Mapping[str, Sequence[str]]) -> list[str]:
    """Each record's canonical JSON (keys sorted), from its values' texts: the records' pieces in
    one list, joined once and split at a NUL between records (JSON escapes any NUL it holds)."""
    names = sorted(texts)
    if not names:
        return []
    count = len(texts[names[0]])
    width = 2 * len(names)
    labels = [("," if at else "{") + canonical_json(name) + ":" for at, name in enumerate(names)]
    pieces: list[str] = [""] * (width * count)
    for at, (name, label) in enumerate(zip(names, labels, strict=True)):
        pieces[2 * at :: width] = [label] * count
        pieces[2 * at + 1 :: width] = texts[name]
    pieces[width::width] = ["}\x00" + labels[0]] * (count - 1)
    pieces.append("}")
    return "".join(pieces).split("\x00") if count else []


def content_hashes(record_texts: Sequence[str]) -> list[str]:
    """md5 of each record's canonical JSON: `hashing.content_hash`, record by record (a lone
    surrogate too, as its code point: a dead letter's payload may hold text that was no UTF-8)."""
    return [
        hashlib.md5(text.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()
        for text in record_texts
    ]


def field_hashes(texts: Mapping[str, Sequence[str]]) -> list[str]:
    """Per record, a short hash of each field's value, as `names:hashes` (8 hex digits naming the
    sorted field names, then 8 per field in that order): enough to tell which fields a later write
    changes, in a few dozen bytes of the ledger. The hex of all records is written at once, a NUL
    between records, and split."""
    names = sorted(texts)
    if not names:
        return []
    hashed = np.column_stack(
        [
            pd.util.hash_array(_utf8(texts[name]), hash_key=_FIELD_HASH_KEY, categorize=False)
            >> np.uint64(32)
            for name in names
        ]
    ).astype(">u4")
    if not len(hashed):
        return []
    prefix = _names_digest(names) + ":"
    hexed = hashed.tobytes().hex("\x00", 4 * len(names))
    return (prefix + hexed.replace("\x00", "\x00" + prefix)).split("\x00")


def _utf8(texts: Sequence[str]) -> np.ndarray:
    """The texts' UTF-8, which `hash_array` hashes as it is (a str it encodes itself, slower)."""
    return np.fromiter(map(str.encode, texts), dtype=object, count=len(texts))


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
