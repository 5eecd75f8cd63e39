"""A table in a system of record, streamed in keyset-paginated batches.

Each batch is one short query `WHERE (cursor, key) > (last cursor, last key) ORDER BY cursor, key
LIMIT n`: memory is bounded by the batch, no transaction stays open across batches, and a
crashed sync resumes where its last committed batch ended.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

import pandas as pd
import sqlalchemy as sa

from integrations.engine.spec import SourceTable
from integrations.sql.connect import raise_on_lost_connection


class SourceSchemaError(Exception):
    """The configured table or columns are not in the source database."""


class SourceUnavailable(Exception):
    """The source database could not be reached, or dropped the connection mid-extract."""


class SqlSource:
    def __init__(self, engine: sa.Engine, spec: SourceTable):
        self.engine = engine
        self.spec = spec
        raise_on_lost_connection(engine, SourceUnavailable, f"the source database of {spec.table}")
        # Identifiers from configuration are checked against the reflected schema, never interpolated.
        try:
            self.table = sa.Table(spec.table, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError as error:
            raise SourceSchemaError(
                f"table {spec.table!r} is not in the source database"
            ) from error
        wanted = [spec.key, spec.cursor] + ([spec.deleted] if spec.deleted else [])
        missing = [name for name in wanted if name not in self.table.c]
        if missing:
            raise SourceSchemaError(f"table {spec.table!r} has no column(s) {missing}")
        self.key = self.table.c[spec.key]
        self.cursor = self.table.c[spec.cursor]
        self.select, self.columns = self._with_lookups()

    def _with_lookups(self) -> tuple[sa.Select, list[str]]:
        joined, extra = self.table, []
        for lookup in self.spec.lookups:
            try:
                parent = sa.Table(lookup.table, sa.MetaData(), autoload_with=self.engine)
            except sa.exc.NoSuchTableError as error:
                raise SourceSchemaError(
                    f"lookup table {lookup.table!r} is not in the source"
                ) from error
            missing = [c for c in (lookup.key, lookup.value) if c not in parent.c]
            if missing or lookup.via not in self.table.c:
                raise SourceSchemaError(f"lookup {lookup.name!r} names unknown columns")
            joined = joined.outerjoin(parent, self.table.c[lookup.via] == parent.c[lookup.key])
            extra.append(parent.c[lookup.value].label(lookup.name))
        columns = [*self.table.c.keys(), *(lookup.name for lookup in self.spec.lookups)]
        return sa.select(self.table, *extra).select_from(joined), columns

    def in_window(self, column: str, start: datetime, end: datetime) -> sa.ColumnElement[bool]:
        """`start <= column < end`, as dates when the column is a date."""
        if column not in self.table.c:
            raise SourceSchemaError(f"table {self.spec.table!r} has no column {column!r}")
        target = self.table.c[column]
        if isinstance(target.type, sa.Date):
            start, end = start.date(), end.date()
        return sa.and_(target >= start, target < end)

    def batches(
        self,
        since: datetime | None,
        batch_size: int,
        within: sa.ColumnElement[bool] | None = None,
    ) -> Iterator[pd.DataFrame]:
        """Rows with cursor ≥ `since` (all rows when None) and `within` (a partition window),
        in (cursor, key) order."""
        position = sa.tuple_(self.cursor, self.key)
        scope = within if within is not None else sa.true()
        condition = self.cursor >= since if since is not None else sa.true()
        columns = self.columns
        while True:
            query = (
                self.select.where(scope, condition)
                .order_by(self.cursor, self.key)
                .limit(batch_size)
            )
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
            if not rows:
                return
            yield pd.DataFrame.from_records(rows, columns=columns)
            if len(rows) < batch_size:
                return
            last = rows[-1]
            condition = position > sa.tuple_(
                sa.literal(last[columns.index(self.spec.cursor)], self.cursor.type),
                sa.literal(last[columns.index(self.spec.key)], self.key.type),
            )

    def rows_with_keys(self, keys: Sequence[object], batch_size: int) -> Iterator[pd.DataFrame]:
        """The rows with these keys (a repair), in (cursor, key) order within each batch."""
        native = []
        for key in keys:
            try:
                native.append(self.key.type.python_type(key))
            except (TypeError, ValueError):
                continue  # a key of the wrong type names no row of this table
        for start in range(0, len(native), batch_size):
            chunk = native[start : start + batch_size]
            query = self.select.where(self.key.in_(chunk)).order_by(self.cursor, self.key)
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
            if rows:
                yield pd.DataFrame.from_records(rows, columns=self.columns)

    def deleted_keys(self, since: datetime | None) -> list[object]:
        """Keys of soft-deleted rows with cursor ≥ `since`: what a run would archive at most."""
        if not self.spec.deleted:
            return []
        deleted = self.table.c[self.spec.deleted]
        query = sa.select(self.key).where(deleted.is_not(None))
        if since is not None:
            query = query.where(self.cursor >= since)
        with self.engine.connect() as connection:
            return list(connection.execute(query).scalars())

    def high_water_mark(self) -> datetime | None:
        """The newest cursor value in the table: the sensor's cheap 'did anything change?'."""
        with self.engine.connect() as connection:
            return connection.execute(sa.select(sa.func.max(self.cursor))).scalar_one()
