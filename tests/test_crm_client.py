"""The client copes with the sandbox's injected faults: 429 + Retry-After, 5xx, timeouts,
outages (circuit breaker), lost answers (idempotency keys), and a rate limit shared by clients."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import sqlalchemy as sa

from integrations.crm.client import (
    CrmAuthError,
    CrmClient,
    CrmEndpointNotFound,
    CrmReadRefused,
    CrmRequestRejected,
    CrmUnavailable,
)
from integrations.http import ApiClient, ApiLimits, ApiUnavailable, SharedTokenBucket
from integrations.sql.connect import create_engine
from tests.sandbox_faults import set_faults

QUICK = ApiLimits(backoff=0.02, backoff_max=0.2)


def counts(sandbox) -> dict[str, int]:
    return sandbox.faults.traffic()["counts"]


def contacts(start: int, n: int = 5) -> list[dict]:
    return [
        {"id": f"C{i:07d}", "properties": {"email": f"p{i}@example.com"}}
        for i in range(start, start + n)
    ]


def client(sandbox, token: str, limits: ApiLimits = QUICK, **kwargs) -> CrmClient:
    return CrmClient(sandbox.base_url, token, limits, **kwargs)


def test_429_waits_as_long_as_retry_after_says(crm_sandbox, crm_token):
    set_faults(crm_sandbox, crm_token, rate_limit=1, rate_burst=1)
    crm = client(crm_sandbox, crm_token)
    started = time.monotonic()
    crm.batch_upsert("contacts", "erp_customer_id", contacts(0))
    crm.batch_upsert("contacts", "erp_customer_id", contacts(5))
    assert time.monotonic() - started >= 0.95, "Retry-After: 1 was honoured"
    assert crm.api.stats()["answered_429"] == 1
    assert len(list(crm.list_objects("contacts"))) == 10


def test_a_retry_after_longer_than_a_run_waits_stops_the_call_saying_so(crm_sandbox, crm_token):
    """A 429 asking to wait a quarter of an hour (a quota spent) was slept through, the run
    holding its flow and its Dagster run all the while."""
    set_faults(crm_sandbox, crm_token, rate_limit=0.001, rate_burst=1)
    crm = client(crm_sandbox, crm_token)
    crm.batch_upsert("contacts", "erp_customer_id", contacts(0))
    outcome: list[BaseException] = []

    def second_call() -> None:
        try:
            crm.batch_upsert("contacts", "erp_customer_id", contacts(5))
        except BaseException as error:
            outcome.append(error)

    waiting = threading.Thread(target=second_call, daemon=True)
    waiting.start()
    waiting.join(timeout=10)
    assert not waiting.is_alive(), "the call slept through Retry-After: 1000"
    (error,) = outcome
    assert isinstance(error, CrmUnavailable | ApiUnavailable)
    assert "asking to wait 1000 s, longer than a run waits (120 s" in str(error)


class FailsOnce(BaseHTTPRequestHandler):
    """Answers the server's `status` once (with its `retry_after` text, when it has one), then
    200; `seen` holds when each request arrived."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(time.monotonic())
        first = len(self.server.seen) == 1
        self.send_response(self.server.status if first else 200)
        if first and self.server.retry_after is not None:
            self.send_header("Retry-After", self.server.retry_after)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_args):
        pass


