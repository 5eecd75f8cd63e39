"""One destination row holds one record, and one unique value one record: the checks a batch
goes through before its load (a mixin of Sync), and the batch still being committed that they
count with the ledger.

A record whose destination id another record holds live is refused (written, each would
overwrite the other's row), unless this batch moves that record off the id; a record taking an
id others of its batch move off is written once their moves land (see Sync._load_movers_first).
A record written under a new id has its old row archived when no other record holds it. A
unique value (ignoring case) goes to the first record that claims it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import pandas as pd

from integrations.contracts.contract import RowRejection
from integrations.engine.destination import Destination, WrittenColumns
from integrations.engine.source import Source
from integrations.engine.spec import FlowSpec
from integrations.engine.state import LedgerEntries, LedgerEntry, StateStore

if TYPE_CHECKING:
    from integrations.engine.sync import _Plan

# A letter of a record refused for a destination id another record holds names that record.
ID_TOO = "'s destination id too"
ID_HELD_BY = re.compile(r" is record (.+?)" + re.escape(ID_TOO), re.DOTALL)
_CLAIM_PASSES = 8  # checks of a batch's unique values, as refused moves are found (_unclaimed)


def key_text(value: object) -> str:
    """A key as text; whole numbers that pandas turned into floats (a key column with a null)
    stay whole: 42.0 → "42"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class IdCheck(NamedTuple):
    """What `Sync._taken_ids` found: see the _Plan fields of the same names."""

    taken: list[RowRejection]
    displaced: dict[str, tuple[str, str]]
    vacated: dict[str, list[str]]


def _sharing(keys: list[str], ids: list[str], sending: list[int]) -> dict[str, str]:
    """The records sent (`sending`: their positions) to an id another record of the batch
    holds, each with that record: one in sync already holds its id first, then the first sent
    to it. A batch whose ids are all distinct, as one mostly is, has none."""
    if len(set(ids)) == len(ids):
        return {}
    holder: dict[str, str] = {}
    sent = set(sending)
    for at, key in enumerate(keys):
        if at not in sent:
            holder.setdefault(ids[at], key)
    taken = {}
    for at in sending:
        owner = holder.setdefault(ids[at], keys[at])
        if owner != keys[at]:
            taken[keys[at]] = owner
    return taken


def _still_held(
    candidates: dict[str, list[str]], wanted: dict[str, str], moving: dict[str, str | None]
) -> dict[str, str]:
    """For each record, the first of its id's holders (`candidates`) that this batch does not
    move off the id (`moving`: a record's id now; None, archived)."""
    held = {}
    for key, owners in candidates.items():
        keeping = [owner for owner in owners if moving.get(owner, wanted[key]) == wanted[key]]
        if keeping:
            held[key] = keeping[0]
    return held


