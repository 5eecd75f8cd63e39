"""Flows, one module each; the factory builds their assets."""

from assets.chinook import CHINOOK_CUSTOMERS, CHINOOK_INVOICES
from assets.crm_companies import CRM_COMPANIES
from assets.crm_contacts import CRM_CONTACTS
from assets.crm_deals import CRM_DEALS
from assets.finance_invoices import FINANCE_INVOICES
from assets.finance_payments import FINANCE_PAYMENTS

FLOWS = [
    CRM_CONTACTS,
    CRM_COMPANIES,
    CRM_DEALS,
    FINANCE_INVOICES,
    FINANCE_PAYMENTS,
    CHINOOK_CUSTOMERS,
    CHINOOK_INVOICES,
]
