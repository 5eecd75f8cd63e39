"""ERP customers → RT users: who may open tickets, and how fast the helpdesk answers them."""

from __future__ import annotations

import pandas as pd

from integrations.contracts.erp_customer import ERP_CUSTOMER_WITH_PAID
from integrations.contracts.rt_user import RT_USER
from integrations.engine.spec import FlowSpec, RecentTotal, SourceTable, Target
from integrations.helpdesk.support_tier import TIER_FIELD, TIER_WINDOW, support_tier


def customer_to_rt_user(customers: pd.DataFrame) -> pd.DataFrame:
    """Each field by its meaning in RT's user model."""
    return pd.DataFrame(
        {
            # RT's unique user name: the customer number, stable when the email changes.
            "Name": customers["customer_number"],
            # RT matches incoming mail to users by address, ignoring case: store it lower-case.
            "EmailAddress": customers["email"].str.strip().str.lower(),
            "RealName": customers["first_name"] + " " + customers["last_name"],
            "Organization": customers["company_name"],
            "City": customers["city"],
            "Country": customers["country"],
            "WorkPhone": customers["phone"],
            f"CF.{{{TIER_FIELD}}}": support_tier(customers["paid_last_12_months"]),
        },
        index=customers.index,
    )


HELPDESK_USERS = FlowSpec(
    name="erp_customers_to_helpdesk_users",
    description="ERP customers as RT users named by customer number, with their support tier "
    "(paid EUR invoices over the last 12 months); soft-deleted customers are disabled in RT.",
    source=SourceTable(
        table="customers",
        key="customer_id",
        totals=(
            RecentTotal(
                "paid_last_12_months",
                table="invoices",
                via="customer_id",
                value="amount",
                dated="invoice_date",
                window=TIER_WINDOW,
                # The tiers' floors are EUR: an invoice in another currency is not summed.
                where=(("status", "paid"), ("currency", "EUR")),
            ),
        ),
    ),
    source_contract=ERP_CUSTOMER_WITH_PAID,
    target=Target(
        system="helpdesk",
        dataset="users",
        id_property="Name",
        unique_ignoring_case=("EmailAddress",),
    ),
    target_contract=RT_USER,
    mapping=customer_to_rt_user,
    pool="rt_api",
)
