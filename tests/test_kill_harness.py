"""Crash safety, proven: SIGKILL at seeded points of each phase, rerun, nothing lost or doubled."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import pytest

from assets.crm_contacts import CRM_CONTACTS
from integrations.crm.client import CrmClient
from integrations.crm.destination import CrmObjects
from integrations.engine.state import StateStore
from integrations.erp.changes import live_customer_ids, move_customers, soft_delete_customers
from integrations.erp.seed import seed_erp
from integrations.http import ApiLimits
from integrations.sql.connect import create_engine
from integrations.sql.source import SqlSource
from tests.conftest import DLQ_KEY
from tests.kill_harness import run_harness, seeded_points

POINTS = 20
# Small batches and chunks: a few hundred rows give many places to die in.
SPEC = dataclasses.replace(CRM_CONTACTS, batch_size=50)
MOST = {"extract": 2, "mid-load": 2, "after-load": 2, "mid-commit": 1, "mid-cursor": 1}


@pytest.mark.slow
def test_crm_sync_survives_sigkill_at_every_seeded_point(tmp_path, crm_sandbox, crm_token, capsys):
    erp_url = f"sqlite:///{tmp_path / 'erp.sqlite'}"
    state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    seed_erp(erp_url, rows=400, seed=11)
    erp = create_engine(erp_url)
    rng = np.random.default_rng(5)

    @contextmanager
    def opener():
        engine = create_engine(erp_url)
        client = CrmClient(crm_sandbox.base_url, crm_token, ApiLimits(retries=2, backoff=0.05))
        destination = CrmObjects.for_target(client, SPEC.target)
        destination.max_batch = 20
        state = StateStore(state_url, dlq_key=DLQ_KEY)
        try:
            yield SqlSource(engine, SPEC.source), destination, state
        finally:
            state.dispose()
            client.close()
            engine.dispose()

    def change(i: int) -> None:
        if i == 0:
            return  # the first point kills the first, full sync
        ids = live_customer_ids(erp)
        chosen = [int(x) for x in rng.choice(ids, size=31, replace=False)]
        move_customers(erp, chosen[:30], seed=i)
        soft_delete_customers(erp, chosen[30:])

    points = seeded_points(seed=2026, count=POINTS, most=MOST)
    report = run_harness(SPEC, opener, points, change)
    with capsys.disabled():
        print(f"\n{report.summary()}")
    assert all(outcome.killed for outcome in report.outcomes), [
        str(o.point) for o in report.outcomes if not o.killed
    ]
    assert report.clean, [o for o in report.outcomes if o.lost or o.duplicated or o.ledger_off]
    erp.dispose()
