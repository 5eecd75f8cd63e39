"""CRM objects as a sync destination: batch upsert by a unique property, batch archive."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from integrations.crm.client import (
    MAX_BATCH,
    CrmAuthError,
    CrmClient,
    CrmRequestRejected,
    CrmUnavailable,
)
from integrations.engine.destination import (
    DestinationUnavailable,
    OutboundRecord,
    RecordsRejected,
    Written,
)


class CrmObjects:
    """One CRM object type (contacts, companies, deals) keyed by `id_property`."""

    max_batch = MAX_BATCH

    def __init__(self, client: CrmClient, object_type: str, id_property: str):
        self.client, self.object_type, self.id_property = client, object_type, id_property
        self.name = f"CRM {object_type}"

    def upsert(self, records: Sequence[OutboundRecord]) -> list[Written]:
        inputs = [
            {
                "id": str(record.properties[self.id_property]),
                "properties": record.properties,
                "objectWriteTraceId": record.trace_id,
            }
            for record in records
        ]
        try:
            results = self.client.batch_upsert(self.object_type, self.id_property, inputs)
        except CrmRequestRejected as error:
            raise RecordsRejected(str(error)) from error
        except (CrmUnavailable, CrmAuthError) as error:
            raise DestinationUnavailable(str(error)) from error
        # Read the answer record by record: a 2xx is never taken as success wholesale.
        by_id = {
            str(result.get("properties", {}).get(self.id_property, "")).lower(): result
            for result in results
        }
        written, missing = [], []
        for record, item in zip(records, inputs, strict=True):
            result = by_id.get(item["id"].lower())
            if result is None:
                missing.append(record.key)
            else:
                written.append(
                    Written(record.key, str(result["id"]), bool(result.get("new", False)))
                )
        if missing:
            raise RecordsRejected(
                f"the CRM returned no result for {len(missing)} of {len(records)} inputs"
            )
        return written

    def snapshot(self, fields: Sequence[str]) -> Iterator[tuple[str, str, dict[str, object]]]:
        try:
            for item in self.client.list_objects(self.object_type, [self.id_property, *fields]):
                properties = item.get("properties", {})
                yield str(properties.get(self.id_property) or ""), str(item["id"]), properties
        except (CrmUnavailable, CrmAuthError) as error:
            raise DestinationUnavailable(str(error)) from error

    def archive(self, destination_ids: Sequence[str]) -> None:
        try:
            self.client.batch_archive(self.object_type, destination_ids)
        except CrmRequestRejected as error:
            raise RecordsRejected(str(error)) from error
        except (CrmUnavailable, CrmAuthError) as error:
            raise DestinationUnavailable(str(error)) from error
