"""ERP invoice (source), with the customer number looked up from its customer."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract


class ErpInvoiceV1(pa.DataFrameModel):
    invoice_id: Series[int] = pa.Field(gt=0, unique=True)
    invoice_number: Series[str] = pa.Field(str_matches=r"^INV-\d{8}$")
    customer_id: Series[int] = pa.Field(gt=0)
    customer_number: Series[str] = pa.Field(str_matches=r"^C\d{7}$")
    invoice_date: Series[pa.DateTime]
    amount: Series[float] = pa.Field(gt=0)
    currency: Series[str] = pa.Field(str_matches=r"^[A-Z]{3}$")
    status: Series[str] = pa.Field(isin=["open", "paid", "void"])

    class Config:
        coerce = True
        strict = False


ERP_INVOICE = Contract(name="erp.invoice", version=1, model=ErpInvoiceV1)
