"""Fill the ERP with deterministic, realistically messy data.

A few percent of customers carry the faults real ERPs have: malformed emails, missing
countries, and emails that differ from another customer's only in case. The generator is
vectorised (numpy) and loads with executemany on SQLite and MariaDB and COPY on PostgreSQL, so a
million customers seed in seconds.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence

import numpy as np
import sqlalchemy as sa

from integrations.erp import schema
from integrations.sql.connect import create_engine

FIRST_NAMES = (
    "Ada Alan Alice Amara Ana Arjun Ben Bianca Carlos Chen Chloe Daniel Dmitri Elena Emma Farah "
    "Felix Grace Hana Hugo Ines Isaac Jana Jonas Julia Kai Kenji Lara Leila Liam Lucia Maya Mateo "
    "Mia Nadia Noah Olga Omar Paula Pedro Priya Rafael Rosa Sami Sofia Tariq Tomas Uma Yara Zoe"
).split()
LAST_NAMES = (
    "Adams Almeida Bauer Becker Costa Dubois Eriksen Fischer Garcia Haddad Hansen Ivanova Jensen "
    "Kim Kowalski Larsen Lopez Martin Meyer Moreau Nakamura Novak Okafor Olsen Patel Petrov Quinn "
    "Rossi Sato Schmidt Silva Smith Sousa Tanaka Torres Varga Wagner Weber Wong Yilmaz Zhang"
).split()
COMPANY_WORDS = (
    "Acme Apex Atlas Blue Cedar Crest Delta Echo Falcon Granite Harbor Iris Juniper Keystone "
    "Lumen Maple Nimbus Northwind Orbit Pioneer Quartz Redwood Summit Tidal Umbra Vertex Willow"
).split()
COMPANY_SUFFIXES = ["GmbH", "Ltd", "Inc", "SA", "BV", "AB", "Oy", "LLC"]
DOMAINS = ["example.com", "example.org", "mail.example.net", "post.example.de", "inbox.example.fr"]
COUNTRIES = ["DE", "FR", "GB", "US", "NL", "SE", "ES", "IT", "PL", "BR", "JP", "IN", "CA", "AU"]
CITIES = ["Berlin", "Paris", "London", "Boston", "Utrecht", "Malmo", "Sevilla", "Turin", "Gdansk"]
PRODUCT_WORDS = (
    "Cable Desk Lamp Chair Router Monitor Keyboard Drill Kettle Shelf Sensor Valve".split()
)

# Shares of customers with each fault (see the module docstring).
MALFORMED_EMAIL_SHARE = 0.02
MISSING_COUNTRY_SHARE = 0.02
CASE_DUPLICATE_EMAIL_SHARE = 0.01
SOFT_DELETED_SHARE = 0.01

EPOCH = np.datetime64("2024-01-01T00:00:00", "us")
LAST_SEEDED_CHANGE = np.datetime64("2026-06-30T00:00:00", "us")


def _timestamps(values: np.ndarray) -> list[str]:
    """datetime64[us] → the text SQLAlchemy's SQLite DateTime stores and compares."""
    text = np.datetime_as_string(values, unit="us")
    text.view(np.uint32).reshape(len(text), -1)[:, 10] = ord(" ")  # ISO's "T" → " "
    return text.tolist()


def _dates(values: np.ndarray) -> list[str]:
    return list(np.datetime_as_string(values.astype("datetime64[D]")))


def _random_instants(rng: np.random.Generator, n: int, start, end) -> np.ndarray:
    span = (end - start).astype(np.int64)
    return start + rng.integers(0, span, size=n).astype("timedelta64[us]")


def _malform(email: str, variant: int) -> str:
    local, domain = email.split("@")
    return [
        f"{local}{domain}",  # the @ went missing
        f"{local}@@{domain}",
        f"{local} @{domain}",
        f"{local}@{domain.split('.')[0]}",  # no top-level domain
    ][variant % 4]


