"""What a standing error-budget trip means for the sensors and schedules that request a flow's
runs: while it stands, each run would stop at its start (and fail, with its alert), so they
request none and say why."""

from integrations.engine.spec import FlowSpec
from integrations.engine.state import BudgetTrip, StateStore


def standing_trip(store: StateStore, spec: FlowSpec) -> BudgetTrip | None:
    """The flow's error-budget trip that stops its runs: one with dead letters still open (one
    whose letters were all replayed or discarded clears at the next run's start)."""
    return next(
        (trip for trip in store.standing_budget_trips(spec.name) if trip.open_letters), None
    )


def trip_stands(trip: BudgetTrip) -> str:
    """Why a sensor requests no run while `trip` stands, and what clears it."""
    return (
        f"the error budget's trip of run {trip.run_id} stands ({trip.open_letters} of its dead "
        f"letters open; `handoff budget list --flow {trip.flow}`)"
    )
