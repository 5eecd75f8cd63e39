"""CRM company (destination)."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import ORGANISATION_NUMBER


class CrmCompanyV2(pa.DataFrameModel):
    erp_organisation_id: Series[str] = pa.Field(str_matches=ORGANISATION_NUMBER, unique=True)
    name: Series[str] = pa.Field(str_length={"min_value": 1})
    domain: Series[str] = pa.Field(nullable=True)
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(str_length=2)

    class Config:
        coerce = True
        strict = True


CRM_COMPANY = Contract(name="crm.company", version=2, model=CrmCompanyV2)
