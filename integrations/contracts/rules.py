"""Rules shared by several contracts."""

from __future__ import annotations

import pandas as pd


def whole(pattern: str) -> str:
    r"""`pattern` for pandera's `str_matches` (Python's `re.match`) that the whole value must
    match. Written `^…$`, a pattern also took the value with a newline at its end: `$` matches
    before a final newline, so "C1234567\n" was a valid customer number, and became a CRM key
    that the same customer, once the ERP trimmed it, no longer had. Write digits as `[0-9]`: `\d`
    takes any script's digits ("C١٢٣٤٥٦٧")."""
    return rf"^(?:{pattern})\Z" if "|" in pattern else rf"^{pattern}\Z"


# The ERP's keys and codes, as every contract that holds them reads them.
CUSTOMER_NUMBER = whole("C[0-9]{7}")
ORGANISATION_NUMBER = whole("O[0-9]{7}")
INVOICE_NUMBER = whole("INV-[0-9]{8}")
COUNTRY_CODE = whole("[A-Z]{2}")  # ISO 3166-1 alpha-2
CURRENCY_CODE = whole("[A-Z]{3}")  # ISO 4217
DAY = whole("[0-9]{4}-[0-9]{2}-[0-9]{2}")  # an ISO 8601 date, nothing after it

# Deliberately plain: one @, no spaces, a dot in the domain. What HubSpot and mail servers refuse.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s.]+$"


def is_email(values: pd.Series) -> pd.Series:
    return values.str.fullmatch(EMAIL_PATTERN).fillna(False).astype(bool)


def first_of_case_insensitive_duplicates(values: pd.Series) -> pd.Series:
    """True for each value not already seen earlier in the batch, ignoring case."""
    return ~values.str.lower().duplicated(keep="first")


def utf8_bytes(values: pd.Series) -> pd.Series:
    """Each text's length in bytes of UTF-8: what a database column of so many bytes holds."""
    return values.str.encode("utf-8").str.len()
