"""Dagster resources: typed connections to the ERP, the CRM and the state store."""

from resources.crm import CrmResource
from resources.erp import ErpDatabase
from resources.notifier import Notifier
from resources.state import StateStoreResource

__all__ = ["CrmResource", "ErpDatabase", "Notifier", "StateStoreResource"]
