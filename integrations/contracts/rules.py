"""Rules shared by several contracts."""

from __future__ import annotations

import pandas as pd

# Deliberately plain: one @, no spaces, a dot in the domain. What HubSpot and mail servers refuse.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s.]+$"


def is_email(values: pd.Series) -> pd.Series:
    return values.str.fullmatch(EMAIL_PATTERN).fillna(False).astype(bool)


def first_of_case_insensitive_duplicates(values: pd.Series) -> pd.Series:
    """True for each value not already seen earlier in the batch, ignoring case."""
    return ~values.str.lower().duplicated(keep="first")
