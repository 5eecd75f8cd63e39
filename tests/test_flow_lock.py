"""One run, repair or replay of a flow at a time, across processes: a second one waits for the
first, and stops with what to do when it waits too long; a killed holder holds nothing. Real
SQLite and PostgreSQL state stores, real processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa

from integrations.engine.errors import SyncError
from integrations.engine.state import FlowBusy, StateStore
from integrations.sql.connect import create_engine
from tests.conftest import DLQ_KEY, POSTGRES_ADMIN
from tests.test_sql_cursors import SPEC, source_lines, syncing


def end_lock_sessions(url: str) -> None:
    """End the sessions that hold advisory locks in the database at `url`, as a state store's
    restart or a dropped connection would: their flow locks go with them."""
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND database = (SELECT oid FROM pg_database WHERE datname = %s)",
            (url.rsplit("/", 1)[1],),
        )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_database")()
    else:
        url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    state = StateStore(url, dlq_key=DLQ_KEY)
    yield state
    state.dispose()


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'lines.sqlite'}")
    source_lines(engine, [datetime(2025, 1, 1) + timedelta(minutes=n) for n in range(3)])
    yield engine
    engine.dispose()


def test_a_second_run_of_a_flow_waits_for_the_first(engine, store):
    other_run_ends = threading.Event()
    held = threading.Event()

    def other_run() -> None:
        with store.flow_lock(SPEC.name, wait=0):
            held.set()
            other_run_ends.wait(30)

    holder = threading.Thread(target=other_run)
    holder.start()
    assert held.wait(10)
    outcome: list[object] = []

    def second_run() -> None:
        with syncing(engine, store) as sync:
            outcome.append(sync.run())

    waiting = threading.Thread(target=second_run)
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive() and not outcome and store.count_synced(SPEC.name) == 0
    other_run_ends.set()
    holder.join()
    waiting.join(30)
    assert outcome and outcome[0].written == 3


def test_a_run_that_waits_too_long_stops_with_what_to_do_and_writes_nothing(engine, store):
    with store.flow_lock(SPEC.name, wait=0), syncing(engine, store) as sync:
        sync.lock_wait = 0.3
        with pytest.raises(SyncError) as stopped:
            sync.run()
    error = stopped.value
    assert error.flow == SPEC.name and "another run, repair or replay" in error.what
    assert "then rerun" in error.todo
    assert store.count_synced(SPEC.name) == 0 and not sa.inspect(engine).has_table("ledger_lines")
    with syncing(engine, store) as sync:  # its holder gone, the flow runs
        assert sync.run().written == 3


def test_a_killed_holder_holds_nothing(engine, store):
    """A run killed mid-flight (OOM, a redeploy): its lock goes with its process."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from integrations.engine.state import StateStore\n"
            "store = StateStore(sys.argv[1])\n"
            "with store.flow_lock(sys.argv[2], wait=0):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
            store.url,
            SPEC.name,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with syncing(engine, store) as sync:
            sync.lock_wait = 0.3
            with pytest.raises(SyncError):
                sync.run()
        holder.kill()
        holder.wait(30)
        with syncing(engine, store) as sync:
            sync.lock_wait = 30
            assert sync.run().written == 3
    finally:
        holder.kill()
        holder.wait(30)


@pytest.mark.postgres
def test_the_lock_outlives_an_idle_session_timeout_and_its_loss_fails_no_run(
    postgres_database, caplog
):
    """The lock's session sits idle all run long: a server's idle_session_timeout ended it,
    and a second run took the flow meanwhile. A session ended all the same (killed) made the
    finished run fail as it let go, though it had written everything."""
    url = postgres_database()
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE \"{url.rsplit('/', 1)[1]}\" SET idle_session_timeout = '1s'")
    store = StateStore(url, dlq_key=DLQ_KEY)
    with store.flow_lock(SPEC.name, wait=0):
        time.sleep(2.5)
        with pytest.raises(FlowBusy), store.flow_lock(SPEC.name, wait=0):
            pass
        end_lock_sessions(url)
    assert "the flow's lock was lost during the run" in caplog.text
    with store.flow_lock(SPEC.name, wait=0):  # nothing left held
        pass
    store.dispose()


@pytest.fixture
def owner_role_url(postgres):
    """A state store database owned by a role its login role becomes on connecting (`ALTER ROLE
    … SET role`, as objects owned by an owner role are often set up)."""
    suffix = uuid.uuid4().hex[:8]
    owner, login, name = f"handoff_owner_{suffix}", f"handoff_login_{suffix}", f"handoff_{suffix}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {owner} NOLOGIN")
        admin.execute(f"CREATE ROLE {login} LOGIN IN ROLE {owner}")
        admin.execute(f"ALTER ROLE {login} SET role = '{owner}'")
        admin.execute(f'CREATE DATABASE "{name}" OWNER {owner}')
    yield f"postgresql://{login}@127.0.0.1:5432/{name}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f"DROP ROLE {login}")
        admin.execute(f"DROP ROLE {owner}")


@pytest.mark.postgres
def test_a_run_whose_session_runs_as_another_role_still_holds_its_lock(engine, owner_role_url):
    """Whether a run still held its lock was asked of pg_stat_activity, whose session start
    times a role that set another one sees as NULL, its own included: every run then took its
    lock for lost and stopped before its first batch."""
    store = StateStore(owner_role_url, dlq_key=DLQ_KEY)
    with syncing(engine, store) as sync:
        assert sync.run().counts["inserted"] == 3
    with store.flow_lock(SPEC.name, wait=0) as still_held:
        assert still_held()
        end_lock_sessions(owner_role_url)
        ended = time.monotonic() + 10  # the server ends the session a moment later
        while still_held() and time.monotonic() < ended:
            time.sleep(0.05)
        assert not still_held()
    store.dispose()
