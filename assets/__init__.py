"""Flows, one module each; the factory builds their assets."""

from assets.crm_contacts import CRM_CONTACTS
from assets.crm_deals import CRM_DEALS

FLOWS = [CRM_CONTACTS, CRM_DEALS]
