"""ERP payments → the finance reporting database: money received, on the day it was paid."""

import pandas as pd

from integrations.contracts.erp_payment import ERP_PAYMENT
from integrations.contracts.finance_payment import FINANCE_PAYMENT
from integrations.engine.spec import DailyPartitions, FlowSpec, Lookup, SourceTable, Target


def payment_to_finance(payments: pd.DataFrame) -> pd.DataFrame:
    """A payment is reported against its invoice's number (the ERP's invoice id stays internal)."""
    return pd.DataFrame(
        {
            "payment_id": payments["payment_id"],
            "invoice_number": payments["invoice_number"],
            "paid_on": payments["paid_on"],
            "amount": payments["amount"].astype(float).round(2),
            "method": payments["method"],
        },
        index=payments.index,
    )


FINANCE_PAYMENTS = FlowSpec(
    name="erp_payments_to_finance_payments",
    description="ERP payments in the finance reporting database, by payment id; daily "
    "partitions on the payment date. A deleted payment is archived.",
    source=SourceTable(
        table="payments",
        key="payment_id",
        lookups=(
            Lookup(
                "invoice_number",
                table="invoices",
                via="invoice_id",
                key="invoice_id",
                value="invoice_number",
            ),
        ),
    ),
    source_contract=ERP_PAYMENT,
    target=Target(system="finance", dataset="payments", id_property="payment_id"),
    target_contract=FINANCE_PAYMENT,
    mapping=payment_to_finance,
    batch_size=20_000,
    partitions=DailyPartitions(column="paid_on", start="2024-01-01"),
    pool="finance_db",
)
