"""Dagster resources: typed connections to the systems of record, the CRM, SQL destinations and
the state store."""

from resources.crm import CrmResource
from resources.erp import ErpDatabase
from resources.notifier import Notifier
from resources.sql_destination import SqlDestinationDatabase
from resources.state import StateStoreResource

__all__ = ["CrmResource", "ErpDatabase", "Notifier", "SqlDestinationDatabase", "StateStoreResource"]
