"""What the engine needs from a source: batches changed since a watermark, rows by key, and its
high-water mark. A table of a system of record (integrations/sql/source.py) and a helpdesk's
tickets over its API (integrations/helpdesk/source.py) both offer it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import pandas as pd

# A cursor value this far past the present is a mistake in the source (a typo's year 2099, a
# clock gone wrong), not a change still to come: it moves no watermark, and no sensor's mark.
FAR_FUTURE = timedelta(days=1)


class SourceUnavailable(Exception):
    """The source could not be read (an API that is down, its circuit open); nothing was lost."""


# What to do about a database's SourceReadFailed, before "then rerun …".
FIX_THE_SOURCE = (
    "fix what the database says in the source (a view or computed column failing on a row's "
    "value, a column changed, a grant missing)"
)


class SourceReadFailed(Exception):
    """The source answered but refused a read (a view's cast or a computed column failing on one
    row, a column changed, a permission taken away; an API's 4xx): a rerun alone does not cure
    it. Its text names the table and the source's complaint, without the SQL, its parameters or
    the values it quotes; `todo` is what cures it, before "then rerun" (a database's by
    default)."""

    def __init__(self, message: str, todo: str = FIX_THE_SOURCE):
        super().__init__(message)
        self.todo = todo

    def __reduce__(self):
        return type(self), (str(self), self.todo)


class Source(Protocol):
    def batches(
        self, since: datetime | None, batch_size: int, within: object | None = None
    ) -> Iterator[pd.DataFrame]:
        """Rows with cursor ≥ `since` (all rows when None) and `within` (a partition window,
        from `in_window`), in (cursor, key) order, at most `batch_size` a frame."""

    def in_window(self, column: str, start: datetime | None, end: datetime | None) -> object:
        """The condition `start <= column < end` (None: no such bound), or no date at all (a row
        no window holds, read by every window's run to be dead-lettered), for
        `batches(within=...)`."""

    def rows_with_keys(self, keys: Sequence[object], batch_size: int) -> Iterator[pd.DataFrame]:
        """The rows with these keys (a repair)."""

    def deleted_keys(self, since: datetime | None, within: object | None = None) -> list[object]:
        """Keys of soft-deleted rows with cursor ≥ `since` and `within` (a partition window):
        what a run would archive at most."""

    def high_water_mark(self) -> datetime | None:
        """The newest cursor value (but those FAR_FUTURE past now): the sensor's cheap 'did
        anything change?'."""

    def change_counter(self, high_water_mark: datetime) -> int | None:
        """A number that moves with every change at `high_water_mark` (RT's newest ticket
        transaction, a fingerprint of a SQL table's rows at that second), or None; compared for
        equality only. The sensor compares it where the high-water mark is inconclusive: a
        cursor kept in whole seconds holds a change made within the second a run synced up to
        at the same value."""
