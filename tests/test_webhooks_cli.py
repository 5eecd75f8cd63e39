"""`handoff webhooks serve` as an operator runs it: a process on a free port, secrets from the
environment, events into the state store's inbox that `handoff webhooks status` counts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import requests

from integrations.cli import main
from tests.webhooks import deliver, event

SECRET = os.environ["CRM_WEBHOOK_SECRET"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_command_serves_the_inbox_and_status_counts_it(tmp_path, monkeypatch, capsys):
    state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))
    monkeypatch.setenv("HANDOFF_STATE_URL", state_url)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "integrations.cli", "webhooks", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = server.stdout.readline()
        url = f"http://127.0.0.1:{port}/webhooks/crm"
        assert url in banner and SECRET not in banner
        answer, _, _ = deliver(requests.Session(), url, SECRET, [event(1), event(2)], "hubspot")
        assert answer.status_code == 200 and answer.json()["stored"] == 2
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert SECRET.removeprefix("whsec_") not in err
    assert main(["webhooks", "status"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deliveries": 1, "events": 2, "waiting": 2}


def test_the_command_refuses_to_start_without_a_secret(monkeypatch, capsys):
    monkeypatch.delenv("CRM_WEBHOOK_SECRET")
    assert main(["webhooks", "serve", "--port", str(free_port())]) == 2
    assert "CRM_WEBHOOK_SECRET" in capsys.readouterr().err
