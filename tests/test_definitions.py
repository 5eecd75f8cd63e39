"""The code location loads, in-process and through `dagster definitions validate`."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import dagster as dg
import pytest

from assets.crm_deals import CRM_DEALS
from assets.factory import flow_asset
from definitions import defs, resources
from integrations.engine.state import MissingSecret

ROOT = Path(__file__).resolve().parents[1]


def test_the_asset_graph_resolves_with_flows_checks_sensors_and_schedules():
    graph = defs.resolve_asset_graph()
    contacts = dg.AssetKey(["crm", "contacts"])
    assert contacts in graph.get_all_asset_keys()
    assert graph.get(contacts).parent_keys == {dg.AssetKey(["erp", "customers"])}
    assert dg.AssetCheckKey(contacts, "contract") in graph.asset_check_keys
    assert dg.AssetCheckKey(contacts, "audit_anchor") in graph.asset_check_keys
    assert dg.AssetCheckKey(contacts, "reconciliation") in graph.asset_check_keys
    assert (
        graph.get(contacts).freshness_policy.fail_window.to_timedelta().total_seconds() == 3 * 3600
    )
    for name in ("handoff_stale_flows", "handoff_old_dead_letters", "handoff_run_failures"):
        assert defs.resolve_sensor_def(name)
    defs.resolve_implicit_global_asset_job_def()
    assert defs.resolve_sensor_def("erp_customers_changed")
    schedule = defs.resolve_schedule_def("erp_customers_to_crm_contacts_schedule")
    assert schedule.cron_schedule == "0 * * * *"
    assets_def = defs.resolve_assets_def(contacts)
    assert assets_def.op.pool == "crm_api"
    assert assets_def.op.retry_policy.backoff == dg.Backoff.EXPONENTIAL


def validate(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    (tmp_path / "dagster.yaml").write_text("")
    return subprocess.run(
        [
            Path(sys.executable).with_name("dagster"),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=ROOT,
        env={**env, "DAGSTER_HOME": str(tmp_path), "HANDOFF_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_dagster_definitions_validate_passes(tmp_path):
    done = validate(tmp_path, dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All code locations passed validation" in done.stdout + done.stderr


@pytest.mark.parametrize("secret", ["CRM_ACCESS_TOKEN", "HANDOFF_DLQ_KEY"])
def test_a_missing_secret_stops_the_load_with_one_error_naming_it(tmp_path, secret):
    env = {name: value for name, value in os.environ.items() if name != secret}
    done = validate(tmp_path, env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count(f"{secret} is not set") == 1, output
    assert "handoff cannot load" in output


@pytest.mark.parametrize("limit", ["10/s", "0", "-5", "inf"])
def test_a_request_limit_that_is_no_limit_stops_the_load_naming_it(monkeypatch, limit):
    """`CRM_REQUESTS_PER_SECOND=10/s` stopped the load with float()'s ValueError, naming no
    variable; 0, a negative limit or inf loaded, and limited nothing."""
    monkeypatch.setenv("CRM_REQUESTS_PER_SECOND", limit)
    with pytest.raises(MissingSecret, match=f"CRM_REQUESTS_PER_SECOND is '{limit}', not a number"):
        resources()
    monkeypatch.setenv("CRM_REQUESTS_PER_SECOND", "10")
    assert resources()["crm"].requests_per_second == 10


def test_every_run_config_field_of_a_flow_says_what_it_does():
    """The Launchpad shows a field's description: attribute docstrings never reached it, so
    `repair`, `replay` and the rest were bare names there."""
    contacts = defs.resolve_assets_def(dg.AssetKey(["crm", "contacts"]))
    config = contacts.op.config_schema.as_field().config_type
    assert set(config.fields) >= {"full_refresh", "repair", "replay", "acknowledge_budget_trip"}
    undescribed = [name for name, field in config.fields.items() if not field.description]
    assert undescribed == []


def test_a_partitioned_flow_loads_without_the_backfill_policy_beta_warning():
    """`make demo` printed Dagster's BetaWarning for `backfill_policy` once per partitioned flow
    at every load; only that warning is silenced, others still reach the user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flow_asset(CRM_DEALS)
        warnings.warn("another beta API", dg.BetaWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["another beta API"]
