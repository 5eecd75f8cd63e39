"""Materialize crm/contacts in a process of its own (the crash test kills it with SIGKILL)."""

import dagster as dg

from assets.crm_contacts import CRM_CONTACTS
from assets.factory import flow_asset
from definitions import resources

if __name__ == "__main__":
    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize([flow_asset(CRM_CONTACTS)], resources=resources(), instance=instance)
