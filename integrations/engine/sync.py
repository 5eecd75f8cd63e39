"""One sync run of one flow: DESIGN.md's steps 1–7, batch by batch.

Per batch: extract → set aside rows whose key is unusable (missing, too long, repeated in the
batch) → drop rows held in the DLQ with unchanged content → validate (source contract) → map →
validate (target contract, then unique values across the dataset) → diff against the ledger →
archive soft-deleted and out-of-scope records (first: that frees their unique values) → upsert
the changed records (bisecting a refused chunk so only its bad records are dead-lettered) →
commit ledger, unique-value claims, dead letters, watermark and an audit entry (with one record
per write or rejection: its action, correlation id and field-level diff, PII masked) in one state
transaction. Re-running any window changes nothing that is in sync.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import re
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence, Set
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cached_property
from itertools import chain, repeat

import numpy as np
import pandas as pd

from integrations.contracts.contract import ContractViolation, RowRejection, holds_surrogates
from integrations.contracts.text_checks import lengths
from integrations.engine import columns
from integrations.engine.budget import ErrorBudget
from integrations.engine.destination import (
    Destination,
    DestinationMismatch,
    DestinationRefused,
    DestinationUnavailable,
    OutboundBatch,
    OutboundRecord,
    RecordsRejected,
    Written,
    WrittenColumns,
    correlation_id,
)
from integrations.engine.echoes import echoes
from integrations.engine.errors import (
    ArchiveGuardTripped,
    DestinationRefusedWrite,
    FlowHeld,
    SourceRefusedRead,
    SyncError,
)
from integrations.engine.first_sync import FirstSync
from integrations.engine.hashing import canonical_json, content_hash
from integrations.engine.ids import (
    ID_HELD_BY,
    ID_TOO,
    DestinationIds,
    InFlight,
    key_text,
)
from integrations.engine.masking import mask_record, mask_value, scrub
from integrations.engine.source import (
    FAR_FUTURE,
    Source,
    SourceReadFailed,
    SourceUnavailable,
)
from integrations.engine.spec import FlowSpec
from integrations.engine.state import (
    SINCE_WATERMARK,
    AuditRecord,
    BatchCommit,
    DeadLetter,
    FlowBusy,
    LedgerEntry,
    LockTakenSince,
    StateStore,
    StateStoreUnavailable,
    StoppedWindow,
    Watermark,
    looked_back,
    utcnow,
)

logger = logging.getLogger(__name__)

# A run's three stages, each a thread working on one batch at a time (see `Sync._drive`), and the
# phases each times. Stages overlap: their seconds add up to more than the run's.
STAGES = {
    "reader": ("extract", "validate", "map"),
    "loader": ("diff", "load"),
    "committer": ("commit",),
}
PHASES = tuple(phase for phases in STAGES.values() for phase in phases)
# A batch's counts the progress line sums, as its commit audits them.
_PROGRESS = ("rows", "inserted", "updated", "archived", "dead_lettered")
SAMPLE_SIZE = 5
EXAMPLE_KEYS = 3  # keys a batch's dead-letter summary names per reason kind
MAX_KEY_LENGTH = 200  # the state store keys records by text of at most 255 characters


@dataclass
class SyncResult:
    flow: str
    run_id: str
    full: bool
    counts: Counter = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    watermark_before: Watermark | None = None
    watermark_after: Watermark | None = None
    batches: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    open_dead_letters: dict[str, int] = field(default_factory=dict)  # the flow's DLQ, by kind
    samples: list[dict[str, object]] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.counts["read"] / self.seconds if self.seconds else 0.0

    @property
    def written(self) -> int:
        return self.counts["inserted"] + self.counts["updated"] + self.counts["archived"]

    def stage_timings(self, digits: int = 2) -> dict[str, dict[str, float]]:
        """Seconds each stage was busy (`total`) and its phases': stages overlap, and each one's
        seconds include its waits for the GIL and for the databases."""
        return {
            stage: {
                "total": round(sum(self.timings[phase] for phase in phases), digits),
                **{phase: round(self.timings[phase], digits) for phase in phases},
            }
            for stage, phases in STAGES.items()
        }


@dataclass
class _Plan:
    """One batch's decision: what to send (column by column), what each write changes, what to
    archive."""

    outbound: OutboundBatch
    to_archive: dict[str, str]
    # Per outbound record, in its order: its field hashes for the ledger, and what its write
    # changes field by field (PII masked) as the audit trail's JSON.
    field_hashes: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    # Valid records already in sync whose open dead letters can be closed.
    in_sync: list[str] = field(default_factory=list)
    # Records refused because another record holds their destination id.
    taken: list[RowRejection] = field(default_factory=list)
    # The destination ids the ledger holds for the records sent; archived ids another record
    # holds (left in place); a sent record's old id, once written under a new one.
    previous: dict[str, str] = field(default_factory=dict)
    kept: set[str] = field(default_factory=set)
    relocated: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Records deleted outright whose destination id a sent record takes: key → (id, taker).
    displaced: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Records sent to take an id that records of the batch move off: key → those records.
    vacated: dict[str, list[str]] = field(default_factory=dict)

    @cached_property
    def position(self) -> dict[str, int]:
        """Where each outbound key stands in the lists above (made once per batch)."""
        return {key: at for at, key in enumerate(self.outbound.keys)}


@dataclass
class _Staged:
    """A batch read, keyed and validated, waiting for the loader."""

    rows: int  # read from the source
    last: pd.DataFrame  # its last row with a cursor value (its watermark), not the whole batch
    live: pd.DataFrame
    gone: pd.DataFrame
    valid: pd.DataFrame
    letters: list[DeadLetter]
    open_letters: set[str]


class _HeapFrozen:
    """What lived before the first of the process's syncs began (modules, the host's objects) is
    left out of the cyclic garbage collector's passes until the last one ends (gc.freeze): a
    million-row run allocates tuples by the million, which sets off full passes, and each walked
    the whole process again (a tenth of a first sync's Python time)."""

    _lock = threading.Lock()
    _running = 0

    def __enter__(self) -> None:
        with self._lock:
            if _HeapFrozen._running == 0:
                gc.freeze()
            _HeapFrozen._running += 1

    def __exit__(self, *_exc) -> None:
        with self._lock:
            _HeapFrozen._running -= 1
            if _HeapFrozen._running == 0:
                gc.unfreeze()


class _Clock:
    def __init__(self, timings: dict[str, float]):
        self.timings = timings
        self.mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] += now - self.mark
        self.mark = now


def _out_of_flow(spec: FlowSpec, batch: pd.DataFrame) -> pd.Series:
    """Soft-deleted rows, and rows the flow's `in_scope` leaves out: both are archived."""
    gone = pd.Series(False, index=batch.index)
    if spec.source.deleted:
        gone |= batch[spec.source.deleted].notna()
    if spec.in_scope is not None:
        gone |= ~_in_scope(spec, batch)
    return gone


def _in_scope(spec: FlowSpec, batch: pd.DataFrame) -> pd.Series:
    """The flow's `in_scope` as plain booleans: unknown (a comparison with a NULL of a nullable
    column, pd.NA) is out of scope."""
    return spec.in_scope(batch).fillna(False).astype(bool)


def _window_label(start: datetime, end: datetime) -> str:
    """A window of daily partitions as its days: one day, or its first … last."""
    last = end - timedelta(days=1)
    return f"{start:%Y-%m-%d}" if last <= start else f"{start:%Y-%m-%d} … {last:%Y-%m-%d}"


def _a_time(value: object) -> bool:
    if not isinstance(value, str):
        return pd.notna(value)
    try:
        return pd.notna(pd.Timestamp(value))
    except (ValueError, OverflowError):
        return False


def _what_and_todo(error: Exception) -> tuple[str, str | None]:
    """An error's text, and what it says to do (its own "What to do: …") apart, so that a
    SyncError built on it says "What to do" once."""
    what, _, todo = str(error).partition(". What to do: ")
    return what, todo.rstrip(".") or None


def _archived(destination_id: str, kept: Set[str]) -> dict[str, str]:
    """An archive's audit record: its row, and whether the row was left for another record."""
    if destination_id in kept:
        return {"destination_id": destination_id, "row": "kept: another record holds it"}
    return {"destination_id": destination_id}


# "email is already used by record 3884": one rule, whichever record holds the value.
_HOLDER = re.compile(r"used by record \S+")


def _grouped(reason: str) -> str:
    """A reason as the run's counts group it: without the record that holds a value (each
    holder made a reason of its own, and the top reasons undercounted the rule by far)."""
    return _HOLDER.sub("used by another record", reason)


def _rows_in(letter: DeadLetter) -> int:
    """The source rows a dead letter holds: one, or each row of a key repeated in a batch."""
    if letter.payload.keys() == {"rows"} and isinstance(letter.payload["rows"], list):
        return len(letter.payload["rows"])
    return 1


