"""CRM deal (destination): a won deal per paid invoice, linked to the customer's contact."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract


class CrmDealV1(pa.DataFrameModel):
    erp_invoice_id: Series[str] = pa.Field(str_matches=r"^INV-\d{8}$", unique=True)
    dealname: Series[str] = pa.Field(str_length={"min_value": 1})
    amount: Series[float] = pa.Field(gt=0)
    deal_currency_code: Series[str] = pa.Field(str_matches=r"^[A-Z]{3}$")
    dealstage: Series[str] = pa.Field(isin=["closedwon"])
    pipeline: Series[str] = pa.Field(isin=["default"])
    closedate: Series[str] = pa.Field(str_matches=r"^\d{4}-\d{2}-\d{2}$")
    # The association to the contact (resolved by the CRM destination, not stored as a property).
    contact_erp_customer_id: Series[str] = pa.Field(str_matches=r"^C\d{7}$")

    class Config:
        coerce = True
        strict = True


CRM_DEAL = Contract(name="crm.deal", version=1, model=CrmDealV1)
