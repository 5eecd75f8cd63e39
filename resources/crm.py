from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from integrations.crm.client import CrmClient, shared_bucket
from integrations.crm.destination import CrmObjects
from integrations.engine.spec import Target
from integrations.http import ApiLimits


class CrmResource(dg.ConfigurableResource):
    """A HubSpot-compatible CRM: the local sandbox by default, or a real account.

    With `requests_per_second` set, every run and process sharing `rate_limit_url` (the state
    store) stays under that limit together; set it to the account's API limit.
    """

    base_url: str
    access_token: str = Field(description="Bind to dg.EnvVar('CRM_ACCESS_TOKEN'); never a literal.")
    requests_per_second: float | None = Field(
        default=None, description="The CRM's request limit (HubSpot: 10 to 19); unset: none."
    )
    burst: int = Field(
        default=3,
        description="Requests sent at once from a full bucket: lets a sync catch up after "
        "reading a batch (HubSpot counts per 10 s, so bursts of a few stay within it).",
    )
    rate_limit_url: str | None = Field(
        default=None, description="Database holding the shared token bucket: the state store."
    )
    timeout_seconds: float = 30.0
    max_retries: int = 8
    backoff_seconds: float = 0.25
    circuit_failures: int = Field(default=8, description="Consecutive failures that open it.")
    circuit_open_seconds: float = Field(default=10.0, description="Open this long, then a probe.")

    def limits(self) -> ApiLimits:
        return ApiLimits(
            requests_per_second=self.requests_per_second,
            burst=self.burst,
            read_timeout=self.timeout_seconds,
            retries=self.max_retries,
            backoff=self.backoff_seconds,
            failures_to_open=self.circuit_failures,
            open_seconds=self.circuit_open_seconds,
        )

    @contextmanager
    def destination(self, target: Target, log=None) -> Iterator[CrmObjects]:
        limits = self.limits()
        if limits.requests_per_second and not self.rate_limit_url:
            raise ValueError("requests_per_second needs rate_limit_url (the state store)")
        bucket = shared_bucket(self.rate_limit_url or "", self.base_url, limits)
        client = CrmClient(self.base_url, self.access_token, limits, bucket=bucket, log=log)
        try:
            yield CrmObjects.for_target(client, target)
        finally:
            client.close()
