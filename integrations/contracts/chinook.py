"""Chinook, a second ERP with its own schema (a music store: customers and their invoices).

Source contracts use Chinook's own column names; the target contracts are what the finance
reporting database holds for them.
"""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import is_email


class ChinookCustomerV1(pa.DataFrameModel):
    CustomerId: Series[int] = pa.Field(gt=0, unique=True)
    FirstName: Series[str] = pa.Field(str_length={"min_value": 1}, metadata={"pii": True})
    LastName: Series[str] = pa.Field(str_length={"min_value": 1}, metadata={"pii": True})
    Company: Series[str] = pa.Field(nullable=True)
    # Where a person lives and how to reach them: masked wherever someone reads a record.
    Address: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    City: Series[str] = pa.Field(nullable=True)
    State: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    Country: Series[str] = pa.Field(str_length={"min_value": 2})
    PostalCode: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    Phone: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    Fax: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    Email: Series[str] = pa.Field(metadata={"pii": True})

    @pa.check("Email", name="email_shape", error="is not a valid email address")
    def email_shape(cls, email: Series[str]) -> Series[bool]:
        return is_email(email)

    class Config:
        coerce = True
        strict = False


class ChinookInvoiceV1(pa.DataFrameModel):
    InvoiceId: Series[int] = pa.Field(gt=0, unique=True)
    CustomerId: Series[int] = pa.Field(gt=0)
    InvoiceDate: Series[pa.DateTime]
    BillingCountry: Series[str] = pa.Field(nullable=True)
    Total: Series[float] = pa.Field(ge=0)

    class Config:
        coerce = True
        strict = False


class FinanceChinookCustomerV1(pa.DataFrameModel):
    customer_id: Series[int] = pa.Field(gt=0, unique=True)
    first_name: Series[str] = pa.Field(metadata={"pii": True})
    last_name: Series[str] = pa.Field(metadata={"pii": True})
    email: Series[str] = pa.Field(metadata={"pii": True})
    company: Series[str] = pa.Field(nullable=True)
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str]

    class Config:
        coerce = True
        strict = True


class FinanceChinookInvoiceV1(pa.DataFrameModel):
    invoice_id: Series[int] = pa.Field(gt=0, unique=True)
    customer_id: Series[int] = pa.Field(gt=0)
    invoice_date: Series[pa.Date]
    billing_country: Series[str] = pa.Field(nullable=True)
    total: Series[float] = pa.Field(ge=0)
    currency: Series[str] = pa.Field(isin=["USD"])

    class Config:
        coerce = True
        strict = True


CHINOOK_CUSTOMER = Contract(name="chinook.customer", version=1, model=ChinookCustomerV1)
CHINOOK_INVOICE = Contract(name="chinook.invoice", version=1, model=ChinookInvoiceV1)
FINANCE_CHINOOK_CUSTOMER = Contract(
    name="finance.chinook_customer", version=1, model=FinanceChinookCustomerV1
)
FINANCE_CHINOOK_INVOICE = Contract(
    name="finance.chinook_invoice", version=1, model=FinanceChinookInvoiceV1
)
