from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from integrations.engine.spec import Target
from integrations.helpdesk.client import RtClient
from integrations.helpdesk.destination import RtUsers


class HelpdeskResource(dg.ConfigurableResource):
    """Request Tracker 5 over REST2: basic auth (RT_USER/RT_PASSWORD) or an auth token (RT_TOKEN)."""

    base_url: str | None = Field(
        default=None, description="Bind to dg.EnvVar('RT_BASE_URL'); unset means no helpdesk."
    )
    user: str | None = Field(default=None, description="Bind to dg.EnvVar('RT_USER').")
    password: str | None = Field(default=None, description="Bind to dg.EnvVar('RT_PASSWORD').")
    token: str | None = Field(default=None, description="Bind to dg.EnvVar('RT_TOKEN').")
    timeout_seconds: float = 30.0
    max_retries: int = 6

    @contextmanager
    def client(self) -> Iterator[RtClient]:
        if not self.base_url:
            raise dg.Failure(
                description="the helpdesk is not configured: set RT_BASE_URL (and RT_USER/"
                "RT_PASSWORD or RT_TOKEN); `scripts/rt start` serves a local RT"
            )
        client = RtClient(
            self.base_url,
            user=self.user,
            password=self.password,
            token=self.token,
            timeout=self.timeout_seconds,
            retries=self.max_retries,
        )
        try:
            yield client
        finally:
            client.close()

    @contextmanager
    def destination(self, target: Target) -> Iterator[RtUsers]:
        if target.dataset != "users":
            raise ValueError(f"RT offers users as a destination, not {target.dataset!r}")
        with self.client() as client:
            yield RtUsers(client, target.id_property)
