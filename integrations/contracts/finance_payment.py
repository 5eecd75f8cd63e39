"""Finance payment (destination): money received against an invoice, on its business date."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import INVOICE_NUMBER


class FinancePaymentV2(pa.DataFrameModel):
    payment_id: Series[int] = pa.Field(gt=0, unique=True)
    invoice_number: Series[str] = pa.Field(str_matches=INVOICE_NUMBER)
    paid_on: Series[pa.Date]
    amount: Series[float] = pa.Field(gt=0)
    method: Series[str] = pa.Field(isin=["card", "transfer", "direct_debit"])

    class Config:
        coerce = True
        strict = True


FINANCE_PAYMENT = Contract(name="finance.payment", version=2, model=FinancePaymentV2)
