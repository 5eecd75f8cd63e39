"""Flows, one module each; the factory builds their assets."""

from assets.crm_contacts import CRM_CONTACTS

FLOWS = [CRM_CONTACTS]
