"""A materialization killed with SIGKILL after its first batch, then rerun: nothing lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.crm_contacts import CRM_CONTACTS
from assets.factory import flow_asset
from definitions import resources
from integrations.engine.state import StateStore
from tests.expectations import assert_crm_matches_erp, crm_contacts

ROOT = Path(__file__).resolve().parents[1]


def ledger_size(state_url: str) -> int:
    store = StateStore(state_url)
    with store.engine.connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM ledger")).scalar_one()
    store.dispose()
    return count


@pytest.mark.slow
def test_sigkill_after_the_first_batch_then_rerun(any_world, crm_client):
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.materialize_contacts"],
        cwd=ROOT,
        env={**os.environ, **any_world.env()},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 120
    try:
        for line in process.stderr:
            if "batch 1 committed" in line:
                process.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the first batch never committed"
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    partial = len(crm_contacts(crm_client))
    assert 0 < ledger_size(any_world.state_url) <= partial < 2900, "the kill should land mid-run"

    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance
        ).success

    assert_crm_matches_erp(any_world.erp_url, crm_client)
    assert ledger_size(any_world.state_url) == len(crm_contacts(crm_client))