def failing_once(
    status: int, retry_after: str | None, limits: ApiLimits
) -> tuple[CrmClient, list[float]]:
    """A batch archive against a server that answers `status` once: the client, and when each
    of its requests arrived."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailsOnce)
    server.seen, server.status, server.retry_after = [], status, retry_after
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        crm = CrmClient(f"http://127.0.0.1:{server.server_port}", "s3cret-token", limits)
        crm.batch_archive("contacts", ["1"])
    finally:
        server.shutdown()
        server.server_close()
    return crm, server.seen


@pytest.mark.parametrize(("retry_after", "waited"), [("0.6", 0.55), ("soon", 0.0)])
def test_a_retry_after_that_is_not_whole_seconds_is_waited_or_backed_off_not_a_crash(
    retry_after, waited
):
    """A gateway's "Retry-After: 0.6" (or one not a number) raised urllib3's InvalidHeader out of
    the client: the call was not retried and the run failed naming neither system nor call."""
    crm, (first, second) = failing_once(429, retry_after, QUICK)
    assert second - first >= waited
    assert crm.api.stats()["answered_429"] == 1 and crm.api.stats()["retries"] == 1


@pytest.mark.parametrize("status", [503, 429])
def test_the_first_retry_waits_the_backoff_too(status):
    """urllib3 2.x's backoff is 0 before the first retry: a 503 without Retry-After (or a 429
    without one) was sent again at once, the server given no time to recover."""
    crm, (first, second) = failing_once(status, None, ApiLimits(backoff=0.3, backoff_max=2))
    assert second - first >= 0.3, "the first retry waited the first backoff"
    assert crm.api.stats()["retries"] == 1


@pytest.mark.parametrize(
    ("status", "said", "todo"),
    [
        (403, "403 MISSING_SCOPES: This app hasn't been granted", "crm.objects.contacts.read"),
        (400, "400 VALIDATION_ERROR: There was a problem", "properties the flow reads"),
        (404, "404 OBJECT_NOT_FOUND: Not Found", "CRM_BASE_URL"),
    ],
)
def test_a_read_the_crm_refuses_says_what_it_answered_and_is_not_retried(
    crm_sandbox, crm_token, status, said, todo
):
    """A 403 (a token without the read scope) on a search was reported as the CRM refusing the
    token, a 400 or 404 as a refusal of records; the source called each "unavailable, rerun"."""
    crm = client(crm_sandbox, crm_token)
    crm.batch_upsert("contacts", "erp_customer_id", contacts(0))  # writes still go through
    set_faults(crm_sandbox, crm_token, refuse_reads=status)
    for read in (
        lambda: list(crm.search_modified_since("contacts", datetime(2000, 1, 1))),
        lambda: crm.newest_modification("contacts"),
        lambda: list(crm.list_objects("contacts")),
        lambda: crm.batch_read("contacts", ["1"]),
    ):
        with pytest.raises(CrmReadRefused) as refused:
            read()
        assert refused.value.status == status and said in str(refused.value)
        assert todo in refused.value.todo and crm_token not in str(refused.value)
    assert "required scopes: crm.objects.contacts.read" in str(refused.value) or status != 403
    assert counts(crm_sandbox)["refused_reads"] == 4, "each read asked once: no retries"
    assert crm.api.stats()["retries"] == 0


@pytest.mark.parametrize(
    ("status", "said", "todo"),
    [
        (
            403,
            "the CRM refused the write: 403 MISSING_SCOPES: This app hasn't been granted",
            "give the CRM token (CRM_ACCESS_TOKEN, its app) the scope the CRM names, e.g. "
            "crm.objects.contacts.write",
        ),
        (
            401,
            "the CRM refused the access token: 401 INVALID_AUTHENTICATION: Authentication "
            "credentials not found or invalid",
            "check CRM_ACCESS_TOKEN: the CRM refused the token",
        ),
    ],
)
def test_a_write_the_crm_refuses_for_the_token_says_what_it_answered_and_what_to_fix(
    crm_sandbox, crm_token, status, said, todo
):
    """A 403 on a write (a token without the write scope) was "the CRM refused the access token
    (403)", without the CRM's words or the scope it names, and handed on as an outage."""
    crm = client(crm_sandbox, crm_token)
    crm.batch_upsert("contacts", "erp_customer_id", contacts(0))
    ids = [item["id"] for item in crm.list_objects("contacts")]
    set_faults(crm_sandbox, crm_token, refuse_writes=status)
    for write in (
        lambda: crm.batch_upsert("contacts", "erp_customer_id", contacts(5)),
        lambda: crm.batch_archive("contacts", ids[:1]),
        lambda: crm.associate("contacts", "companies", [(ids[0], "1")], "key-1"),
        lambda: crm.dissociate("contacts", "companies", [(ids[0], "1")]),
    ):
        with pytest.raises(CrmAuthError) as refused:
            write()
        assert refused.value.status == status and said in str(refused.value)
        assert todo in refused.value.todo and crm_token not in str(refused.value)
    assert "required scopes: crm.objects.contacts.write" in str(refused.value) or status != 403
    assert len(list(crm.list_objects("contacts"))) == 5, "reads go through, nothing written"
    assert counts(crm_sandbox)["refused_writes"] == 4, "each write asked once: no retries"
    assert crm.api.stats()["retries"] == 0


