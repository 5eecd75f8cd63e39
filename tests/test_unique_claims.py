"""Unique values ignoring case (a company's domain): who holds one, as records move, clear and
repeat it, across batches and within one. Real SQLite ERP and state, and the CRM sandbox."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from assets.crm_companies import CRM_COMPANIES
from integrations.crm.destination import CrmObjects
from integrations.engine.sync import Sync, SyncResult
from integrations.sql.source import SqlSource


def sync(erp, crm_client, state, run: str) -> SyncResult:
    destination = CrmObjects(crm_client, "companies", "erp_organisation_id")
    source = SqlSource(erp, CRM_COMPANIES.source)
    return Sync(
        CRM_COMPANIES, source, destination, state, run_id=run, actor="test", why="test"
    ).run()


def set_domains(erp, domains: dict[int, str | None]) -> None:
    with erp.begin() as connection:
        for organisation, domain in domains.items():
            connection.execute(
                sa.text(
                    "UPDATE organisations SET domain = :domain, updated_at = :now "
                    "WHERE organisation_id = :id"
                ),
                {
                    "domain": domain,
                    "id": organisation,
                    "now": datetime.now(UTC).replace(tzinfo=None),
                },
            )


def two_synced(erp) -> list[int]:
    with erp.connect() as connection:
        return list(
            connection.execute(
                sa.text(
                    "SELECT organisation_id FROM organisations WHERE country IS NOT NULL "
                    "AND deleted_at IS NULL ORDER BY organisation_id LIMIT 2"
                )
            ).scalars()
        )


def domains_in_crm(crm_client) -> dict[str, str | None]:
    companies = crm_client.list_objects("companies", ["erp_organisation_id", "domain"])
    return {
        c["properties"]["erp_organisation_id"]: c["properties"].get("domain") for c in companies
    }


def clashes(state) -> list[str]:
    return [d.reason for d in state.list_dead_letters(limit=10_000) if "already used" in d.reason]


def test_a_value_moved_on_within_one_batch_is_free_for_another(world, erp, crm_client, state):
    sync(erp, crm_client, state, "run-1")
    x, y = two_synced(erp)
    set_domains(erp, {x: "moved-on.example.com", y: "first-home.example.com"})
    sync(erp, crm_client, state, "run-2")
    set_domains(erp, {x: "next-home.example.com", y: "moved-on.example.com"})  # one batch
    result = sync(erp, crm_client, state, "run-3")
    assert result.written == 2 and not clashes(state)


def test_a_cleared_value_is_let_go(world, erp, crm_client, state):
    sync(erp, crm_client, state, "run-1")
    x, y = two_synced(erp)
    set_domains(erp, {x: "kept-once.example.com"})
    sync(erp, crm_client, state, "run-2")
    set_domains(erp, {x: None})
    sync(erp, crm_client, state, "run-3")
    set_domains(erp, {y: "kept-once.example.com"})
    result = sync(erp, crm_client, state, "run-4")
    assert result.written == 1 and not clashes(state)


def test_one_value_twice_in_a_batch_goes_to_the_first_and_the_flow_goes_on(
    world, erp, crm_client, state
):
    """The ERP does not keep domains unique: two organisations with one domain in one batch.
    The first keeps it, the second is dead-lettered, and the commit lands."""
    sync(erp, crm_client, state, "run-1")
    x, y = two_synced(erp)
    set_domains(erp, {x: "shared.example.com", y: "shared.example.com"})
    result = sync(erp, crm_client, state, "run-2")
    assert result.written == 1
    assert len(clashes(state)) == 1
    holders = [
        key for key, domain in domains_in_crm(crm_client).items() if domain == "shared.example.com"
    ]
    assert len(holders) == 1
    assert sync(erp, crm_client, state, "run-3").written == 0
