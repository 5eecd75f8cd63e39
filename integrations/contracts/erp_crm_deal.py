"""ERP CRM deal (destination): a CRM deal as the ERP's staging table holds it (the pipeline the
ERP's forecasts read)."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import CURRENCY_CODE, INVOICE_NUMBER


class ErpCrmDealV2(pa.DataFrameModel):
    crm_deal_id: Series[int] = pa.Field(gt=0, unique=True)
    erp_invoice_id: Series[str] = pa.Field(nullable=True, str_matches=INVOICE_NUMBER)
    dealname: Series[str] = pa.Field(str_length={"min_value": 1})
    amount: Series[float] = pa.Field(nullable=True, ge=0)
    currency: Series[str] = pa.Field(nullable=True, str_matches=CURRENCY_CODE)
    dealstage: Series[str] = pa.Field(str_length={"min_value": 1})
    pipeline: Series[str] = pa.Field(nullable=True)
    close_date: Series[pa.DateTime] = pa.Field(nullable=True)
    crm_modified_at: Series[pa.DateTime]

    class Config:
        coerce = True
        strict = True


ERP_CRM_DEAL = Contract(name="erp.crm_deal", version=2, model=ErpCrmDealV2)
