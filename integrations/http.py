"""The HTTP edge every SaaS connector shares: timeouts, retries, a shared rate limit, a breaker.

One `ApiClient` per system (CRM, helpdesk, ...), built from a name, a base URL, auth headers and
`ApiLimits`::

    limits = ApiLimits(requests_per_second=10, burst=1)
    bucket = SharedTokenBucket(state_url, "crm", limits)        # optional: no limit without it
    api = ApiClient("crm", "https://api.example.com", {"Authorization": "Bearer ..."},
                    limits, bucket=bucket, log=logger)
    response = api.request("POST", "/things/batch", json=body, idempotent=True)
    api.stats()   # requests, retries, 429s, 5xx, time waited for the bucket, circuit state

`request` returns the response of any answer that is not retryable (2xx, 207, 4xx other than
429: the caller reads it) and raises `ApiUnavailable` (or its kind `CircuitOpen`) when the
system cannot be reached. What each attempt goes through, in order:

1. The **circuit breaker** of (system, base URL), shared by the clients of this process: after
   `failures_to_open` consecutive failed attempts (5xx, timeout, dropped connection) it opens and
   calls fail at once, without touching the network, for `open_seconds`; then one probe goes
   through (half-open): success closes it, failure opens it again. Transitions are logged; the
   state is in `stats()` (the asset puts it in its materialization metadata).
2. The **token bucket** (`SharedTokenBucket`): each attempt reserves the next send slot in a
   row of the state store database (one atomic UPDATE … RETURNING on the database's own clock),
   so every process and host using that database stays under the API limit together, in the
   order they asked, without polling. A 429 pushes the shared slot past its Retry-After: every
   process waits, not only the one that was told.
3. The request itself, with a (connect, read) **timeout** on every call.
4. On 429/5xx/timeout/dropped connection: **retry** after Retry-After when the answer carries
   one (one longer than `retry_after_max`, a spent daily quota, stops the call instead: the
   run fails saying so, rather than sleeping for hours), otherwise after an exponential backoff
   with jitter, from the first retry on (urllib3 2.x's own schedule sends the first retry at
   once; `FirstRetryWaits` keeps its schedule but starts it there). urllib3's `Retry` computes
   that schedule; the loop is ours (not urllib3's adapter) because every attempt, retries included,
   must pass the breaker and take a token, which retries inside the adapter would bypass.

A POST is retried after it may have reached the server only when the caller says it is
idempotent (an upsert by natural key, a search) or sends an `Idempotency-Key` (the server then
replays the first answer instead of acting twice). Errors name the system, method and path,
never headers: tokens stay out of logs, exceptions and dead letters.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import takewhile

import requests
import sqlalchemy as sa
from urllib3.exceptions import InvalidHeader, MaxRetryError, NewConnectionError
from urllib3.util.retry import Retry

from integrations.sql.connect import create_engine, raise_on_lost_connection

RETRYABLE = frozenset({429, 500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiLimits:
    """How one system is called: its rate limit, timeouts, retries and circuit breaker."""

    requests_per_second: float | None = None  # None: no client-side limit
    burst: int = 1  # sends allowed at once from a full bucket; keep ≤ the API's own burst
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 8
    backoff: float = 0.25  # first backoff; doubles per retry, plus up to as much jitter
    backoff_max: float = 4.0
    # 8 failures in a row: at 30% independent 5xx that is a 1-in-15,000 event per attempt, so a
    # flaky API does not trip it, while a dead one does within ~12 s of backoff.
    failures_to_open: int = 8
    open_seconds: float = 10.0
    # A longer Retry-After (a daily quota spent, a gateway's hour) stops the call instead: a run
    # asleep for hours holds its flow's lock and its Dagster run for nothing.
    retry_after_max: float = 120.0


class ApiUnavailable(Exception):
    """The system could not be reached, or kept failing after every retry."""


class CircuitOpen(ApiUnavailable):
    """The system's circuit breaker is open: the call was not attempted."""


class RateLimitUnavailable(ApiUnavailable):
    """The shared token bucket's database (the state store) was lost: the call was not sent."""

    def __init__(self, message: str):
        super().__init__(
            f"{message}. What to do: rerun once the state store answers (no call goes out "
            "without its token, so nothing was sent past the limit)"
        )


