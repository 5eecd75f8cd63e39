"""ERP paid invoices → CRM deals: what each customer bought, won, on the day it was invoiced."""

import pandas as pd

from integrations.contracts.crm_deal import CRM_DEAL
from integrations.contracts.erp_invoice import ERP_INVOICE
from integrations.engine.spec import (
    Association,
    DailyPartitions,
    FlowSpec,
    Lookup,
    SourceTable,
    Target,
)


def invoice_to_deal(invoices: pd.DataFrame) -> pd.DataFrame:
    """Each field by its meaning in HubSpot's deal model."""
    return pd.DataFrame(
        {
            "erp_invoice_id": invoices["invoice_number"],
            "dealname": "Invoice " + invoices["invoice_number"],
            "amount": invoices["amount"].astype(float).round(2),
            "deal_currency_code": invoices["currency"],
            # A paid invoice is a won deal, closed on the invoice's business date.
            "dealstage": "closedwon",
            "pipeline": "default",
            "closedate": pd.to_datetime(invoices["invoice_date"]).dt.strftime("%Y-%m-%d"),
            "contact_erp_customer_id": invoices["customer_number"],
        },
        index=invoices.index,
    )


def is_paid(invoices: pd.DataFrame) -> pd.Series:
    return invoices["status"] == "paid"


CRM_DEALS = FlowSpec(
    name="erp_paid_invoices_to_crm_deals",
    description="Paid ERP invoices as won CRM deals, associated with the customer's contact; "
    "daily partitions on the invoice date. An invoice that is voided is archived.",
    source=SourceTable(
        table="invoices",
        key="invoice_id",
        lookups=(
            Lookup(
                "customer_number",
                table="customers",
                via="customer_id",
                key="customer_id",
                value="customer_number",
            ),
        ),
    ),
    source_contract=ERP_INVOICE,
    target=Target(
        system="crm",
        dataset="deals",
        id_property="erp_invoice_id",
        associations=(Association("contact_erp_customer_id", "contacts", "erp_customer_id"),),
    ),
    target_contract=CRM_DEAL,
    mapping=invoice_to_deal,
    in_scope=is_paid,
    partitions=DailyPartitions(column="invoice_date", start="2024-01-01"),
    pool="crm_api",
)
