"""`make demo`'s checks before it starts anything: ports that are taken, or no port at all."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo"


def demo(tmp_path: Path, **ports: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HANDOFF_HOME": str(tmp_path / "home"), **ports}
    return subprocess.run([DEMO], env=env, capture_output=True, text=True, timeout=60)


def listening() -> socket.socket:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def test_a_taken_port_stops_the_demo_suggesting_a_free_one(tmp_path):
    """The suggestion was the taken port plus 10, whether or not that one was free."""
    taken = listening()
    port = taken.getsockname()[1]
    try:
        next_one = socket.socket()
        try:
            next_one.bind(("127.0.0.1", port + 10))
            next_one.listen()
        except OSError:
            pass  # already taken by someone else: as good for this test
        try:
            done = demo(tmp_path, DAGSTER_PORT=str(port))
        finally:
            next_one.close()
    finally:
        taken.close()
    assert done.returncode == 1
    said = done.stderr.strip()
    assert said.startswith(f"handoff demo: port {port} on 127.0.0.1 is in use")
    suggested = int(said.rsplit("DAGSTER_PORT=", 1)[1].split()[0])
    assert suggested != port and suggested != port + 10


@pytest.mark.parametrize("value", ["abc", "0", "99999"])
def test_a_port_setting_that_is_no_port_is_said_so(tmp_path, value):
    done = demo(tmp_path, DAGSTER_PORT=value)
    assert done.returncode == 1
    assert (
        done.stderr.strip() == f"handoff demo: DAGSTER_PORT={value} is no port number (1 to 65535)"
    )
