"""handoff's own tables (state store, webhook inbox), created when missing and brought up to date
when an older handoff made them.

Between versions these tables only gain tables, columns and indexes. `create_or_evolve` makes
the missing tables, adds the columns an older table lacks (nullable or defaulted ones, in place:
existing rows get NULL or the default) and creates the missing indexes. A column it cannot add
by itself (NOT NULL without a default: existing rows would have no value) stops it with the
table, the column and what to do, before anything is changed.
"""

from __future__ import annotations

import sqlalchemy as sa


class SchemaOutdated(Exception):
    """A table an older handoff made lacks a column that cannot be added in place."""


def create_or_evolve(connection: sa.Connection, metadata: sa.MetaData, owner: str) -> list[str]:
    """Create or bring up to date `metadata`'s tables; returns what it added ("table.column",
    "index name"). `owner` names the tables in an error ("the state store")."""
    inspector = sa.inspect(connection)
    present = {table.name for table in metadata.sorted_tables if inspector.has_table(table.name)}
    missing_columns = []
    for table in metadata.sorted_tables:
        if table.name not in present:
            continue
        have = {column["name"] for column in inspector.get_columns(table.name)}
        missing_columns += [column for column in table.columns if column.name not in have]
    blocking = [c for c in missing_columns if not c.nullable and c.server_default is None]
    if blocking:
        names = ", ".join(f"{column.table.name}.{column.name}" for column in blocking)
        raise SchemaOutdated(
            f"{owner} at {connection.engine.url.render_as_string(hide_password=True)} was made by "
            f"an older handoff: {names} cannot be added to rows that exist (NOT NULL, no "
            "default). What to do: point handoff at a new database for it (the first run of "
            "each flow then compares every record again, and upserts make resending harmless), "
            "and keep the old one for its history"
        )
    metadata.create_all(
        connection, tables=[t for t in metadata.sorted_tables if t.name not in present]
    )
    added = []
    quote = connection.dialect.identifier_preparer.quote
    for column in missing_columns:
        spec = sa.schema.CreateColumn(column).compile(dialect=connection.dialect)
        connection.exec_driver_sql(f"ALTER TABLE {quote(column.table.name)} ADD COLUMN {spec}")
        added.append(f"{column.table.name}.{column.name}")
    for table in metadata.sorted_tables:
        if table.name not in present:
            continue
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(connection)
                added.append(index.name)
    return added
