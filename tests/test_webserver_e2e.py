"""crm/contacts through the real webserver, as `make demo` runs it: `dagster dev`, then GraphQL."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests

from tests.expectations import assert_crm_matches_erp

ROOT = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")
CONTACTS = ["crm", "contacts"]
DEALS = ["crm", "deals"]
STARTUP_SECONDS = 120
RUN_SECONDS = 180

WORKSPACE = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

ASSET_NODES = """
query AssetNodes {
  assetNodes { assetKey { path } }
}
"""

LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on Error { message }
    ... on PythonError { stack }
    ... on RunConfigValidationInvalid { pipelineName errors { message } }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName }
  }
}
"""

LAUNCH_BACKFILL = """
mutation LaunchBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

BACKFILL_STATUS = """
query BackfillStatus($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill { status runs { runId status } }
    ... on Error { message }
  }
}
"""

MATERIALIZED = """
query Materialized($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode { partitionStats { numMaterialized } }
  }
}
"""

RUN_STATUS = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status }
    ... on Error { message }
  }
}
"""

RUN_ERRORS = """
query RunErrors($runId: ID!) {
  runOrError(runId: $runId) {
    ... on Run {
      eventConnection(limit: 10000) {
        events {
          __typename
          ... on MessageEvent { message }
          ... on ErrorEvent { error { message causes { message } } }
        }
      }
    }
  }
}
"""


