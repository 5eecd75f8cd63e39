"""CRM deal (source): a deal as the CRM's search API returns it, to be staged in the ERP."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import CURRENCY_CODE, INVOICE_NUMBER


class CrmDealObjectV2(pa.DataFrameModel):
    hs_object_id: Series[int] = pa.Field(gt=0, unique=True)
    # Set on the won deals handoff made from paid invoices; empty on deals made in the CRM.
    erp_invoice_id: Series[str] = pa.Field(nullable=True, str_matches=INVOICE_NUMBER)
    dealname: Series[str] = pa.Field(str_length={"min_value": 1})
    amount: Series[float] = pa.Field(nullable=True, ge=0)
    deal_currency_code: Series[str] = pa.Field(nullable=True, str_matches=CURRENCY_CODE)
    dealstage: Series[str] = pa.Field(str_length={"min_value": 1})
    pipeline: Series[str] = pa.Field(nullable=True)
    # A date, or HubSpot's ISO date-time (midnight UTC of the closing day).
    closedate: Series[str] = pa.Field(nullable=True, str_matches=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}")
    hs_lastmodifieddate: Series[pa.DateTime]

    class Config:
        coerce = True
        strict = False


CRM_DEAL_OBJECT = Contract(name="crm.deal_object", version=2, model=CrmDealObjectV2)
