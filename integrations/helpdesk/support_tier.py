"""The support tier: what a customer paid us over the last 12 months decides how fast we answer.

RT holds it as a single-value Select custom field on users; the setup creates the field with
exactly these values, and the helpdesk user contract accepts only these.
"""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

TIER_FIELD = "Support tier"
TIER_WINDOW = timedelta(days=365)
# (tier, paid at least this much in the window, EUR), best first; "basic" is everybody else.
TIER_FLOORS = (("gold", 2500.0), ("silver", 500.0), ("bronze", 0.01))
TIERS = (*(tier for tier, _ in TIER_FLOORS), "basic")


def support_tier(paid: pd.Series) -> pd.Series:
    """Each customer's tier from the sum of their paid invoices in the window (missing = 0)."""
    amounts = pd.to_numeric(paid, errors="coerce").fillna(0.0).astype(float)
    tiers = pd.Series("basic", index=paid.index, dtype=object)
    for tier, floor in reversed(TIER_FLOORS):
        tiers[amounts >= floor] = tier
    return tiers
