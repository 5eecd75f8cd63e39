from __future__ import annotations

import dagster as dg
from pydantic import Field

from integrations.http import ApiLimits, SharedTokenBucket


class ApiResource(dg.ConfigurableResource):
    """What every SaaS-facing resource configures about its transport (integrations/http.py).

    With `requests_per_second` set, every run and process sharing `rate_limit_url` (the state
    store) stays under that limit together; set it to the API's limit.
    """

    base_url: str | None = None
    requests_per_second: float | None = Field(
        default=None, description="The API's request limit; unset: none."
    )
    burst: int = Field(default=1, description="Requests sent at once from a full bucket.")
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

    def bucket(self, system: str, limits: ApiLimits) -> SharedTokenBucket | None:
        """The token bucket every run and process calling this system at this address shares
        (in the state store), or None when no request limit is set."""
        if not limits.requests_per_second:
            return None
        if not self.rate_limit_url:
            raise ValueError("requests_per_second needs rate_limit_url (the state store)")
        name = f"{system} {(self.base_url or '').rstrip('/')}"
        return SharedTokenBucket(self.rate_limit_url, name, limits)