def claim_digest(value: object) -> str | None:
    """The digest a unique value is claimed by; none for no value (null, or blank text: an
    ERP's "" for "no domain" is no one's)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _digest(value)


def _digest(value: object) -> str:
    return hashlib.md5(str(value).lower().encode(), usedforsecurity=False).hexdigest()


@dataclass
class InFlight:
    """A batch loaded into the destination whose commit is under way: what the ledger and the
    unique-value claims will hold once it lands."""

    written: WrittenColumns = field(default_factory=lambda: WrittenColumns([], [], []))
    entries: LedgerEntries = field(
        default_factory=lambda: LedgerEntries([], [[] for _ in LedgerEntry._fields])
    )
    claims: list[tuple[str, str, str]] = field(default_factory=list)  # (field, digest, key)
    archived: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, spec: FlowSpec, plan: _Plan, written: WrittenColumns) -> InFlight:
        outbound = plan.outbound
        keys = written.keys
        hashes, field_hashes = outbound.hashes, plan.field_hashes
        if keys != outbound.keys:  # some refused, or written in another order
            at = list(map(plan.position.__getitem__, keys))
            hashes = list(map(hashes.__getitem__, at))
            field_hashes = list(map(field_hashes.__getitem__, at))
        # Archived, and let go of the rows others took (their records left the source).
        archived = [*plan.to_archive, *plan.displaced]
        ids = [*plan.to_archive.values(), *(taken for taken, _ in plan.displaced.values())]
        entries = LedgerEntries(
            keys + archived,
            [
                [*hashes, *(["archived"] * len(archived))],
                [*written.destination_ids, *ids],
                [False] * len(keys) + [True] * len(archived),
                [*field_hashes, *([None] * len(archived))],
                [*written.links, *([None] * len(archived))],  # an archived row's links go with it
            ],
        )
        position = plan.position
        claims = [
            (name, digest, key)
            for name in spec.target.unique_ignoring_case
            for key in keys
            if (digest := claim_digest(outbound.column(name)[position[key]])) is not None
        ]
        return cls(written, entries, claims, set(archived))

    def owners(self, name: str) -> dict[str, str]:
        return {digest: key for field_name, digest, key in self.claims if field_name == name}

    @property
    def rewritten(self) -> set[str]:
        """Keys whose stored claims this batch replaces (written) or lets go (archived)."""
        return set(self.written.keys) | self.archived


class DestinationIds:
    """The id and unique-value checks of a Sync (a mixin: it reads the run's flow, source,
    destination and state store)."""

    spec: FlowSpec
    source: Source
    destination: Destination
    state: StateStore
    _clashed: list[str]

    def _ids(self, values: Sequence[object]) -> list[str]:
        """The destination ids of records with these id_property values, as the destination
        compares them."""
        ids_of = getattr(self.destination, "ids_of", None)
        ids = ids_of(values) if ids_of is not None else [key_text(value) for value in values]
        folded = getattr(self.destination, "ids_ignore_case", False)
        return [i.lower() for i in ids] if folded else ids

    def _taken_ids(
        self,
        valid: pd.DataFrame,
        sending: list[int],
        ledger: Mapping[str, LedgerEntry],
        gone: pd.DataFrame,
        in_flight: InFlight | None,
    ) -> IdCheck:
        """Records whose destination id another record holds: one of the batch already in sync
        or sent before it, or, where the destination's ids are its key's values (a SQL table),
        one the ledger or the batch being committed holds live and does not let go of in this
        batch. Written, each would overwrite the other's row (an invoice renumbered onto
        another's number, a mapping that folds two codes into one), and archiving one would
        archive the other's. And the ledger's holders that left the source (deleted outright)
        of ids records are sent to take, and the records sent to take an id that others of the
        batch move off (written only once those moves land)."""
        name = self.spec.target.id_property
        if not sending or name not in valid:
            return IdCheck([], {}, {})
        keys, ids = valid.index.tolist(), self._ids(valid[name].tolist())
        taken = _sharing(keys, ids, sending)  # record → the record that holds its id
        displaced: dict[str, tuple[str, str]] = {}
        vacated: dict[str, list[str]] = {}
        if getattr(self.destination, "ids_of", None) is not None:
            new = {
                keys[at]: ids[at]
                for at in sending
                if keys[at] not in taken
                and (
                    (known := ledger.get(keys[at])) is None
                    or known.archived
                    or known.destination_id != ids[at]
                )
            }
            now = {**dict(zip(keys, ids, strict=True)), **dict.fromkeys(gone.index)}
            candidates, deserted = self._holders(new, now.keys(), in_flight)
            held: dict[str, str] = {}
            while True:  # a refused record keeps its row, and so holds its id: to a fixed point
                moving = (
                    {key: at for key, at in now.items() if key not in taken and key not in held}
                    if taken or held
                    else now
                )
                kept = _still_held(candidates, new, moving)
                if kept.keys() == held.keys():
                    break
                held = kept
            taken.update(held)
            self._clashed += list(held)
            displaced = {
                owner: (new[key], key)
                for key, owners in deserted.items()
                if key not in taken
                for owner in owners
            }
            vacated = {key: owners for key, owners in candidates.items() if key not in taken}
        refusals = [self._id_taken(key, owner) for key, owner in taken.items()]
        return IdCheck(refusals, displaced, vacated)

    def _id_taken(self, key: str, owner: str, why: str = "") -> RowRejection:
        label, field_name = self.spec.target_contract.label, self.spec.target.id_property
        return RowRejection(
            key,
            f"{label}: {field_name} is record {owner}{ID_TOO}{why} (two records "
            f"cannot share one row of {self.destination.name}); correct one of them in the "
            "source, then replay this one",
        )

    def _holders(
        self, wanted: dict[str, str], batch: Set[str], in_flight: InFlight | None
    ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """For each record (key → destination id wanted), the other records that hold that id
        live: in the ledger, or in the batch being committed, but not one that batch moved or
        archived, nor one the ledger names whose source row is gone (deleted outright: it
        holds nothing; those are the second mapping's). Whether this batch (`batch`: its keys)
        moves them off is for `_still_held` to say."""
        if not wanted:
            return {}, {}
        flight = in_flight or InFlight()
        flying = dict(zip(flight.written.keys, flight.written.destination_ids, strict=True))
        wanted_ids = set(wanted.values())
        owners = self._live_owners(list(wanted.values()))
        if not wanted_ids.isdisjoint(flying.values()):  # only the ids wanted: not the whole batch
            for key, destination_id in flying.items():
                if destination_id in wanted_ids:
                    owners.setdefault(destination_id, set()).add(key)
        candidates: dict[str, list[str]] = {}
        for key, destination_id in wanted.items():
            if destination_id not in owners:  # most: no set made for them
                continue
            for owner in sorted(owners[destination_id] - {key}):
                if owner in flight.archived or flying.get(owner, destination_id) != destination_id:
                    continue  # the batch being committed moved or archived it
                candidates.setdefault(key, []).append(owner)
        outside = {o for held in candidates.values() for o in held} - set(batch) - flying.keys()
        gone = outside - self._in_source(sorted(outside)) if outside else set()
        live = {
            key: [owner for owner in held if owner not in gone] for key, held in candidates.items()
        }
        deserted = {
            key: [owner for owner in held if owner in gone] for key, held in candidates.items()
        }
        return (
            {key: owners for key, owners in live.items() if owners},
            {key: owners for key, owners in deserted.items() if owners},
        )

    def _held_by(
        self, wanted: dict[str, str], moving: dict[str, str | None], in_flight: InFlight | None
    ) -> dict[str, str]:
        """For each record (key → destination id wanted), another record that holds that id
        and keeps it: not one this batch moves to another id or archives (`moving`: key → its
        id now, None when archived)."""
        candidates, _ = self._holders(wanted, moving.keys(), in_flight)
        return _still_held(candidates, wanted, moving)

    def _in_source(self, keys: list[str]) -> set[str]:
        """Which of these records the source still has."""
        return {
            str(key)
            for batch in self.source.rows_with_keys(keys, self.spec.batch_size)
            for key in batch[self.spec.source.key]
        }

    def _held_ids(
        self, to_archive: dict[str, str], leaving: set[str], in_flight: InFlight | None
    ) -> set[str]:
        """The destination ids of records to archive that another record holds live: a row
        another record was written into since (a renumbered invoice's old number, reused) is
        not archived with the record that left it."""
        if not to_archive:
            return set()
        holders = self._held_by(to_archive, dict.fromkeys(leaving), in_flight)
        return {to_archive[key] for key in holders}

    def _relocated(
        self, plan: _Plan, written: WrittenColumns, in_flight: InFlight | None
    ) -> dict[str, tuple[str, str]]:
        """Records written under another destination id than the ledger held (an invoice
        renumbered; a CRM record whose key property changed): key → (old id, new id), for the
        old rows no other record holds now, to be archived. They were left live, counted twice
        in every total."""
        moved = {
            key: (plan.previous[key], new)
            for key, new in zip(written.keys, written.destination_ids, strict=True)
            if plan.previous.get(key, new) != new
        }
        if not moved:
            return {}
        now = dict(zip(written.keys, written.destination_ids, strict=True))
        moving = {**now, **dict.fromkeys(plan.to_archive)}
        wanted = {key: old for key, (old, _) in moved.items()}
        written_ids = set(written.destination_ids)
        held = self._held_by(wanted, moving, in_flight)
        return {
            key: ids for key, ids in moved.items() if key not in held and ids[0] not in written_ids
        }

    def _unclaimed(
        self, valid: pd.DataFrame, releasing: set[str], in_flight: InFlight
    ) -> tuple[pd.DataFrame, list[RowRejection]]:
        """Split off records whose unique value (ignoring case) another record already holds: in
        the state store, in the batch being committed, or earlier in this batch. A stored claim
        counts only while its holder keeps the value: not once the batch in flight rewrote or
        archived the holder, nor when this batch moves the holder to another value (or none),
        unless that move is refused: then the holder keeps its value, and the check runs again
        (a record took the value of a holder whose own move was refused: two records held it).
        A value released by an archived record (archived before the upserts) goes to the first
        record of the batch that takes it. A record refused for one value claims none of its
        others, and is refused once, with every value it cannot have."""
        fields = self.spec.target.unique_ignoring_case
        if not fields:
            return valid, []
        releasing = releasing | in_flight.archived
        wanted: dict[str, dict[str, str]] = {}  # field → record key → digest of its value
        stored: dict[str, dict[str, str]] = {}  # field → digest → holder, as the store has it
        moving: set[str] = set()  # holders this batch moves off a value they hold
        for name in fields:
            digests = valid[name].map(claim_digest, na_action="ignore")
            now = dict(zip(digests.index, digests, strict=True))  # NaN: no value any more
            found = self.state.unique_owners(self.spec.name, name, digests.dropna().tolist())
            stored[name] = {
                digest: key for digest, key in found.items() if key not in in_flight.rewritten
            }
            moving.update(
                key for digest, key in stored[name].items() if now.get(key, digest) != digest
            )
            wanted[name] = digests.dropna().to_dict()
        keeping: set[str] = set()  # moving holders whose move is refused
        for _ in range(_CLAIM_PASSES):
            taken = self._clashes(valid, wanted, stored, moving - keeping, releasing, in_flight)
            stuck = {rejection.index for rejection in taken} & moving
            if stuck == keeping:
                return valid.drop(index=[rejection.index for rejection in taken]), taken
            keeping = stuck
        # Moves that keep undoing each other (a long chain): none lets go of its value this
        # batch, which refuses more than needed and never gives a value to two records.
        taken = self._clashes(valid, wanted, stored, set(), releasing, in_flight)
        return valid.drop(index=[rejection.index for rejection in taken]), taken

    def _clashes(
        self,
        valid: pd.DataFrame,
        wanted: dict[str, dict[str, str]],
        stored: dict[str, dict[str, str]],
        moved: set[str],
        releasing: set[str],
        in_flight: InFlight,
    ) -> list[RowRejection]:
        """The records refused for a value another holds, when the `moved` holders have let
        go of theirs (see `_unclaimed`)."""
        fields = self.spec.target.unique_ignoring_case
        owners = {
            name: {
                **{d: key for d, key in stored[name].items() if key not in moved},
                **in_flight.owners(name),
            }
            for name in fields
        }
        taken: list[RowRejection] = []
        for key in valid.index:
            mine = [(name, wanted[name][key]) for name in fields if key in wanted[name]]
            held_by = [(name, owners[name].get(digest, key)) for name, digest in mine]
            clashes = [
                f"{name} is already used by record {self._shown_key(owner)} (ignoring case)"
                for name, owner in held_by
                if owner != key and owner not in releasing
            ]
            if clashes:
                label = self.spec.target_contract.label
                taken.append(RowRejection(key, f"{label}: " + "; ".join(clashes)))
                continue
            for name, digest in mine:  # the first in the batch claims it
                owners[name][digest] = key
        return taken
