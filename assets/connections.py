"""Open a flow's source, destination and state store from the run's resources, together."""

from collections.abc import Iterator
from contextlib import contextmanager

from integrations.engine.destination import Destination
from integrations.engine.source import Source
from integrations.engine.spec import FlowSpec
from integrations.engine.state import StateStore


def required_resources(spec: FlowSpec) -> set[str]:
    """The source's system (offers `source(table)`), `state`, and the target's system (offers
    `destination(target)`)."""
    return {spec.source.system, "state", spec.target.system}


@contextmanager
def flow_connections(
    resources, spec: FlowSpec, log=None
) -> Iterator[tuple[Source, Destination, StateStore]]:
    sources = getattr(resources, spec.source.system)
    destinations = getattr(resources, spec.target.system)
    with (
        sources.source(spec.source) as source,
        destinations.destination(spec.target, log=log) as destination,
        resources.state.open() as state,
    ):
        yield source, destination, state
