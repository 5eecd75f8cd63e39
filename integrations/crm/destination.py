"""CRM objects as a sync destination: batch upsert by a unique property, batch archive, and the
associations each record names (handoff's own, and only those, follow the record)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from integrations.crm.client import (
    MAX_BATCH,
    BatchAnswer,
    CrmAuthError,
    CrmClient,
    CrmEndpointNotFound,
    CrmRefused,
    CrmRequestRejected,
    CrmUnavailable,
)
from integrations.engine.destination import (
    DestinationMismatch,
    DestinationRefused,
    DestinationUnavailable,
    OutboundRecord,
    RecordsRejected,
    Refusal,
    Upserted,
    Written,
)
from integrations.engine.hashing import canonical_json, content_hash, idempotency_key
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
        linking = {field: None for field in (a.field for a in self.associations)}
        inputs = [
            {
                "id": str(record.properties[self.id_property]),
                "properties": {k: v for k, v in record.properties.items() if k not in linking},
                "objectWriteTraceId": record.correlation_id or record.trace_id,
            }
            for record in records
        ]
        try:
            targets = [self._resolve(association, records) for association in self.associations]
            answer = self.client.batch_upsert(self.object_type, self.id_property, inputs)
            outcome = self._read(records, inputs, answer)
            if self.associations:
                outcome = self._linked(records, outcome, targets)
        except CrmRequestRejected as error:
            raise RecordsRejected(str(error)) from error
        except (CrmAuthError, CrmEndpointNotFound) as error:  # every record alike, every rerun
            raise DestinationRefused(str(error), error.todo) from error
        except CrmUnavailable as error:
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

    def _linked(
        self, records: Sequence[OutboundRecord], outcome: Upserted, targets: list[dict[str, str]]
    ) -> Upserted:
        """Link each written record to the objects it names, then unlink it from those handoff
        linked it to before (its ledger's links) that it names no more; links made by hand stay.
        Linked first: a crash between the two leaves one link too many, which the rerun (sent
        again with the same ledger) removes, never none. The outcome carries the new links."""
        ids = {item.key: item.destination_id for item in outcome.written}
        written = [record for record in records if record.key in ids]
        named = {record.key: self._named(record, targets) for record in written}
        for dataset in dict.fromkeys(a.to_dataset for a in self.associations):
            self._link(
                dataset,
                written,
                [(ids[r.key], to) for r in written for to in named[r.key][dataset]],
            )
            stale = [
                (ids[r.key], to)
                for r in written
                for to in _links(r.links).get(dataset, ())
                if to not in named[r.key][dataset]
            ]
            for start in range(0, len(stale), MAX_BATCH):
                self.client.dissociate(self.object_type, dataset, stale[start : start + MAX_BATCH])
        return Upserted(
            [item._replace(links=canonical_json(named[item.key])) for item in outcome.written],
            outcome.refused,
        )

    def _named(self, record: OutboundRecord, targets: list[dict[str, str]]) -> dict[str, list[str]]:
        """The ids of the objects the record names, by dataset: {"contacts": ["901"]}."""
        named: dict[str, set[str]] = {a.to_dataset: set() for a in self.associations}
        for association, resolved in zip(self.associations, targets, strict=True):
            value = str(record.properties.get(association.field) or "").lower()
            if value:
                named[association.to_dataset].add(resolved[value])
        return {dataset: sorted(found) for dataset, found in named.items()}

    def _link(self, dataset: str, records: Sequence[OutboundRecord], pairs) -> None:
        # Keyed by the run's writes of these records: a retry after a lost answer is replayed,
        # not acted twice. Another run links anew (linking a pair already linked changes
        # nothing): a key kept across runs had the CRM replay an old answer for a record moved
        # back to an object handoff had unlinked it from since, and it stayed unlinked.
        writes = "|".join(sorted(record.correlation_id or record.trace_id for record in records))
        for start in range(0, len(pairs), MAX_BATCH):
            chunk = pairs[start : start + MAX_BATCH]
            key = idempotency_key(
                f"associate {self.object_type}->{dataset}",
                writes,
                content_hash({"pairs": chunk}),
            )
            self.client.associate(self.object_type, dataset, chunk, key)

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
        except CrmRefused as error:  # the token, a scope or a property: waiting will not help
            raise DestinationMismatch(f"{error}. What to do: {error.todo}, then rerun") from error
        except CrmUnavailable as error:
            raise DestinationUnavailable(str(error)) from error

    def archive(self, destination_ids: Sequence[str]) -> None:
        try:
            self.client.batch_archive(self.object_type, destination_ids)
        except CrmRequestRejected as error:
            raise RecordsRejected(str(error)) from error
        except (CrmAuthError, CrmEndpointNotFound) as error:
            raise DestinationRefused(str(error), error.todo) from error
        except CrmUnavailable as error:
            raise DestinationUnavailable(str(error)) from error


def _links(stored: str | None) -> dict[str, list[str]]:
    """A record's links as the ledger holds them (none for a record written before handoff kept
    them: those links are left as they are)."""
    return json.loads(stored) if stored else {}
