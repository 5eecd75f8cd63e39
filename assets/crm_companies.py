"""ERP organisations → CRM companies: the accounts our customers belong to."""

import pandas as pd

from integrations.contracts.crm_company import CRM_COMPANY
from integrations.contracts.erp_organisation import ERP_ORGANISATION
from integrations.engine.spec import FlowSpec, SourceTable, Target


def organisation_to_company(organisations: pd.DataFrame) -> pd.DataFrame:
    """Each field by its meaning in HubSpot's company model (the domain is its natural key
    there; ours is the organisation number, which survives a change of domain)."""
    return pd.DataFrame(
        {
            "erp_organisation_id": organisations["organisation_number"],
            "name": organisations["name"],
            "domain": organisations["domain"].str.lower(),
            "city": organisations["city"],
            "country": organisations["country"],
        },
        index=organisations.index,
    )


CRM_COMPANIES = FlowSpec(
    name="erp_organisations_to_crm_companies",
    description="ERP organisations as CRM companies, upserted by `erp_organisation_id`.",
    source=SourceTable(table="organisations", key="organisation_id"),
    source_contract=ERP_ORGANISATION,
    target=Target(
        system="crm",
        dataset="companies",
        id_property="erp_organisation_id",
        unique_ignoring_case=("domain",),
    ),
    target_contract=CRM_COMPANY,
    mapping=organisation_to_company,
    pool="crm_api",
)
