"""Finance invoice (destination): an invoice as the finance reporting database holds it."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import CURRENCY_CODE, CUSTOMER_NUMBER, INVOICE_NUMBER


class FinanceInvoiceV2(pa.DataFrameModel):
    invoice_number: Series[str] = pa.Field(str_matches=INVOICE_NUMBER, unique=True)
    customer_number: Series[str] = pa.Field(str_matches=CUSTOMER_NUMBER)
    invoice_date: Series[pa.Date]
    due_date: Series[pa.Date]
    amount: Series[float] = pa.Field(gt=0)
    currency: Series[str] = pa.Field(str_matches=CURRENCY_CODE)
    status: Series[str] = pa.Field(isin=["open", "paid", "void"])

    @pa.dataframe_check(name="due_after_invoiced", error="is due before it was invoiced")
    def due_after_invoiced(cls, invoices) -> Series[bool]:
        return invoices["due_date"] >= invoices["invoice_date"]

    class Config:
        coerce = True
        strict = True


FINANCE_INVOICE = Contract(name="finance.invoice", version=2, model=FinanceInvoiceV2)
