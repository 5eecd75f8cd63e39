from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from integrations.engine.spec import SourceTable, Target
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource


class ErpDatabase(dg.ConfigurableResource):
    """A system of record (an ERP: SQLite, PostgreSQL or MariaDB), by SQLAlchemy URL; one
    resource per system (`erp`, `chinook`), keyed as the flows' `SourceTable.system`."""

    url: str

    @contextmanager
    def source(self, table: SourceTable) -> Iterator[SqlSource]:
        engine = create_engine(self.url)
        try:
            yield SqlSource(engine, table)
        finally:
            engine.dispose()

    @contextmanager
    def destination(self, target: Target, log=None) -> Iterator[SqlTable]:
        """One of the ERP's staging tables (its schema owns them: never created here)."""
        engine = create_engine(self.url)
        try:
            yield SqlTable(engine, target)
        finally:
            engine.dispose()
