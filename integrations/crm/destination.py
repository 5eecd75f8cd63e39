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
from integrations.engine.spec import Association, Target


class CrmObjects:
    """One CRM object type (contacts, companies, deals) keyed by `id_property`."""

    max_batch = MAX_BATCH

    def __init__(
        self,
        client: CrmClient,
        object_type: str,
        id_property: str,
        associations: Sequence[Association] = (),
    ):
        self.client, self.object_type, self.id_property = client, object_type, id_property
        self.associations = tuple(associations)
        self.name = f"CRM {object_type}"

    @classmethod
    def for_target(cls, client: CrmClient, target: Target) -> CrmObjects:
        return cls(client, target.dataset, target.id_property, target.associations)

    def prepare(self, spec) -> None:
        """Nothing to check up front: the CRM answers record by record."""

    def upsert(self, records: Sequence[OutboundRecord]) -> list[Written]:
        links = {field: None for field in (a.field for a in self.associations)}
        inputs = [
            {
                "id": str(record.properties[self.id_property]),
                "properties": {k: v for k, v in record.properties.items() if k not in links},
                "objectWriteTraceId": record.correlation_id or record.trace_id,
            }
            for record in records
        ]
        try:
            targets = [self._resolve(association, records) for association in self.associations]
            results = self.client.batch_upsert(self.object_type, self.id_property, inputs)
            written = self._written(records, inputs, results)
            for association, resolved in zip(self.associations, targets, strict=True):
                self._link(association, records, written, resolved)
        except CrmRequestRejected as error:
            raise RecordsRejected(str(error)) from error
        except (CrmUnavailable, CrmAuthError) as error:
            raise DestinationUnavailable(str(error)) from error
        return written

    def _resolve(
        self, association: Association, records: Sequence[OutboundRecord]
    ) -> dict[str, str]:
        """The linked objects' ids; a record whose linked object is not in the CRM is refused
        before anything is written (the engine isolates it by bisection)."""
        values = sorted(
            {str(r.properties.get(association.field) or "").lower() for r in records} - {""}
        )
        found: dict[str, str] = {}
        for start in range(0, len(values), MAX_BATCH):
            found.update(
                self.client.batch_read_ids(
                    association.to_dataset,
                    association.to_id_property,
                    values[start : start + MAX_BATCH],
                )
            )
        unknown = [value for value in values if value not in found]
        if unknown:
            raise RecordsRejected(
                f"the associated {association.to_dataset} ({association.to_id_property} "
                f"{', '.join(unknown[:3]).upper()}) are not in the CRM"
            )
        return found

    def _link(self, association, records, written: list[Written], resolved: dict[str, str]) -> None:
        ids = {item.key: item.destination_id for item in written}
        pairs = [
            (ids[record.key], resolved[str(record.properties[association.field]).lower()])
            for record in records
            if record.properties.get(association.field)
        ]
        for start in range(0, len(pairs), MAX_BATCH):
            self.client.associate(
                self.object_type, association.to_dataset, pairs[start : start + MAX_BATCH]
            )

    def _written(self, records, inputs, results) -> list[Written]:
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
