"""The handoff code location: every flow's asset, checks, sensor and schedule, and the resources."""

from __future__ import annotations

import os
from collections.abc import Callable

import dagster as dg

from assets import CRM_TO_ERP_FLOWS, FLOWS, HELPDESK_FLOWS
from assets.checks import reconciliation_check
from assets.factory import asset_key, flow_asset, source_asset_specs
from integrations import settings
from integrations.engine.spec import FlowSpec
from resources import (
    CrmResource,
    ErpDatabase,
    HelpdeskResource,
    Notifier,
    SqlDestinationDatabase,
    StateStoreResource,
)
from resources.secrets import require_helpdesk_credentials, require_secrets
from sensors.alerts import alert_sensors
from sensors.changed_days import changed_days_sensors
from sensors.schedules import flow_schedules
from sensors.source_changed import source_changed_sensors
from sensors.stopped_windows import stopped_windows_sensors
from sensors.webhook_inbox import webhook_inbox_sensors


def from_env(name: str, embedded_default: Callable[[], str | None]) -> str | dg.EnvVar | None:
    """`dg.EnvVar(name)` when the variable is set; unset means the embedded default (DESIGN.md)."""
    return dg.EnvVar(name) if os.environ.get(name) else embedded_default()


def resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "erp": ErpDatabase(url=from_env("ERP_DATABASE_URL", settings.erp_database_url)),
        "chinook": ErpDatabase(url=from_env("CHINOOK_DATABASE_URL", settings.chinook_database_url)),
        # The embedded finance database gets its tables from the contracts; a real one is owned
        # by its DBAs, and a table that is missing or does not fit stops the flow with what to do.
        "finance": SqlDestinationDatabase(
            url=from_env("FINANCE_DATABASE_URL", settings.finance_database_url),
            create_missing_tables=not os.environ.get("FINANCE_DATABASE_URL"),
        ),
        "state": StateStoreResource(
            url=from_env("HANDOFF_STATE_URL", settings.state_url),
            dlq_key=dg.EnvVar("HANDOFF_DLQ_KEY"),
        ),
        "crm": CrmResource(
            base_url=from_env("CRM_BASE_URL", settings.crm_base_url),
            access_token=dg.EnvVar("CRM_ACCESS_TOKEN"),
            requests_per_second=settings.crm_requests_per_second(),
            rate_limit_url=from_env("HANDOFF_STATE_URL", settings.state_url),
        ),
        "helpdesk": HelpdeskResource(
            base_url=from_env("RT_BASE_URL", settings.rt_base_url),
            user=from_env("RT_USER", lambda: None),
            password=from_env("RT_PASSWORD", lambda: None),
            token=from_env("RT_TOKEN", lambda: None),
        ),
        "notifier": Notifier(webhook_url=from_env("HANDOFF_ALERT_WEBHOOK_URL", lambda: None)),
    }


def active_flows() -> list[FlowSpec]:
    """The CRM and finance flows, the CRM → ERP flows, and the helpdesk's when RT_BASE_URL says
    where RT is."""
    return FLOWS + CRM_TO_ERP_FLOWS + (HELPDESK_FLOWS if settings.rt_base_url() else [])


def definitions(flows: list[FlowSpec]) -> dg.Definitions:
    return dg.Definitions(
        assets=[*source_asset_specs(flows), *(flow_asset(spec) for spec in flows)],
        asset_checks=[reconciliation_check(spec, asset_key(spec)) for spec in flows],
        sensors=[
            *source_changed_sensors(flows),
            *changed_days_sensors(flows),
            *stopped_windows_sensors(flows),
            *webhook_inbox_sensors(flows),
            *alert_sensors(flows),
        ],
        schedules=flow_schedules(flows),
        resources=resources(),
    )


require_secrets()
if settings.rt_base_url():
    require_helpdesk_credentials()
defs = definitions(active_flows())
