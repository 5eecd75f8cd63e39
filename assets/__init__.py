"""Flows, one module each; the factory builds their assets."""

from assets.crm_companies import CRM_COMPANIES
from assets.crm_contacts import CRM_CONTACTS
from assets.crm_deals import CRM_DEALS
from assets.erp_support_tickets import ERP_SUPPORT_TICKETS
from assets.helpdesk_users import HELPDESK_USERS

FLOWS = [CRM_CONTACTS, CRM_COMPANIES, CRM_DEALS]
# The helpdesk is off unless configured (RT_BASE_URL): its flows join the code location then.
HELPDESK_FLOWS = [HELPDESK_USERS, ERP_SUPPORT_TICKETS]
