"""The column-at-a-time encoding gives, record by record, what the canonical encoding gives."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from integrations.engine import columns
from integrations.engine.hashing import canonical_json, content_hash

scalars = st.one_of(
    st.none(),
    st.text(),
    st.integers(min_value=-(2**62), max_value=2**62),
    st.floats(allow_nan=False),
    st.booleans(),
    st.dates(),
    st.decimals(allow_nan=False, allow_infinity=False),
)


def _frame(rows: list[list[object]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[f"c{i}" for i in range(len(rows[0]))], dtype=object)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=1, max_value=4).flatmap(
        lambda width: st.lists(st.lists(scalars, min_size=width, max_size=width), min_size=1)
    )
)
def test_column_texts_are_the_canonical_encoding_of_each_record(rows):
    frame = _frame(rows)
    values = columns.ready_columns(frame)
    records = columns.records(values)
    texts = columns.texts_of(values)
    assert columns.record_texts(texts) == [canonical_json(record) for record in records]
    assert columns.content_hashes(columns.record_texts(texts)) == [
        content_hash(record) for record in records
    ]


def test_typed_columns_become_json_ready_values():
    frame = pd.DataFrame(
        {
            "at": pd.to_datetime(["2024-05-01 10:00:00.5", None]),
            "n": pd.array([7, None], dtype="Int64"),
            "x": [1.5, float("nan")],
            "day": [date(2024, 5, 1), None],
            "amount": [Decimal("1.10"), None],
        }
    )
    assert columns.records(columns.ready_columns(frame)) == [
        {
            "at": "2024-05-01T10:00:00.500000",
            "n": 7,
            "x": 1.5,
            "day": "2024-05-01",
            "amount": "1.10",
        },
        {"at": None, "n": None, "x": None, "day": None, "amount": None},
    ]
    assert isinstance(columns.ready_columns(frame)["n"][0], int)
    assert datetime.fromisoformat(columns.ready_columns(frame)["at"][0])


def test_a_zoned_time_is_the_utc_time_it_names():
    """The zone was dropped, keeping its wall time: 10:00 in New York became 10:00 "UTC"."""
    same = ["2025-01-03 10:00:00-05:00", "2025-01-03 15:00:00+00:00"]
    texts = [columns.ready_values(pd.Series(pd.to_datetime([moment]))) for moment in same]
    assert texts == [["2025-01-03T15:00:00.000000"]] * 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.none() | st.datetimes()), st.sampled_from(["us", "ns"]))
def test_times_are_their_iso_text_in_microseconds(moments, unit):
    if unit == "ns":  # pandas' nanoseconds hold the years 1678 to 2261
        moments = [m for m in moments if m is None or 1678 <= m.year <= 2261]
    column = pd.Series(moments, dtype=f"datetime64[{unit}]")
    assert columns.ready_values(column) == [
        None if moment is None else moment.isoformat(timespec="microseconds") for moment in moments
    ]


def test_times_past_the_year_9999_or_before_the_first_are_numpy_s_text():
    """Arrow writes the years 0 to 9999 as numpy does; others its own way, or not at all."""
    far = np.array(["10000-01-01T00:00:00.5", "-0001-12-31T23:59:59", "NaT"], "datetime64[us]")
    assert columns.ready_values(pd.Series(far)) == [
        "10000-01-01T00:00:00.500000",
        "-001-12-31T23:59:59.000000",
        None,
    ]


def test_field_hashes_are_pinned():
    """Ledgers store them: a write compares the fields' hashes with those of the last one."""
    texts = {"city": ['"Oslo"', '"Tromsø"', "null"], "n": ["1", "2.5", "true"]}
    assert columns.field_hashes(texts) == [
        "503f8768:13f928eea25b9e82",
        "503f8768:ce8fcf800495a149",
        "503f8768:35530b3ec7226d40",
    ]


def test_field_hashes_tell_which_fields_changed():
    before = {"city": ['"Oslo"'], "email": ['"a@example.com"'], "phone": ["null"]}
    after = {**before, "city": ['"Bergen"']}
    names = sorted(before)
    old, new = columns.field_hashes(before)[0], columns.field_hashes(after)[0]
    assert columns.changed_fields(old, new, names) == ["city"]
    assert columns.changed_fields(old, old, names) == []
    assert columns.changed_fields(None, new, names) is None, "nothing kept: cannot tell"
    assert columns.changed_fields(old, new, ["city", "email"]) is None, "other fields"
    assert columns.changed_fields('{"city": "abc"}', new, names) is None, "an older format"


def test_a_payload_holding_text_that_was_no_utf8_hashes_as_content_hash_does():
    record = {"name": "Bj\udcf6rk", "city": None, "n": 3}  # Latin-1 bytes kept as surrogates
    values = {name: [value] for name, value in record.items()}
    texts = columns.texts_of(values)
    assert columns.content_hashes(columns.record_texts(texts)) == [content_hash(record)]
