"""Echoes: what a source shows back after another flow wrote it.

A CRM contact handoff wrote from the ERP comes back through the CRM's changes (its webhooks, its
search by modification date) as if a salesperson had changed it. A flow that stages the CRM's
changes for the ERP (`FlowSpec.echo_of`: the flow that writes those objects) does not stage such
a record: one it never staged whose fields the other flow writes hold what it last wrote there.
The record's destination id in that flow's ledger is this flow's record key (the CRM's object id).

Once a record was staged (a person changed it), its later versions are staged, echoes too: the
staged row stays what the CRM holds, never an older version the writer has since overwritten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pandas as pd

from integrations.engine import columns
from integrations.engine.state import LedgerEntry, StateStore

if TYPE_CHECKING:
    from integrations.engine.spec import FlowSpec


def echoes(
    writer: FlowSpec, state: StateStore, rows: pd.DataFrame, fresh: Sequence[str]
) -> list[str]:
    """The keys among `fresh` (records the flow never took) of `rows` (source rows, validated,
    indexed by record key) that are echoes of what `writer` wrote: the key is the destination id
    of one live record in its ledger, whose field hashes the row matches."""
    owners = state.live_owners(writer.name, fresh) if fresh else {}
    owner_of = {held: next(iter(keys)) for held, keys in owners.items() if len(keys) == 1}
    entries = state.ledger_entries(writer.name, list(owner_of.values()))
    written = {held: entries[key] for held, key in owner_of.items() if key in entries}
    return _matching(rows, list(writer.target_contract.schema.columns), written)


def _matching(
    rows: pd.DataFrame, writes: list[str], written: Mapping[str, LedgerEntry]
) -> list[str]:
    """The keys of `rows` (source rows, validated) whose fields hold what the writer's ledger
    entry, in `written` by the same key, says it wrote last, field by field: of the fields it
    `writes`, those `rows` hold (a link the writer makes is no field the source shows). An
    empty text matches the null the writer may have sent (a CRM keeps a cleared property as "")."""
    keys = [key for key in rows.index if key in written]
    if not keys:
        return []
    names = sorted(writes)
    shown = [at for at, name in enumerate(names) if name in rows.columns]
    values = columns.ready_columns(rows.loc[keys, [names[at] for at in shown]])
    values = {name: values.get(name, [None] * len(keys)) for name in names}
    emptied = {name: [None if v == "" else v for v in column] for name, column in values.items()}
    as_read, as_null = (columns.field_hashes(columns.texts_of(some)) for some in (values, emptied))
    return [
        key
        for key, read, nulled in zip(keys, as_read, as_null, strict=True)
        if _same(written[key].field_hashes, read, nulled, shown)
    ]


def _same(before: str | None, read: str, nulled: str, shown: list[int]) -> bool:
    """Whether the writer's field hashes name the same fields (their "names:" prefix), and each
    field shown is hashed as read or as null."""
    if not before or len(before) != len(read) or before[:9] != read[:9]:
        return False
    return all(
        before[at : at + 8] in (read[at : at + 8], nulled[at : at + 8])
        for at in (9 + 8 * position for position in shown)
    )
