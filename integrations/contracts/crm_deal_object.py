"""CRM deal (source): a deal as the CRM's search API returns it, to be staged in the ERP."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract


class CrmDealObjectV1(pa.DataFrameModel):
    hs_object_id: Series[int] = pa.Field(gt=0, unique=True)
    # Set on the won deals handoff made from paid invoices; empty on deals made in the CRM.
    erp_invoice_id: Series[str] = pa.Field(nullable=True, str_matches=r"^INV-\d{8}$")
    dealname: Series[str] = pa.Field(str_length={"min_value": 1})
    amount: Series[float] = pa.Field(nullable=True, ge=0)
    deal_currency_code: Series[str] = pa.Field(nullable=True, str_matches=r"^[A-Z]{3}$")
    dealstage: Series[str] = pa.Field(str_length={"min_value": 1})
    pipeline: Series[str] = pa.Field(nullable=True)
    # A date, or HubSpot's ISO date-time (midnight UTC of the closing day).
    closedate: Series[str] = pa.Field(nullable=True, str_matches=r"^\d{4}-\d{2}-\d{2}")
    hs_lastmodifieddate: Series[pa.DateTime]

    class Config:
        coerce = True
        strict = False


CRM_DEAL_OBJECT = Contract(name="crm.deal_object", version=1, model=CrmDealObjectV1)
