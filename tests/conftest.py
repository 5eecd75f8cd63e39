"""Real parts: SQLite files, PostgreSQL on 127.0.0.1:5432, the CRM sandbox over real HTTP, and a
real Request Tracker 5 on 127.0.0.1 (installed and started by the session)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pymysql
import pytest
from cryptography.fernet import Fernet

from integrations.crm.client import CrmClient
from integrations.crm.sandbox import SandboxServer
from integrations.engine.state import StateStore
from integrations.erp.seed import seed_erp
from integrations.helpdesk.client import RtClient
from integrations.helpdesk.local_rt import LocalRt, LocalRtError
from integrations.http import ApiLimits
from integrations.settings import CHINOOK_DATASET
from integrations.sql.connect import create_engine
from integrations.webhooks.signatures import parse_secrets

# The code location refuses to load without its secrets; tests run with throwaway ones. The key
# the code location reads is the one tests read letters with: one made here, or the environment's
# (a key exported in the shell, or the xdist controller's, which its workers inherit).
DLQ_KEY = os.environ.setdefault("HANDOFF_DLQ_KEY", Fernet.generate_key().decode())
os.environ.setdefault("CRM_ACCESS_TOKEN", secrets.token_urlsafe(24))
os.environ.setdefault(
    "CRM_WEBHOOK_SECRET", "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
)

POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
IN_CI = os.environ.get("CI", "").lower() == "true"


def postgres_available() -> bool:
    try:
        with psycopg.connect(POSTGRES_ADMIN):
            return True
    except psycopg.OperationalError:
        return False


def require_service(name: str, address: str, available: bool) -> bool:
    """A test needing a service skips without it, except in CI, where it fails."""
    if available:
        return True
    if IN_CI:
        pytest.fail(f"{name} is not reachable on {address}, and CI=true requires it")
    pytest.skip(f"{name} is not reachable on {address}")


@pytest.fixture(scope="session")
def postgres() -> bool:
    return require_service("PostgreSQL", "127.0.0.1:5432", postgres_available())


@pytest.fixture
def postgres_database(postgres):
    """A throwaway database; returns a factory so a test can have several."""
    created: list[str] = []

    def make(options: str = "") -> str:
        name = f"handoff_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}" {options}')
        created.append(name)
        return f"postgresql://postgres@127.0.0.1:5432/{name}"

    yield make
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
        for name in created:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


MARIADB_ADMIN = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def mariadb_available() -> bool:
    try:
        pymysql.connect(**MARIADB_ADMIN, connect_timeout=3).close()
        return True
    except pymysql.err.OperationalError:
        return False


@pytest.fixture(scope="session")
def mariadb() -> bool:
    return require_service("MariaDB", "127.0.0.1:3306", mariadb_available())


@pytest.fixture
def mariadb_database(mariadb):
    """A throwaway MariaDB database; returns a factory so a test can have several."""
    created: list[str] = []

    def make() -> str:
        name = f"handoff_test_{uuid.uuid4().hex[:12]}"
        connection = pymysql.connect(**MARIADB_ADMIN, autocommit=True)
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        connection.close()
        created.append(name)
        return f"mariadb://root@127.0.0.1:3306/{name}"

    yield make
    connection = pymysql.connect(**MARIADB_ADMIN, autocommit=True)
    with connection.cursor() as cursor:
        for name in created:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    connection.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def sql_database(request, tmp_path):
    """A factory of empty databases of each dialect handoff supports, one test per dialect."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_database")
    if request.param == "mariadb":
        return request.getfixturevalue("mariadb_database")
    names = iter(range(1000))
    return lambda: f"sqlite:///{tmp_path / f'db{next(names)}.sqlite'}"


@pytest.fixture
def crm_token() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def crm_sandbox(tmp_path: Path, crm_token: str):
    # Signs webhooks once a test subscribes a receiver (POST /_sandbox/webhooks); none before.
    server = SandboxServer(
        tmp_path / "crm_sandbox.sqlite",
        crm_token,
        webhook_secrets=parse_secrets(os.environ["CRM_WEBHOOK_SECRET"]),
    )
    server.start_in_thread()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def crm_client(crm_sandbox, crm_token) -> CrmClient:
    client = CrmClient(crm_sandbox.base_url, crm_token, ApiLimits(retries=2, backoff=0.05))
    yield client
    client.close()


@dataclass
class World:
    """An ERP, a state store and a CRM sandbox, wired through the environment as in production."""

    erp_url: str
    state_url: str
    crm: SandboxServer
    token: str
    home: Path

    def env(self) -> dict[str, str]:
        return {
            "HANDOFF_HOME": str(self.home),
            "ERP_DATABASE_URL": self.erp_url,
            "HANDOFF_STATE_URL": self.state_url,
            "CRM_BASE_URL": self.crm.base_url,
            "CRM_ACCESS_TOKEN": self.token,
            "HANDOFF_DLQ_KEY": DLQ_KEY,
        }


WORLD_ROWS = 3000


