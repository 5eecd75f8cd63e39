"""What a test reads off a Dagster run."""

from __future__ import annotations

import dagster as dg


def failed_once(run: dg.ExecuteInJobResult) -> str:
    """The description of a run's one failure, which Dagster did not retry (a rerun would get
    the same answer: a refusal is no outage)."""
    assert not run.success
    retried = [e for e in run.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert not retried, "a refusal retried: a rerun gets the same answer"
    (failure,) = run.get_step_failure_events()
    return failure.step_failure_data.user_failure_data.description