def test_a_write_or_lookup_under_a_base_url_the_crm_has_no_api_at_is_the_endpoints_404(
    crm_sandbox, crm_token
):
    """CRM_BASE_URL with a path segment too: every write and every lookup of linked objects was
    answered 404, taken as a refusal of the request's records (each then dead-lettered); it is
    the endpoint's, saying to check CRM_BASE_URL, asked once."""
    wrong = f"{crm_sandbox.base_url}/v9"
    crm = CrmClient(wrong, crm_token, QUICK)
    for call, path in (
        (
            lambda: crm.batch_upsert("contacts", "erp_customer_id", contacts(0)),
            "/crm/v3/objects/contacts/batch/upsert",
        ),
        (
            lambda: crm.batch_read_ids("contacts", "erp_customer_id", ["C0000001"]),
            "/crm/v3/objects/contacts/batch/read",
        ),
        (lambda: crm.batch_archive("contacts", ["1"]), "/crm/v3/objects/contacts/batch/archive"),
        (
            lambda: crm.associate("contacts", "companies", [("1", "2")], "key-1"),
            "/crm/v4/associations/contacts/companies/batch/associate/default",
        ),
    ):
        with pytest.raises(CrmEndpointNotFound) as missing:
            call()
        assert str(missing.value).startswith(
            f"POST {path}: the CRM has no such endpoint: 404 OBJECT_NOT_FOUND: no route for POST "
            f"/v9{path}"
        )
        assert missing.value.todo.startswith("check that CRM_BASE_URL is the CRM's API root")
        assert missing.value.todo.endswith(f"CRM_BASE_URL is now {wrong}")
    assert crm.api.stats()["retries"] == 0
    assert not list(client(crm_sandbox, crm_token).list_objects("contacts"))


class NoneOfTheObjects(BaseHTTPRequestHandler):
    """A CRM answering a batch read of objects none of which it has with HubSpot's 404, which
    lists their ids in its context."""

    def do_POST(self):
        inputs = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        body = json.dumps(
            {
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": "Could not get some CONTACT objects, they may be deleted or not exist.",
                "context": {"ids": [item["id"] for item in inputs["inputs"]]},
            }
        ).encode()
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


def test_a_404_naming_the_objects_looked_up_stays_a_refusal_of_those_records():
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoneOfTheObjects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        crm = CrmClient(f"http://127.0.0.1:{server.server_port}", "token", QUICK)
        with pytest.raises(CrmRequestRejected, match="404 OBJECT_NOT_FOUND: Could not get some"):
            crm.batch_read_ids("contacts", "erp_customer_id", ["C0000001"])
    finally:
        server.shutdown()
        server.server_close()


class QuotingRefusal(BaseHTTPRequestHandler):
    """A CRM whose refusal (`status`) quotes the request's token and a person's email address."""

    status = 400

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        token = self.headers["Authorization"].removeprefix("Bearer ")
        body = json.dumps(
            {
                "status": "error",
                "category": "VALIDATION_ERROR",
                "message": f"token {token} may not filter on email = ada.lovelace@example.com",
            }
        ).encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


class QuotingScopeRefusal(QuotingRefusal):
    status = 403


@pytest.mark.parametrize(
    ("handler", "call", "kind"),
    [
        (QuotingRefusal, lambda crm: crm.newest_modification("contacts"), CrmReadRefused),
        (
            QuotingScopeRefusal,
            lambda crm: crm.batch_upsert("contacts", "erp_customer_id", contacts(0)),
            CrmAuthError,
        ),
    ],
)
def test_a_refusal_quoting_the_token_or_an_email_keeps_both_masked(handler, call, kind):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        crm = CrmClient(f"http://127.0.0.1:{server.server_port}", "s3cret-token", QUICK)
        with pytest.raises(kind) as refused:
            call(crm)
    finally:
        server.shutdown()
        server.server_close()
    text = str(refused.value)
    assert (
        f"{handler.status} VALIDATION_ERROR: token *** may not filter on email = a***@e***.com"
        in text
    )
    assert "s3cret-token" not in text and "ada.lovelace" not in text


def test_5xx_and_slow_answers_are_retried_until_they_succeed(crm_sandbox, crm_token):
    set_faults(crm_sandbox, crm_token, error_rate=0.4, slow_rate=0.2, slow_seconds=0.6, seed=3)
    crm = client(crm_sandbox, crm_token, ApiLimits(backoff=0.02, read_timeout=0.3))
    for start in range(0, 100, 10):
        crm.batch_upsert("contacts", "erp_customer_id", contacts(start, 10))
    stats = crm.api.stats()
    assert stats["answered_5xx"] > 0 and stats["connection_errors"] > 0, "timeouts happened"
    assert stats["retries"] == stats["answered_5xx"] + stats["connection_errors"]
    assert stats["circuit"]["state"] == "closed"
    set_faults(crm_sandbox, crm_token, error_rate=0, slow_rate=0)
    numbers = [c["properties"]["erp_customer_id"] for c in crm.list_objects("contacts")]
    assert sorted(numbers) == [f"C{i:07d}" for i in range(100)], "each once, none lost"