class FirstRetryWaits(Retry):
    """urllib3's Retry, whose backoff starts at the first retry: urllib3 2.x waits nothing
    before it (its schedule begins at the second), so a server that just failed (a 503 while
    it restarts, a dropped connection) got the same request back at once, a wasted attempt
    that counts toward the breaker. Here the nth consecutive failure waits
    `backoff_factor * 2 ** (n - 1)` plus up to `backoff_jitter`, at most `backoff_max`."""

    def get_backoff_time(self) -> float:
        # The failures in a row since the last redirect, as urllib3 counts them.
        in_a_row = takewhile(lambda error: error.redirect_location is None, reversed(self.history))
        failures = sum(1 for _ in in_a_row)
        if not failures:
            return 0.0
        backoff = self.backoff_factor * 2 ** (failures - 1) + random.random() * self.backoff_jitter
        return float(max(0.0, min(self.backoff_max, backoff)))


# --- circuit breaker ------------------------------------------------------------------------


class CircuitBreaker:
    """Closed → open after N consecutive failures → half-open probe after a pause → closed."""

    def __init__(self, system: str, failures_to_open: int, open_seconds: float, address: str = ""):
        self.system, self.address = system, address
        self.failures_to_open, self.open_seconds = failures_to_open, open_seconds
        self.state = "closed"
        self.consecutive_failures = 0
        self.times_opened = 0
        self.opened_at: float | None = None
        self.last_failure = ""
        # The half-open circuit's probe under way (None: none): only its own attempt gives its
        # place up unanswered (see not_sent).
        self._probe: object | None = None
        self._lock = threading.Lock()

    def before_attempt(self, log: logging.Logger | logging.LoggerAdapter) -> object | None:
        """Let an attempt go, or raise CircuitOpen; returns the probe's token when it is the
        half-open circuit's probe (hand it to `not_sent`)."""
        with self._lock:
            if self.state == "closed":
                return None
            waited = time.monotonic() - (self.opened_at or 0.0)
            if self.state == "open" and waited >= self.open_seconds:
                self.state, self._probe = "half_open", None
                log.info("%s circuit half-open: sending one probe", self.system)
            if self.state == "half_open" and self._probe is None:
                self._probe = object()
                return self._probe
            retry_in = max(0.0, self.open_seconds - waited)
            raise CircuitOpen(
                f"{self.system} circuit open after {self.consecutive_failures} consecutive "
                f"failures{f' talking to {self.address}' if self.address else ''} (last: "
                f"{self.last_failure}); calls fail fast, the next probe goes out in "
                f"{retry_in:.0f} s"
            )

    def succeeded(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        with self._lock:
            if self.state != "closed":
                log.info("%s circuit closed: the probe succeeded", self.system)
            self.state, self.consecutive_failures, self._probe = "closed", 0, None

    def failed(self, what: str, log: logging.Logger | logging.LoggerAdapter) -> None:
        with self._lock:
            self.consecutive_failures += 1
            self.last_failure = what
            tripped = self.consecutive_failures >= self.failures_to_open
            if self.state == "half_open" or (self.state == "closed" and tripped):
                self.state, self.opened_at, self._probe = "open", time.monotonic(), None
                self.times_opened += 1
                log.warning(
                    "%s circuit OPEN after %d consecutive failures (last: %s); failing fast "
                    "for %.0f s, then one probe",
                    self.system,
                    self.consecutive_failures,
                    what,
                    self.open_seconds,
                )

    def not_sent(self, probe: object | None) -> None:
        """The attempt stopped before it had an answer or a failure to report (the shared
        bucket's database failed, an interrupt): a probe it was (`probe`, as `before_attempt`
        gave it) leaves the next call to probe. Any other attempt (one let go while the circuit
        was closed, or the probe of an earlier half-open spell) leaves the probe under way
        alone: freeing its place let a second probe out beside it."""
        with self._lock:
            if probe is not None and probe is self._probe:
                self._probe = None

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "state": self.state,
                "consecutive_failures": self.consecutive_failures,
                "times_opened": self.times_opened,
                "last_failure": self.last_failure or None,
            }


_breakers: dict[tuple[str, str, int, float], CircuitBreaker] = {}
_breakers_lock = threading.Lock()


def breaker_for(system: str, base_url: str, limits: ApiLimits) -> CircuitBreaker:
    """The process's breaker for this system at this address (every client with the same
    breaker settings shares it: a run's later calls fail fast when an earlier one tripped it)."""
    with _breakers_lock:
        key = (system, base_url, limits.failures_to_open, limits.open_seconds)
        if key not in _breakers:
            _breakers[key] = CircuitBreaker(
                system, limits.failures_to_open, limits.open_seconds, address=base_url
            )
        return _breakers[key]


