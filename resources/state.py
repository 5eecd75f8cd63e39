from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from integrations.engine.state import StateStore


class StateStoreResource(dg.ConfigurableResource):
    """Ledger, cursors, DLQ and audit trail (SQLite or PostgreSQL), by SQLAlchemy URL."""

    url: str
    dlq_key: str = Field(
        description="Bind to dg.EnvVar('HANDOFF_DLQ_KEY'): the Fernet key of the DLQ's payloads."
    )

    @contextmanager
    def open(self) -> Iterator[StateStore]:
        store = StateStore(self.url, dlq_key=self.dlq_key)
        try:
            yield store
        finally:
            store.dispose()