def test_an_outage_opens_the_circuit_then_calls_fail_fast_until_a_probe_succeeds(
    crm_sandbox, crm_token, caplog
):
    crm = client(
        crm_sandbox,
        crm_token,
        ApiLimits(backoff=0.05, backoff_max=0.1, failures_to_open=3, open_seconds=0.5),
    )
    set_faults(crm_sandbox, crm_token, outage_seconds=1.5)
    with caplog.at_level(logging.INFO, logger="integrations.http"):
        with pytest.raises(CrmUnavailable, match="circuit open after 3 consecutive") as caught:
            crm.batch_upsert("contacts", "erp_customer_id", contacts(0))
        assert crm_token not in str(caught.value)
        seen = counts(crm_sandbox)["requests"]
        with pytest.raises(CrmUnavailable, match="circuit open"):
            crm.batch_upsert("contacts", "erp_customer_id", contacts(0))
        assert counts(crm_sandbox)["requests"] == seen, "an open circuit does not call the CRM"
        time.sleep(1.6)
        crm.batch_upsert("contacts", "erp_customer_id", contacts(0))
    assert crm.api.stats()["circuit"] | {"last_failure": None} == {
        "state": "closed",
        "consecutive_failures": 0,
        "times_opened": 1,
        "last_failure": None,
    }
    logged = caplog.text
    assert "crm circuit OPEN after 3 consecutive failures" in logged
    assert "half-open" in logged and "crm circuit closed" in logged


def test_a_probe_stopped_before_it_was_sent_lets_the_next_call_probe(
    crm_sandbox, crm_token, tmp_path
):
    """The circuit is due a probe, and the shared bucket's state store fails as the probe takes
    its token: once the store is back, calls reach the CRM again (they failed fast for good)."""
    limits = ApiLimits(
        requests_per_second=1000, retries=0, failures_to_open=2, open_seconds=0.3, backoff=0.01
    )
    state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    crm = client(crm_sandbox, crm_token, limits, bucket=SharedTokenBucket(state_url, "crm", limits))
    set_faults(crm_sandbox, crm_token, outage_seconds=0.5)
    for _ in range(2):
        with pytest.raises(CrmUnavailable, match="503"):
            list(crm.list_objects("contacts"))
    assert crm.api.stats()["circuit"]["state"] == "open"
    time.sleep(0.6)  # the outage is over; the next call is the probe
    state = create_engine(state_url)
    with state.begin() as connection:
        connection.execute(sa.text("ALTER TABLE api_rate_limits RENAME TO away"))
    with pytest.raises(sa.exc.OperationalError):
        list(crm.list_objects("contacts"))
    with state.begin() as connection:
        connection.execute(sa.text("ALTER TABLE away RENAME TO api_rate_limits"))
    state.dispose()
    time.sleep(0.4)
    assert list(crm.list_objects("contacts")) == []
    assert crm.api.stats()["circuit"]["state"] == "closed"


def test_a_call_that_took_its_token_before_the_circuit_opened_leaves_its_probe_alone(
    crm_sandbox, crm_token, tmp_path
):
    """A call waits for its token while an outage opens the circuit and a probe goes out; its
    token then fails (the shared bucket's state store locked, then changed). Its "not sent" let
    go of the probe's place, not its own: the next call probed too, two at once."""
    limits = ApiLimits(
        requests_per_second=1000, retries=0, failures_to_open=2, open_seconds=0.4, backoff=0.01
    )
    path = tmp_path / "state.sqlite"
    waiting = client(
        crm_sandbox, crm_token, limits, bucket=SharedTokenBucket(f"sqlite:///{path}", "crm", limits)
    )
    crm = client(crm_sandbox, crm_token, limits)  # the same CRM and settings: the same breaker
    outcomes: dict[str, object] = {}

    def call(name: str, on: CrmClient) -> threading.Thread:
        def run() -> None:
            try:
                outcomes[name] = list(on.list_objects("contacts"))
            except Exception as error:
                outcomes[name] = error

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the bucket's store busy: the call waits for its token
    holder.execute("ALTER TABLE api_rate_limits RENAME TO away")
    stuck = call("stuck", waiting)
    time.sleep(0.3)
    set_faults(crm_sandbox, crm_token, outage_seconds=0.3)
    for _ in range(2):
        with pytest.raises(CrmUnavailable, match="503"):
            list(crm.list_objects("contacts"))
    time.sleep(0.5)  # the outage is over and the circuit due a probe
    set_faults(crm_sandbox, crm_token, latency=1.5)
    probe = call("probe", crm)
    time.sleep(0.3)
    holder.execute("COMMIT")  # the waiting call's token fails: it was never sent
    stuck.join(timeout=10)
    assert isinstance(outcomes["stuck"], sa.exc.OperationalError)
    assert crm.api.stats()["circuit"]["state"] == "half_open"
    with pytest.raises(CrmUnavailable, match="circuit open"):
        list(crm.list_objects("contacts"))
    probe.join(timeout=10)
    assert outcomes["probe"] == [] and crm.api.stats()["circuit"]["state"] == "closed"
    holder.close()


