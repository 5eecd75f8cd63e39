"""RT user (destination): what a helpdesk user must look like before it is sent to RT.

Columns are named as RT's REST2 API names the user's fields; a custom field is `CF.{Name}`, as
TicketSQL writes it.
"""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import (
    CUSTOMER_NUMBER,
    first_of_case_insensitive_duplicates,
    is_email,
)
from integrations.helpdesk.support_tier import TIER_FIELD, TIERS


class RtUserV2(pa.DataFrameModel):
    # The ERP customer number: RT's unique user name, stable when the customer changes email.
    Name: Series[str] = pa.Field(str_matches=CUSTOMER_NUMBER, unique=True)
    EmailAddress: Series[str] = pa.Field(metadata={"pii": True})
    RealName: Series[str] = pa.Field(str_length={"min_value": 1}, metadata={"pii": True})
    Organization: Series[str] = pa.Field(nullable=True)
    City: Series[str] = pa.Field(nullable=True)
    Country: Series[str] = pa.Field(str_length=2)
    WorkPhone: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    support_tier: Series[str] = pa.Field(isin=list(TIERS), alias=f"CF.{{{TIER_FIELD}}}")

    @pa.check("EmailAddress", name="email_shape", error="is not a valid lower-case email address")
    def email_shape(cls, email: Series[str]) -> Series[bool]:
        return is_email(email) & (email == email.str.lower())

    @pa.dataframe_check(
        name="email_unique_ignoring_case",
        error="EmailAddress is used by another customer in this batch (ignoring case)",
    )
    def email_unique_ignoring_case(cls, users) -> Series[bool]:
        # RT refuses a second user with the same address, whatever its case.
        return first_of_case_insensitive_duplicates(users["EmailAddress"])

    class Config:
        coerce = True
        strict = True


RT_USER = Contract(name="rt.user", version=2, model=RtUserV2)
