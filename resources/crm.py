from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from integrations.crm.client import CrmClient
from integrations.crm.destination import CrmObjects
from integrations.engine.spec import Target


class CrmResource(dg.ConfigurableResource):
    """A HubSpot-compatible CRM: the local sandbox by default, or a real account."""

    base_url: str
    access_token: str = Field(description="Bind to dg.EnvVar('CRM_ACCESS_TOKEN'); never a literal.")
    timeout_seconds: float = 30.0
    max_retries: int = 6

    @contextmanager
    def destination(self, target: Target) -> Iterator[CrmObjects]:
        client = CrmClient(
            self.base_url, self.access_token, timeout=self.timeout_seconds, retries=self.max_retries
        )
        try:
            yield CrmObjects.for_target(client, target)
        finally:
            client.close()