def _world(request, tmp_path, crm_sandbox, crm_token, monkeypatch, kind: str) -> World:
    if kind == "postgres":
        make = request.getfixturevalue("postgres_database")
        erp_url, state_url = make(), make()
    else:
        erp_url = f"sqlite:///{tmp_path / 'erp.sqlite'}"
        state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    seed_erp(erp_url, rows=WORLD_ROWS, seed=7)
    world = World(erp_url, state_url, crm_sandbox, crm_token, tmp_path)
    for name, value in world.env().items():
        monkeypatch.setenv(name, value)
    return world


@pytest.fixture
def world(request, tmp_path, crm_sandbox, crm_token, monkeypatch) -> World:
    """The embedded world: SQLite ERP and state."""
    return _world(request, tmp_path, crm_sandbox, crm_token, monkeypatch, "sqlite")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_world(request, tmp_path, crm_sandbox, crm_token, monkeypatch) -> World:
    """The same test on the embedded world and on PostgreSQL (ERP and state)."""
    return _world(request, tmp_path, crm_sandbox, crm_token, monkeypatch, request.param)


class AlertReceiver(ThreadingHTTPServer):
    """A local webhook receiver: keeps every JSON body posted to it."""

    def __init__(self):
        self.received: list[dict] = []
        super().__init__(("127.0.0.1", 0), _AlertHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/alerts"


class _AlertHandler(BaseHTTPRequestHandler):
    server: AlertReceiver

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def alert_receiver(monkeypatch):
    receiver = AlertReceiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    monkeypatch.setenv("HANDOFF_ALERT_WEBHOOK_URL", receiver.url)
    yield receiver
    receiver.shutdown()
    receiver.server_close()


@pytest.fixture
def erp(world):
    """The world's ERP engine."""
    engine = create_engine(world.erp_url)
    yield engine
    engine.dispose()


@pytest.fixture
def state(world):
    """The world's state store."""
    store = StateStore(world.state_url, dlq_key=DLQ_KEY)
    yield store
    store.dispose()


@pytest.fixture
def own_state(tmp_path):
    """A state store of the test's own (SQLite), for tests without the demo world."""
    store = StateStore(f"sqlite:///{tmp_path / 'own_state.sqlite'}", dlq_key=DLQ_KEY)
    yield store
    store.dispose()


@pytest.fixture
def chinook_copy(world, tmp_path, monkeypatch) -> str:
    """A writable copy of the real Chinook database, as the world's `CHINOOK_DATABASE_URL`."""
    copy = tmp_path / "chinook.sqlite"
    shutil.copyfile(CHINOOK_DATASET, copy)
    copy.chmod(0o644)
    url = f"sqlite:///{copy}"
    monkeypatch.setenv("CHINOOK_DATABASE_URL", url)
    return url


def pytest_addoption(parser):
    parser.addoption(
        "--outage-seconds",
        type=float,
        default=4.0,
        help="length of the CRM outage in the fault suite's scenario (d); 30 shows the "
        "issue's case (about 1-2 minutes)",
    )


_FIGURES: list[str] = []


@pytest.fixture
def figures():
    """Lines a test reports; printed in the run's summary (no -s needed)."""
    return _FIGURES


def pytest_sessionfinish(session):
    """An xdist worker hands its figures to the controller, which prints the summary."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["figures"] = list(_FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _FIGURES.extend(getattr(node, "workeroutput", {}).get("figures", []))


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def rt_server(tmp_path_factory) -> LocalRt:
    """One RT5 for the session: packages installed when absent, a throwaway SQLite database."""
    server = LocalRt(tmp_path_factory.mktemp("rt"))
    try:
        server.start()
    except LocalRtError as error:
        if IN_CI:
            pytest.fail(f"Request Tracker 5 could not be started, and CI=true requires it: {error}")
        pytest.skip(f"Request Tracker 5 could not be started: {error}")
    yield server
    server.stop()


@pytest.fixture
def rt(rt_server: LocalRt, monkeypatch) -> LocalRt:
    """The session's RT, reset to its freshly initialised database and wired through the
    environment as in production."""
    rt_server.reset()
    monkeypatch.setenv("RT_BASE_URL", rt_server.base_url)
    monkeypatch.setenv("RT_USER", rt_server.user)
    monkeypatch.setenv("RT_PASSWORD", rt_server.password)
    return rt_server


@pytest.fixture
def rt_client(rt: LocalRt) -> RtClient:
    client = RtClient(
        rt.base_url, user=rt.user, password=rt.password, limits=ApiLimits(retries=2, backoff=0.05)
    )
    yield client
    client.close()


@dataclass
class HelpdeskWorld:
    """A small SQLite ERP and state store next to the test's RT, wired through the environment."""

    erp_url: str
    state_url: str
    rt: LocalRt

    def state(self) -> StateStore:
        return StateStore(self.state_url, dlq_key=DLQ_KEY)


HELPDESK_WORLD_ROWS = 150  # RT writes one user per request: a small ERP keeps the tests quick


@pytest.fixture
def helpdesk_world(rt, tmp_path, monkeypatch) -> HelpdeskWorld:
    erp_url = f"sqlite:///{tmp_path / 'erp.sqlite'}"
    state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    seed_erp(erp_url, rows=HELPDESK_WORLD_ROWS, seed=7)
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))
    monkeypatch.setenv("ERP_DATABASE_URL", erp_url)
    monkeypatch.setenv("HANDOFF_STATE_URL", state_url)
    return HelpdeskWorld(erp_url, state_url, rt)
