"""ERP organisation (source): the companies our customers work for."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import COUNTRY_CODE, ORGANISATION_NUMBER, whole


class ErpOrganisationV2(pa.DataFrameModel):
    organisation_id: Series[int] = pa.Field(gt=0, unique=True)
    organisation_number: Series[str] = pa.Field(str_matches=ORGANISATION_NUMBER)
    name: Series[str] = pa.Field(str_length={"min_value": 1})
    domain: Series[str] = pa.Field(nullable=True, str_matches=whole(r"[a-z0-9.-]+\.[a-z]{2,}"))
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(str_matches=COUNTRY_CODE)

    class Config:
        coerce = True
        strict = False


ERP_ORGANISATION = Contract(name="erp.organisation", version=2, model=ErpOrganisationV2)