def generate_organisations(n: int, rng: np.random.Generator) -> dict[str, list]:
    """Companies with unique names and domains; a few percent lack a country."""
    ids = np.arange(1, n + 1)
    words, suffixes = len(COMPANY_WORDS), len(COMPANY_SUFFIXES)
    combos = words * words * suffixes
    names = []
    picks = rng.choice(combos, size=n, replace=False) if n <= combos else rng.permutation(n)
    for i in picks:
        name = (
            f"{COMPANY_WORDS[i % words]} {COMPANY_WORDS[(i // words) % words]} "
            f"{COMPANY_SUFFIXES[(i // words**2) % suffixes]}"
        )
        names.append(name if i < combos else f"{name} {i // combos + 1}")
    countries = np.array(COUNTRIES, dtype=object)[rng.integers(0, len(COUNTRIES), n)]
    countries[rng.random(n) < MISSING_COUNTRY_SHARE] = None
    created = _random_instants(rng, n, EPOCH, LAST_SEEDED_CHANGE)
    return {
        "organisation_id": ids.tolist(),
        "organisation_number": [f"O{i:07d}" for i in ids],
        "name": names,
        "domain": [name.lower().replace(" ", "-") + ".example.com" for name in names],
        "city": np.array(CITIES)[rng.integers(0, len(CITIES), n)].tolist(),
        "country": countries.tolist(),
        "created_at": _timestamps(created),
        "updated_at": _timestamps(created),
        "deleted_at": [None] * n,
    }


def generate_customers(
    n: int, rng: np.random.Generator, organisations: dict[str, list]
) -> dict[str, list]:
    ids = np.arange(1, n + 1)
    first = np.array(FIRST_NAMES)[rng.integers(0, len(FIRST_NAMES), n)]
    last = np.array(LAST_NAMES)[rng.integers(0, len(LAST_NAMES), n)]
    domains = np.array(DOMAINS)[rng.integers(0, len(DOMAINS), n)]
    emails = [
        f"{f.lower()}.{la.lower()}.{i}@{d}"
        for f, la, i, d in zip(first, last, ids, domains, strict=True)
    ]

    fault = rng.random(n)
    malformed = fault < MALFORMED_EMAIL_SHARE
    case_dupe = (fault >= MALFORMED_EMAIL_SHARE) & (
        fault < MALFORMED_EMAIL_SHARE + CASE_DUPLICATE_EMAIL_SHARE
    )
    case_dupe[0] = False
    no_country = rng.random(n) < MISSING_COUNTRY_SHARE
    deleted = rng.random(n) < SOFT_DELETED_SHARE
    clean = ~(malformed | case_dupe | no_country | deleted)
    for index in np.flatnonzero(malformed):
        emails[index] = _malform(emails[index], int(index))
    # A case duplicate copies the email of an earlier clean customer, in another case.
    clean_ids = np.flatnonzero(clean)
    copied: set[int] = set()
    for index in np.flatnonzero(case_dupe):
        earlier = int(np.searchsorted(clean_ids, index))
        if earlier == 0:
            continue
        target = clean_ids[rng.integers(0, earlier)]
        if target in copied:
            continue  # one twin per email: every email stays unique when case counts
        copied.add(target)
        local, domain = emails[target].split("@")
        emails[index] = f"{local.title()}@{domain.upper()}"

    countries = np.array(COUNTRIES, dtype=object)[rng.integers(0, len(COUNTRIES), n)]
    countries[no_country] = None
    phones = [
        f"+{cc} {num:09d}"
        for cc, num in zip(rng.integers(1, 99, n), rng.integers(0, 10**9, n), strict=True)
    ]
    for index in np.flatnonzero(rng.random(n) < 0.1):
        phones[index] = None
    has_organisation = rng.random(n) < 0.7
    organisation_ids = rng.integers(1, len(organisations["organisation_id"]) + 1, n)
    organisation_ids = np.where(has_organisation, organisation_ids, 0)
    names = organisations["name"]
    created = _random_instants(rng, n, EPOCH, LAST_SEEDED_CHANGE)
    updated = created + ((LAST_SEEDED_CHANGE - created) * rng.random(n) * 0.5).astype(
        "timedelta64[us]"
    )
    deleted_at = np.array(_timestamps(updated), dtype=object)
    deleted_at[~deleted] = None
    return {
        "customer_id": ids.tolist(),
        "customer_number": [f"C{i:07d}" for i in ids],
        "first_name": first.tolist(),
        "last_name": last.tolist(),
        "email": emails,
        "phone": phones,
        "organisation_id": [int(i) if i else None for i in organisation_ids],
        "company_name": [names[i - 1] if i else None for i in organisation_ids],
        "city": np.array(CITIES)[rng.integers(0, len(CITIES), n)].tolist(),
        "country": countries.tolist(),
        "created_at": _timestamps(created),
        "updated_at": _timestamps(updated),
        "deleted_at": deleted_at.tolist(),
    }


