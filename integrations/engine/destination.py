"""What the engine needs from a destination: upsert by natural key, and archive."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, overload

from integrations.engine.hashing import idempotency_key

if TYPE_CHECKING:
    from integrations.engine.spec import FlowSpec


@dataclass(frozen=True)
class OutboundRecord:
    key: str  # the ledger's record key (the source key)
    properties: dict[str, object]
    trace_id: str  # idempotency key: (flow, key, content hash)
    # The write's id across systems: (run id, flow, key). Sent to the CRM as
    # `objectWriteTraceId`, kept in the logs, the DLQ and the audit trail.
    correlation_id: str = ""
    # What the destination noted it linked the record to at its last write (Written.links, kept
    # in the ledger): it unlinks only what it linked itself, not what people linked by hand.
    links: str | None = None


def correlation_id(run_id: str, flow: str, key: str) -> str:
    return f"{run_id}:{flow}:{key}"


class OutboundBatch(Sequence[OutboundRecord]):
    """Records to upsert, kept column by column. A destination that writes columns (a SQL
    table) reads `column` without a dict per record; any other indexes or iterates it as
    OutboundRecords, built on demand. A slice is a batch again (the engine bisects with it)."""

    def __init__(
        self,
        keys: Sequence[str],
        columns: Mapping[str, Sequence[object]],
        hashes: Sequence[str],
        *,
        flow: str,
        run_id: str,
        links: Sequence[str | None] | None = None,
    ):
        self.keys, self.columns, self.hashes = keys, columns, hashes
        self.flow, self.run_id = flow, run_id
        self.links = links  # per record, as OutboundRecord.links; None: none known for any

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, at: int) -> OutboundRecord: ...
    @overload
    def __getitem__(self, at: slice) -> OutboundBatch: ...
    def __getitem__(self, at):
        if isinstance(at, slice):
            return OutboundBatch(
                self.keys[at],
                {name: values[at] for name, values in self.columns.items()},
                self.hashes[at],
                flow=self.flow,
                run_id=self.run_id,
                links=None if self.links is None else self.links[at],
            )
        key = self.keys[at]
        return OutboundRecord(
            key=key,
            properties={name: values[at] for name, values in self.columns.items()},
            trace_id=idempotency_key(self.flow, key, self.hashes[at]),
            correlation_id=correlation_id(self.run_id, self.flow, key),
            links=None if self.links is None else self.links[at],
        )

    @classmethod
    def of(cls, records: Sequence[OutboundRecord]) -> OutboundBatch:
        """Records made one by one, as columns (for a destination that reads columns; its
        records carry no content hashes, so it does not rebuild them)."""
        names = {name: None for record in records for name in record.properties}
        return cls(
            [record.key for record in records],
            {name: [record.properties.get(name) for record in records] for name in names},
            [""] * len(records),
            flow="",
            run_id="",
        )

    def column(self, name: str) -> Sequence[object]:
        """One property of every record (None where the records do not carry it)."""
        found = self.columns.get(name)
        return found if found is not None else [None] * len(self.keys)


class Written(NamedTuple):  # a tuple: a batch makes one per record, cheaply
    key: str
    destination_id: str
    # True: created; False: updated; None: the destination held the record as sent already,
    # and rewrote nothing (a destination that can tell).
    created: bool | None
    # What the destination linked the record to, as text it reads back (a CRM deal's contact);
    # the ledger keeps it and hands it back as OutboundRecord.links with the record's next write.
    links: str | None = None


class WrittenColumns(Sequence[Written]):
    """Written records column by column: a destination that writes a batch at once (a SQL table)
    makes no tuple per record, and the engine reads the columns; a Written is made only when one
    is looked at."""

    def __init__(
        self,
        keys: Sequence[str],
        destination_ids: Sequence[str],
        created: Sequence[bool | None],
        links: Sequence[str | None] | None = None,
    ):
        self.keys, self.destination_ids, self.created = keys, destination_ids, created
        self.links = [None] * len(keys) if links is None else links

    @property
    def inserted(self) -> int:
        return list(self.created).count(True)

    @property
    def unchanged(self) -> int:
        """Records the destination held as sent already: nothing was rewritten."""
        return list(self.created).count(None)

    @property
    def updated(self) -> int:
        return len(self.created) - self.inserted - self.unchanged

    @classmethod
    def joined(cls, parts: Iterable[Sequence[Written]]) -> WrittenColumns:
        """The parts (chunks' outcomes, in order) as one."""
        keys: list[str] = []
        destination_ids: list[str] = []
        created: list[bool | None] = []
        links: list[str | None] = []
        for part in parts:
            if isinstance(part, WrittenColumns):
                keys += part.keys
                destination_ids += part.destination_ids
                created += part.created
                links += part.links
            else:
                keys += [item.key for item in part]
                destination_ids += [item.destination_id for item in part]
                created += [item.created for item in part]
                links += [item.links for item in part]
        return cls(keys, destination_ids, created, links)

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, at: int) -> Written: ...
    @overload
    def __getitem__(self, at: slice) -> WrittenColumns: ...
    def __getitem__(self, at):
        if isinstance(at, slice):
            return WrittenColumns(
                self.keys[at], self.destination_ids[at], self.created[at], self.links[at]
            )
        return Written(self.keys[at], self.destination_ids[at], self.created[at], self.links[at])


