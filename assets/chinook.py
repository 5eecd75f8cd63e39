"""Chinook, a second ERP: its customers and invoices into the finance reporting database.

Chinook keeps no change timestamps and no soft deletes: each run reads its tables whole (or one
partition of invoices), and the ledger's diff sends only what changed.
"""

import pandas as pd

from integrations.contracts.chinook import (
    CHINOOK_CUSTOMER,
    CHINOOK_INVOICE,
    FINANCE_CHINOOK_CUSTOMER,
    FINANCE_CHINOOK_INVOICE,
)
from integrations.engine.spec import DailyPartitions, FlowSpec, SourceTable, Target


def chinook_customer_to_finance(customers: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": customers["CustomerId"],
            "first_name": customers["FirstName"],
            "last_name": customers["LastName"],
            "email": customers["Email"].str.strip().str.lower(),
            "company": customers["Company"],
            "city": customers["City"],
            "country": customers["Country"],
        },
        index=customers.index,
    )


def chinook_invoice_to_finance(invoices: pd.DataFrame) -> pd.DataFrame:
    """Chinook's totals are in US dollars (the store sells in one currency)."""
    return pd.DataFrame(
        {
            "invoice_id": invoices["InvoiceId"],
            "customer_id": invoices["CustomerId"],
            "invoice_date": invoices["InvoiceDate"].dt.date,
            "billing_country": invoices["BillingCountry"],
            "total": invoices["Total"].astype(float).round(2),
            "currency": "USD",
        },
        index=invoices.index,
    )


CHINOOK_CUSTOMERS = FlowSpec(
    name="chinook_customers_to_finance",
    description="Chinook customers in the finance reporting database, by Chinook customer id.",
    source=SourceTable(
        system="chinook", table="Customer", key="CustomerId", cursor=None, deleted=None
    ),
    source_contract=CHINOOK_CUSTOMER,
    target=Target(system="finance", dataset="chinook_customers", id_property="customer_id"),
    target_contract=FINANCE_CHINOOK_CUSTOMER,
    mapping=chinook_customer_to_finance,
    batch_size=20_000,
    watch_source=False,
    pool="finance_db",
)

CHINOOK_INVOICES = FlowSpec(
    name="chinook_invoices_to_finance",
    description="Chinook invoices in the finance reporting database, by Chinook invoice id; "
    "daily partitions on the invoice date.",
    source=SourceTable(
        system="chinook", table="Invoice", key="InvoiceId", cursor=None, deleted=None
    ),
    source_contract=CHINOOK_INVOICE,
    target=Target(system="finance", dataset="chinook_invoices", id_property="invoice_id"),
    target_contract=FINANCE_CHINOOK_INVOICE,
    mapping=chinook_invoice_to_finance,
    batch_size=20_000,
    partitions=DailyPartitions(column="InvoiceDate", start="2021-01-01"),
    watch_source=False,
    pool="finance_db",
)
