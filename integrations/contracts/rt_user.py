"""RT user (destination): what a helpdesk user must look like before it is sent to RT.

Columns are named as RT's REST2 API names the user's fields; a custom field is `CF.{Name}`, as
TicketSQL writes it.

RT keeps a user's fields in columns of its schema's size (varchar) and cuts a longer value to
that many bytes without a word, whatever the database (its answer even quotes the whole value as
set): on RT 5.0.3, EmailAddress and RealName keep 120 bytes of UTF-8, Organization 200, City 100,
WorkPhone 30 (so 60 letters "é" of a name). Such a user is refused here, naming the field and
its limit, rather than stored cut.
"""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import (
    CUSTOMER_NUMBER,
    first_of_case_insensitive_duplicates,
    is_email,
    utf8_bytes,
)
from integrations.helpdesk.support_tier import TIER_FIELD, TIERS


def _fits_rt(field: str, limit: int):
    """A check that `field` fits RT's column of `limit` bytes (see the module docstring)."""

    def fits(cls, values: Series[str]) -> Series[bool]:
        return utf8_bytes(values) <= limit

    return pa.check(
        field,
        name=f"{field}_fits_rt",
        error=f"is longer than the {limit} bytes of UTF-8 RT keeps (it would cut the rest without "
        "a word): shorten it in the ERP, then replay the letter",
    )(fits)


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

    email_fits_rt = _fits_rt("EmailAddress", 120)
    real_name_fits_rt = _fits_rt("RealName", 120)
    organization_fits_rt = _fits_rt("Organization", 200)
    city_fits_rt = _fits_rt("City", 100)
    work_phone_fits_rt = _fits_rt("WorkPhone", 30)

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
