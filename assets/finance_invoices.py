"""ERP invoices → the finance reporting database: every invoice, on its business date."""

import pandas as pd

from integrations.contracts.erp_invoice import ERP_INVOICE
from integrations.contracts.finance_invoice import FINANCE_INVOICE
from integrations.engine.spec import DailyPartitions, FlowSpec, Lookup, SourceTable, Target

CUSTOMER_NUMBER = Lookup(
    "customer_number",
    table="customers",
    via="customer_id",
    key="customer_id",
    value="customer_number",
)


def invoice_to_finance(invoices: pd.DataFrame) -> pd.DataFrame:
    """Finance reports by invoice and customer number (the ERP's ids stay internal)."""
    return pd.DataFrame(
        {
            "invoice_number": invoices["invoice_number"],
            "customer_number": invoices["customer_number"],
            "invoice_date": invoices["invoice_date"],
            "due_date": invoices["due_date"],
            "amount": invoices["amount"].astype(float).round(2),
            "currency": invoices["currency"],
            "status": invoices["status"],
        },
        index=invoices.index,
    )


FINANCE_INVOICES = FlowSpec(
    name="erp_invoices_to_finance_invoices",
    description="ERP invoices (open, paid and void) in the finance reporting database, by "
    "invoice number; daily partitions on the invoice date. A deleted invoice is archived.",
    source=SourceTable(table="invoices", key="invoice_id", lookups=(CUSTOMER_NUMBER,)),
    source_contract=ERP_INVOICE,
    target=Target(system="finance", dataset="invoices", id_property="invoice_number"),
    target_contract=FINANCE_INVOICE,
    mapping=invoice_to_finance,
    batch_size=20_000,
    partitions=DailyPartitions(column="invoice_date", start="2024-01-01"),
    pool="finance_db",
)
