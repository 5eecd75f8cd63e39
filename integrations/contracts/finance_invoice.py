"""Finance invoice (destination): an invoice as the finance reporting database holds it."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract


class FinanceInvoiceV1(pa.DataFrameModel):
    invoice_number: Series[str] = pa.Field(str_matches=r"^INV-\d{8}$", unique=True)
    customer_number: Series[str] = pa.Field(str_matches=r"^C\d{7}$")
    invoice_date: Series[pa.Date]
    due_date: Series[pa.Date]
    amount: Series[float] = pa.Field(gt=0)
    currency: Series[str] = pa.Field(str_matches=r"^[A-Z]{3}$")
    status: Series[str] = pa.Field(isin=["open", "paid", "void"])

    @pa.dataframe_check(name="due_after_invoiced", error="is due before it was invoiced")
    def due_after_invoiced(cls, invoices) -> Series[bool]:
        return invoices["due_date"] >= invoices["invoice_date"]

    class Config:
        coerce = True
        strict = True


FINANCE_INVOICE = Contract(name="finance.invoice", version=1, model=FinanceInvoiceV1)
