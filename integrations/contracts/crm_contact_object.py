"""CRM contact (source): a contact as the CRM's search API returns it, to be staged in the ERP."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import CUSTOMER_NUMBER


class CrmContactObjectV2(pa.DataFrameModel):
    hs_object_id: Series[int] = pa.Field(gt=0, unique=True)
    # Set on contacts handoff created from ERP customers; empty on contacts made in the CRM.
    erp_customer_id: Series[str] = pa.Field(nullable=True, str_matches=CUSTOMER_NUMBER)
    email: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    firstname: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    lastname: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    phone: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    company: Series[str] = pa.Field(nullable=True)
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(nullable=True)
    lastmodifieddate: Series[pa.DateTime]

    class Config:
        coerce = True
        strict = False


CRM_CONTACT_OBJECT = Contract(name="crm.contact_object", version=2, model=CrmContactObjectV2)
