"""Flows, one module each; the factory builds their assets."""

from assets.crm_companies import CRM_COMPANIES
from assets.crm_contacts import CRM_CONTACTS
from assets.crm_deals import CRM_DEALS

FLOWS = [CRM_CONTACTS, CRM_COMPANIES, CRM_DEALS]