@dataclass
class Webserver:
    """A running `dagster dev` and the file its output goes to."""

    process: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def explain(self, message: str) -> str:
        return f"{message}\n--- tail of {self.log} ---\n{self.log_tail()}"

    def graphql(self, query: str, **variables: object) -> dict:
        """The answer's `data`. The status code says little: the webserver answers 500 when a
        field resolves to a PythonError, which the caller reports like any other error type."""
        response = requests.post(
            self.url, json={"query": query, "variables": variables}, timeout=30
        )
        try:
            body = response.json()
        except requests.JSONDecodeError:
            body = {}
        assert body.get("data") and not body.get("errors"), self.explain(
            f"GraphQL answered {response.status_code}: {body.get('errors') or response.text[:2000]}"
        )
        return body["data"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole process group (webserver, daemon, code servers, run workers), then
    SIGKILL to whatever is left of it."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def dagster_dev(tmp_path: Path, instance_yaml: Path, env: dict[str, str]) -> Iterator[Webserver]:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(instance_yaml, dagster_home / "dagster.yaml")
    port = free_port()
    log = tmp_path / "dagster_dev.log"
    command = [str(DAGSTER), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env, "DAGSTER_HOME": str(dagster_home)},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield Webserver(process, f"http://127.0.0.1:{port}/graphql", log)
        finally:
            stop(process)


def wait_for_location(server: Webserver) -> str:
    """The name of the workspace's only code location, once it has loaded without error."""
    deadline = time.monotonic() + STARTUP_SECONDS
    last = "no answer yet"
    while time.monotonic() < deadline:
        returncode = server.process.poll()
        assert returncode is None, server.explain(f"dagster dev exited with {returncode}")
        try:
            workspace = server.graphql(WORKSPACE)["workspaceOrError"]
        except requests.RequestException as error:
            last = repr(error)
        else:
            assert workspace["__typename"] == "Workspace", server.explain(str(workspace))
            entries = workspace["locationEntries"]
            last = str(entries)
            if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
                (entry,) = entries
                location = entry["locationOrLoadError"]
                assert location["__typename"] == "RepositoryLocation", server.explain(
                    f"code location {entry['name']} failed to load: {location}"
                )
                return location["name"]
        time.sleep(1)
    pytest.fail(server.explain(f"no loaded code location after {STARTUP_SECONDS} s: {last}"))


def describe_error(result: dict) -> str:
    details = [result["__typename"], result.get("message", "")]
    details += [error["message"] for error in result.get("errors", [])]
    details += result.get("stack", [])
    details += [
        f"{k}={result[k]}"
        for k in ("invalidStepKey", "stepKey", "invalidOutputName")
        if k in result
    ]
    return "\n".join(str(detail) for detail in details if detail)


def run_errors(server: Webserver, run_id: str) -> str:
    """The run's failures and retries so far, with their error messages."""
    run = server.graphql(RUN_ERRORS, runId=run_id)["runOrError"]
    events = run.get("eventConnection", {}).get("events", [])
    lines = []
    for event in events:
        error = event.get("error") or {}
        if error or event["__typename"].endswith("FailureEvent"):
            causes = [cause["message"] for cause in error.get("causes", [])]
            lines.append(" | ".join([f"{event['__typename']}: {event['message']}", *causes]))
    return "\n".join(lines)


def wait_for_run(server: Webserver, run_id: str) -> None:
    deadline = time.monotonic() + RUN_SECONDS
    status = "unknown"
    while time.monotonic() < deadline:
        run = server.graphql(RUN_STATUS, runId=run_id)["runOrError"]
        assert run["__typename"] == "Run", server.explain(f"run {run_id}: {describe_error(run)}")
        status = run["status"]
        if status == "SUCCESS":
            return
        assert status not in {"FAILURE", "CANCELED"}, server.explain(
            f"run {run_id} ended {status}:\n{run_errors(server, run_id)}"
        )
        time.sleep(1)
    pytest.fail(
        server.explain(
            f"run {run_id} still {status} after {RUN_SECONDS} s:\n{run_errors(server, run_id)}"
        )
    )


def wait_for_backfill(
    server: Webserver, backfill_id: str, asset: list[str], days: int
) -> list[dict]:
    """The backfill's runs, once every run succeeded and the asset holds its days. The daemon
    marks the backfill complete only at its next tick, up to 30 s later: not waited for."""
    deadline = time.monotonic() + RUN_SECONDS
    answer: dict = {}
    while time.monotonic() < deadline:
        answer = server.graphql(BACKFILL_STATUS, backfillId=backfill_id)["partitionBackfillOrError"]
        assert answer["__typename"] == "PartitionBackfill", server.explain(str(answer))
        runs = answer["runs"]
        failed = [run for run in runs if run["status"] in {"FAILURE", "CANCELED"}]
        assert not failed, server.explain(
            "\n".join(run_errors(server, run["runId"]) for run in failed)
        )
        assert answer["status"] not in {"FAILED", "CANCELED", "COMPLETED_FAILED"}, server.explain(
            str(answer)
        )
        if runs and all(run["status"] == "SUCCESS" for run in runs):
            node = server.graphql(MATERIALIZED, assetKey={"path": asset})["assetNodeOrError"]
            if node["partitionStats"]["numMaterialized"] >= days:
                return runs
        time.sleep(1)
    pytest.fail(server.explain(f"backfill {backfill_id} not done after {RUN_SECONDS} s: {answer}"))


@pytest.fixture(params=["local", pytest.param("postgres", marks=pytest.mark.postgres)])
def instance(request) -> tuple[Path, dict[str, str]]:
    """The demo's instance (SQLite storage), and production's (deploy/dagster.yaml, PostgreSQL)."""
    if request.param == "local":
        return ROOT / "deploy" / "dagster.local.yaml", {}
    url = request.getfixturevalue("postgres_database")()
    # dagster-postgres is built on psycopg2; SQLAlchemy 2.1 would otherwise pick psycopg 3.
    return ROOT / "deploy" / "dagster.yaml", {
        "DAGSTER_PG_URL": url.replace("postgresql://", "postgresql+psycopg2://")
    }


@pytest.mark.slow
def test_materialize_contacts_through_the_webserver(world, crm_client, tmp_path, instance):
    with dagster_dev(tmp_path, *instance) as server:
        location = wait_for_location(server)

        nodes = server.graphql(ASSET_NODES)["assetNodes"]
        keys = [node["assetKey"]["path"] for node in nodes]
        assert CONTACTS in keys, server.explain(f"{CONTACTS} is not among the asset nodes {keys}")

        execution_params = {
            "selector": {
                "repositoryLocationName": location,
                "repositoryName": "__repository__",
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": CONTACTS}],
            },
        }
        launched = server.graphql(LAUNCH_RUN, executionParams=execution_params)["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", server.explain(
            f"launchRun failed: {describe_error(launched)}"
        )
        wait_for_run(server, launched["run"]["runId"])
        assert_crm_matches_erp(world.erp_url, crm_client)

        # A year of deals, backfilled from the UI's API: one run, not 365.
        days = [f"{day:%Y-%m-%d}" for day in (date(2025, 1, 1) + timedelta(n) for n in range(365))]
        backfill = server.graphql(
            LAUNCH_BACKFILL,
            backfillParams={"partitionNames": days, "assetSelection": [{"path": DEALS}]},
        )["launchPartitionBackfill"]
        assert backfill["__typename"] == "LaunchBackfillSuccess", server.explain(
            f"launchPartitionBackfill failed: {describe_error(backfill)}"
        )
        runs = wait_for_backfill(server, backfill["backfillId"], DEALS, len(days))
        assert 1 <= len(runs) <= 4, f"a year's backfill took {len(runs)} runs"
        deals = list(crm_client.list_objects("deals", ["closedate"]))
        assert deals and all(d["properties"]["closedate"].startswith("2025-") for d in deals)
