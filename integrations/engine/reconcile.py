"""Reconciliation: does the destination hold what the source says it should?

Both sides are reduced to `id value → hash of the target contract's fields` (values compared as
the destination stores them: text, NULL apart from empty text where it keeps them apart). Records
the runs hold (an open letter, a discard) are left out of both sides. The digest of each side is
an md5 over its sorted (id, hash) pairs.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from integrations.contracts.contract import kind_of
from integrations.engine.columns import ready_columns, records
from integrations.engine.destination import Destination
from integrations.engine.hashing import content_hash
from integrations.engine.source import Source
from integrations.engine.spec import FlowSpec
from integrations.engine.state import StateStore, utcnow
from integrations.engine.sync import expected_records


@dataclass
class Drift:
    source_count: int
    destination_count: int
    source_digest: str
    destination_digest: str
    missing: list[str] = field(default_factory=list)  # source keys absent from the destination
    differing: list[str] = field(default_factory=list)  # source keys whose content differs
    extra: list[str] = field(default_factory=list)  # destination id values the source lacks
    extra_ids: list[str] = field(default_factory=list)  # their destination ids, in that order

    @property
    def in_sync(self) -> bool:
        return not (self.missing or self.differing or self.extra)

    def summary(self) -> str:
        if self.in_sync:
            return f"in sync: {self.source_count} records on both sides"
        return (
            f"{len(self.missing)} missing, {len(self.differing)} differing and "
            f"{len(self.extra)} extra records (source {self.source_count}, "
            f"destination {self.destination_count})"
        )


def _as_stored(
    record: dict[str, object],
    fields: Iterable[str],
    kinds: Mapping[str, str] | None = None,
    null_is_empty: bool = False,
) -> dict[str, str | None]:
    """The record's values as both sides compare them: text, and NULL as None, apart from empty
    text, unless the destination keeps them as one (`null_is_empty`: a CRM's cleared property
    reads back as ""). By the contract's kind of the field (`kinds`): a bool as true or false,
    whether a side holds True, 1 (an integer column, MariaDB's BOOLEAN) or text ("true" from a
    CRM); a whole number as itself, held as 42.0 by a NUMERIC or floating-point column; a date
    as the day, held at midnight by a timestamp column."""
    kinds = kinds or {}
    return {name: _stored(record.get(name), kinds.get(name), null_is_empty) for name in fields}


def _stored(value: object, kind: str | None, null_is_empty: bool) -> str | None:
    if value is None:
        return "" if null_is_empty else None
    if kind == "int" and isinstance(value, float | Decimal) and math.isfinite(value):
        return str(int(value)) if value == int(value) else str(value)
    if kind == "date" and isinstance(value, str) and _MIDNIGHT.fullmatch(value[10:]):
        return value[:10]
    if kind != "bool":
        return str(value)
    said = str(value).strip().lower()
    return {"1": "true", "t": "true", "0": "false", "f": "false"}.get(said, said)


_MIDNIGHT = re.compile(r"([T ]00:00(:00(\.0+)?)?)?")


def _digest(pairs: dict[str, str]) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    for key in sorted(pairs):
        md5.update(f"{key}\x1f{pairs[key]}\n".encode())
    return md5.hexdigest()


def held_records(spec: FlowSpec, source: Source, state: StateStore) -> set[str]:
    """Keys of the records the runs hold: those with an open letter, and those whose letter was
    discarded with the content they still have and not synced since (a discard sticks until the
    record changes; changed, the record is judged, and reconciled, as any other)."""
    opened, discarded = state.held_letter_hashes(spec.name, state.held_letter_keys(spec.name))
    unchanged = {
        key
        for batch in source.rows_with_keys(sorted(discarded), spec.batch_size)
        for key, payload in zip(
            batch[spec.source.key].astype(str), records(ready_columns(batch)), strict=True
        )  # the row hashed as the run hashes it, and its letter's payload
        if discarded.get(key) == content_hash(payload)
    }
    return set(opened) | unchanged


def unpartitioned_records(spec: FlowSpec, source: Source) -> set[str]:
    """Keys of a daily-partitioned flow's rows dated on a day it has no partition for: today or
    later (a day is synced once it is over), or before its first day. No run has read them yet,
    so they are on neither side, as held records are. A row with no date, which every window's
    run reads, is in both windows, and so is reconciled."""
    if spec.partitions is None:
        return set()
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    first = datetime.fromisoformat(spec.partitions.start)
    # Open-ended: an ERP's "valid forever" (9999-12-31) or a year-1 day has no partition either.
    return _keys_dated(spec, source, today, None) ^ _keys_dated(spec, source, None, first)


def _keys_dated(
    spec: FlowSpec, source: Source, start: datetime | None, end: datetime | None
) -> set[str]:
    """Keys of the rows whose business date is in [start, end) (None: unbounded), and of those
    with none."""
    within = source.in_window(spec.partitions.column, start, end)
    return {
        str(key)
        for batch in source.batches(None, spec.batch_size, within=within)
        for key in batch[spec.source.key]
    }


def reconcile(spec: FlowSpec, source: Source, destination: Destination, state: StateStore) -> Drift:
    fields = [
        name for name in spec.target_contract.schema.columns if name != spec.target.id_property
    ]
    # A record held in the DLQ is on neither side: the destination may keep what it synced
    # before the record went bad, which is no drift of the destination's.
    kinds = {name: kind_of(spec.target_contract, name) for name in fields}
    null_is_empty = getattr(destination, "null_is_empty", False)
    held = held_records(spec, source, state) | unpartitioned_records(spec, source)
    held_ids = {
        entry.destination_id
        for entry in state.ledger_entries(spec.name, sorted(held)).values()
        if entry.destination_id
    }
    # Ids as the destination compares them: a CRM's ignoring case, a SQL table's exactly (there
    # "abc" and "ABC" are two records, which lower-casing made one).
    same = str.lower if getattr(destination, "ids_ignore_case", False) else str
    expected: dict[str, str] = {}
    source_key_of: dict[str, str] = {}
    for key, record in expected_records(spec, source, state, held):
        id_value = same(str(record[spec.target.id_property]))
        expected[id_value] = content_hash(_as_stored(record, fields, kinds, null_is_empty))
        source_key_of[id_value] = key
    actual: dict[str, str] = {}
    destination_ids: dict[str, str] = {}
    for id_value, destination_id, properties in destination.snapshot(fields):
        if destination_id not in held_ids:
            actual[same(id_value)] = content_hash(
                _as_stored(properties, fields, kinds, null_is_empty)
            )
            destination_ids[same(id_value)] = destination_id
    extra = sorted(actual.keys() - expected.keys())
    return Drift(
        source_count=len(expected),
        destination_count=len(actual),
        source_digest=_digest(expected),
        destination_digest=_digest(actual),
        missing=sorted(source_key_of[k] for k in expected.keys() - actual.keys()),
        differing=sorted(
            source_key_of[k] for k in expected.keys() & actual.keys() if expected[k] != actual[k]
        ),
        extra=extra,
        extra_ids=[destination_ids[k] for k in extra],
    )
