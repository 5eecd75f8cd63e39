"""Dagster resources: typed connections to the systems of record, the CRM, the helpdesk, SQL
destinations and the state store."""

from resources.crm import CrmResource
from resources.erp import ErpDatabase
from resources.helpdesk import HelpdeskResource
from resources.notifier import Notifier
from resources.sql_destination import SqlDestinationDatabase
from resources.state import StateStoreResource

__all__ = [
    "CrmResource",
    "ErpDatabase",
    "HelpdeskResource",
    "Notifier",
    "SqlDestinationDatabase",
    "StateStoreResource",
]
