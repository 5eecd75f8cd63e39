"""ERP organisation (source): the companies our customers work for."""

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract


class ErpOrganisationV1(pa.DataFrameModel):
    organisation_id: Series[int] = pa.Field(gt=0, unique=True)
    organisation_number: Series[str] = pa.Field(str_matches=r"^O\d{7}$")
    name: Series[str] = pa.Field(str_length={"min_value": 1})
    domain: Series[str] = pa.Field(nullable=True, str_matches=r"^[a-z0-9.-]+\.[a-z]{2,}$")
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(str_matches=r"^[A-Z]{2}$")

    class Config:
        coerce = True
        strict = False


ERP_ORGANISATION = Contract(name="erp.organisation", version=1, model=ErpOrganisationV1)
