"""What a first sync knows of the state store without asking it.

A run holds its flow's lock from its start to its end (sync.py `_one_at_a_time`), and only a
run of the flow writes the flow's ledger and opens its dead letters. So when the flow's ledger
held nothing as the run began, it holds only what this run has committed since: a key, or a
destination id, this run never committed is in no ledger row, and needs no lookup. The same
goes for the flow's letters a run would hold or settle, when none was open (or discarded) as it
began. A first sync of 1M rows otherwise asked the ledger for every key and every destination
id (80 queries of 25,000 keys, each finding nothing), and the dead-letter queue for every key
twice: 11 of the database's 32 CPU-seconds, on the loader's and the committer's paths.

What the run wrote is kept as a Bloom filter of fixed size, not a set: its memory does not grow
with the table. A false positive only costs a lookup (one in a thousand keys at 1M rows, one in
fifteen at 10M).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from integrations.engine.state import BatchCommit, Empty, LedgerEntries

_BITS = 1 << 26  # 8 MB per filter
_MASK = np.uint64(_BITS - 1)


class RunWritten:
    """The values (record keys, or destination ids) a run wrote to a table of its flow's, when
    that table held none of the flow's as the run began (`empty`); otherwise it knows nothing,
    and every value is to be looked up."""

    def __init__(self, empty: bool = False):
        self._bits = np.zeros(_BITS // 8, dtype=np.uint8) if empty else None
        # The committer adds, and so may the loader (an error budget's trip): each byte's
        # read-modify-write must not lose the other's bit.
        self._adding = threading.Lock()

    def add(self, values: Iterable[str | None]) -> None:
        if self._bits is None:
            return
        written = [value for value in values if value is not None]
        with self._adding:
            for at in _positions(written):
                np.bitwise_or.at(self._bits, at >> np.uint64(3), _bit(at))

    def to_look_up(self, values: Sequence[str]) -> list[str]:
        """The values the table may hold."""
        if self._bits is None or not values:
            return list(values)
        held = np.ones(len(values), dtype=bool)
        for at in _positions(values):
            held &= (self._bits[at >> np.uint64(3)] & _bit(at)) != 0
        return [value for value, maybe in zip(values, held, strict=True) if maybe]


def _positions(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two bits of each value's 64-bit hash: Python's own string hash, kept by each string once
    taken (the run's dicts take it); the filter lives no longer than the process, so the hash's
    per-process seed is no matter."""
    hashed = np.fromiter(map(hash, values), dtype=np.int64, count=len(values)).view(np.uint64)
    return hashed & _MASK, (hashed >> np.uint64(32)) & _MASK


def _bit(at: np.ndarray) -> np.ndarray:
    return np.left_shift(np.uint8(1), (at & np.uint64(7)).astype(np.uint8))


class FirstSync(NamedTuple):
    """What a run wrote, of the tables that held none of its flow's as it began."""

    keys: RunWritten = RunWritten()  # the ledger's record keys
    destination_ids: RunWritten = RunWritten()  # the ledger's destination ids
    letters: RunWritten = RunWritten()  # keys of letters open or discarded

    @classmethod
    def of(cls, empty: Empty) -> FirstSync:
        return cls(RunWritten(empty.ledger), RunWritten(empty.ledger), RunWritten(empty.letters))

    def committing(self, batch: BatchCommit) -> None:
        """Before `batch` is committed: a commit whose answer is lost leaves no hole."""
        synced = LedgerEntries.of(batch.synced)
        self.keys.add(synced.keys)
        self.destination_ids.add(synced.columns[1])
        self.letters.add(letter.record_key for letter in batch.dead_letters)