@dataclass(frozen=True)
class Refusal:
    """One record the destination refused while accepting others, in its own words."""

    key: str
    reason: str


@dataclass(frozen=True)
class Upserted:
    """A batch's outcome record by record: a half-accepted batch is not a success wholesale."""

    written: Sequence[Written]
    refused: list[Refusal] = field(default_factory=list)


class RecordsRejected(Exception):
    """The destination refused the batch because of what is in it (not a transient failure)."""


class DestinationUnavailable(Exception):
    """The destination could not be reached, or kept failing after retries."""


class DestinationRefused(Exception):
    """The destination answered and refused the writes themselves, whatever records they carry
    (its credentials refused, their scope short of writing, or no such endpoint at its
    configured address): a rerun alone gets the same answer. Its text is the destination's
    answer; `todo` is what cures it, before "then rerun"."""

    def __init__(self, message: str, todo: str):
        super().__init__(message)
        self.todo = todo

    def __reduce__(self):
        return type(self), (str(self), self.todo)


class DestinationMismatch(Exception):
    """The destination cannot hold the flow's records (a missing table or column, a wrong type,
    a key that is not unique): found before anything is written."""


class Destination(Protocol):
    name: str
    max_batch: int
    # Whether it takes ids that differ only in case for one record (a CRM's unique properties);
    # reconciliation compares ids so. A destination without the attribute compares exactly.
    ids_ignore_case: bool
    # Optional: `ids_of(values)`, the destination ids of records with these id_property values,
    # for a destination whose ids are its key's values (a SQL table), not ids of its own (a CRM).
    # Whether it keeps no NULL apart from empty text (a CRM reads a cleared property back as "");
    # reconciliation compares them as one value then. A destination without it keeps them apart.
    null_is_empty: bool

    def prepare(self, spec: FlowSpec) -> None:
        """Before the first write: raise DestinationMismatch when the destination cannot hold
        the flow's records, naming the flow, what does not fit and what to do."""

    def upsert(self, records: Sequence[OutboundRecord]) -> Upserted:
        """Upsert by natural key. Records the destination refused one by one come back in
        `refused`; raise RecordsRejected when it refused the batch without saying which."""

    def archive(self, destination_ids: Sequence[str]) -> None:
        """Archive (soft-delete) records by their destination ids; already archived is fine."""

    def snapshot(self, fields: Sequence[str]) -> Iterator[tuple[str, str, dict[str, object]]]:
        """Every live record as (id_property value, destination id, its `fields`)."""

    def health(self) -> dict[str, object]:
        """How the transport fared (requests, retries, throttling, circuit state), for metadata."""
