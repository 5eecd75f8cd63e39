from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from integrations.engine.spec import SourceTable
from integrations.sql.connect import create_engine
from integrations.sql.source import SqlSource


class ErpDatabase(dg.ConfigurableResource):
    """The system of record (SQLite or PostgreSQL), by SQLAlchemy URL."""

    url: str

    @contextmanager
    def source(self, table: SourceTable) -> Iterator[SqlSource]:
        engine = create_engine(self.url)
        try:
            yield SqlSource(engine, table)
        finally:
            engine.dispose()