# --- shared token bucket --------------------------------------------------------------------

_buckets = sa.MetaData()
api_rate_limits = sa.Table(
    "api_rate_limits",
    _buckets,
    sa.Column("name", sa.String(120), primary_key=True),
    # The bucket as its "theoretical arrival time" (GCRA): when the next send slot is free,
    # in seconds since the epoch on the database's clock.
    sa.Column("next_free", sa.Float(precision=53), nullable=False),
)

_DATABASE_NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "CAST(extract(epoch from statement_timestamp()) AS DOUBLE PRECISION)",
}


class SharedTokenBucket:
    """A token bucket of `requests_per_second` and `burst`, held in a database row so that every
    process (and host) using the database shares it. `acquire()` reserves a send slot and sleeps
    until it; one short transaction per request (about a millisecond on SQLite or PostgreSQL)."""

    def __init__(self, url: str, name: str, limits: ApiLimits):
        if not limits.requests_per_second:
            raise ValueError("a token bucket needs requests_per_second")
        self.name = name
        self.interval = 1.0 / limits.requests_per_second
        self.tolerance = (max(limits.burst, 1) - 1) * self.interval
        self.engine = create_engine(url)
        # Else SQLAlchemy's error quoting the bucket's UPDATE stopped a run naming no flow.
        raise_on_lost_connection(
            self.engine, RateLimitUnavailable, f"the rate limit of {name}, kept in the state store"
        )
        now = _DATABASE_NOW[self.engine.dialect.name]
        try:
            _buckets.create_all(self.engine)
        except sa.exc.DatabaseError:  # two processes creating it at once: one of them wins
            if not sa.inspect(self.engine).has_table(api_rate_limits.name):
                raise
        try:
            with self.engine.begin() as connection:
                connection.execute(api_rate_limits.insert().values(name=name, next_free=0.0))
        except sa.exc.IntegrityError:
            pass  # another process made the row first
        self._reserve = sa.text(
            f"UPDATE api_rate_limits SET next_free = "
            f"CASE WHEN next_free > {now} THEN next_free ELSE {now} END + :interval "
            f"WHERE name = :name RETURNING next_free, {now}"
        )
        self._push_back = sa.text(
            f"UPDATE api_rate_limits SET next_free = "
            f"CASE WHEN next_free > {now} + :pause THEN next_free ELSE {now} + :pause END "
            f"WHERE name = :name"
        )

    def acquire(self) -> float:
        """Wait for a send slot; returns the seconds waited."""
        with self.engine.begin() as connection:
            next_free, now = connection.execute(
                self._reserve, {"interval": self.interval, "name": self.name}
            ).one()
        slot = next_free - self.interval  # the slot this call reserved
        wait = max(0.0, slot - self.tolerance - now)
        if wait:
            time.sleep(wait)
        return wait

    def push_back(self, seconds: float) -> None:
        """The API said "wait": nobody sharing the bucket sends for `seconds`."""
        with self.engine.begin() as connection:
            # Past the burst tolerance too: the first slot after it is `seconds` away.
            pause = seconds + self.tolerance
            connection.execute(self._push_back, {"pause": pause, "name": self.name})

    def dispose(self) -> None:
        self.engine.dispose()


# --- the client -----------------------------------------------------------------------------


