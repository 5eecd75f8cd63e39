from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from integrations.engine.spec import SourceTable, Target
from integrations.helpdesk.client import RtClient
from integrations.helpdesk.destination import RtUsers
from integrations.helpdesk.source import RtTickets
from resources.api import ApiResource


class HelpdeskResource(ApiResource):
    """Request Tracker 5 over REST2: basic auth (RT_USER/RT_PASSWORD) or an auth token (RT_TOKEN).
    Unset `base_url` (RT_BASE_URL) means there is no helpdesk."""

    user: str | None = Field(default=None, description="Bind to dg.EnvVar('RT_USER').")
    password: str | None = Field(default=None, description="Bind to dg.EnvVar('RT_PASSWORD').")
    token: str | None = Field(default=None, description="Bind to dg.EnvVar('RT_TOKEN').")

    @contextmanager
    def client(self, log=None) -> Iterator[RtClient]:
        if not self.base_url:
            raise dg.Failure(
                description="the helpdesk is not configured: set RT_BASE_URL (and RT_USER/"
                "RT_PASSWORD or RT_TOKEN); `scripts/rt start` serves a local RT"
            )
        limits = self.limits()
        client = RtClient(
            self.base_url,
            user=self.user,
            password=self.password,
            token=self.token,
            limits=limits,
            bucket=self.bucket("rt", limits),
            log=log,
        )
        try:
            yield client
        finally:
            client.close()

    @contextmanager
    def destination(self, target: Target, log=None) -> Iterator[RtUsers]:
        if target.dataset != "users":
            raise ValueError(f"RT offers users as a destination, not {target.dataset!r}")
        with self.client(log) as client:
            yield RtUsers(client, target.id_property)

    @contextmanager
    def source(self, table: SourceTable, log=None) -> Iterator[RtTickets]:
        if table.table != "tickets":
            raise ValueError(f"RT offers tickets as a source, not {table.table!r}")
        with self.client(log) as client:
            yield RtTickets(client, table)
