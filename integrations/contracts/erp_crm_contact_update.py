"""ERP CRM contact update (destination): a CRM contact as the ERP's staging table holds it, for
the ERP's owners to review and take into `customers` (the ERP stays the system of record)."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import COUNTRY_CODE, CUSTOMER_NUMBER, is_email


class ErpCrmContactUpdateV2(pa.DataFrameModel):
    crm_contact_id: Series[int] = pa.Field(gt=0, unique=True)
    erp_customer_id: Series[str] = pa.Field(nullable=True, str_matches=CUSTOMER_NUMBER)
    email: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    firstname: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    lastname: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    phone: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    company: Series[str] = pa.Field(nullable=True)
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(nullable=True, str_matches=COUNTRY_CODE)
    crm_modified_at: Series[pa.DateTime]

    @pa.check("email", name="email_shape", error="is not a valid lower-case email address")
    def email_shape(cls, email: Series[str]) -> Series[bool]:
        return email.isna() | (is_email(email) & (email == email.str.lower()))

    class Config:
        coerce = True
        strict = True


ERP_CRM_CONTACT_UPDATE = Contract(
    name="erp.crm_contact_update", version=2, model=ErpCrmContactUpdateV2
)