class ApiClient:
    """Requests to one system, through its breaker and bucket, with timeouts and retries."""

    def __init__(
        self,
        system: str,
        base_url: str,
        headers: Mapping[str, str],
        limits: ApiLimits = ApiLimits(),
        *,
        bucket: SharedTokenBucket | None = None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ):
        self.system, self.base_url, self.limits = system, base_url.rstrip("/"), limits
        self.bucket = bucket
        self.log = log or logger
        self.breaker = breaker_for(system, self.base_url, limits)
        self.session = requests.Session()
        self.session.headers.update(headers)
        self.counts: Counter[str] = Counter()
        self.waited = 0.0
        self._retry = FirstRetryWaits(
            total=limits.retries,
            backoff_factor=limits.backoff,
            backoff_max=limits.backoff_max,
            backoff_jitter=limits.backoff,
            status_forcelist=RETRYABLE,
            allowed_methods=None,
            respect_retry_after_header=True,
            raise_on_status=True,
        )

    def close(self) -> None:
        self.session.close()
        if self.bucket is not None:
            self.bucket.dispose()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: Mapping[str, object] | None = None,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> requests.Response:
        """Send, retrying what is safe to retry; returns any non-retryable answer."""
        where = f"{method} {path}"
        url = f"{self.base_url}{path}"
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        repeatable = method in IDEMPOTENT_METHODS or idempotent or bool(idempotency_key)
        retry = self._retry
        while True:
            probe = self.breaker.before_attempt(self.log)
            try:
                if self.bucket is not None:
                    self.waited += self.bucket.acquire()
                response, failure, error = self._attempt(method, url, json, params, headers)
            except BaseException:
                self.breaker.not_sent(probe)  # else the circuit waited for this probe for good
                raise
            if response is not None and response.status_code not in RETRYABLE:
                self.breaker.succeeded(self.log)
                return response
            if response is not None and response.status_code == 429:
                self.breaker.succeeded(self.log)  # throttled means alive, not broken
            else:
                self.breaker.failed(f"{failure} on {where}", self.log)
            if not repeatable and not _never_processed(response, error):
                raise ApiUnavailable(
                    f"{self.system}: {where}: {failure}; not retried: the request may have "
                    "been processed and is not idempotent"
                )
            try:
                retry = retry.increment(
                    method, url, response=response.raw if response is not None else None
                )
            except MaxRetryError:
                raise ApiUnavailable(
                    f"{self.system}: {where}: {failure} after {self.limits.retries + 1} attempts "
                    f"talking to {self.base_url}"
                ) from None
            after = _retry_after(retry, response)
            if after is not None and after > self.limits.retry_after_max:
                raise ApiUnavailable(
                    f"{self.system}: {where}: {failure}, asking to wait {after:.0f} s, longer "
                    f"than a run waits ({self.limits.retry_after_max:.0f} s; a quota spent?); "
                    "rerun once it has passed"
                )
            self.counts["retries"] += 1
            self._pause(retry, after)

    def _attempt(self, method, url, json, params, headers):
        """One request with the timeouts: (response, None, None) or (None, what failed, error)."""
        self.counts["attempts"] += 1
        try:
            response = self.session.request(
                method,
                url,
                json=json,
                params=params,
                headers=headers,
                timeout=(self.limits.connect_timeout, self.limits.read_timeout),
            )
        except requests.RequestException as error:
            self.counts["connection_errors"] += 1
            # Its text can hold the URL but never headers; keep only its kind.
            return None, type(error).__name__, error
        self.counts[f"{response.status_code // 100}xx"] += 1
        if response.status_code in RETRYABLE:
            self.counts[str(response.status_code)] += 1
        return response, f"{response.status_code} {response.reason}", None

    def _pause(self, retry: FirstRetryWaits, after: float | None) -> None:
        """Retry-After when the answer has one (shared through the bucket), else backoff."""
        if after is not None:
            if self.bucket is not None:
                self.bucket.push_back(after)
            else:
                time.sleep(after)
            return
        time.sleep(retry.get_backoff_time())

    def stats(self) -> dict[str, object]:
        """What the calls met: attempts, answers by class, 429s, retries, waits, the circuit."""
        return {
            "system": self.system,
            "requests_per_second_limit": self.limits.requests_per_second,
            "attempts": self.counts["attempts"],
            "retries": self.counts["retries"],
            "answered_429": self.counts["429"],
            "answered_5xx": self.counts["5xx"],
            "connection_errors": self.counts["connection_errors"],
            "rate_limit_wait_seconds": round(self.waited, 3),
            "circuit": self.breaker.snapshot(),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def _retry_after(retry: Retry, response: requests.Response | None) -> float | None:
    """The answer's Retry-After in seconds: whole (as HTTP has it), a date, or decimal (as some
    gateways send it); None without one, or with one that says no sane wait (the backoff then)."""
    if response is None:
        return None
    try:
        return retry.get_retry_after(response.raw)
    except InvalidHeader:  # urllib3 reads whole seconds and dates only: "1.5" raised past us
        try:
            seconds = float(response.headers["Retry-After"])
        except ValueError:
            return None
        return seconds if 0 <= seconds < math.inf else None


def _never_processed(response: requests.Response | None, error: Exception | None) -> bool:
    """A 429, or a connection that was never made: the server did nothing, a resend is safe."""
    if response is not None:
        return response.status_code == 429
    if isinstance(error, requests.ConnectTimeout):
        return True
    reason = getattr(error.args[0], "reason", None) if error and error.args else None
    return isinstance(reason, NewConnectionError)
