"""CRM objects (contacts, deals) as a sync source, read incrementally by the search API on the
last-modified date.

The key is the CRM's object id (`hs_object_id`); the cursor its last-modified property
(`lastmodifieddate` for contacts, `hs_lastmodifieddate` for the rest), kept as naive UTC.
`CrmClient.search_modified_since` pages through every result, each page a search from the newest
date served (an object edited meanwhile is served again, and a batch keeps its newest state).
Archived objects never show in a search, so there are no soft deletes to read: a deleted CRM
object keeps its last staged state (its `deletion` webhook stays in the inbox's history).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from itertools import islice

import pandas as pd

from integrations.crm.client import (
    MAX_BATCH,
    CrmClient,
    CrmError,
    CrmRefused,
    last_modified_property,
)
from integrations.engine.source import SourceReadFailed, SourceUnavailable
from integrations.engine.spec import SourceTable

KEY = "hs_object_id"
# What the flows read of each object type (besides the id and the last-modified date).
PROPERTIES = {
    "contacts": (
        "erp_customer_id",
        "email",
        "firstname",
        "lastname",
        "phone",
        "company",
        "city",
        "country",
    ),
    "deals": (
        "erp_invoice_id",
        "dealname",
        "amount",
        "deal_currency_code",
        "dealstage",
        "pipeline",
        "closedate",
    ),
}
EPOCH = datetime(1970, 1, 1)


class CrmObjectsSource:
    """One CRM object type as the engine's Source; `spec` is the flow's `SourceTable`."""

    def __init__(self, client: CrmClient, spec: SourceTable):
        modified = last_modified_property(spec.table)
        if spec.table not in PROPERTIES or spec.key != KEY or spec.cursor != modified:
            raise ValueError(
                f"CRM {spec.table} are read by key {KEY!r} and cursor {modified!r}; "
                f"known object types: {sorted(PROPERTIES)}"
            )
        if spec.deleted:
            raise ValueError("CRM searches never return archived objects: set deleted=None")
        self.client, self.spec, self.modified = client, spec, modified
        self.properties = PROPERTIES[spec.table]
        self.columns = [KEY, *self.properties, modified]

    def _frames(self, objects: Iterable[dict], size: int) -> Iterator[pd.DataFrame]:
        iterator = iter(objects)
        try:
            while chunk := list(islice(iterator, size)):
                records = [
                    [
                        int(item["id"]),
                        *(item["properties"].get(name) or None for name in self.columns[1:]),
                    ]
                    for item in chunk
                ]
                frame = pd.DataFrame.from_records(records, columns=self.columns)
                # One modified while the search was read comes again, as it is now: keep that.
                frame = frame.drop_duplicates(KEY, keep="last", ignore_index=True)
                frame[self.modified] = pd.to_datetime(frame[self.modified], utc=True)
                frame[self.modified] = frame[self.modified].dt.tz_localize(None)
                yield frame
        except CrmError as error:
            raise _read_failed(self.spec.table, error) from error

    def batches(
        self, since: datetime | None, batch_size: int, within: object | None = None
    ) -> Iterator[pd.DataFrame]:
        if within is not None:
            raise ValueError("CRM objects are not read by partition")
        found = self.client.search_modified_since(self.spec.table, since or EPOCH, self.properties)
        yield from self._frames(found, batch_size)

    def in_window(self, column: str, start: datetime, end: datetime) -> object:
        raise ValueError("CRM objects are not read by partition")

    def rows_with_keys(self, keys: Sequence[object], batch_size: int) -> Iterator[pd.DataFrame]:
        ids = sorted({str(int(key)) for key in keys}, key=int)

        def objects() -> Iterator[dict]:
            for start in range(0, len(ids), MAX_BATCH):
                chunk = ids[start : start + MAX_BATCH]
                yield from self.client.batch_read(
                    self.spec.table, chunk, [*self.properties, self.modified]
                )

        yield from self._frames(objects(), batch_size)

    def deleted_keys(self, since: datetime | None, within: object | None = None) -> list[object]:
        return []  # searches never show archived objects (see the module docstring)

    def change_counter(self, high_water_mark: datetime) -> None:
        return None  # none kept: the sensor goes by the high-water mark alone

    def high_water_mark(self) -> datetime | None:
        try:
            newest = self.client.newest_modification(self.spec.table)
        except CrmError as error:
            raise _read_failed(self.spec.table, error) from error
        return None if newest is None else newest.replace(tzinfo=None)


def _read_failed(object_type: str, error: CrmError) -> Exception:
    """A CRM that answered and refused the read (a 4xx: a scope missing, a property unknown, the
    token refused) as SourceReadFailed, saying what to fix: a rerun gets the same answer. Not
    reached, or 429/5xx after every retry: SourceUnavailable, rerun when it answers."""
    if isinstance(error, CrmRefused):
        return SourceReadFailed(f"CRM {object_type}: {error}", error.todo)
    return SourceUnavailable(f"CRM {object_type}: {error}")
