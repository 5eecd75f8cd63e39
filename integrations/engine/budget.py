"""The error budget of a sync: a run that fails too many of the rows it judges stops, and its
trip stands, stopping every later run of the flow at its start, until someone acknowledges it
(its dead letters replayed or discarded, or going on approved). A run it stops keeps its window
(a partition's, or an unpartitioned flow's sync from the watermark: see Sync._keep_window),
requested again once no trip stands."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING

from integrations.engine.errors import ErrorBudgetExceeded, ErrorBudgetTripStands, over_budget
from integrations.engine.spec import FlowSpec
from integrations.engine.state import (
    BatchCommit,
    BudgetTrip,
    DeadLetter,
    StateStore,
    StateStoreUnavailable,
    utcnow,
)

if TYPE_CHECKING:
    from integrations.engine.sync import SyncResult


class ErrorBudget:
    """The error budget's part of a Sync (a mixin: it reads the run's flow, state store and
    trail, and the window of a partition's run)."""

    spec: FlowSpec
    state: StateStore
    run_id: str
    actor: str
    why: str
    log: logging.Logger | logging.LoggerAdapter
    _window: tuple[datetime, datetime] | None
    _replaying: bool
    _clashed: list[str]
    # and Sync's _letter_records, _batch_entry and _log_letters (the audit and the log's summary
    # of a stopped batch's letters), _keep_window and _window_todo (a run stopped: a partition's,
    # or an unpartitioned flow's)

    def _stop_while_tripped(self, approved: bool) -> None:
        """Stop before reading anything while an earlier run's error-budget trip stands (some of
        its dead letters open, going on not approved), unless this run approves it: audited, with
        the run's actor and why. Held, those letters no longer count against the budget, so
        without this a rerun with nothing fixed went through with them in the DLQ."""
        flow = self.spec.name
        trip = self.state.settle_budget_trip(
            flow, actor=self.actor, why=self.why, run_id=self.run_id
        )
        if trip is None or trip.resolution:  # none, or its letters were all settled since
            return
        if not approved:
            self._keep_window("refused")
            raise ErrorBudgetTripStands(trip, self._window_todo())
        self.state.clear_budget_trip(flow, actor=self.actor, why=self.why, run_id=self.run_id)
        self.log.warning(
            "%s: going on despite the error budget's trip of run %s, as approved: its %d open "
            "dead letters stay in the DLQ",
            flow,
            trip.run_id,
            trip.open_letters,
        )

    @contextmanager
    def _trip_kept(self) -> Iterator[None]:
        """A run the error budget stops keeps its trip in the state store, with the dead letters
        it left open: later runs stop at their start until it is acknowledged. The trip is kept
        as the budget stops the run (a run killed while its threads wind down leaves it), and
        the letters of the commits that land meanwhile join it here."""
        try:
            yield
        except ErrorBudgetExceeded as stopped:
            stopped.trip = self._kept(stopped.trip, window="tripped")
            raise

    def _kept(self, trip: BudgetTrip, window: str | None = None) -> BudgetTrip:
        """The trip as the state store keeps it (see _trip_kept), and the window of the run it
        stopped (`window`: how, see _keep_window)."""
        try:
            kept = self.state.trip_budget(trip, actor=self.actor, why=self.why)
            if window is not None:
                self._keep_window(window)
            return kept
        except StateStoreUnavailable as error:  # the budget's stop is still the news
            self.log.error(
                "%s: the error budget's trip could not be kept (%s): the next run will not "
                "stop for it; check `handoff dlq list --flow %s` before rerunning",
                self.spec.name,
                error,
                self.spec.name,
            )
            return trip

    def _settle_trip(self) -> None:
        """After a replay: clear the flow's error-budget trip once none of its dead letters is
        open (audited), or say how many still keep the flow's runs stopped."""
        flow = self.spec.name
        trip = self.state.settle_budget_trip(
            flow, actor=self.actor, why=self.why, run_id=self.run_id
        )
        if trip is None:
            return
        if trip.resolution:
            self.log.info(
                "%s: every dead letter of the error budget's trip of run %s is replayed or "
                "discarded: the trip is cleared, runs go on",
                flow,
                trip.run_id,
            )
            return
        self.log.warning(
            "%s: %d of the %d dead letters of the error budget's trip of run %s are still open: "
            "runs stay stopped until they are replayed or discarded, or `handoff budget clear "
            "--flow %s` approves going on",
            flow,
            trip.open_letters,
            trip.letters,
            trip.run_id,
            flow,
        )

    def _fix_todo(self, finished: bool) -> str:
        """After "fix the source": what else the error budget's stop of this run leaves to do."""
        replay = f"replay them (`handoff dlq replay --flow {self.spec.name}`)"
        if finished:
            return (
                f"(or the contract, or the destination), then {replay}: every batch of this run "
                "was committed, the rejected rows wait in the DLQ"
            )
        if self._window is None:  # a run from the watermark: the next run resumes there
            return (
                f"(or the contract), then {replay}; the watermark did not advance past the "
                "failing batch"
            )
        # A window has no watermark to resume from: the rows after the failing batch need a rerun.
        return (
            f"(or the contract), then {replay} and rerun this window: its rows after the failing "
            "batch were not read"
        )

    def _check_budget(
        self, result: SyncResult, pending: Sequence[DeadLetter] = (), finished: bool = False
    ) -> None:
        """Stop the run when too many of the rows it judged were rejected. A record the
        destination refused passed the contracts (it is in `valid`) and is counted once."""
        budget = self.spec.error_budget
        refused = result.kinds["destination-rejected"]
        # Refused for an id a record of another batch held: tried again at the run's end (see
        # _retried), judged then (a renumbering across batches stopped every run).
        deferred = len(set(self._clashed))
        # Echoes passed the contract too (not staged, as unchanged records are not written).
        judged = result.counts["valid"] + result.counts["echoes"] + result.counts["rejected"]
        seen = judged - refused - deferred
        if self._replaying or seen < budget.min_rows:  # a replay retries known-bad records
            return
        failed = result.counts["rejected"] - deferred
        share = failed / seen
        if share <= budget.max_share:
            return
        if pending:  # the batch's rejected rows are kept, audited and logged; nothing is loaded
            self._log_letters(pending)
            self._commit_batch(
                BatchCommit(
                    self.spec.name,
                    self.run_id,
                    dead_letters=list(pending),
                    audit_records=self._letter_records(pending),
                ),
                audit=self._batch_entry({"dead_lettered": len(pending), "stopped": "error budget"}),
            )
        flow = self.spec.name
        reasons = dict(result.reasons.most_common(3))
        trip = BudgetTrip(flow, self.run_id, utcnow(), failed, seen, budget.max_share, reasons)
        trip = self._kept(trip)
        raise ErrorBudgetExceeded(
            flow,
            over_budget(trip),
            f"inspect them with `handoff dlq list --flow {flow}`, fix the source "
            + self._fix_todo(finished)
            + "; until they are replayed or discarded, every run of this flow stops at its start "
            f"(to go on with them held in the DLQ: `handoff budget clear --flow {flow} --why "
            "...`, or rerun with acknowledge_budget_trip)"
            + (f"; {window}" if (window := self._window_todo()) else ""),
            trip,
        )
