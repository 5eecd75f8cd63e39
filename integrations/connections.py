"""A flow's systems opened from the environment, outside Dagster (the CLI's DLQ replay).

Inside Dagster the resources open the same objects from their configuration; this is the
same wiring for a shell, reading the variables DESIGN.md names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from integrations import settings
from integrations.engine.destination import Destination
from integrations.engine.spec import FlowSpec, Target
from integrations.engine.state import MissingSecret, StateStore
from integrations.sql.connect import create_engine
from integrations.sql.source import SqlSource


@contextmanager
def crm_destination(target: Target) -> Iterator[Destination]:
    from integrations.crm.client import CrmClient
    from integrations.crm.destination import CrmObjects

    token = settings.crm_access_token()
    if not token:
        raise MissingSecret("CRM_ACCESS_TOKEN is not set: the CRM destination needs it")
    client = CrmClient(settings.crm_base_url(), token)
    try:
        yield CrmObjects.for_target(client, target)
    finally:
        client.close()


@contextmanager
def helpdesk_destination(target: Target) -> Iterator[Destination]:
    import os

    from integrations.helpdesk.client import RtClient
    from integrations.helpdesk.destination import RtUsers

    url = settings.rt_base_url()
    if not url:
        raise MissingSecret("RT_BASE_URL is not set: the helpdesk destination needs it")
    client = RtClient(
        url,
        user=os.environ.get("RT_USER"),
        password=os.environ.get("RT_PASSWORD"),
        token=os.environ.get("RT_TOKEN"),
    )
    try:
        yield RtUsers(client, target.id_property)
    finally:
        client.close()


DESTINATIONS = {"crm": crm_destination, "helpdesk": helpdesk_destination}


@contextmanager
def open_flow(spec: FlowSpec) -> Iterator[tuple[SqlSource, Destination, StateStore]]:
    opener = DESTINATIONS.get(spec.target.system)
    if opener is None:
        raise ValueError(
            f"flow {spec.name}: no command-line wiring for system {spec.target.system!r}; "
            "replay it from Dagster instead (run config `replay: true`)"
        )
    with ExitStack() as stack:
        engine = create_engine(settings.erp_database_url())
        stack.callback(engine.dispose)
        state = StateStore(settings.state_url(), dlq_key=settings.dlq_key())
        stack.callback(state.dispose)
        destination = stack.enter_context(opener(spec.target))
        yield SqlSource(engine, spec.source), destination, state
