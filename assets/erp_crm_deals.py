"""CRM deals → ERP staging: the sales pipeline as the CRM holds it, for the ERP's forecasts."""

from __future__ import annotations

import pandas as pd

from assets.crm_deals import CRM_DEALS
from integrations.contracts.crm_deal_object import CRM_DEAL_OBJECT
from integrations.contracts.erp_crm_deal import ERP_CRM_DEAL
from integrations.engine.spec import FlowSpec, SourceTable, Target


def deal_to_staging_row(deals: pd.DataFrame) -> pd.DataFrame:
    """Each field by its meaning in the ERP's staging table."""
    return pd.DataFrame(
        {
            "crm_deal_id": deals["hs_object_id"],
            "erp_invoice_id": deals["erp_invoice_id"],
            "dealname": deals["dealname"],
            "amount": deals["amount"],
            "currency": deals["deal_currency_code"],
            "dealstage": deals["dealstage"],
            "pipeline": deals["pipeline"],
            # The closing day (HubSpot sends midnight UTC of it as a date-time).
            "close_date": pd.to_datetime(deals["closedate"].str.slice(0, 10)),
            "crm_modified_at": deals["hs_lastmodifieddate"],
        },
        index=deals.index,
    )


ERP_CRM_DEALS = FlowSpec(
    name="crm_deals_to_erp_deals",
    description="CRM deals into the ERP's `crm_deals` staging table by CRM id, read by the CRM "
    "search API on hs_lastmodifieddate; runs when CRM webhooks arrive (crm_webhooks).",
    source=SourceTable(
        table="deals", key="hs_object_id", cursor="hs_lastmodifieddate", system="crm", deleted=None
    ),
    source_contract=CRM_DEAL_OBJECT,
    target=Target(system="erp", dataset="crm_deals", id_property="crm_deal_id"),
    target_contract=ERP_CRM_DEAL,
    mapping=deal_to_staging_row,
    pool="crm_api",
    archive_deleted=False,
    watch_source=False,  # the webhook inbox says when; the hourly schedule catches lost webhooks
    echo_of=CRM_DEALS,  # what handoff wrote there comes back as changes: not staged
)
