from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from integrations.engine.state import StateStore


class StateStoreResource(dg.ConfigurableResource):
    """Ledger, cursors, DLQ and audit trail (SQLite or PostgreSQL), by SQLAlchemy URL."""

    url: str

    @contextmanager
    def open(self) -> Iterator[StateStore]:
        store = StateStore(self.url)
        try:
            yield store
        finally:
            store.dispose()
