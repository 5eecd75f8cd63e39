"""Run the contacts flow through the engine alone (no Dagster), as a script would."""

from assets.crm_contacts import CRM_CONTACTS
from integrations.crm.destination import CrmObjects
from integrations.engine.sync import Sync
from integrations.sql.source import SqlSource


def sync(erp, crm_client, state, run_id="run-1", full=False, log=None, arrow=True):
    source = SqlSource(erp, CRM_CONTACTS.source, arrow=arrow)
    destination = CrmObjects(crm_client, "contacts", "erp_customer_id")
    return Sync(
        CRM_CONTACTS, source, destination, state, run_id=run_id, actor="test", why="manual", log=log
    ).run(full=full)
