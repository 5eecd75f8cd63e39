"""Dagster resources: typed connections to the ERP, the CRM, the helpdesk and the state store."""

from resources.crm import CrmResource
from resources.erp import ErpDatabase
from resources.helpdesk import HelpdeskResource
from resources.notifier import Notifier
from resources.state import StateStoreResource

__all__ = ["CrmResource", "ErpDatabase", "HelpdeskResource", "Notifier", "StateStoreResource"]