def generate_products(n: int, rng: np.random.Generator) -> dict[str, list]:
    ids = np.arange(1, n + 1)
    created = _random_instants(rng, n, EPOCH, EPOCH + np.timedelta64(30, "D"))
    prices = np.round(rng.uniform(2, 900, n), 2)
    return {
        "product_id": ids.tolist(),
        "sku": [f"SKU-{i:06d}" for i in ids],
        "name": [f"{PRODUCT_WORDS[i % len(PRODUCT_WORDS)]} {i}" for i in ids],
        "unit_price": prices.tolist(),
        "created_at": _timestamps(created),
        "updated_at": _timestamps(created),
        "deleted_at": [None] * n,
    }


def generate_sales(
    customers: int, products: dict[str, list], rng: np.random.Generator
) -> tuple[dict[str, list], dict[str, list], dict[str, list]]:
    """Orders, one invoice per fulfilled order, one payment per paid invoice."""
    n = max(customers // 4, 1)
    ids = np.arange(1, n + 1)
    customer_ids = rng.integers(1, customers + 1, n)
    product_index = rng.integers(0, len(products["product_id"]), n)
    quantity = rng.integers(1, 6, n)
    totals = np.round(np.array(products["unit_price"])[product_index] * quantity, 2)
    ordered_at = _random_instants(rng, n, EPOCH, LAST_SEEDED_CHANGE - np.timedelta64(40, "D"))
    fulfilled = rng.random(n) < 0.9
    orders = {
        "order_id": ids.tolist(),
        "customer_id": customer_ids.tolist(),
        "product_id": (product_index + 1).tolist(),
        "quantity": quantity.tolist(),
        "order_date": _dates(ordered_at),
        "status": np.where(fulfilled, "fulfilled", "cancelled").tolist(),
        "total": totals.tolist(),
        "currency": ["EUR"] * n,
        "created_at": _timestamps(ordered_at),
        "updated_at": _timestamps(ordered_at),
        "deleted_at": [None] * n,
    }
    order_rows = np.flatnonzero(fulfilled)
    m = len(order_rows)
    invoiced_at = ordered_at[order_rows] + rng.integers(0, 3, m).astype("timedelta64[D]")
    state = rng.random(m)
    status = np.where(state < 0.75, "paid", np.where(state < 0.95, "open", "void"))
    invoice_ids = np.arange(1, m + 1)
    invoices = {
        "invoice_id": invoice_ids.tolist(),
        "invoice_number": [f"INV-{i:08d}" for i in invoice_ids],
        "order_id": ids[order_rows].tolist(),
        "customer_id": customer_ids[order_rows].tolist(),
        "invoice_date": _dates(invoiced_at),
        "due_date": _dates(invoiced_at + np.timedelta64(30, "D")),
        "amount": totals[order_rows].tolist(),
        "currency": ["EUR"] * m,
        "status": status.tolist(),
        "created_at": _timestamps(invoiced_at),
        "updated_at": _timestamps(invoiced_at),
        "deleted_at": [None] * m,
    }
    paid = np.flatnonzero(status == "paid")
    paid_at = invoiced_at[paid] + rng.integers(1, 30, len(paid)).astype("timedelta64[D]")
    payments = {
        "payment_id": np.arange(1, len(paid) + 1).tolist(),
        "invoice_id": invoice_ids[paid].tolist(),
        "paid_on": _dates(paid_at),
        "amount": totals[order_rows][paid].tolist(),
        "method": np.array(["card", "transfer", "direct_debit"])[
            rng.integers(0, 3, len(paid))
        ].tolist(),
        "created_at": _timestamps(paid_at),
        "updated_at": _timestamps(paid_at),
        "deleted_at": [None] * len(paid),
    }
    return orders, invoices, payments


def _load_sqlite(engine: sa.Engine, table: sa.Table, columns: dict[str, list]) -> None:
    names = list(columns)
    placeholders = ", ".join("?" for _ in names)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.execute("PRAGMA cache_size=-262144")
        cursor.executemany(
            f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({placeholders})",
            zip(*columns.values(), strict=True),
        )
        raw.commit()
    finally:
        raw.close()


def _load_postgresql(engine: sa.Engine, table: sa.Table, columns: dict[str, list]) -> None:
    names = list(columns)
    # COPY's CSV format reads an unquoted empty field (how csv writes None) as NULL.
    buffer = io.StringIO()
    csv.writer(buffer).writerows(zip(*columns.values(), strict=True))
    raw = engine.raw_connection()
    try:
        connection = raw.driver_connection
        with (
            connection.cursor() as cursor,
            cursor.copy(f"COPY {table.name} ({', '.join(names)}) FROM STDIN (FORMAT csv)") as copy,
        ):
            copy.write(buffer.getvalue())
        connection.commit()
    finally:
        raw.close()


def _load_mysql(engine: sa.Engine, table: sa.Table, columns: dict[str, list]) -> None:
    names = list(columns)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        rows = list(zip(*columns.values(), strict=True))
        # PyMySQL turns an executemany INSERT into multi-row statements of up to ~1 MB each.
        for start in range(0, len(rows), 50_000):
            cursor.executemany(
                f"INSERT INTO {table.name} ({', '.join(names)}) "
                f"VALUES ({', '.join('%s' for _ in names)})",
                rows[start : start + 50_000],
            )
        raw.commit()
    finally:
        raw.close()


LOADERS: dict[str, Callable[[sa.Engine, sa.Table, dict[str, list]], None]] = {
    "sqlite": _load_sqlite,
    "postgresql": _load_postgresql,
    "mysql": _load_mysql,
    "mariadb": _load_mysql,
}


def seed_erp(url: str, rows: int, seed: int = 42) -> dict[str, int]:
    """Recreate the ERP schema at `url` and fill it; returns the row count per table."""
    if rows < 1:
        raise ValueError("--rows must be at least 1")
    engine = create_engine(url)
    loader = LOADERS.get(engine.dialect.name)
    if loader is None:
        raise NotImplementedError(
            f"seeding is implemented for {sorted(LOADERS)}, not {engine.dialect.name}"
        )
    rng = np.random.default_rng(seed)
    organisations = generate_organisations(max(10, rows // 20), rng)
    customers = generate_customers(rows, rng, organisations)
    products = generate_products(max(50, min(5000, rows // 100)), rng)
    orders, invoices, payments = generate_sales(rows, products, rng)
    tables: Sequence[tuple[sa.Table, dict[str, list]]] = [
        (schema.organisations, organisations),
        (schema.customers, customers),
        (schema.products, products),
        (schema.orders, orders),
        (schema.invoices, invoices),
        (schema.payments, payments),
    ]
    schema.metadata.drop_all(engine)
    counts = {}
    for table, columns in tables:
        # Secondary indexes are built after the load: much faster than maintaining them row by row.
        with engine.begin() as connection:
            connection.execute(sa.schema.CreateTable(table))
        loader(engine, table, columns)
        for index in table.indexes:
            index.create(engine)
        counts[table.name] = len(next(iter(columns.values())))
    schema.metadata.create_all(engine)  # the staging tables handoff fills, empty
    engine.dispose()
    return counts
