"""CRM contact (destination): what a contact must look like before it is sent to the CRM."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import (
    CUSTOMER_NUMBER,
    first_of_case_insensitive_duplicates,
    is_email,
)


class CrmContactV2(pa.DataFrameModel):
    erp_customer_id: Series[str] = pa.Field(str_matches=CUSTOMER_NUMBER, unique=True)
    email: Series[str] = pa.Field(metadata={"pii": True})
    firstname: Series[str] = pa.Field(metadata={"pii": True})
    lastname: Series[str] = pa.Field(metadata={"pii": True})
    phone: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    company: Series[str] = pa.Field(nullable=True)
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(str_length=2)

    @pa.check("email", name="email_shape", error="is not a valid lower-case email address")
    def email_shape(cls, email: Series[str]) -> Series[bool]:
        return is_email(email) & (email == email.str.lower())

    @pa.dataframe_check(
        name="email_unique_ignoring_case",
        error="email is used by another customer in this batch (ignoring case)",
    )
    def email_unique_ignoring_case(cls, contacts) -> Series[bool]:
        return first_of_case_insensitive_duplicates(contacts["email"])

    class Config:
        coerce = True
        strict = True


CRM_CONTACT = Contract(name="crm.contact", version=2, model=CrmContactV2)
