from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import Field

from integrations.crm.client import CrmClient
from integrations.crm.destination import CrmObjects
from integrations.engine.spec import Target
from resources.api import ApiResource


class CrmResource(ApiResource):
    """A HubSpot-compatible CRM: the local sandbox by default, or a real account (HubSpot's
    request limit: 10 to 19 a second)."""

    base_url: str
    access_token: str = Field(description="Bind to dg.EnvVar('CRM_ACCESS_TOKEN'); never a literal.")

    @contextmanager
    def destination(self, target: Target, log=None) -> Iterator[CrmObjects]:
        limits = self.limits()
        bucket = self.bucket("crm", limits)
        client = CrmClient(self.base_url, self.access_token, limits, bucket=bucket, log=log)
        try:
            yield CrmObjects.for_target(client, target)
        finally:
            client.close()
