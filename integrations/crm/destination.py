"""CRM objects as a sync destination: batch upsert by a unique property, batch archive."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from integrations.crm.client import (
    MAX_BATCH,
    BatchAnswer,
    CrmAuthError,
    CrmClient,
    CrmRequestRejected,
    CrmUnavailable,
)
from integrations.engine.destination import (
    DestinationUnavailable,
    OutboundRecord,
    RecordsRejected,
    Refusal,
    Upserted,
    Written,
)
from integrations.engine.hashing import content_hash, idempotency_key
from integrations.engine.spec import Association, Target


class CrmObjects:
    """One CRM object type (contacts, companies, deals) keyed by `id_property`."""

    max_batch = MAX_BATCH
    ids_ignore_case = True  # its unique properties compare without case
    null_is_empty = True  # a property cleared (sent null) reads back as ""

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

    def upsert(self, records: Sequence[OutboundRecord]) -> Upserted:
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
            answer = self.client.batch_upsert(self.object_type, self.id_property, inputs)
            outcome = self._read(records, inputs, answer)
            accepted = {item.key for item in outcome.written}
            linked = [record for record in records if record.key in accepted]
            for association, resolved in zip(self.associations, targets, strict=True):
                self._link(association, linked, outcome.written, resolved)
        except CrmRequestRejected as error:
            raise RecordsRejected(str(error)) from error
        except (CrmUnavailable, CrmAuthError) as error:
            raise DestinationUnavailable(str(error)) from error
        return outcome

    def health(self) -> dict[str, object]:
        return self.client.api.stats()

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
        # The same records with the same content give the same key, whatever the run.
        traces = "|".join(sorted(record.trace_id for record in records))
        for start in range(0, len(pairs), MAX_BATCH):
            chunk = pairs[start : start + MAX_BATCH]
            key = idempotency_key(
                f"associate {self.object_type}->{association.to_dataset}",
                traces,
                content_hash({"pairs": chunk}),
            )
            self.client.associate(self.object_type, association.to_dataset, chunk, key)

    def _read(self, records, inputs, answer: BatchAnswer) -> Upserted:
        """Record by record: a result, an error naming the input (by its objectWriteTraceId), or
        neither, which is a refusal too: a 2xx or 207 is never taken as success wholesale."""
        by_id = {
            str(result.get("properties", {}).get(self.id_property, "")).lower(): result
            for result in answer.results
        }
        errors: dict[str, str] = {}
        for error in answer.errors:
            reason = f"{error.get('category', 'ERROR')}: {error.get('message', 'no message')}"
            for trace in (error.get("context") or {}).get("objectWriteTraceId", []):
                errors[str(trace)] = reason
        written, refused = [], []
        for record, item in zip(records, inputs, strict=True):
            result = by_id.get(item["id"].lower())
            if result is not None:
                written.append(
                    Written(record.key, str(result["id"]), bool(result.get("new", False)))
                )
            else:
                reason = errors.get(
                    item["objectWriteTraceId"], "the CRM answered neither a result nor an error"
                )
                refused.append(Refusal(record.key, reason))
        return Upserted(written, refused)

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
