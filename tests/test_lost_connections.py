"""Databases that go away mid-run: the ERP drops the connection mid-extract, the state store
becomes unreachable mid-commit. The run stops with a clear error, the rerun completes, and
nothing is lost or duplicated."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from integrations.crm.client import CrmClient, shared_bucket
from integrations.engine.errors import SyncError
from integrations.http import ApiLimits
from tests.conftest import POSTGRES_ADMIN, _world
from tests.contacts import sync
from tests.expectations import assert_crm_matches_erp

pytestmark = pytest.mark.postgres


@pytest.fixture
def world(request, tmp_path, crm_sandbox, crm_token, monkeypatch):
    """The PostgreSQL world (ERP and state): sessions there can be cut from outside."""
    return _world(request, tmp_path, crm_sandbox, crm_token, monkeypatch, "postgres")


def terminate(connection: sa.Connection) -> None:
    """What a database restart or a network cut does to one session."""
    pid = connection.connection.dbapi_connection.info.backend_pid
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def cut(engine: sa.Engine, statement_start: str, nth: int, event: str) -> list[int]:
    """Terminate the session that runs the n-th statement starting with `statement_start`."""
    seen = [0]

    @sa.event.listens_for(engine, event)
    def _(conn, cursor, statement, *args):
        if " ".join(statement.split()).startswith(statement_start):
            seen[0] += 1
            if seen[0] == nth:
                terminate(conn)

    return seen


def test_a_connection_dropped_between_batches_is_replaced(world, erp, crm_client, state):
    returned = [0]

    @sa.event.listens_for(erp.pool, "checkin")
    def _(dbapi_connection, record):
        returned[0] += 1
        if returned[0] == 2 and dbapi_connection is not None:  # idle in the pool, then cut
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
                pid = dbapi_connection.info.backend_pid
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    result = sync(erp, crm_client, state)
    assert returned[0] > 2, "the cut happened before the extract ended"
    assert result.batches == 3 and result.counts["read"] == 3000
    assert_crm_matches_erp(world.erp_url, crm_client)


def test_the_erp_lost_mid_extract_stops_the_run_clearly_and_the_rerun_completes(
    world, erp, crm_client, state
):
    """The classic extract streams through one server-side cursor: its session is cut once the
    first batch is committed, while the stream still has rows to give. (The Arrow read takes a
    table this small in one go: its lost stream is in tests/test_sql_arrow_reads.py.)"""
    streaming, cuts = [], []

    @sa.event.listens_for(erp, "before_cursor_execute")
    def _(conn, cursor, statement, *args):
        if "ORDER BY" in statement and "FROM customers" in statement:
            streaming.append(conn.connection.dbapi_connection.info.backend_pid)

    @sa.event.listens_for(state.engine, "after_cursor_execute")
    def _(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO cursors") and streaming and not cuts:
            cuts.append(streaming[-1])
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (cuts[0],))

    with pytest.raises(SyncError) as stopped:
        sync(erp, crm_client, state, arrow=False)
    message = str(stopped.value)
    assert "flow erp_customers_to_crm_contacts" in message
    assert "the source database of customers" in message and "failed" in message
    assert "rerun when the source answers" in message
    # The cut fired once; the rerun runs on a healthy ERP.
    again = sync(erp, crm_client, state, run_id="run-2")
    assert again.counts["read"] > 0
    assert_crm_matches_erp(world.erp_url, crm_client)


@pytest.mark.parametrize("batch", [2, 3], ids=["a-middle-batch", "the-last-batch"])
def test_the_state_store_lost_mid_commit_stops_the_run_and_the_rerun_completes(
    world, erp, crm_client, state, batch
):
    """Cut in the commit of batch 2 or 3 of 3, after its ledger rows: the last batch's commit
    fails while the run is already waiting for it, and must stop it all the same."""
    cut(state.engine, "LOCK TABLE audit_log", batch, "before_cursor_execute")
    with pytest.raises(SyncError) as stopped:
        sync(erp, crm_client, state)
    message = str(stopped.value)
    assert "the state store" in message and "failed" in message
    assert "upserts make that harmless" in message
    sent = world.crm.store.stats()["upsert_inputs"]
    sync(erp, crm_client, state, run_id="run-2")
    assert world.crm.store.stats()["upsert_inputs"] > sent, "the lost batch was sent again"
    assert_crm_matches_erp(world.erp_url, crm_client)
    assert sync(erp, crm_client, state, run_id="run-3").written == 0


def test_the_state_store_lost_as_a_call_takes_its_rate_limit_token_stops_the_run_clearly(
    world, erp, state
):
    """The shared rate limit's bucket is a row of the state store: its session cut as a CRM call
    took a token, SQLAlchemy's OperationalError came through as it was, quoting the bucket's
    UPDATE, naming no flow and nothing to do."""
    limits = ApiLimits(requests_per_second=1000, retries=2, backoff=0.05)
    bucket = shared_bucket(world.state_url, world.crm.base_url, limits)
    crm = CrmClient(world.crm.base_url, world.token, limits, bucket=bucket)
    try:
        cut(bucket.engine, "UPDATE api_rate_limits", 3, "before_cursor_execute")
        with pytest.raises(SyncError) as stopped:
            sync(erp, crm, state)
        message = str(stopped.value)
        assert "flow erp_customers_to_crm_contacts" in message
        assert "the state store" in message and "What to do:" in message
        assert "UPDATE api_rate_limits" not in message
        assert sync(erp, crm, state, run_id="run-2").counts["read"] > 0
        assert_crm_matches_erp(world.erp_url, crm)
    finally:
        crm.close()