def _key_problems(keys: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Why each key cannot key a record (None where it can), and the usable keys as text.

    Whole numbers are all usable. Text keys are looked at all at once: only those that are not
    plainly fine (ASCII without whitespace or control characters, 1 to MAX_KEY_LENGTH long) go
    through `_unusable_key` one by one, so a batch of ordinary keys costs no Python per key.
    """
    if isinstance(keys.dtype, np.dtype) and keys.dtype.kind in "iu":  # never null: all usable
        return pd.Series(None, index=keys.index, dtype=object), keys.astype(str)
    values = keys.to_numpy(dtype=object)
    if set(map(type, values)) != {str}:  # nulls, numbers, str subclasses: one by one
        problems = keys.map(_unusable_key)
        return problems, keys[problems.isna()].map(key_text)
    sizes = lengths(values)
    fine = np.fromiter(map(str.isascii, values), bool, len(values))
    fine &= (sizes > 0) & (sizes <= MAX_KEY_LENGTH)
    at = np.flatnonzero(fine)
    codes = np.frombuffer("".join(values[at]).encode("ascii"), np.uint8)
    spaced = np.flatnonzero(codes <= ord(" "))  # whitespace or a control character
    if spaced.size:
        fine[at[np.searchsorted(np.cumsum(sizes[at]), spaced, side="right")]] = False
    problems = np.full(len(values), None, dtype=object)
    for position in np.flatnonzero(~fine):
        problems[position] = _unusable_key(values[position])
    problems = pd.Series(problems, index=keys.index, dtype=object)
    return problems, keys[problems.isna()]  # text keys are their own text (key_text)


def _unusable_key(value: object) -> str | None:
    """Why a source key cannot key a record (None when it can)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "the key is missing"
    text = str(value)
    if not text.strip():
        return "the key is blank"
    if len(text) > MAX_KEY_LENGTH:
        return f"the key is longer than {MAX_KEY_LENGTH} characters"
    if any(ord(char) < 32 for char in text):
        return "the key holds control characters"
    if not text.isascii() and holds_surrogates(text):  # no state store or letter takes them
        return "the key is not UTF-8 text (bytes another program wrote in another encoding)"
    return None


def _sub_batch(batch: OutboundBatch, positions: list[int]) -> OutboundBatch:
    """The records of `batch` at these positions, as a batch."""
    return OutboundBatch(
        _picked(batch.keys, positions),
        {name: _picked(values, positions) for name, values in batch.columns.items()},
        _picked(batch.hashes, positions),
        flow=batch.flow,
        run_id=batch.run_id,
        links=None if batch.links is None else _picked(batch.links, positions),
    )


def _picked(values: list, positions: list[int]) -> list:
    return [values[at] for at in positions]


def _natural(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdecimal() else (0, key)


def _json_key(key: object) -> object:
    """A source key as the state store keeps it in JSON: a number or a text (a UUID, say)."""
    if hasattr(key, "item"):  # numpy's scalars
        key = key.item()
    if isinstance(key, Decimal) and key == key.to_integral_value():
        return int(key)
    return key if isinstance(key, int | float | str) else str(key)


def _in_order(watermark: Watermark) -> tuple[datetime, bool, object]:
    """A watermark as the source orders its rows: by time, then key, numbers before text (a
    SQLite column without a type holds both; compared, they failed every run after the first)."""
    return watermark.updated_at, isinstance(watermark.key, str), watermark.key


def _json_ready(frame: pd.DataFrame) -> list[dict[str, object]]:
    """Rows as plain dicts (Python scalars, None for nulls, ISO text for dates and timestamps,
    exact text for decimals), converted column by column."""
    return columns.records(columns.ready_columns(frame))


# A write's audit action: created, updated, or found as sent (the destination rewrote nothing).
_ACTIONS = {True: "insert", False: "update", None: "unchanged"}
# The start of the letter key of a row without a usable key (its content's hash follows).
UNKEYED = "!unkeyed:"
# Rounds of the end-of-run retry: each replays the letters waiting on what the one before moved.
_RETRY_ROUNDS = 10
# Why a record written with others that take each other's ids is refused with them.
_TOGETHER = (
    " (written in one statement with the records of its batch whose ids it takes, and they "
    "with its: the destination refused one of them, so none was written)"
)


def mapped_rows(spec: FlowSpec, valid: pd.DataFrame) -> tuple[pd.DataFrame, list[RowRejection]]:
    """The flow's mapping over the batch; when it fails, row by row, so that only the rows it
    cannot map are refused."""
    if valid.empty:
        return _no_records(spec), []
    try:
        return spec.mapping(valid), []
    except Exception:  # the mapping is the flow's code: any error is about its input
        if len(valid) <= 1:
            return _mapped_alone(spec, valid)
    mapped, failed = [], []
    for key in valid.index:
        frame, rejections = _mapped_alone(spec, valid.loc[[key]])
        mapped.append(frame)
        failed += rejections
    return pd.concat(mapped), failed


def _mapped_alone(spec: FlowSpec, row: pd.DataFrame) -> tuple[pd.DataFrame, list[RowRejection]]:
    try:
        return spec.mapping(row), []
    except Exception as error:
        reason = f"mapping of flow {spec.name} failed: {type(error).__name__}"
        return _no_records(spec), [RowRejection(key, reason) for key in row.index]


def _no_records(spec: FlowSpec) -> pd.DataFrame:
    return pd.DataFrame(columns=list(spec.target_contract.schema.columns), dtype=object)


def expected_records(
    spec: FlowSpec, source: Source, state: StateStore, held: Set[str] = frozenset()
) -> Iterator[tuple[str, dict[str, object]]]:
    """Every live source record that passes both contracts and maps, but those `held` (in the
    DLQ) and the echoes a run leaves out, mapped: what the destination should hold
    (reconciliation reads the whole source this way). A row the mapping fails on is left out,
    as its sync dead-letters it."""
    for batch in source.batches(None, spec.batch_size):
        batch = batch.set_axis(batch[spec.source.key].astype(str), axis=0)
        if held:  # a lookup per row: the DLQ may hold many
            batch = batch[np.fromiter((key not in held for key in batch.index), bool, len(batch))]
        batch = batch[~_out_of_flow(spec, batch)]
        valid = spec.source_contract.judge(batch).valid
        if spec.echo_of is not None:
            taken = state.ledger_entries(spec.name, list(valid.index))
            fresh = [key for key in valid.index if key not in taken]
            valid = valid.drop(index=echoes(spec.echo_of, state, valid, fresh))
        mapped = spec.target_contract.judge(mapped_rows(spec, valid)[0]).valid
        yield from zip(mapped.index, _json_ready(mapped), strict=True)


def _one_at_a_time(method):
    """A Sync method that writes: it holds the flow's lock (see StateStore.flow_lock), once,
    however deep the calls (a run's end replays letters)."""

    @functools.wraps(method)
    def alone(self: Sync, *args, **kwargs):
        if self._holding_lock:
            return method(self, *args, **kwargs)
        flow = self.spec.name
        try:
            with self.state.flow_lock(flow, wait=self.lock_wait) as held:
                first_sync = FirstSync.of(self.state.empty_of(flow))
                self._holding_lock, self._lock_held, self._fence = True, held, held.fence
                self._first_sync = first_sync
                try:
                    return method(self, *args, **kwargs)
                finally:
                    self._holding_lock, self._fence = False, None
                    self._first_sync = FirstSync()
        except FlowBusy:
            # A partition's run keeps its window, an unpartitioned flow's run its sync: each is
            # requested again once the flow is free.
            self._keep_window("busy")
            todo = (
                "wait for it to end (a Dagster run of the flow, a backfill, or `handoff dlq "
                "replay`), then rerun"
            )
            window = self._window_todo()
            raise FlowHeld(
                flow,
                f"another run, repair or replay of {flow} held the flow for over "
                f"{self.lock_wait:.0f} s: one runs at a time (two would write the same records, "
                "each blind to the other's moves); nothing was read or written",
                todo if window is None else f"{todo}; {window}",
            ) from None

    return alone


class Sync(ErrorBudget, DestinationIds):
    # How long a run waits for another run of its flow to end (see _one_at_a_time).
    lock_wait = 300.0

    """Runs `spec` from `source` into `destination`, keeping books in `state`."""

    def __init__(
        self,
        spec: FlowSpec,
        source: Source,
        destination: Destination,
        state: StateStore,
        *,
        run_id: str,
        actor: str,
        why: str,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ):
        self.spec, self.source, self.destination, self.state = spec, source, destination, state
        self.run_id, self.actor, self.why = run_id, actor, why
        self.log = log or logger
        self._force: set[str] = set()
        self._replaying = False
        # The letter keys of the rows without a usable key this sync read (see replay).
        self._unkeyed_read: set[str] = set()
        self._holding_lock = False
        # What the run committed, while it holds the lock of a flow whose tables were empty.
        self._first_sync = FirstSync()
        self._lock_held: Callable[[], bool] = lambda: True
        self._fence: int | None = None  # the flow's lock's, while held: the commits carry it
        # Records refused for a destination id a record outside their batch held, and records
        # that let go of their ids (moved off, archived) in this run (see _retried).
        self._clashed: list[str] = []
        self._let_go: set[str] = set()
        # Retrying letters at a run's end: those of earlier runs stay theirs (see _retried).
        self._retrying = False
        # The stages of a run (see _drive): the batch being committed, and its commit.
        self._in_flight: InFlight | None = None
        self._committed: Future | None = None
        # The window [start, end) of a partition's run (see run_window): kept when stopped.
        self._window: tuple[datetime, datetime] | None = None
        # An unpartitioned flow's run (see run): kept when it stops, as a partition's window.
        self._sync_window: tuple[datetime, datetime] | None = None

    def run(
        self,
        full: bool = False,
        allow_mass_archive: bool = False,
        acknowledge_budget_trip: bool = False,
    ) -> SyncResult:
        """Sync what changed since the watermark (minus the lookback), or every row if `full`.

        Before anything is read, an earlier run's error-budget trip stops it, unless
        acknowledged; before anything is written, the archive guard counts what the run would
        archive. An unpartitioned flow's run that waited too long for another run of the flow,
        or that the error budget stopped (at its start, or in mid-run), is kept in the state
        store, as a partition's is, until a run of the flow goes through: requested by a sensor
        for a change, it was requested by nothing again (the sensor's mark had moved), and the
        change waited for the next one or the hourly schedule.
        """
        self._sync_window = SINCE_WATERMARK if self.spec.partitions is None else None
        try:
            return self._run(full, allow_mass_archive, acknowledge_budget_trip)
        finally:
            self._sync_window = None

    @_one_at_a_time
    def _run(
        self, full: bool, allow_mass_archive: bool, acknowledge_budget_trip: bool
    ) -> SyncResult:
        """run's work, holding the flow's lock."""
        read_from = utcnow()
        self._stop_while_tripped(approved=acknowledge_budget_trip)
        before = self.state.watermark(self.spec.name)
        if before is not None and before.updated_at > utcnow() + FAR_FUTURE:
            self.log.warning(
                "%s: the stored watermark %s is in the future (a cursor value in the future, "
                "kept by an earlier handoff): every change since was skipped; this run reads "
                "every row, and sets the watermark anew",
                self.spec.name,
                before.updated_at.isoformat(),
            )
            before = None
        since = None
        if before is not None and not full:
            since = looked_back(before.updated_at, self.spec.lookback)
        if self.spec.archive_deleted:
            self._guard_archives(since, approved=allow_mass_archive)
        batches = self.source.batches(since, self.spec.batch_size)
        with self._trip_kept():
            result = self._retried(self._drive(batches, before, full=full, move_watermark=True))
        if self._sync_window is not None:
            self.state.forget_stopped_windows(self.spec.name, *self._sync_window, read_from)
        return result

    def run_window(
        self,
        start: datetime,
        end: datetime,
        allow_mass_archive: bool = False,
        acknowledge_budget_trip: bool = False,
    ) -> SyncResult:
        """Rewrite exactly one window of the business date (a partition or a backfill's range):
        every row dated in [start, end), compared with the ledger; the watermark stays. The
        archive guard counts the window's soft-deleted rows against every synced record; an
        error-budget trip stops it as it does `run`. A window the error budget stops (at its
        start, or in mid-run with the rest unread), or whose run waited too long for another
        run of the flow, is kept in the state store until a run of it goes through: no schedule
        or sensor runs that day again by itself."""
        if self.spec.partitions is None:
            raise ValueError(f"flow {self.spec.name} is not partitioned")
        self._window = (start, end)  # kept should the run stop (see _keep_window)
        try:
            return self._run_window(start, end, allow_mass_archive, acknowledge_budget_trip)
        finally:
            self._window = None

    @_one_at_a_time
    def _run_window(
        self,
        start: datetime,
        end: datetime,
        allow_mass_archive: bool,
        acknowledge_budget_trip: bool,
    ) -> SyncResult:
        """run_window's work, holding the flow's lock."""
        read_from = utcnow()
        self._stop_while_tripped(approved=acknowledge_budget_trip)
        within = self.source.in_window(self.spec.partitions.column, start, end)
        if self.spec.archive_deleted:
            self._guard_archives(None, approved=allow_mass_archive, within=within)
        batches = self.source.batches(None, self.spec.batch_size, within=within)
        before = self.state.watermark(self.spec.name)
        with self._trip_kept():
            result = self._retried(self._drive(batches, before, full=False, move_watermark=False))
        self.state.forget_stopped_windows(self.spec.name, start, end, read_from)
        return result

    def _retried(self, result: SyncResult) -> SyncResult:
        """The run's result, once the records it refused for a destination id that a record
        outside their batch held are tried again, now that every batch is written: two records
        that swap ids across batches (each refused for the other's old id) land together then,
        as a replay of their letters, in one batch. So are the records an earlier run refused
        for an id that a record this run moved off or archived held (its next change could be
        months away), and then those waiting on what that replay moved, round by round. What
        still clashes stays in the DLQ, an earlier run's letter still that run's: this run did
        not judge its record, and its error budget's trip does not hold it (see BatchCommit)."""
        clashed, self._clashed = sorted(set(self._clashed)), []
        own = (
            self.state.list_dead_letters(self.spec.name, keys=clashed, limit=None)
            if clashed
            else []
        )
        owned = {letter.record_key for letter in own}
        waiting = self._waiting_for(self._let_go) if self._let_go else []
        letters = self._with_holders(
            own + [letter for letter in waiting if letter.record_key not in owned]
        )
        if not letters:
            return result
        self._retrying = True
        try:
            for _ in range(_RETRY_ROUNDS):
                again = self.replay(
                    letters, batch_size=max(self.spec.batch_size, len(letters)), retry=False
                )
                for name in ("inserted", "updated", "unchanged", "archived"):
                    result.counts[name] += again.counts[name]
                result.open_dead_letters = again.open_dead_letters
                # What this replay moved off or archived frees ids others wait for.
                letters = self._waiting_for(self._let_go) if self._let_go else []
                if not letters:
                    break
        finally:
            self._retrying = False
        self._clashed = []
        # This run's refusals that landed are its own to count again; an earlier run's counted.
        still = (
            self.state.list_dead_letters(self.spec.name, keys=clashed, limit=None) if own else []
        )
        landed = len(own) - len(still)
        result.counts["rejected"] -= landed
        result.counts["valid"] += landed
        if not self._replaying:
            self._check_budget(result, finished=True)
        return result

    def _with_holders(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """The letters, and the open letters of the records whose ids they wait on, and so on:
        records refused together (a swap, one half of which the destination refused) land only
        together, once it is fixed, in one batch."""
        have = {letter.record_key for letter in letters}
        for _ in range(_RETRY_ROUNDS):
            holders = {
                holder.group(1)
                for letter in letters
                if (holder := ID_HELD_BY.search(letter.reason))
            } - have
            found = (
                self.state.list_dead_letters(self.spec.name, keys=sorted(holders), limit=None)
                if holders
                else []
            )
            if not found:
                break
            letters = letters + found
            have |= {letter.record_key for letter in found}
        return letters

    def _waiting_for(self, let_go: set[str]) -> list[DeadLetter]:
        """The open letters of records refused for a destination id one of these records held."""
        letters = self.state.list_dead_letters(self.spec.name, limit=None, reason_contains=ID_TOO)
        return [
            letter
            for letter in letters
            if (holder := ID_HELD_BY.search(letter.reason)) and holder.group(1) in let_go
        ]

    @_one_at_a_time
    def repair(self, keys: Sequence[str], acknowledge_budget_trip: bool = False) -> SyncResult:
        """Send these records again whatever the ledger says (reconciliation found them drifted).
        The watermark stays where it is; an error-budget trip stops it as it does `run`."""
        self._stop_while_tripped(approved=acknowledge_budget_trip)
        self._force = set(keys)
        try:
            batches = self.source.rows_with_keys(list(keys), self.spec.batch_size)
            before = self.state.watermark(self.spec.name)
            with self._trip_kept():
                # As a run: records refused for each other's ids across batches land at the end.
                return self._retried(self._drive(batches, before, full=False, move_watermark=False))
        finally:
            self._force = set()

    @_one_at_a_time
    def replay(
        self, letters: Sequence[DeadLetter], batch_size: int | None = None, retry: bool = True
    ) -> SyncResult:
        """Sync dead-lettered records again, each from its current source row, re-validated
        against today's contracts. A letter closes only when its record lands (or is found
        already in sync); a record that fails again stays in the DLQ with its new reason. A
        record the source no longer has left it: its letter closes as `gone`, and what the
        destination holds of it is archived (its stored payload was written back: a deleted
        record brought back to life). The watermark stays. A replay goes on while the flow's
        error budget is tripped (it is how its dead letters are fixed), and clears the trip once
        none of them is open.

        A letter of a row without a usable key names no row to read again, and its payload, judged
        again, was refused again: no replay closed it, nor a trip holding it, once the row was
        fixed. Its replay re-reads the rows changed since that row's time instead (see
        `_unkeyed_rows`): a row given its key is synced under it, one still without is held
        again (counted as `unkeyed_held`: the source must give it a key), and a letter whose row
        is no longer without a key there closes as `gone`."""
        letters = [letter for letter in letters if letter.flow == self.spec.name]
        if letters:  # chosen before the flow's lock was ours: one closed since is not sent
            ids = [letter.id for letter in letters]
            still_open = {o.id for o in self.state.list_dead_letters(ids=ids, limit=None)}
            letters = [letter for letter in letters if letter.id in still_open]
        unkeyed = [letter for letter in letters if letter.record_key.startswith(UNKEYED)]
        keys = [letter.record_key for letter in letters if letter not in unkeyed]
        batch_size = batch_size or self.spec.batch_size
        found = list(self.source.rows_with_keys(keys, batch_size))
        present = {str(key) for batch in found for key in batch[self.spec.source.key]}
        batches = chain(found, self._unkeyed_rows(unkeyed, present, batch_size) if unkeyed else ())
        gone = sorted({key for key in keys if key not in present})
        was, self._replaying, self._unkeyed_read = self._replaying, True, set()
        try:
            before = self.state.watermark(self.spec.name)
            result = self._drive(batches, before, full=False, move_watermark=False)
            if retry:  # records refused for an id another batch of the replay held
                result = self._retried(result)
            fixed = [u.record_key for u in unkeyed if u.record_key not in self._unkeyed_read]
            result.counts["unkeyed_held"] += len(unkeyed) - len(fixed)
            if gone or fixed:
                result.counts["archived"] += self._archive_gone(gone + fixed)
                result.counts["gone"] += len(gone) + len(fixed)
                result.open_dead_letters = self.state.dead_letter_kinds(self.spec.name)
            self._settle_trip()
            return result
        finally:
            self._replaying = was

    def _changed_at(self, letter: DeadLetter) -> datetime | None:
        """When the letter's row last changed (UTC, without a zone), as its payload says."""
        cursor = self.spec.source.cursor
        if not cursor or not letter.payload or not _a_time(letter.payload.get(cursor)):
            return None
        moment = pd.Timestamp(letter.payload[cursor])
        if moment.tzinfo is not None:
            moment = moment.tz_convert("UTC").tz_localize(None)
        return moment.to_pydatetime()

    def _unkeyed_rows(
        self, letters: Sequence[DeadLetter], present: Set[str], batch_size: int
    ) -> Iterator[pd.DataFrame]:
        """The source's rows changed since the earliest of these letters' rows was read (all
        rows when one has no time of change), less those `present` (read by key already): among
        them the letters' rows, fixed or not. As many as the letters' age makes (the table, when
        a letter has no time), streamed a batch at a time as a run's are."""
        times = [self._changed_at(letter) for letter in letters]
        since = None if None in times else looked_back(min(times), self.spec.lookback)
        column = self.spec.source.key
        for batch in self.source.batches(since, batch_size):
            yield batch[~batch[column].map(str).isin(present)]

    @_one_at_a_time
    def archive_extras(
        self,
        destination_ids: Sequence[str],
        approved: bool = False,
        result: SyncResult | None = None,
    ) -> int:
        """Archive the extra rows reconciliation found (live in the destination, not expected
        from the source) that this flow wrote, for records the source no longer has: a row
        deleted outright, which no run reads. Rows the ledger holds for no record (not written
        by handoff) are left alone. The letters waiting on the ids they held are tried again,
        and counted in `result` (the repair's). How many were archived."""
        owners = self.state.live_owners(self.spec.name, list(destination_ids))
        keys = sorted({key for held in owners.values() for key in held})
        present = self._in_source(keys)
        gone = [key for key in keys if key not in present]
        if not gone:
            return 0
        self._guard(gone, approved)  # a source emptied by mistake is no reason to archive all
        self._let_go = set()
        archived = self._archive_gone(gone, replaying=False)
        self._retried(result or SyncResult(flow=self.spec.name, run_id=self.run_id, full=False))
        return archived

    def _archive_gone(self, keys: list[str], replaying: bool = True) -> int:
        """Close the letters of records the source no longer has, archiving what the
        destination holds of them (not a row another record holds now); how many archived."""
        flow = self.spec.name
        live = {
            key: entry.destination_id
            for key, entry in self.state.ledger_entries(flow, keys).items()
            if not entry.archived and entry.destination_id and self.spec.archive_deleted
        }
        kept = self._held_ids(live, set(live), None)
        archived = [
            destination_id for destination_id in live.values() if destination_id not in kept
        ]
        self._let_go.update(live)  # letters waiting on them may land now (see _retried)
        self._stop_if_not_alone()
        if archived:
            self._call_destination(lambda: self._archive(archived))
        trace = functools.partial(correlation_id, self.run_id, flow)
        records = [
            AuditRecord(flow, key, "archive", trace(key), _archived(destination_id, kept))
            for key, destination_id in live.items()
        ]
        if replaying:
            records += [
                AuditRecord(flow, key, "replay", trace(key), {"closed": "gone from the source"})
                for key in keys
            ]
        self._commit_batch(
            BatchCommit(
                flow,
                self.run_id,
                synced={key: LedgerEntry("archived", d, True) for key, d in live.items()},
                released=list(live),  # their unique values are free again
                resolved=keys,
                resolution="gone",
                audit_records=records,
            ),
            audit=self._batch_entry({"gone": len(keys), "archived": len(archived)}),
        )
        return len(archived)

    def _drive(
        self,
        batches: Iterator[pd.DataFrame],
        before: Watermark | None,
        full: bool,
        move_watermark: bool,
    ) -> SyncResult:
        self.destination.prepare(self.spec)
        self._clashed, self._let_go = [], set()
        result = SyncResult(flow=self.spec.name, run_id=self.run_id, full=full)
        result.watermark_before = before
        started = self._started = time.perf_counter()
        clock = _Clock(result.timings)
        # Three stages, one batch in each at most: this thread reads and validates batch n+2 while
        # a loader diffs and loads batch n+1 and a committer commits batch n, so the databases'
        # work overlaps Python's. The loader diffs against the ledger plus the batch still being
        # committed (`_in_flight`), and waits for that commit before handing on its own batch.
        self._in_flight, self._committed = None, None
        # The keys lettered by the last two batches handed to the committer: the reader looked
        # for a batch's open letters while those two may not have been committed yet.
        self._recent_letters: deque[set[str]] = deque(maxlen=2)
        self._committed_counts: Counter = Counter()
        with (
            _HeapFrozen(),
            ThreadPoolExecutor(1, thread_name_prefix=f"handoff-{self.spec.name}-load") as loader,
            ThreadPoolExecutor(1, thread_name_prefix=f"handoff-{self.spec.name}-commit") as commit,
        ):
            self._committer = commit
            loading: Future | None = None
            try:
                for batch in self._guarded(batches):
                    clock.lap("extract")
                    with self._state_lost():
                        staged = self._stage(batch, result, clock)
                    if loading is not None:
                        loading.result()
                    loading = loader.submit(self._load_staged, staged, result, move_watermark)
                    clock.mark = time.perf_counter()
                if loading is not None:
                    loading.result()  # the loader hands the last batch to the committer first
                if self._committed is not None:  # read only now: that last batch's commit
                    self._committed.result()
            except BaseException:
                if loading is not None:
                    loading.exception()  # wait: the loader may still hand on a commit
                for future in (self._committed, loading):  # the earliest batch's failure first
                    if future is not None and future.exception() is not None:
                        raise future.exception() from None
                raise
        result.seconds = time.perf_counter() - started
        result.watermark_after = self.state.watermark(self.spec.name)
        result.open_dead_letters = self.state.dead_letter_kinds(self.spec.name)
        self._check_budget(result, finished=True)
        return result

    @contextmanager
    def _state_lost(self) -> Iterator[None]:
        try:
            yield
        except StateStoreUnavailable as error:
            raise SyncError(
                self.spec.name,
                str(error),
                "the batch in flight may be in the destination but not in the ledger; rerun "
                "when the state store answers: the rerun sends it again, and upserts make "
                "that harmless",
            ) from error

    def _guarded(self, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """The source's batches; a source lost or refusing mid-extract stops the run with what
        to do."""
        with self._reading_source():
            yield from batches

    @contextmanager
    def _reading_source(self) -> Iterator[None]:
        try:
            yield
        except SourceUnavailable as error:
            raise SyncError(
                self.spec.name,
                str(error),
                "every batch before it is committed; rerun when the source answers (the rerun "
                "resumes from the watermark)",
            ) from error
        except SourceReadFailed as error:
            raise SourceRefusedRead(
                self.spec.name,
                str(error),
                f"a rerun alone will not cure it: {error.todo}, then rerun; every batch "
                "before it is committed, and the rerun resumes from the watermark",
            ) from error

    def _stopped_window(self) -> tuple[datetime, datetime] | None:
        """What a run that stops keeps: a partition's run its window, an unpartitioned flow's
        run its sync (SINCE_WATERMARK); None for a replay or repair."""
        return self._window or self._sync_window

    def _stop_if_not_alone(self) -> None:
        """Before a batch, or an archive of records gone, is written: stop if the flow's lock
        went with its session (a state store restarted, a connection dropped). Another run of
        the flow may be writing: two alongside could each write over the other's newer rows
        with older ones, and a first sync asks the ledger only about its own writes."""
        if not self._holding_lock or self._lock_held():
            return
        raise self._lock_lost(
            "this run stopped before writing the next batch; every batch before it is committed"
        )

    def _lock_lost(self, what: str) -> FlowHeld:
        """The stop of a run whose lock went with its session, its window kept."""
        self._keep_window("busy")
        todo = (
            "run it again once no other run of the flow is going on (a sync resumes from "
            "the watermark)"
        )
        window = self._window_todo()
        return FlowHeld(
            self.spec.name,
            "the flow's lock was lost during the run (its state store session ended), so "
            f"another run of the flow may be writing: {what}",
            todo if window is None else f"{todo}; {window}",
        )

    def _keep_window(self, stop: str) -> None:
        """Keep the window of a run that stopped (`refused` at its start while a trip stood,
        `tripped` in mid-run, or `busy`: it gave up waiting for another run of the flow): once
        no trip stands and the flow is free, it is requested again."""
        window = self._stopped_window()
        if window is not None:
            start, end = window
            self.state.keep_stopped_window(
                StoppedWindow(self.spec.name, start, end, self.run_id, stop)
            )

    def _window_todo(self) -> str | None:
        """What becomes of the window of a run that stopped (see _keep_window); None for a run
        of no window."""
        window = self._stopped_window()
        if window is None:
            return None
        if window == SINCE_WATERMARK:
            return (
                f"this run's sync is kept, and requested again by sensor "
                f"`{self.spec.name}_stopped_windows` once no trip stands and the flow is free "
                "(with that sensor off, rerun then)"
            )
        return (
            f"this run's window ({_window_label(*window)}) is kept, and requested again "
            f"once no trip stands by sensor `{self.spec.name}_stopped_windows` (with that sensor "
            "off, rerun or backfill it then)"
        )

    def _guard_archives(
        self, since: datetime | None, approved: bool, within: object | None = None
    ) -> None:
        with self._reading_source():
            keys = [str(key) for key in self.source.deleted_keys(since, within)]
        if self.spec.in_scope is not None:
            keys += self._leaving_scope(since, within)
        ledger = self.state.ledger_entries(self.spec.name, keys)
        self._guard([key for key, entry in ledger.items() if not entry.archived], approved)

    def _guard(self, doomed: list[str], approved: bool) -> None:
        """Stop before archiving `doomed` (keys the ledger holds live) when they are more of the
        synced records than the archive guard allows, unless someone approved it (audited)."""
        guard = self.spec.archive_guard
        if len(doomed) <= guard.min_records:  # no count of a big ledger for a few archives
            return
        doomed = sorted(doomed, key=_natural)
        synced = self.state.count_synced(self.spec.name)
        if len(doomed) <= guard.max_share * synced:
            return
        if approved:  # someone said the mass archive is intended: the trail keeps who
            self.state.append_audit(
                [
                    AuditRecord(
                        self.spec.name,
                        key,
                        "approve",
                        correlation_id(self.run_id, self.spec.name, key),
                        {"archive": True},
                    )
                    for key in doomed
                ],
                actor=self.actor,
                action="approve",
                why=self.why,
                detail={"approved_archives": len(doomed), "synced": synced},
                run_id=self.run_id,
                flow=self.spec.name,
            )
            return
        raise ArchiveGuardTripped(
            self.spec.name,
            f"the run would archive {len(doomed)} of {synced} synced records "
            f"({len(doomed) / max(synced, 1):.0%}), above the archive guard of "
            f"{guard.max_share:.0%}; nothing was written",
            "check the source for a mistaken mass delete; if it is intended, rerun with "
            "allow_mass_archive (run config) to archive them",
            plan=doomed[:100],
            total=len(doomed),
        )

    def _leaving_scope(self, since: datetime | None, within: object | None) -> list[str]:
        """Keys of the live rows the run will read that the flow's `in_scope` leaves out: they
        are archived too. Counting them takes a read of those rows before the run's own."""
        spec, leaving = self.spec, []
        for batch in self._guarded(self.source.batches(since, spec.batch_size, within=within)):
            out = ~_in_scope(spec, batch)
            if spec.source.deleted:  # soft deletes are counted already
                out &= batch[spec.source.deleted].isna()
            leaving += map(key_text, batch.loc[out, spec.source.key])
        return leaving

    # --- one batch ---------------------------------------------------------------------------

    def _stage(self, batch: pd.DataFrame, result: SyncResult, clock: _Clock) -> _Staged:
        """Key, set aside held and out-of-flow rows, validate and map: nothing that depends on
        the batch before it being committed."""
        result.counts["read"] += len(batch)
        keyed, letters = self._keyed(batch)
        gone_mask = _out_of_flow(self.spec, keyed)
        live, gone = keyed[~gone_mask], keyed[gone_mask]
        live, letters, open_letters = self._without_held(live, gone, letters, result)
        dated, undated = self._dated(live)
        valid, rejected = self._validate(dated, clock, result, open_letters)
        return _Staged(
            len(batch),
            self._last_dated(batch),
            live,
            gone,
            valid,
            letters + undated + rejected,
            open_letters,
        )

    def _dated(self, live: pd.DataFrame) -> tuple[pd.DataFrame, list[DeadLetter]]:
        """A partitioned flow's rows without a business date are dead-lettered: no partition
        holds them, so no backfill would ever rewrite them."""
        column = self.spec.partitions.column if self.spec.partitions else None
        if column is None or column not in live or live[column].notna().all():
            return live, []
        missing = live[column].isna()
        reason = (
            f"{self.spec.name}: the record has no {column}, the business date its partitions "
            f"are made of, so no partition holds it; set {column} in the source, then replay it"
        )
        rejections = [RowRejection(key, reason) for key in live.index[missing]]
        return live[~missing], self._letters(live, rejections, "contract")

    def _last_dated(self, batch: pd.DataFrame) -> pd.DataFrame:
        """The batch's last row whose cursor is a time (none: it cannot move the watermark). A
        NULL is none, and so is text that is no time, which a SQLite source may hold: its row is
        dead-lettered by the contract, and read again by every run, as a NULL's is."""
        cursor = self.spec.source.cursor
        if cursor is None or cursor not in batch:
            return batch.iloc[[-1]]
        values = batch[cursor]
        for at in range(len(batch) - 1, -1, -1):
            if _a_time(values.iat[at]):
                return batch.iloc[[at]]
        return batch.iloc[:0]

    def _load_staged(self, staged: _Staged, result: SyncResult, move_watermark: bool) -> None:
        """Unique values, diff and load of one staged batch (the loader's stage); then, once the
        batch before it is committed, hand it to the committer."""
        with self._state_lost():
            clock = _Clock(result.timings)
            in_flight = self._in_flight  # read before the ledger: see _drive
            valid, taken = self._unclaimed(
                staged.valid, set(staged.gone.index), in_flight or InFlight()
            )
            letters = staged.letters + self._letters(staged.live, taken, "contract")
            # A record lettered by a batch still being committed, found in sync now, settles it.
            open_letters = staged.open_letters.union(*self._recent_letters)
            plan = self._diff(valid, staged.gone, result, open_letters, in_flight)
            letters += self._letters(staged.live, plan.taken, "contract")
            result.counts["valid"] += len(valid) - len(plan.taken)
            clock.lap("diff")
            self._stop_if_not_alone()
            self._note_rejections(result, letters)
            self._check_budget(result, pending=letters)

            archived = [i for i in plan.to_archive.values() if i not in plan.kept]
            if archived:
                self._call_destination(lambda: self._archive(archived))
            written, refused = self._load_movers_first(plan, staged.live)
            self._note_rejections(result, refused)
            self._log_letters(letters + refused)
            landed = set(written.keys)
            plan.displaced = {k: held for k, held in plan.displaced.items() if held[1] in landed}
            plan.relocated = self._relocated(plan, written, in_flight)
            old_rows = list({old for old, _ in plan.relocated.values()})
            if old_rows:
                self._call_destination(lambda: self._archive(old_rows))
            clock.lap("load")
        moved = zip(written.keys, written.destination_ids, strict=True)
        self._let_go.update(plan.to_archive, plan.displaced)
        self._let_go.update(key for key, new in moved if plan.previous.get(key, new) != new)
        result.counts["inserted"] += written.inserted
        result.counts["updated"] += written.updated
        result.counts["unchanged"] += written.unchanged
        result.counts["archived"] += len(archived) + len(old_rows)
        if self._committed is not None:
            self._committed.result()  # raises the batch before's failure: nothing is handed on
        flight = InFlight.of(self.spec, plan, written)
        watermark = (
            self._watermark(staged.last, result.watermark_before) if move_watermark else None
        )
        # The committer keeps what it writes, not the batch's frames and values.
        plan.outbound = OutboundBatch(
            plan.outbound.keys, {}, plan.outbound.hashes, flow=self.spec.name, run_id=self.run_id
        )
        self._in_flight = flight
        self._recent_letters.append({letter.record_key for letter in letters + refused})
        self._committed = self._committer.submit(
            self._commit_staged,
            (staged.rows, watermark),
            plan,
            flight,
            letters + refused,
            result,
        )

    def _commit_staged(
        self,
        read: tuple[int, Watermark | None],
        plan: _Plan,
        flight: InFlight,
        letters: list[DeadLetter],
        result: SyncResult,
    ) -> None:
        """Commit one loaded batch (the committer's stage): `read` is its rows and watermark."""
        clock = _Clock(result.timings)
        with self._state_lost():
            detail = self._commit(*read, plan, flight, letters)
        if self._in_flight is flight:
            self._in_flight = None
        clock.lap("commit")
        result.batches += 1
        result.seconds = time.perf_counter() - self._started
        # What the commits so far hold (the reader's counts run up to two batches ahead).
        done = self._committed_counts
        done.update({name: detail[name] for name in _PROGRESS})
        self.log.info(
            "%s: batch %d committed: %d rows done, %.0f rows/s, %d written, %d rejected",
            self.spec.name,
            result.batches,
            done["rows"],
            done["rows"] / max(result.seconds, 1e-9),
            done["inserted"] + done["updated"] + done["archived"],
            done["dead_lettered"],
        )

    def _keyed(self, batch: pd.DataFrame) -> tuple[pd.DataFrame, list[DeadLetter]]:
        """The batch indexed by record key; rows whose key is missing, unusable or repeated
        within the batch are dead-lettered instead (the source must settle which row is right)."""
        keys = batch[self.spec.source.key]
        problems, text = _key_problems(keys)
        usable = problems.isna()
        repeated = text.duplicated(keep=False)
        letters = []
        for position in (~usable).to_numpy().nonzero()[0]:
            payload = _json_ready(batch.iloc[[position]])[0]
            digest = content_hash(payload)
            letters.append(
                self._letter(
                    f"{UNKEYED}{digest[:16]}", "contract", problems.iloc[position], payload
                )
            )
            self._unkeyed_read.add(letters[-1].record_key)
        clashing = batch[usable][repeated.to_numpy()]
        for key, rows in clashing.groupby(text[repeated], sort=False):
            payload = {"rows": _json_ready(rows)}
            letters.append(
                self._letter(
                    str(key),
                    "contract",
                    f"the source returned {len(rows)} rows with key {key} in one batch",
                    payload,
                )
            )
        if usable.all() and not repeated.any():  # as a batch mostly is: no copy to filter
            keyed = batch.set_axis(text.to_numpy(), axis=0)
        else:
            keyed = batch[usable][~repeated.to_numpy()]
            keyed = keyed.set_axis(text[~repeated].to_numpy(), axis=0)
        keyed.index.name = None
        return keyed, letters

    def _validate(
        self,
        live: pd.DataFrame,
        clock: _Clock,
        result: SyncResult,
        open_letters: Set[str],
    ) -> tuple[pd.DataFrame, list[DeadLetter]]:
        """Source contract → (echoes set aside) → mapping → target contract."""
        spec = self.spec
        try:
            source_verdict = spec.source_contract.judge(live)
            clock.lap("validate")
            taken = self._without_echoes(source_verdict.valid, result, open_letters)
            mapped, unmappable = mapped_rows(self.spec, taken)
            clock.lap("map")
            target_verdict = spec.target_contract.judge(mapped)
        except ContractViolation as error:
            raise SyncError(
                spec.name, str(error), "fix the source schema or the contract, then rerun"
            ) from error
        clock.lap("validate")
        rejections = source_verdict.rejections + target_verdict.rejections
        return target_verdict.valid, self._letters(live, rejections, "contract") + self._letters(
            live, unmappable, "mapping"
        )

    def _without_echoes(
        self, valid: pd.DataFrame, result: SyncResult, open_letters: Set[str]
    ) -> pd.DataFrame:
        """`valid` without the echoes of what `echo_of` wrote (see integrations/engine/echoes.py):
        records this flow never took, with no open letter, that a repair does not force."""
        writer = self.spec.echo_of
        if writer is None or valid.empty:
            return valid
        keys = [key for key in valid.index if key not in self._force and key not in open_letters]
        taken = self._ledger_entries(keys)
        echoed = echoes(writer, self.state, valid, [key for key in keys if key not in taken])
        result.counts["echoes"] += len(echoed)
        return valid.drop(index=echoed)

    def _diff(
        self,
        valid: pd.DataFrame,
        gone: pd.DataFrame,
        result: SyncResult,
        open_letters: set[str],
        in_flight: InFlight | None = None,
    ) -> _Plan:
        """What to send (content differs from the ledger's), what changes field by field, and
        what to archive. Column by column: no dict per record. In the source's order: a record
        that takes a unique value another lets go in the same batch is written after it."""
        keys = valid.index.tolist()
        in_sync: list[str] = []
        values = columns.ready_columns(valid)
        texts = columns.texts_of(values)
        wholes = columns.record_texts(texts)
        hashes = columns.content_hashes(wholes)
        ledger = self._ledger_entries(keys + list(gone.index))
        if in_flight is not None:  # the batch still being committed is newer than the ledger
            ledger.update(
                (key, in_flight.entries[key])
                for key in [*keys, *gone.index]
                if key in in_flight.entries
            )
        sending: list[int] = []
        for at, key in enumerate(keys):
            known = ledger.get(key)
            same = known is not None and known.content_hash == hashes[at] and not known.archived
            if same and key not in self._force:
                result.counts["unchanged"] += 1
                if key in open_letters:
                    in_sync.append(key)
                continue
            sending.append(at)
        ids = self._taken_ids(valid, sending, ledger, gone, in_flight)
        taken = ids.taken
        if taken:
            refused = {rejection.index for rejection in taken}
            sending = [at for at in sending if keys[at] not in refused]
        if len(sending) < len(keys):
            keys, hashes = _picked(keys, sending), _picked(hashes, sending)
            wholes = _picked(wholes, sending)
            values = {name: _picked(column, sending) for name, column in values.items()}
            texts = {name: _picked(column, sending) for name, column in texts.items()}
        # What the destination linked each record to, as the ledger holds it (an archived row's
        # went with it): a record that names another object now is unlinked from the old one.
        linked = [
            None if (known := ledger.get(key)) is None or known.archived else known.links
            for key in keys
        ]
        outbound = OutboundBatch(
            keys, values, hashes, flow=self.spec.name, run_id=self.run_id, links=linked
        )
        to_archive = {
            key: entry.destination_id
            for key, entry in ledger.items()
            if self.spec.archive_deleted
            and key in gone.index
            and not entry.archived
            and entry.destination_id
        }
        # Rows deleted or out of scope at the source that were never synced: nothing to do, and
        # not "unchanged" either (a first sync counted every soft-deleted row so).
        never = sum(key not in ledger for key in gone.index)
        result.counts["skipped"] += never
        result.counts["unchanged"] += len(gone) - len(to_archive) - never
        # A dead-lettered record that left the source (or the flow) has nothing left to send: its
        # letter closes, as an archived record's does with its commit.
        in_sync += [key for key in gone.index if key in open_letters and key not in to_archive]
        now = columns.field_hashes(texts)
        changes = self._changes(outbound, texts, wholes, now, ledger)
        previous = {
            key: known.destination_id
            for key in outbound.keys
            if (known := ledger.get(key)) is not None
            and not known.archived
            and known.destination_id
        }
        kept = self._held_ids(to_archive, set(to_archive), in_flight)
        plan = _Plan(outbound, to_archive, now, changes, in_sync, taken, previous, kept)
        plan.displaced, plan.vacated = ids.displaced, ids.vacated
        return plan

    def _changes(
        self,
        outbound: OutboundBatch,
        texts: dict[str, list[str]],
        wholes: list[str],
        now: list[str],
        ledger: dict[str, LedgerEntry],
    ) -> list[str]:
        """What each write changes, as JSON (PII masked): every field of a new record, the
        fields whose hash differs from the ledger's for a known one."""
        pii = self.spec.target_contract.pii_fields & set(texts)
        shown = {name: outbound.column(name) for name in texts}
        shown.update({name: [mask_value(value) for value in shown[name]] for name in pii})
        masked = {name: columns.json_texts(shown[name]) for name in pii}
        whole = columns.record_texts({**texts, **masked}) if pii else list(wholes)
        names = sorted(texts)
        for at, key in enumerate(outbound.keys):
            known = ledger.get(key)
            if known is None or known.archived:
                continue
            changed = columns.changed_fields(known.field_hashes, now[at], names)
            if changed:  # none: a repair rewrites what the destination lost, shown whole
                whole[at] = canonical_json({name: shown[name][at] for name in changed})
        return whole

    def _commit(
        self,
        rows: int,
        watermark: Watermark | None,
        plan: _Plan,
        flight: InFlight,
        letters: list[DeadLetter],
    ) -> dict[str, object]:
        """Ledger, unique-value claims, dead letters, watermark (None: it stays) and audit: one
        transaction. Returns the batch's counts, as audited."""
        spec = self.spec
        written = flight.written
        records = self._audit_records(plan, flight, letters)
        detail = {
            "rows": rows,
            "inserted": written.inserted,
            "updated": written.updated,
            "unchanged": written.unchanged,
            "archived": sum(i not in plan.kept for i in plan.to_archive.values())
            + len(plan.relocated),
            "dead_lettered": len(letters),
            "watermark": watermark.as_dict() if watermark else None,
        }
        self._commit_batch(
            BatchCommit(
                spec.name,
                self.run_id,
                synced=flight.entries,
                dead_letters=letters,
                watermark=watermark,
                claims=flight.claims,
                # Written records let go of their old claims too (one that cleared its value
                # claims nothing new); archived ones of all theirs.
                released=[
                    *plan.to_archive,
                    *plan.displaced,
                    *(flight.written.keys if spec.target.unique_ignoring_case else ()),
                ],
                resolved=plan.in_sync,
                resolution="replayed" if self._replaying else "synced",
                audit_records=records,
                retried=self._retrying,
            ),
            audit=self._batch_entry(detail),
        )
        return detail

    def _commit_batch(self, batch: BatchCommit, audit: dict[str, object]) -> None:
        """Commit `batch`; a first sync settles, and refreshes, only the letters it may have
        opened."""
        first = self._first_sync
        batch.lettered = first.letters.to_look_up([*batch.synced, *batch.resolved])
        batch.letters_open = first.letters.to_look_up(
            [letter.record_key for letter in batch.dead_letters]
        )
        batch.fence = self._fence
        first.committing(batch)
        try:
            self.state.commit_batch(batch, audit)
        except LockTakenSince:
            raise self._lock_lost(
                "another run took the flow, so this run committed nothing more (what its last "
                "batch wrote to the destination, the rerun sends again: upserts make that "
                "harmless)"
            ) from None

    def _ledger_entries(self, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        """The ledger's entries of these keys (a first sync asks only for those it wrote)."""
        wanted = self._first_sync.keys.to_look_up(keys)
        return self.state.ledger_entries(self.spec.name, wanted)

    def _live_owners(self, destination_ids: Sequence[str]) -> dict[str, set[str]]:
        """The records the ledger holds live under each of these destination ids."""
        wanted = self._first_sync.destination_ids.to_look_up(destination_ids)
        return self.state.live_owners(self.spec.name, wanted)

    def _batch_entry(self, detail: dict[str, object]) -> dict[str, object]:
        """The audit entry of one batch's commit."""
        action = "replay" if self._replaying else "sync_batch"
        return {"actor": self.actor, "action": action, "why": self.why, "detail": detail}

    def _audit_records(
        self, plan: _Plan, flight: InFlight, letters: list[DeadLetter]
    ) -> list[AuditRecord]:
        """One audit record per write, archive and rejection of the batch."""
        flow, position = self.spec.name, plan.position

        def trace(key: str) -> str:
            return correlation_id(self.run_id, flow, key)

        prefix = trace("")  # the correlation id of record k is prefix + k
        keys = flight.written.keys
        changes = plan.changes
        if keys != plan.outbound.keys:
            changes = list(map(changes.__getitem__, map(position.__getitem__, keys)))
        if self._replaying:
            actions = ["replay"] * len(keys)
        else:
            actions = list(map(_ACTIONS.__getitem__, flight.written.created))
        # Tuples made by zip, in C: a batch's writes make one each.
        records: list[tuple] = list(
            zip(repeat(flow), keys, actions, map(prefix.__add__, keys), changes)
        )
        records += [
            AuditRecord(flow, key, "archive", trace(key), _archived(destination_id, plan.kept))
            for key, destination_id in plan.to_archive.items()
        ]
        records += [  # the old row of a record now written under another id
            AuditRecord(flow, key, "archive", trace(key), {"destination_id": old, "now": new})
            for key, (old, new) in plan.relocated.items()
        ]
        records += [  # a record deleted outright, whose row another record took
            AuditRecord(
                flow,
                key,
                "archive",
                trace(key),
                {
                    "destination_id": taken,
                    "row": f"taken by record {taker}: this one left the source",
                },
            )
            for key, (taken, taker) in plan.displaced.items()
        ]
        return records + self._letter_records(letters)

    def _letter_records(self, letters: Sequence[DeadLetter]) -> list[AuditRecord]:
        return [
            AuditRecord(
                self.spec.name,
                letter.record_key,
                "dead-letter",
                letter.correlation_id
                or correlation_id(self.run_id, self.spec.name, letter.record_key),
                {"kind": letter.reason_kind, "reason": letter.reason},
            )
            for letter in letters
        ]

    def _watermark(self, batch: pd.DataFrame, before: Watermark | None) -> Watermark | None:
        """The batch's last (cursor, key); none for a source without a cursor, or for a batch
        of rows without cursor values (the stored watermark stays)."""
        if self.spec.source.cursor is None or batch.empty:
            return None
        last = batch.iloc[-1]
        key = last[self.spec.source.key]
        moment = pd.Timestamp(last[self.spec.source.cursor])
        if moment.tzinfo is not None:  # a zoned cursor: the state store keeps UTC, without zone
            moment = moment.tz_convert("UTC").tz_localize(None)
        moment, now = moment.to_pydatetime(), utcnow()
        if moment > now:
            # A watermark in the future would skip every change made until then: it stops at
            # the present, and the row is read again each run until its cursor is.
            if moment - now > FAR_FUTURE:
                self.log.warning(
                    "%s: record %s has %s %s, in the future: the watermark stays at the "
                    "present, so later changes are still read (the record is read again by "
                    "every run). What to do: correct the record's %s in the source",
                    self.spec.name,
                    key_text(key),
                    self.spec.source.cursor,
                    moment.isoformat(),
                    self.spec.source.cursor,
                )
            moment = now
        watermark = Watermark(moment, _json_key(key))
        if before and _in_order(watermark) < _in_order(before):
            return before  # a lookback batch never moves the watermark back
        return watermark

    def _without_held(
        self, live: pd.DataFrame, gone: pd.DataFrame, letters: list[DeadLetter], result: SyncResult
    ) -> tuple[pd.DataFrame, list[DeadLetter], set[str]]:
        """Drop rows already dead-lettered with this exact content, and the batch's letters (of
        keys missing or repeated) already open with it: they wait for a fix or a replay, they
        are not refused again on every run (a replay takes them all). So do those whose letter
        was discarded with this content: a discard sticks until the record changes. Also
        returns the keys with open dead letters, live or gone."""
        keys = [*live.index, *gone.index, *(letter.record_key for letter in letters)]
        keys = self._first_sync.letters.to_look_up(keys)
        opened, discarded = self.state.held_letter_hashes(self.spec.name, keys)
        if self._replaying:
            return live, letters, set(opened)
        discarded = {key: hashed for key, hashed in discarded.items() if key not in self._force}
        held = {**discarded, **opened}
        if not held:
            return live, letters, set(opened)
        fresh = [letter for letter in letters if held.get(letter.record_key) != letter.content_hash]
        result.counts["held"] += sum(map(_rows_in, letters)) - sum(map(_rows_in, fresh))
        waiting = [key for key in held if key in live.index]
        payloads = _json_ready(live.loc[waiting])
        unchanged = [
            key
            for key, payload in zip(waiting, payloads, strict=True)
            if content_hash(payload) == held[key]
        ]
        result.counts["held"] += len(unchanged)
        return live.drop(index=unchanged), fresh, set(opened)

    # --- load: per-record refusals, bisection of chunks refused whole -------------------------

    def _load(
        self, outbound: OutboundBatch, source_rows: pd.DataFrame
    ) -> tuple[WrittenColumns, list[DeadLetter]]:
        written: list[Sequence[Written]] = []  # each accepted chunk's
        refused: list[DeadLetter] = []
        size = self.destination.max_batch
        for start in range(0, len(outbound), size):
            self._load_chunk(outbound[start : start + size], source_rows, written, refused)
        return WrittenColumns.joined(written), refused

    def _load_movers_first(
        self, plan: _Plan, source_rows: pd.DataFrame
    ) -> tuple[WrittenColumns, list[DeadLetter]]:
        """Load the batch; a record taking an id that records of the batch move off is written
        once their moves landed, and refused, naming one, when one did not: that record keeps
        its row, which the taker would be written over. A chain of moves goes wave by wave.
        Records that wait on each other (a swap, a cycle, and what waits on it) are written in
        one statement, or refused together: written in part, one would land on a row another
        kept."""
        outbound = plan.outbound
        if not plan.vacated:
            return self._load(outbound, source_rows)
        at = {key: i for i, key in enumerate(outbound.keys)}
        waits = {  # taker → the records of the batch it waits on
            taker: [mover for mover in movers if mover in at]
            for taker, movers in plan.vacated.items()
            if taker in at
        }
        written, refused = self._load(
            _sub_batch(outbound, [i for i, key in enumerate(outbound.keys) if key not in waits]),
            source_rows,
        )
        parts, stayed = [written], {letter.record_key for letter in refused}
        why = ", whose move off it the destination refused"
        while waits:
            doomed = {
                taker: next(mover for mover in movers if mover in stayed)
                for taker, movers in waits.items()
                if any(mover in stayed for mover in movers)
            }
            if doomed:
                taken = [self._id_taken(taker, owner, why) for taker, owner in doomed.items()]
                refused += self._letters(source_rows, taken, "destination-rejected")
                stayed.update(doomed)
                waits = {taker: movers for taker, movers in waits.items() if taker not in doomed}
                continue
            ready = [taker for taker, movers in waits.items() if not set(movers) & waits.keys()]
            wave, together = (ready, False) if ready else (list(waits), True)
            landed: list[Sequence[Written]] = []
            refusals: list[DeadLetter] = []
            self._load_chunk(
                _sub_batch(outbound, [at[key] for key in wave]),
                source_rows,
                landed,
                refusals,
                together=together,
            )
            parts += landed
            refused += refusals
            stayed.update(letter.record_key for letter in refusals)
            waits = {taker: movers for taker, movers in waits.items() if taker not in wave}
        return WrittenColumns.joined(parts), refused

    def _load_chunk(
        self,
        chunk,
        source_rows,
        written: list[Sequence[Written]],
        refused: list[DeadLetter],
        together: bool = False,
    ) -> None:
        """Upsert a chunk; records refused one by one go to the DLQ with the destination's own
        reason, and a chunk refused as a whole is bisected to find its bad records, unless its
        records go `together` (they take each other's ids): then each is refused."""
        try:
            # Records that go together only go to destinations that key rows by their ids (SQL
            # tables: see _taken_ids), which write a chunk whole.
            if together:
                outcome = self._call_destination(lambda: self.destination.upsert(chunk, whole=True))
            else:
                outcome = self._call_destination(lambda: self.destination.upsert(chunk))
        except RecordsRejected as error:
            if len(chunk) == 1 or together:
                reason = str(error) + (_TOGETHER if len(chunk) > 1 else "")
                refused.extend(self._refusal(record, reason, source_rows) for record in chunk)
                return
            middle = math.ceil(len(chunk) / 2)
            self._load_chunk(chunk[:middle], source_rows, written, refused)
            self._load_chunk(chunk[middle:], source_rows, written, refused)
            return
        written.append(outcome.written)
        if outcome.refused:
            at = {record_key: i for i, record_key in enumerate(chunk.keys)}
            refused.extend(
                self._refusal(chunk[at[item.key]], item.reason, source_rows)
                for item in outcome.refused
            )

    def _refusal(
        self, record: OutboundRecord, reason: str, source_rows: pd.DataFrame
    ) -> DeadLetter:
        """A refused record's dead letter; the destination's words are scrubbed of its PII."""
        payload = _json_ready(source_rows.loc[[record.key]])[0]
        pii = self.spec.source_contract.pii_fields | self.spec.target_contract.pii_fields
        values = [payload.get(name) for name in pii] + [record.properties.get(name) for name in pii]
        reason = scrub(f"{self.destination.name} refused the record: {reason}", values)
        return self._letter(record.key, "destination-rejected", reason, payload)

    def _archive(self, destination_ids: list[str]) -> None:
        size = self.destination.max_batch
        for start in range(0, len(destination_ids), size):
            self.destination.archive(destination_ids[start : start + size])

    def _call_destination(self, call):
        try:
            return call()
        except DestinationUnavailable as error:
            what, todo = _what_and_todo(error)
            raise SyncError(
                self.spec.name,
                f"{self.destination.name} is unavailable: {what}",
                f"{todo or 'rerun when ' + self.destination.name + ' answers again'}; nothing "
                "after the last committed batch was marked synced (the rerun resumes from the "
                "watermark)",
            ) from error
        except DestinationRefused as error:
            raise DestinationRefusedWrite(
                self.spec.name,
                f"{self.destination.name}: {error}",
                f"a rerun alone will not cure it: {error.todo}, then rerun; nothing after the "
                "last committed batch was marked synced (the rerun resumes from the watermark)",
            ) from error
        except DestinationMismatch as error:
            what, todo = _what_and_todo(error)
            raise SyncError(
                self.spec.name,
                f"{self.destination.name} no longer fits the flow: {what}",
                (f"{todo}; " if todo else "") + "nothing after the last committed batch was "
                "marked synced; the rerun resumes from the watermark",
            ) from error

    # --- rejections and the error budget ----------------------------------------------------

    def _letters(
        self, rows: pd.DataFrame, rejections: list[RowRejection], kind: str
    ) -> list[DeadLetter]:
        values = columns.ready_columns(rows.loc[[rejection.index for rejection in rejections]])
        # Their payloads' content hashes a column at a time, as the diff hashes records.
        digests = columns.content_hashes(columns.record_texts(columns.texts_of(values)))
        return [
            self._letter(str(rejection.index), kind, rejection.reason, payload, digest)
            for rejection, payload, digest in zip(
                rejections, columns.records(values), digests, strict=True
            )
        ]

    def _letter(
        self,
        key: str,
        kind: str,
        reason: str,
        payload: dict[str, object],
        digest: str | None = None,
    ) -> DeadLetter:
        """`digest`: the payload's content hash, when known."""
        trace = correlation_id(self.run_id, self.spec.name, key)
        return DeadLetter(
            flow=self.spec.name,
            record_key=key,
            reason_kind=kind,
            reason=reason,
            payload=payload,
            content_hash=digest or content_hash(payload),
            correlation_id=trace,
        )

    def _note_rejections(self, result: SyncResult, letters: Sequence[DeadLetter]) -> None:
        """Count the batch's rejections and keep the run's first few as samples (PII masked)."""
        result.counts["rejected"] += sum(map(_rows_in, letters))
        for letter in letters:
            result.reasons[_grouped(letter.reason)] += 1
            result.kinds[letter.reason_kind] += 1
            if len(result.samples) < SAMPLE_SIZE and "rows" not in letter.payload:
                masked = self.spec.masked_fields(letter.payload)  # as the CLI shows letters
                result.samples.append(
                    {
                        "key": letter.record_key,
                        "reason": letter.reason,
                        "record": mask_record(letter.payload, masked),
                    }
                )

    def _log_letters(self, letters: Sequence[DeadLetter]) -> None:
        """One line for a batch's dead letters: how many of each kind, with a few keys. Each
        letter's reason and payload are in the DLQ (`handoff dlq list`), so the run's log stays
        a summary however many rows a first run rejects."""
        if not letters:
            return
        keys_by_kind: dict[str, list[str]] = defaultdict(list)
        rows_by_kind: Counter = Counter()
        for letter in letters:
            keys_by_kind[letter.reason_kind].append(self._shown_key(letter.record_key))
            rows_by_kind[letter.reason_kind] += _rows_in(letter)
        kinds = "; ".join(
            f"{kind} {rows} (e.g. {', '.join(keys_by_kind[kind][:EXAMPLE_KEYS])})"
            for kind, rows in rows_by_kind.most_common()
        )
        self.log.warning(
            "%s: %d dead-lettered in this batch: %s; `handoff dlq list --flow %s` lists them",
            self.spec.name,
            rows_by_kind.total(),
            kinds,
            self.spec.name,
        )

    def _shown_key(self, key: str) -> str:
        """A record key as a log may show it: masked where the flow is keyed by a PII field."""
        pii = self.spec.source_contract.pii_fields
        return str(mask_value(key)) if self.spec.source.key in pii else key
