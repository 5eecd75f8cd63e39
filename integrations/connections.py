"""A flow's systems opened from the environment, outside Dagster (the CLI's DLQ replay).

The same wiring as the Dagster resources (`definitions.resources()`): one opener per system, the
flow's source chosen by `spec.source.system` and its destination by `spec.target.system`, each
from the variables README's "What runs where" names, with the same embedded defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial

import sqlalchemy as sa

from integrations import settings
from integrations.engine.destination import Destination
from integrations.engine.errors import SyncError
from integrations.engine.source import Source
from integrations.engine.spec import FlowSpec, SourceTable, Target
from integrations.engine.state import MissingSecret, StateStore
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource

# As CrmResource: HubSpot counts requests per 10 s, so a burst of a few stays within its limit.
CRM_BURST = 3


class FlowNotOpened(SyncError):
    """A flow's source, destination or state store could not be opened: says which flow, what
    happened and what to do. Nothing of the flow was read or written."""


@contextmanager
def _database(url: str) -> Iterator[sa.Engine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def sql_source(url_of: Callable[[], str], table: SourceTable) -> Iterator[Source]:
    with _database(url_of()) as engine:
        yield SqlSource(engine, table)


@contextmanager
def sql_destination(
    url_of: Callable[[], str], target: Target, tables_from_contracts: Callable[[], bool]
) -> Iterator[Destination]:
    with _database(url_of()) as engine:
        yield SqlTable(engine, target, create_missing=tables_from_contracts())


def _never() -> bool:
    """A system of record's tables belong to its schema: never created here."""
    return False


def _finance_is_embedded() -> bool:
    """The embedded finance database gets its tables from the contracts; a real one's DBAs own
    them (as `definitions.resources()` says)."""
    return not os.environ.get("FINANCE_DATABASE_URL")


@contextmanager
def crm_client():
    from integrations.crm.client import CrmClient, shared_bucket
    from integrations.http import ApiLimits

    token = settings.crm_access_token()
    if not token:
        raise MissingSecret("CRM_ACCESS_TOKEN is not set: the CRM needs it")
    base_url = settings.crm_base_url().rstrip("/")
    limits = ApiLimits(requests_per_second=settings.crm_requests_per_second(), burst=CRM_BURST)
    bucket = shared_bucket(settings.state_url(), base_url, limits)
    client = CrmClient(base_url, token, limits, bucket=bucket)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def crm_source(table: SourceTable) -> Iterator[Source]:
    from integrations.crm.source import CrmObjectsSource

    with crm_client() as client:
        yield CrmObjectsSource(client, table)


@contextmanager
def crm_destination(target: Target) -> Iterator[Destination]:
    from integrations.crm.destination import CrmObjects

    with crm_client() as client:
        yield CrmObjects.for_target(client, target)


@contextmanager
def rt_client():
    from integrations.helpdesk.client import RtClient

    url = settings.rt_base_url()
    if not url:
        raise MissingSecret("RT_BASE_URL is not set: the helpdesk needs it")
    user, password, token = (
        os.environ.get(name) for name in ("RT_USER", "RT_PASSWORD", "RT_TOKEN")
    )
    if not (token or (user and password)):
        raise MissingSecret("neither RT_TOKEN nor RT_USER and RT_PASSWORD are set: RT needs them")
    client = RtClient(url, user=user, password=password, token=token)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def helpdesk_source(table: SourceTable) -> Iterator[Source]:
    from integrations.helpdesk.source import RtTickets

    with rt_client() as client:
        yield RtTickets(client, table)


@contextmanager
def helpdesk_destination(target: Target) -> Iterator[Destination]:
    from integrations.helpdesk.destination import RtUsers

    with rt_client() as client:
        yield RtUsers(client, target.id_property)


# Keyed as the flows' `SourceTable.system` and `Target.system`, as the Dagster resources are.
SOURCES: dict[str, Callable[[SourceTable], AbstractContextManager[Source]]] = {
    "erp": partial(sql_source, settings.erp_database_url),
    "chinook": partial(sql_source, settings.chinook_database_url),
    "crm": crm_source,
    "helpdesk": helpdesk_source,
}
DESTINATIONS: dict[str, Callable[[Target], AbstractContextManager[Destination]]] = {
    "erp": partial(sql_destination, settings.erp_database_url, tables_from_contracts=_never),
    "chinook": partial(
        sql_destination, settings.chinook_database_url, tables_from_contracts=_never
    ),
    "finance": partial(
        sql_destination, settings.finance_database_url, tables_from_contracts=_finance_is_embedded
    ),
    "crm": crm_destination,
    "helpdesk": helpdesk_destination,
}


def _opener(spec: FlowSpec, role: str, system: str, openers: dict[str, Callable]) -> Callable:
    if system not in openers:
        raise FlowNotOpened(
            spec.name,
            f"its {role} system {system!r} has no command-line wiring (known: "
            f"{', '.join(sorted(openers))})",
            "replay it from Dagster instead (run config `replay: true`)",
        )
    return openers[system]


@contextmanager
def open_flow(spec: FlowSpec) -> Iterator[tuple[Source, Destination, StateStore]]:
    """The flow's source, destination and state store. A system without wiring here, or a secret
    missing from the environment, is FlowNotOpened; a system that does not answer or does not
    fit raises its own error, as it does in a run."""
    open_source = _opener(spec, "source", spec.source.system, SOURCES)
    open_destination = _opener(spec, "destination", spec.target.system, DESTINATIONS)
    with ExitStack() as stack:
        try:
            state = StateStore(settings.state_url(), dlq_key=settings.dlq_key())
            stack.callback(state.dispose)
            source = stack.enter_context(open_source(spec.source))
            destination = stack.enter_context(open_destination(spec.target))
        except MissingSecret as error:
            raise FlowNotOpened(
                spec.name,
                str(error),
                "set it in this shell's environment, as the code location has it",
            ) from error
        yield source, destination, state
