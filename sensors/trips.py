"""What a standing error-budget trip means for the sensors and schedules that request a flow's
runs: while it stands, each run would stop at its start (and fail, with its alert), so they
request none and say why; the run a tick skipped is kept, as the refused run would have kept it,
and requested by the flow's stopped-windows sensor once the trip clears."""

from datetime import datetime

from assets.factory import asset_key
from integrations.engine.spec import FlowSpec
from integrations.engine.state import BudgetTrip, StateStore, StoppedWindow


def standing_trip(store: StateStore, spec: FlowSpec) -> BudgetTrip | None:
    """The flow's error-budget trip that stops its runs: one with dead letters still open (one
    whose letters were all replayed or discarded clears at the next run's start)."""
    return next(
        (trip for trip in store.standing_budget_trips(spec.name) if trip.open_letters), None
    )


def trip_skips(
    store: StateStore, spec: FlowSpec, window: tuple[datetime, datetime], tick: str
) -> BudgetTrip | None:
    """The standing trip that skips `tick`'s run of `window` (a day, or an unpartitioned flow's
    sync, SINCE_WATERMARK), if any; the window is then kept as `refused`, as the run refused at
    its start would have kept it: a skip that kept nothing left the tick's sync to whatever
    requested the flow next (an hourly tick, the next change)."""
    trip = standing_trip(store, spec)
    if trip is not None:
        store.keep_stopped_window(StoppedWindow(spec.name, *window, tick, "refused"))
    return trip


def trip_stands(trip: BudgetTrip) -> str:
    """Why a sensor requests no run while `trip` stands, and what clears it."""
    return (
        f"the error budget's trip of run {trip.run_id} stands ({trip.open_letters} of its dead "
        f"letters open; `handoff budget list --flow {trip.flow}`)"
    )


def sync_skipped(spec: FlowSpec, trip: BudgetTrip) -> str:
    """Why a sensor requests no sync of an unpartitioned flow: its trip, what clears it, and that
    its sync is kept."""
    return f"{asset_key(spec).to_user_string()} skipped: {trip_stands(trip)}; " + clear_todo(
        spec, "its sync"
    )


def clear_todo(spec: FlowSpec, kept: str) -> str:
    """What clears a standing trip, and that the skipped tick's run (`kept`: the day, its sync)
    is requested once it clears."""
    return (
        f"replay or discard its dead letters (`handoff dlq replay --flow {spec.name}`), or "
        f"approve going on (`handoff budget clear --flow {spec.name} --why ...`); {kept} is kept, "
        f"and requested by sensor `{spec.name}_stopped_windows` once it clears"
    )
