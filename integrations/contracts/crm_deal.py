"""CRM deal (destination): a won deal per paid invoice, linked to the customer's contact."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import CURRENCY_CODE, CUSTOMER_NUMBER, DAY, INVOICE_NUMBER


class CrmDealV2(pa.DataFrameModel):
    erp_invoice_id: Series[str] = pa.Field(str_matches=INVOICE_NUMBER, unique=True)
    dealname: Series[str] = pa.Field(str_length={"min_value": 1})
    amount: Series[float] = pa.Field(gt=0)
    deal_currency_code: Series[str] = pa.Field(str_matches=CURRENCY_CODE)
    dealstage: Series[str] = pa.Field(isin=["closedwon"])
    pipeline: Series[str] = pa.Field(isin=["default"])
    closedate: Series[str] = pa.Field(str_matches=DAY)
    # The association to the contact (resolved by the CRM destination, not stored as a property).
    contact_erp_customer_id: Series[str] = pa.Field(str_matches=CUSTOMER_NUMBER)

    class Config:
        coerce = True
        strict = True


CRM_DEAL = Contract(name="crm.deal", version=2, model=CrmDealV2)
