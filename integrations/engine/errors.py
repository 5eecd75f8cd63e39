"""How a sync stops: each error names the flow, what happened and what to do."""

from __future__ import annotations

from integrations.engine.state import BudgetTrip


class SyncError(Exception):
    """A sync that stopped: says which flow, what happened and what to do."""

    def __init__(self, flow: str, what: str, todo: str):
        self.flow, self.what, self.todo = flow, what, todo
        super().__init__(f"flow {flow}: {what}. What to do: {todo}")


class ErrorBudgetExceeded(SyncError):
    """The run failed too many of the rows it judged; `trip` says how many and why. It is kept
    in the state store: later runs stop at their start until it is acknowledged."""

    def __init__(self, flow: str, what: str, todo: str, trip: BudgetTrip):
        super().__init__(flow, what, todo)
        self.trip = trip


class ErrorBudgetTripStands(SyncError):
    """An earlier run tripped the flow's error budget and nobody acknowledged it (its dead
    letters replayed or discarded, or going on approved): this run stopped at its start, before
    reading anything. `trip` is the earlier run's; `window` says what becomes of the window of a
    partition's run it stopped, or of an unpartitioned flow's sync."""

    def __init__(self, trip: BudgetTrip, window: str | None = None):
        flow = trip.flow
        super().__init__(
            flow,
            f"the error budget stopped run {trip.run_id} at {trip.tripped_at:%Y-%m-%d %H:%M:%S} "
            f"UTC: {over_budget(trip)}; {trip.open_letters} of the {trip.letters} dead letters "
            "it left are still open, so this run stopped before reading anything",
            f"inspect them with `handoff dlq list --flow {flow}`; fix the source (or the "
            f"contract, or the destination) and replay them (`handoff dlq replay --flow {flow}`, "
            "or run config replay), or discard those not to be synced (`handoff dlq discard`): "
            "runs go on once none of them is open. To go on with them held in the DLQ, approve "
            f"it: `handoff budget clear --flow {flow} --why ...`, or rerun with "
            "acknowledge_budget_trip (run config); both are audited"
            + (f"; {window}" if window else ""),
        )
        self.trip = trip


class FlowHeld(SyncError):
    """Another run, repair or replay of the flow held it for longer than a run waits: this one
    read and wrote nothing. What it was to sync is kept and requested again once the flow is free
    (a retry now would wait again, holding its Dagster run)."""


class SourceRefusedRead(SyncError):
    """The source answered and refused the read (a database's error on a row, an API's 4xx: a
    scope missing, a property unknown): the same run again gets the same answer, so it is not
    retried; what to do names what to fix first."""


class DestinationRefusedWrite(SyncError):
    """The destination answered and refused the writes themselves (an API's 401, its 403 for a
    token without the write scope, its 404 for an endpoint it does not have), not the records in
    them: the same run again gets the same answer, so it is not retried; what to do names what
    to fix first."""


class ArchiveGuardTripped(SyncError):
    """The run would archive too much; `plan` lists the archives it would have made."""

    def __init__(self, flow: str, what: str, todo: str, plan: list[str], total: int):
        super().__init__(flow, what, todo)
        self.plan, self.total = plan, total


def over_budget(trip: BudgetTrip) -> str:
    top = "; ".join(f"{reason} ({n})" for reason, n in trip.reasons.items())
    return (
        f"{trip.failed} of {trip.seen} rows ({trip.share:.1%}) failed, above the error budget of "
        f"{trip.max_share:.0%}; top reasons: {top}"
    )
