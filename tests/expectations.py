"""What the CRM should hold, computed from the ERP independently of the engine."""

from __future__ import annotations

import re
from collections import defaultdict

import sqlalchemy as sa

from integrations.crm.client import CrmClient
from integrations.sql.connect import create_engine

EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")


def valid_customers(erp_url: str) -> dict[str, str]:
    """customer_number → lower-cased email, for live customers that satisfy the contracts."""
    engine = create_engine(erp_url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT customer_number, email, country FROM customers WHERE deleted_at IS NULL"
            )
        ).all()
    engine.dispose()
    return {
        number: email.strip().lower()
        for number, email, country in rows
        if email
        and EMAIL.fullmatch(email.strip())
        and country
        and re.fullmatch(r"[A-Z]{2}", country)
    }


def crm_contacts(client: CrmClient) -> list[dict]:
    return list(client.list_objects("contacts", properties=["erp_customer_id", "email", "city"]))


def assert_crm_matches_erp(erp_url: str, client: CrmClient) -> None:
    """Every valid customer is a contact, once; customers sharing an email (ignoring case) have
    exactly one contact among them; nothing else is in the CRM."""
    contacts = crm_contacts(client)
    assert_one_per_valid_customer(
        erp_url, [contact["properties"]["erp_customer_id"] for contact in contacts]
    )


def assert_one_per_valid_customer(erp_url: str, numbers: list[str]) -> None:
    """`numbers` (the customer numbers a destination holds) name every valid customer once;
    of customers sharing an email (ignoring case) exactly one; and nobody else."""
    expected = valid_customers(erp_url)
    assert len(numbers) == len(set(numbers)), "duplicate records for one customer"
    assert set(numbers) <= set(expected), "records that are not valid ERP customers"
    by_email: dict[str, list[str]] = defaultdict(list)
    for number, email in expected.items():
        by_email[email].append(number)
    missing = [group for group in by_email.values() if len(set(group) & set(numbers)) != 1]
    assert not missing, f"{len(missing)} valid customers (or email groups) are missing or doubled"
