from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from integrations.engine.spec import Target
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable


class SqlDestinationDatabase(dg.ConfigurableResource):
    """A SQL database that flows write into (a finance reporting database): SQLite, PostgreSQL
    or MariaDB, by SQLAlchemy URL. Each flow's target dataset is one of its tables."""

    url: str
    create_missing_tables: bool = Field(
        default=False,
        description="Create a flow's table from its target contract when it is missing "
        "(the embedded demo database); off where DBAs own the schema.",
    )

    @contextmanager
    def destination(self, target: Target, log=None) -> Iterator[SqlTable]:
        engine = create_engine(self.url)
        try:
            yield SqlTable(engine, target, create_missing=self.create_missing_tables)
        finally:
            engine.dispose()
