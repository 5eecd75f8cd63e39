"""ERP invoice (source), with the customer number looked up from its customer."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import CURRENCY_CODE, CUSTOMER_NUMBER, INVOICE_NUMBER


class ErpInvoiceV2(pa.DataFrameModel):
    invoice_id: Series[int] = pa.Field(gt=0, unique=True)
    invoice_number: Series[str] = pa.Field(str_matches=INVOICE_NUMBER)
    customer_id: Series[int] = pa.Field(gt=0)
    customer_number: Series[str] = pa.Field(str_matches=CUSTOMER_NUMBER)
    invoice_date: Series[pa.DateTime]
    amount: Series[float] = pa.Field(gt=0)
    currency: Series[str] = pa.Field(str_matches=CURRENCY_CODE)
    status: Series[str] = pa.Field(isin=["open", "paid", "void"])

    class Config:
        coerce = True
        strict = False


ERP_INVOICE = Contract(name="erp.invoice", version=2, model=ErpInvoiceV2)
