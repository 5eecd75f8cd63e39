"""ERP customer (source): what the system of record must hold for a customer to be synced."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import COUNTRY_CODE, CUSTOMER_NUMBER, is_email


class ErpCustomerV2(pa.DataFrameModel):
    customer_id: Series[int] = pa.Field(gt=0, unique=True)
    customer_number: Series[str] = pa.Field(str_matches=CUSTOMER_NUMBER)
    first_name: Series[str] = pa.Field(str_length={"min_value": 1}, metadata={"pii": True})
    last_name: Series[str] = pa.Field(str_length={"min_value": 1}, metadata={"pii": True})
    email: Series[str] = pa.Field(metadata={"pii": True})
    phone: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    company_name: Series[str] = pa.Field(nullable=True)
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(str_matches=COUNTRY_CODE)

    @pa.check("email", name="email_shape", error="is not a valid email address")
    def email_shape(cls, email: Series[str]) -> Series[bool]:
        return is_email(email)

    class Config:
        coerce = True
        strict = False


ERP_CUSTOMER = Contract(name="erp.customer", version=2, model=ErpCustomerV2)


class ErpCustomerWithPaidV2(ErpCustomerV2):
    """A customer with what they paid over the last 12 months (the helpdesk's support tier)."""

    paid_last_12_months: Series[float] = pa.Field(ge=0)


ERP_CUSTOMER_WITH_PAID = Contract(
    name="erp.customer_with_paid", version=2, model=ErpCustomerWithPaidV2
)
