"""Faults the CRM sandbox can inject, so the client is tested against a misbehaving API.

Set at start (`handoff crm-sandbox --rate-limit 10 --error-rate 0.3 ...`) or at run time
(`POST /_sandbox/faults` with any of the fields below as JSON; `GET` shows them). Applied to the
API's routes only (never to `/_sandbox/`), in this order, as a gateway in front of it would:

1. outage: every request answered 503 for `outage_seconds`, starting after
   `outage_after_requests` more requests (0: now);
2. rate limit: a token bucket of `rate_limit` requests/s holding `rate_burst` (default: one
   second's worth); above it, 429 with `Retry-After` (whole seconds, as HTTP has it);
3. `error_rate`: that share answered 500, 502 or 503, before anything is done;
4. `latency` seconds added to every request; `slow_rate` of them held `slow_seconds` (longer
   than a client's read timeout: a timeout for the client, done late for the server);
5. `reject_rate`: that share of batch-upsert inputs refused one by one, in HubSpot's
   multi-status (207) shape; which inputs is decided by their id, so it stays the same on a
   retry or a rerun (as a CRM-side validation rule would);
6. `drop_rate`: that share of requests processed, then their connection closed without an
   answer (the client cannot know the write happened: what idempotency keys are for);
7. `refuse_reads`: every read of CRM objects (a list, a get, a search, a batch read) answered
   with this 4xx status, after the token is checked, in HubSpot's shape for it: 403
   MISSING_SCOPES (a token without the object type's read scope), 400 VALIDATION_ERROR (a search
   naming a property the CRM does not have), 404 OBJECT_NOT_FOUND (0: off). Writes go through;
8. `refuse_writes`: every write of CRM objects (an upsert, an archive, an association made or
   removed) answered so, reads going through: 403 MISSING_SCOPES (a token without the object
   type's write scope), 401 INVALID_AUTHENTICATION (a token the CRM no longer takes for writes).
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from http import HTTPStatus

SERVER_ERRORS = (500, 502, 503)
# What `refuse_reads` may answer: a client error HTTP names, but the 429 of the rate limit.
REFUSALS = frozenset(status.value for status in HTTPStatus if 400 <= status < 500) - {429}
# What `refuse_writes` may answer: the token's refusals (a write's other 4xx is its records').
WRITE_REFUSALS = frozenset({401, 403})


@dataclass
class Faults:
    rate_limit: float | None = None
    rate_burst: int | None = None
    error_rate: float = 0.0
    latency: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 5.0
    reject_rate: float = 0.0
    drop_rate: float = 0.0
    outage_seconds: float = 0.0
    outage_after_requests: int = 0
    refuse_reads: int = 0
    refuse_writes: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.refuse_reads and self.refuse_reads not in REFUSALS:
            raise ValueError(
                f"refuse_reads must be a 4xx status other than 429 (or 0: off), got "
                f"{self.refuse_reads}"
            )
        if self.refuse_writes and self.refuse_writes not in WRITE_REFUSALS:
            raise ValueError(
                f"refuse_writes must be 401 or 403 (or 0: off), got {self.refuse_writes}"
            )

    @classmethod
    def from_json(cls, body: dict, base: Faults | None = None) -> Faults:
        """`base` with the fields of `body` replaced; unknown fields are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - names)
        if unknown:
            raise ValueError(f"unknown fault settings {unknown}; known: {sorted(names)}")
        return cls(**{**asdict(base or cls()), **body})


@dataclass(frozen=True)
class Verdict:
    """What the gateway does with one request before the API sees it."""

    status: int | None = None  # answer this instead of serving the request
    retry_after: int | None = None
    delay: float = 0.0
    drop: bool = False  # serve it, then close the connection without answering


class FaultInjector:
    def __init__(self, faults: Faults | None = None):
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()
        self.served: list[float] = []  # seconds since start of each request let through
        self.configure(faults or Faults())

    def configure(self, faults: Faults) -> dict[str, object]:
        with self.lock:
            self.faults = faults
            self.random = random.Random(faults.seed)
            self.outage_from = self.counts["requests"] + faults.outage_after_requests
            self.outage_until: float | None = None
            self.tokens = float(self._burst())
            self.refilled = time.monotonic()
            return self.describe()

    def describe(self) -> dict[str, object]:
        return asdict(self.faults)

    def _burst(self) -> int:
        faults = self.faults
        if not faults.rate_limit:
            return 0
        return faults.rate_burst or max(1, math.ceil(faults.rate_limit))

    def judge(self) -> Verdict:
        """The fate of one API request (called as it arrives)."""
        with self.lock:
            now = time.monotonic()
            faults = self.faults
            self.counts["requests"] += 1
            if self._in_outage(now):
                self.counts["outage_503"] += 1
                return Verdict(status=503)
            if faults.rate_limit:
                self.tokens = min(
                    self._burst(), self.tokens + (now - self.refilled) * faults.rate_limit
                )
                self.refilled = now
                if self.tokens < 1:
                    self.counts["throttled_429"] += 1
                    wait = (1 - self.tokens) / faults.rate_limit
                    return Verdict(status=429, retry_after=max(1, math.ceil(wait)))
                self.tokens -= 1
            self.served.append(now - self.started)
            if self.random.random() < faults.error_rate:
                self.counts["injected_5xx"] += 1
                return Verdict(status=self.random.choice(SERVER_ERRORS))
            delay = faults.latency
            if self.random.random() < faults.slow_rate:
                self.counts["slow"] += 1
                delay += faults.slow_seconds
            drop = self.random.random() < faults.drop_rate
            self.counts["dropped"] += drop
            return Verdict(delay=delay, drop=drop)

    def _in_outage(self, now: float) -> bool:
        faults = self.faults
        if not faults.outage_seconds:
            return False
        if self.outage_until is None and self.counts["requests"] > self.outage_from:
            self.outage_until = now + faults.outage_seconds
            self.counts["outages"] += 1
        return self.outage_until is not None and now < self.outage_until

    def refuses(self, object_type: str, id_value: str) -> bool:
        """Whether this batch input is refused; the same input always gets the same answer."""
        rate = self.faults.reject_rate
        if not rate:
            return False
        digest = hashlib.blake2b(
            f"{self.faults.seed}/{object_type}/{id_value}".encode(), digest_size=8
        ).digest()
        refused = int.from_bytes(digest) / 2**64 < rate
        if refused:
            with self.lock:
                self.counts["rejected_inputs"] += 1
        return refused

    def refuses_read(self) -> int:
        """The 4xx status every read of CRM objects is answered with now (0: none)."""
        status = self.faults.refuse_reads
        if status:
            self.count("refused_reads")
        return status

    def refuses_write(self) -> int:
        """The 401 or 403 every write of CRM objects is answered with now (0: none)."""
        status = self.faults.refuse_writes
        if status:
            self.count("refused_writes")
        return status

    def count(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def traffic(self) -> dict[str, object]:
        """Counts by fate; when each request the gateway let through arrived (seconds), the rate
        between the first and the last of them, and the most let through in any one second."""
        with self.lock:
            served = list(self.served)
            counts = dict(self.counts)
        rate = (len(served) - 1) / (served[-1] - served[0]) if len(served) > 1 else 0.0
        return {
            "counts": counts,
            "served_at": served,
            "served_per_second": rate,
            "busiest_second": _busiest_second(served),
        }


def _busiest_second(moments: list[float]) -> int:
    best, first = 0, 0
    for last, moment in enumerate(moments):
        while moment - moments[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best
