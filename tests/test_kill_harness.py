"""Crash safety, proven: SIGKILL at seeded points of each phase, rerun, nothing lost or doubled.

Two flows: ERP customers into the CRM (over HTTP, state in SQLite) and the same customers into
a PostgreSQL table (ERP, state and destination on PostgreSQL)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager

import numpy as np
import pytest

from assets.crm_contacts import CRM_CONTACTS
from integrations.crm.client import CrmClient
from integrations.crm.destination import CrmObjects
from integrations.engine.destination import Destination
from integrations.engine.spec import FlowSpec
from integrations.engine.state import StateStore
from integrations.erp.changes import live_customer_ids, move_customers, soft_delete_customers
from integrations.erp.seed import seed_erp
from integrations.http import ApiLimits
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource
from tests.conftest import DLQ_KEY
from tests.kill_harness import Report, run_harness, seeded_points

POINTS = 20
# Small batches and chunks: a few hundred rows give many places to die in.
CRM_SPEC = dataclasses.replace(CRM_CONTACTS, batch_size=50)
SQL_SPEC = dataclasses.replace(
    CRM_CONTACTS,
    name="erp_customers_to_warehouse_contacts",
    target=dataclasses.replace(CRM_CONTACTS.target, system="warehouse"),
    batch_size=50,
)
MOST = {"extract": 2, "mid-load": 2, "after-load": 2, "mid-commit": 1, "mid-cursor": 1}


def kill_and_check(
    spec: FlowSpec,
    erp_url: str,
    state_url: str,
    destination: Callable[[], AbstractContextManager[Destination]],
    figures: list[str],
) -> Report:
    seed_erp(erp_url, rows=400, seed=11)
    erp = create_engine(erp_url)
    rng = np.random.default_rng(5)

    @contextmanager
    def opener():
        engine = create_engine(erp_url)
        state = StateStore(state_url, dlq_key=DLQ_KEY)
        try:
            with destination() as target:
                target.max_batch = 20  # several chunks per batch: a kill can fall between them
                yield SqlSource(engine, spec.source), target, state
        finally:
            state.dispose()
            engine.dispose()

    def change(i: int) -> None:
        if i == 0:
            return  # the first point kills the first, full sync
        chosen = [int(x) for x in rng.choice(live_customer_ids(erp), size=31, replace=False)]
        move_customers(erp, chosen[:30], seed=i)
        soft_delete_customers(erp, chosen[30:])

    report = run_harness(spec, opener, seeded_points(seed=2026, count=POINTS, most=MOST), change)
    erp.dispose()
    figures.append(report.summary())  # printed in the run's summary
    assert all(outcome.killed for outcome in report.outcomes), [
        str(o.point) for o in report.outcomes if not o.killed
    ]
    assert report.clean, [o for o in report.outcomes if o.lost or o.duplicated or o.ledger_off]
    return report


@pytest.mark.slow
def test_crm_sync_survives_sigkill_at_every_seeded_point(tmp_path, crm_sandbox, crm_token, figures):
    @contextmanager
    def crm():
        client = CrmClient(crm_sandbox.base_url, crm_token, ApiLimits(retries=2, backoff=0.05))
        try:
            yield CrmObjects.for_target(client, CRM_SPEC.target)
        finally:
            client.close()

    kill_and_check(
        CRM_SPEC,
        f"sqlite:///{tmp_path / 'erp.sqlite'}",
        f"sqlite:///{tmp_path / 'state.sqlite'}",
        crm,
        figures,
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_sql_sync_survives_sigkill_at_every_seeded_point(postgres_database, figures):
    warehouse_url = postgres_database()

    @contextmanager
    def warehouse():
        engine = create_engine(warehouse_url)
        try:
            yield SqlTable(engine, SQL_SPEC.target, create_missing=True)
        finally:
            engine.dispose()

    kill_and_check(SQL_SPEC, postgres_database(), postgres_database(), warehouse, figures)
