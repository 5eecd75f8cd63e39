"""A flow, declared once: where rows come from, what they must be, where they go."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import pandas as pd

from integrations.contracts import Contract


@dataclass(frozen=True)
class Lookup:
    """A column taken from a parent table: `name` = parent.`value` where parent.`key` = `via`.

    Each lookup joins the parent on its own: a flow may look into one parent twice (billing and
    shipping customer) or into its own table (an employee's manager)."""

    name: str
    table: str
    via: str
    key: str
    value: str


@dataclass(frozen=True)
class RecentTotal:
    """A sum over a child table's recent rows (what a customer paid in the last year):
    `name` = sum(`table`.`value`) over the live child rows whose `via` is this row's key, whose
    `dated` lies within `window` before the run, and whose columns equal `where`; 0 if none.

    It is read with the row: a total that moves while the row does not (a new payment, an invoice
    ageing out) reaches the destination with the row's next change or the reconciliation's repair.
    """

    name: str
    table: str
    via: str
    value: str
    dated: str
    window: timedelta
    where: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SourceTable:
    """A table in a system of record, read incrementally by `(cursor, key)`.

    `system` names the system of record (`erp`, `chinook`, …): the source asset is
    `<system>/<table>` and the Dagster resource of that name provides the connection. A table
    without a change cursor (`cursor=None`) is read whole on every run, or by partition window;
    the ledger's diff still sends only what changed.
    """

    table: str
    key: str
    cursor: str | None = "updated_at"
    system: str = "erp"
    deleted: str | None = "deleted_at"
    lookups: tuple[Lookup, ...] = ()
    totals: tuple[RecentTotal, ...] = ()


@dataclass(frozen=True)
class DailyPartitions:
    """The flow's business date: each day is a partition, a backfill rewrites exactly its days."""

    column: str
    start: str  # first day, YYYY-MM-DD


@dataclass(frozen=True)
class Association:
    """A record links to another object of the destination, named by that object's natural key.

    `field` is a field of the mapped record (hashed, so a new link is a change) that the
    destination does not store as a property: it resolves it and links the two objects.
    """

    field: str
    to_dataset: str
    to_id_property: str


@dataclass(frozen=True)
class Target:
    """The destination dataset (asset key `<system>/<dataset>`) and the property that keys it."""

    system: str
    dataset: str
    id_property: str
    # Fields the destination keeps unique ignoring case (HubSpot: a contact's email). The engine
    # checks them across the whole dataset, so a clash is caught before it reaches the destination.
    unique_ignoring_case: tuple[str, ...] = ()
    associations: tuple[Association, ...] = ()


@dataclass(frozen=True)
class ErrorBudget:
    """Above `max_share` rejected rows the sync stops instead of pushing mostly-bad data.

    The share is judged before each batch is loaded, once the run has seen `min_rows` rows: a
    small incremental run with one bad row dead-letters it and goes on.
    """

    max_share: float = 0.10
    min_rows: int = 20


@dataclass(frozen=True)
class ArchiveGuard:
    """A run that would archive more than `max_share` of the synced records (and more than
    `min_records`) stops before writing anything: mass deletes in a source are usually mistakes."""

    max_share: float = 0.2
    min_records: int = 10


@dataclass(frozen=True)
class FlowSpec:
    """Everything the engine needs to know about a flow; no connections, no framework."""

    name: str
    source: SourceTable
    source_contract: Contract
    target: Target
    target_contract: Contract
    # Source rows (valid by source_contract) → target records, same index, by documented meaning.
    mapping: Callable[[pd.DataFrame], pd.DataFrame]
    description: str = ""
    batch_size: int = 1000
    lookback: timedelta = timedelta(minutes=5)
    # Rows for which this is False are out of the flow (an unpaid invoice is no deal): archived
    # like soft-deleted rows if they were synced before.
    in_scope: Callable[[pd.DataFrame], pd.Series] | None = None
    partitions: DailyPartitions | None = None
    error_budget: ErrorBudget = field(default_factory=ErrorBudget)
    archive_deleted: bool = True
    archive_guard: ArchiveGuard = field(default_factory=lambda: ArchiveGuard())
    # When to run, for whichever orchestrator runs the flow (the engine itself ignores these).
    schedule: str | None = "0 * * * *"
    watch_source: bool = True
    pool: str | None = None
    # Whole-run retries of an API-facing flow (after its client's own retries gave up or its
    # circuit opened), spaced out exponentially with jitter by the orchestrator.
    run_retries: int = 3
    # When to alert: no successful sync for this long; a dead letter left open this long.
    max_staleness: timedelta = timedelta(hours=3)
    dead_letter_max_age: timedelta = timedelta(days=1)
    # The flow that writes the objects this one reads back (CRM contacts handoff wrote from the
    # ERP): a record never taken whose fields that flow writes hold what it last wrote is its
    # echo, not a change, and is not taken (see integrations/engine/echoes.py).
    echo_of: FlowSpec | None = None

    def __post_init__(self) -> None:
        if self.echo_of is not None:
            self._check_echoes(self.echo_of)

    def _check_echoes(self, writer: FlowSpec) -> None:
        """An echo is told by comparing every field this flow reads with what `writer` wrote:
        both must name the same fields (but this flow's key, cursor and soft-delete column, and
        the writer's links)."""
        links = {association.field for association in writer.target.associations}
        written = set(writer.target_contract.schema.columns) - links
        own = {self.source.key, self.source.cursor, self.source.deleted}
        read = set(self.source_contract.schema.columns) - own
        if written - read:
            raise ValueError(
                f"{self.name}: echo_of={writer.name} writes fields this flow's source contract "
                f"does not read ({sorted(written - read)}), so an echo cannot be told"
            )
        if read - written:  # a person's change to such a field would be taken for an echo
            raise ValueError(
                f"{self.name}: echo_of={writer.name} does not write fields this flow reads "
                f"({sorted(read - written)}), so a change to one cannot be told from an echo"
            )

    @property
    def pii_fields(self) -> frozenset[str]:
        """The fields either contract marks as personal."""
        return self.source_contract.pii_fields | self.target_contract.pii_fields

    @property
    def declared_fields(self) -> frozenset[str]:
        """The fields the flow names: its contracts', and its key, cursor, soft-delete and
        partition columns."""
        source = self.source
        named = {source.key, source.cursor, source.deleted}
        if self.partitions:
            named.add(self.partitions.column)
        return frozenset(self.source_contract.schema.columns).union(
            self.target_contract.schema.columns, named - {None}
        )

    def masked_fields(self, fields: Iterable[str]) -> frozenset[str]:
        """Which of a record's fields a person sees masked: the personal ones and, when the flow
        has any, every field it does not declare (a column no contract names may hold anything:
        a street address, a fax number)."""
        pii = self.pii_fields
        return pii | (frozenset(fields) - self.declared_fields) if pii else pii
