"""Flows, one module each; the factory builds their assets."""

from assets.chinook import CHINOOK_CUSTOMERS, CHINOOK_INVOICES
from assets.crm_companies import CRM_COMPANIES
from assets.crm_contacts import CRM_CONTACTS
from assets.crm_deals import CRM_DEALS
from assets.erp_crm_contact_updates import ERP_CRM_CONTACT_UPDATES
from assets.erp_crm_deals import ERP_CRM_DEALS
from assets.erp_support_tickets import ERP_SUPPORT_TICKETS
from assets.finance_invoices import FINANCE_INVOICES
from assets.finance_payments import FINANCE_PAYMENTS
from assets.helpdesk_users import HELPDESK_USERS

FLOWS = [
    CRM_CONTACTS,
    CRM_COMPANIES,
    CRM_DEALS,
    FINANCE_INVOICES,
    FINANCE_PAYMENTS,
    CHINOOK_CUSTOMERS,
    CHINOOK_INVOICES,
]
# The other direction: CRM changes into ERP staging tables, run by the webhook inbox's sensor.
CRM_TO_ERP_FLOWS = [ERP_CRM_CONTACT_UPDATES, ERP_CRM_DEALS]
# The helpdesk is off unless configured (RT_BASE_URL): its flows join the code location then.
HELPDESK_FLOWS = [HELPDESK_USERS, ERP_SUPPORT_TICKETS]