def test_a_closed_port_is_unavailable_not_a_crash():
    crm = CrmClient("http://127.0.0.1:9", "s3cret-token", ApiLimits(retries=1, backoff=0.01))
    with pytest.raises(CrmUnavailable, match="ConnectionError after 2 attempts") as caught:
        crm.batch_archive("contacts", ["1"])
    assert "s3cret-token" not in str(caught.value)


def test_a_post_that_is_not_idempotent_is_not_sent_twice(crm_sandbox, crm_token):
    set_faults(crm_sandbox, crm_token, drop_rate=1.0)
    api = ApiClient("crm", crm_sandbox.base_url, {"Authorization": f"Bearer {crm_token}"}, QUICK)
    with pytest.raises(ApiUnavailable, match="not retried"):
        api.request("POST", "/crm/v3/objects/contacts/search", json={"limit": 1})
    assert counts(crm_sandbox)["requests"] == 1


def test_a_lost_answer_is_replayed_by_its_idempotency_key_not_repeated(crm_sandbox, crm_token):
    crm = client(crm_sandbox, crm_token, ApiLimits(retries=2, backoff=0.01))
    made = crm.batch_upsert("contacts", "erp_customer_id", contacts(0, 3)).results
    a, b, c = (item["id"] for item in made)
    set_faults(crm_sandbox, crm_token, drop_rate=1.0)
    with pytest.raises(CrmUnavailable):
        crm.associate("contacts", "contacts", [(a, b)], idempotency_key="k-1")
    assert counts(crm_sandbox)["idempotent_replays"] == 2, "the retries were replayed"
    set_faults(crm_sandbox, crm_token, drop_rate=0.0)
    replayed = requests.post(
        f"{crm_sandbox.base_url}/crm/v4/associations/contacts/contacts/batch/associate/default",
        json={"inputs": [{"from": {"id": a}, "to": {"id": b}}]},
        headers={"Authorization": f"Bearer {crm_token}", "Idempotency-Key": "k-1"},
        timeout=5,
    )
    assert replayed.status_code == 200 and replayed.headers["Idempotent-Replayed"] == "true"
    assert [int(b)] == [int(i) for i in crm.associated_ids("contacts", a, "contacts")]
    with pytest.raises(CrmRequestRejected) as reused:
        crm.associate("contacts", "contacts", [(a, c)], idempotency_key="k-1")
    assert reused.value.status == 422 and "different request" in str(reused.value)


def test_a_removed_association_can_be_removed_again_and_others_stay(crm_sandbox, crm_token):
    crm = client(crm_sandbox, crm_token)
    a, b, c = (
        item["id"]
        for item in crm.batch_upsert("contacts", "erp_customer_id", contacts(0, 3)).results
    )
    crm.associate("contacts", "contacts", [(a, b), (a, c)], idempotency_key="k-2")
    for _ in range(2):  # a retry after a lost answer: nothing left to remove, no error
        crm.dissociate("contacts", "contacts", [(a, b)])
        assert crm.associated_ids("contacts", a, "contacts") == [c]


def test_clients_sharing_a_bucket_stay_under_the_limit_together(crm_sandbox, crm_token, tmp_path):
    set_faults(crm_sandbox, crm_token, rate_limit=20)
    limits = ApiLimits(requests_per_second=20, backoff=0.02)
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    clients = [
        client(crm_sandbox, crm_token, limits, bucket=SharedTokenBucket(url, "crm", limits))
        for _ in range(2)
    ]

    def send(crm: CrmClient, first: int) -> None:
        for start in range(first, first + 100, 5):
            crm.batch_upsert("contacts", "erp_customer_id", contacts(start))

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(c, n * 100)) for n, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    assert counts(crm_sandbox).get("throttled_429", 0) == 0
    assert 1.8 <= seconds < 4, f"40 requests at 20/s took {seconds:.2f} s"
    print(f"\n2 clients, 40 requests, shared 20/s bucket: {seconds:.2f} s, no 429")
