"""The ERP schema: customers, products, orders, invoices, payments.

Every table has `updated_at` (the sync cursor) and `deleted_at` (soft deletes). Times keep
microseconds on every dialect (MariaDB's DATETIME keeps whole seconds unless told otherwise).
"""

from __future__ import annotations

import sqlalchemy as sa

from integrations.sql.fit import MICROSECOND_DATETIME as DATETIME

metadata = sa.MetaData()


def _lifecycle_columns() -> list[sa.Column]:
    return [
        sa.Column("created_at", DATETIME, nullable=False),
        sa.Column("updated_at", DATETIME, nullable=False),
        sa.Column("deleted_at", DATETIME, nullable=True),
    ]


organisations = sa.Table(
    "organisations",
    metadata,
    sa.Column("organisation_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("organisation_number", sa.String(16), nullable=False, unique=True),
    sa.Column("name", sa.String(160), nullable=False),
    sa.Column("domain", sa.String(160), nullable=True),
    sa.Column("city", sa.String(80), nullable=True),
    sa.Column("country", sa.String(2), nullable=True),
    *_lifecycle_columns(),
    sa.Index("ix_organisations_updated_at", "updated_at", "organisation_id"),
)

customers = sa.Table(
    "customers",
    metadata,
    sa.Column("customer_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("customer_number", sa.String(16), nullable=False, unique=True),
    sa.Column("first_name", sa.String(80), nullable=False),
    sa.Column("last_name", sa.String(80), nullable=False),
    sa.Column("email", sa.String(255), nullable=True),
    sa.Column("phone", sa.String(40), nullable=True),
    sa.Column(
        "organisation_id", sa.Integer, sa.ForeignKey("organisations.organisation_id"), nullable=True
    ),
    # The organisation's name as printed on the customer record (ERPs keep it denormalised).
    sa.Column("company_name", sa.String(160), nullable=True),
    sa.Column("city", sa.String(80), nullable=True),
    sa.Column("country", sa.String(2), nullable=True),
    *_lifecycle_columns(),
    sa.Index("ix_customers_updated_at", "updated_at", "customer_id"),
)

products = sa.Table(
    "products",
    metadata,
    sa.Column("product_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sku", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(160), nullable=False),
    sa.Column("unit_price", sa.Numeric(12, 2), nullable=False),
    *_lifecycle_columns(),
    sa.Index("ix_products_updated_at", "updated_at", "product_id"),
)

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("order_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.customer_id"), nullable=False),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.product_id"), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("order_date", sa.Date, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("total", sa.Numeric(12, 2), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    *_lifecycle_columns(),
    sa.Index("ix_orders_updated_at", "updated_at", "order_id"),
)

invoices = sa.Table(
    "invoices",
    metadata,
    sa.Column("invoice_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("invoice_number", sa.String(20), nullable=False, unique=True),
    sa.Column("order_id", sa.Integer, sa.ForeignKey("orders.order_id"), nullable=False),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.customer_id"), nullable=False),
    sa.Column("invoice_date", sa.Date, nullable=False),
    sa.Column("due_date", sa.Date, nullable=False),
    sa.Column("amount", sa.Numeric(12, 2), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    *_lifecycle_columns(),
    sa.Index("ix_invoices_updated_at", "updated_at", "invoice_id"),
    sa.Index("ix_invoices_invoice_date", "invoice_date"),
    # A customer's invoices (the helpdesk's support tier sums them per customer).
    sa.Index("ix_invoices_customer_id", "customer_id", "status"),
)

payments = sa.Table(
    "payments",
    metadata,
    sa.Column("payment_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("invoice_id", sa.Integer, sa.ForeignKey("invoices.invoice_id"), nullable=False),
    sa.Column("paid_on", sa.Date, nullable=False),
    sa.Column("amount", sa.Numeric(12, 2), nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    *_lifecycle_columns(),
    sa.Index("ix_payments_updated_at", "updated_at", "payment_id"),
)

# Staging: helpdesk tickets as handoff brings them in from RT (the erp/support_tickets flow).
support_tickets = sa.Table(
    "support_tickets",
    metadata,
    sa.Column("ticket_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("status", sa.String(64), nullable=False),
    sa.Column("queue", sa.String(200), nullable=False),
    sa.Column("customer_number", sa.String(16), nullable=True),
    sa.Column("requestor_email", sa.String(255), nullable=True),
    sa.Column("created_at", DATETIME, nullable=False),
    sa.Column("resolved_at", DATETIME, nullable=True),
    sa.Column("last_updated_at", DATETIME, nullable=False),
    sa.Column("archived_at", DATETIME, nullable=True),
    sa.Index("ix_support_tickets_customer_number", "customer_number"),
)

# Staging: CRM contacts and deals as handoff brings them in from the CRM (erp/crm_contact_updates,
# erp/crm_deals), keyed by the CRM's object id; the ERP's owners take what they trust from here.
crm_contact_updates = sa.Table(
    "crm_contact_updates",
    metadata,
    sa.Column("crm_contact_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("erp_customer_id", sa.String(16), nullable=True),
    sa.Column("email", sa.String(255), nullable=True),
    sa.Column("firstname", sa.String(80), nullable=True),
    sa.Column("lastname", sa.String(80), nullable=True),
    sa.Column("phone", sa.String(40), nullable=True),
    sa.Column("company", sa.String(160), nullable=True),
    sa.Column("city", sa.String(80), nullable=True),
    sa.Column("country", sa.String(2), nullable=True),
    sa.Column("crm_modified_at", DATETIME, nullable=False),
    sa.Column("archived_at", DATETIME, nullable=True),
    sa.Index("ix_crm_contact_updates_erp_customer_id", "erp_customer_id"),
)

crm_deals = sa.Table(
    "crm_deals",
    metadata,
    sa.Column("crm_deal_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("erp_invoice_id", sa.String(20), nullable=True),
    sa.Column("dealname", sa.String(255), nullable=False),
    sa.Column("amount", sa.Numeric(14, 2), nullable=True),
    sa.Column("currency", sa.String(3), nullable=True),
    sa.Column("dealstage", sa.String(64), nullable=False),
    sa.Column("pipeline", sa.String(64), nullable=True),
    sa.Column("close_date", DATETIME, nullable=True),
    sa.Column("crm_modified_at", DATETIME, nullable=False),
    sa.Column("archived_at", DATETIME, nullable=True),
    sa.Index("ix_crm_deals_erp_invoice_id", "erp_invoice_id"),
)

TABLES_IN_LOAD_ORDER = [organisations, customers, products, orders, invoices, payments]
