"""CRM contacts → ERP staging: what salespeople changed in the CRM, for the ERP's owners to take in."""

from __future__ import annotations

import pandas as pd

from assets.crm_contacts import CRM_CONTACTS
from integrations.contracts.crm_contact_object import CRM_CONTACT_OBJECT
from integrations.contracts.erp_crm_contact_update import ERP_CRM_CONTACT_UPDATE
from integrations.engine.spec import FlowSpec, SourceTable, Target


def contact_to_staging_row(contacts: pd.DataFrame) -> pd.DataFrame:
    """Each field by its meaning in the ERP's staging table; emails compared ignoring case."""
    return pd.DataFrame(
        {
            "crm_contact_id": contacts["hs_object_id"],
            "erp_customer_id": contacts["erp_customer_id"],
            "email": contacts["email"].str.strip().str.lower(),
            "firstname": contacts["firstname"],
            "lastname": contacts["lastname"],
            "phone": contacts["phone"],
            "company": contacts["company"],
            "city": contacts["city"],
            "country": contacts["country"].str.upper(),
            "crm_modified_at": contacts["lastmodifieddate"],
        },
        index=contacts.index,
    )


ERP_CRM_CONTACT_UPDATES = FlowSpec(
    name="crm_contacts_to_erp_contact_updates",
    description="CRM contacts into the ERP's `crm_contact_updates` staging table by CRM id, read "
    "by the CRM search API on lastmodifieddate; runs when CRM webhooks arrive (crm_webhooks).",
    source=SourceTable(
        table="contacts", key="hs_object_id", cursor="lastmodifieddate", system="crm", deleted=None
    ),
    source_contract=CRM_CONTACT_OBJECT,
    target=Target(system="erp", dataset="crm_contact_updates", id_property="crm_contact_id"),
    target_contract=ERP_CRM_CONTACT_UPDATE,
    mapping=contact_to_staging_row,
    pool="crm_api",
    archive_deleted=False,
    watch_source=False,  # the webhook inbox says when; the hourly schedule catches lost webhooks
    echo_of=CRM_CONTACTS,  # what handoff wrote there comes back as changes: not staged
)
