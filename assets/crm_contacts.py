"""ERP customers → CRM contacts: who our customers are, where sales and service work with them."""

from __future__ import annotations

import pandas as pd

from integrations.contracts.crm_contact import CRM_CONTACT
from integrations.contracts.erp_customer import ERP_CUSTOMER
from integrations.engine.spec import FlowSpec, SourceTable, Target


def customer_to_contact(customers: pd.DataFrame) -> pd.DataFrame:
    """Each field by its meaning in HubSpot's contact model."""
    return pd.DataFrame(
        {
            # A unique custom property: the upsert key, stable when a customer changes email.
            "erp_customer_id": customers["customer_number"],
            # HubSpot treats emails case-insensitively; the ERP doesn't, so normalise here.
            "email": customers["email"].str.strip().str.lower(),
            "firstname": customers["first_name"],
            "lastname": customers["last_name"],
            "phone": customers["phone"],
            "company": customers["company_name"],
            "city": customers["city"],
            "country": customers["country"],
        },
        index=customers.index,
    )


CRM_CONTACTS = FlowSpec(
    name="erp_customers_to_crm_contacts",
    description="ERP customers as CRM contacts, upserted by `erp_customer_id`; soft-deleted "
    "customers are archived.",
    source=SourceTable(table="customers", key="customer_id"),
    source_contract=ERP_CUSTOMER,
    target=Target(
        system="crm",
        dataset="contacts",
        id_property="erp_customer_id",
        unique_ignoring_case=("email",),
    ),
    target_contract=CRM_CONTACT,
    mapping=customer_to_contact,
    pool="crm_api",
)
