"""Changes to ERP customers as a business user makes them: edits and soft deletes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa

from integrations.engine.state import utcnow
from integrations.erp.schema import customers

CITIES_AFTER_A_MOVE = ["Lisbon", "Vienna", "Oslo", "Dublin", "Prague", "Zurich", "Porto", "Ghent"]


def live_customer_ids(engine: sa.Engine) -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(customers.c.customer_id).where(customers.c.deleted_at.is_(None))
            ).scalars()
        )


def move_customers(engine: sa.Engine, customer_ids: Sequence[int], seed: int = 0) -> None:
    """The customers moved: a new city and phone number, `updated_at` = now."""
    rng = np.random.default_rng(seed)
    now = utcnow()
    with engine.begin() as connection:
        for customer_id in customer_ids:
            connection.execute(
                sa.update(customers)
                .where(customers.c.customer_id == customer_id)
                .values(
                    city=CITIES_AFTER_A_MOVE[int(rng.integers(len(CITIES_AFTER_A_MOVE)))],
                    phone=f"+{int(rng.integers(1, 99))} {int(rng.integers(0, 10**9)):09d}",
                    updated_at=now,
                )
            )


def soft_delete_customers(engine: sa.Engine, customer_ids: Sequence[int]) -> None:
    now = utcnow()
    with engine.begin() as connection:
        connection.execute(
            sa.update(customers)
            .where(customers.c.customer_id.in_(list(customer_ids)))
            .values(deleted_at=now, updated_at=now)
        )
