"""RT's tickets as a sync source, read incrementally by TicketSQL on `LastUpdated`.

RT keeps times to the second and reads the dates in a TicketSQL query in its own time zone
(which the API does not tell), ignoring a zone written after them. So the query asks for
tickets updated `now - N seconds` or later (RT computes that instant itself, whatever its zone),
with `N` widened by `CLOCK_MARGIN` against clock skew; the flow's lookback re-reads the last
minutes again, and the ledger's diff keeps what did not change from being written twice. Not
`N seconds ago`: RT's date parser reads a number of four digits as a time of day or a year
("3960 seconds ago" is the year 3959), so a run 17 minutes to 3 hours after its watermark missed
the changes. REST2's answers carry times in UTC (`…Z`), which the rows keep as naive UTC datetimes.

The engine's watermark needs the rows oldest change first, and RT's pages in that order are
offsets: a ticket changed while they are read moves to the end, and the one after a page slides
back past the offset, never read (and the watermark passes it). So a read walks the changes in
windows of time, each holding about a page of tickets: an ordered page tells where the window
ends (before the time of the page's last ticket; a second holding a page or more is a window of
its own), the window's (LastUpdated, id) are listed by ids (a change does not move a ticket),
and its tickets read a page of ids at a time in that order (one second's are in id order
already: they are listed and read a page at a time). Memory holds a window, never the table. A
window ends at a time some ticket had when the walk looked: a ticket made or changed later comes
later, in a window listed after it. One changed between its listing and its reading is left to
the next run, which reads it as it is then: served last, its new time moved the watermark past
the tickets created meanwhile, which no list of this run held (never staged). And the run stops
before the first listed ticket whose place is at or past that change: a ticket changed later
still, listed with its new time (the walk of a big RT outlasts the lookback), moved the watermark
past the one left behind, which the next run then never read. A ticket read, then changed, is
read again where the walk meets its new time (a batch keeps its newest state).

RT hides deleted tickets from every REST2 search, so a ticket deleted in RT keeps its last
synced state in the destination; there are no soft deletes to archive.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from itertools import islice

import pandas as pd

from integrations.engine.source import SourceReadFailed, SourceUnavailable
from integrations.engine.spec import SourceTable
from integrations.helpdesk.client import PAGE, RtClient, RtError, RtRefused, rt_time

Place = tuple[datetime, int]  # a ticket's (LastUpdated, id)

CLOCK_MARGIN = timedelta(seconds=60)
ONE_SECOND = timedelta(seconds=1)  # RT keeps times to the second
FIELDS = ("Status", "Queue", "Requestor", "Created", "Resolved", "LastUpdated")
COLUMNS = [
    "id",
    "Status",
    "Queue",
    "RequestorName",
    "RequestorEmail",
    "Created",
    "Resolved",
    "LastUpdated",
]


def updated_since(since: datetime, now: datetime | None = None) -> str:
    """TicketSQL for 'updated at or after `since`' (naive UTC), free of RT's time zone."""
    now = now or datetime.now(UTC).replace(tzinfo=None)
    seconds = max(0, int((now - since + CLOCK_MARGIN).total_seconds()))
    return f"LastUpdated >= 'now - {seconds} seconds'"


def updated_between(start: datetime | None, end: datetime | None) -> str:
    """TicketSQL for 'updated in [start, end)' (naive UTC, None: no bound), each bound widened by
    CLOCK_MARGIN: the walk keeps the answers by their exact times (see `RtTickets._places`)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    conditions = ["id > 0"] if start is None else [updated_since(start, now)]
    if end is not None and (seconds := int((now - end - CLOCK_MARGIN).total_seconds())) > 0:
        conditions.append(f"LastUpdated < 'now - {seconds} seconds'")
    return " AND ".join(conditions)


def _read_failed(error: RtError) -> Exception:
    """An RT that answered and refused the read (the credentials, the user's rights, a query it
    cannot parse, a path it does not have) as SourceReadFailed, saying what to fix: a rerun gets
    the same answer. Not reached, or 429/5xx after every retry: SourceUnavailable, to rerun."""
    if isinstance(error, RtRefused):
        return SourceReadFailed(f"RT tickets: {error.what}", error.todo)
    return SourceUnavailable(str(error))


def _row(ticket: dict) -> tuple:
    """One REST2 ticket as a row; the first requestor speaks for the ticket."""
    requestors = ticket.get("Requestor") or []
    first = requestors[0] if requestors else {}
    queue = ticket.get("Queue") or {}
    return (
        int(ticket["id"]),
        ticket.get("Status"),
        queue.get("Name") if isinstance(queue, dict) else queue,
        first.get("Name") or None,
        first.get("EmailAddress") or None,
        rt_time(ticket.get("Created")),
        rt_time(ticket.get("Resolved")),
        rt_time(ticket.get("LastUpdated")),
    )


def _changed_order(ticket: dict) -> Place:
    """A ticket's place in the engine's (cursor, key) order."""
    return rt_time(ticket.get("LastUpdated")) or datetime.min, int(ticket["id"])


def _ids_query(ids: Iterable[int]) -> str:
    return " OR ".join(f"id = {ticket_id}" for ticket_id in ids)


def _pages(items: Iterable[Place], size: int) -> Iterator[list[Place]]:
    iterator = iter(items)
    while page := list(islice(iterator, size)):
        yield page


def _frames(tickets: Iterable[dict], size: int) -> Iterator[pd.DataFrame]:
    iterator = iter(tickets)
    while chunk := list(islice(iterator, size)):
        frame = pd.DataFrame.from_records([_row(ticket) for ticket in chunk], columns=COLUMNS)
        for name in ("Created", "Resolved", "LastUpdated"):
            frame[name] = pd.to_datetime(frame[name])
        # A ticket read, then changed and read again at its new place: its newest state only.
        yield frame.drop_duplicates("id", keep="last")


class RtTickets:
    """The tickets of one RT, as the engine's Source; `spec` is the flow's `SourceTable`."""

    def __init__(self, client: RtClient, spec: SourceTable):
        if spec.cursor != "LastUpdated" or spec.key != "id" or spec.deleted:
            raise ValueError(
                "RT tickets are keyed by `id`, read by cursor `LastUpdated`, without soft deletes"
            )
        self.client, self.spec = client, spec

    def _search(self, ticketsql: str, fields: Sequence[str] = FIELDS) -> Iterator[dict]:
        try:
            yield from self.client.search_tickets(ticketsql, fields)
        except RtError as error:
            raise _read_failed(error) from error

    def _in_changed_order(self, since: datetime | None) -> Iterator[dict]:
        """The tickets changed at or after `since` oldest change first (see the module
        docstring)."""
        left_at: Place | None = None  # the earliest change left to the next run
        for page in self._places_in_order(since):
            found = {int(t["id"]): t for t in self._search(_ids_query(i for _, i in page))}
            for place in page:
                if left_at is not None and place >= left_at:
                    return  # the watermark must not pass a change left to the next run
                ticket = found.get(place[1])
                if ticket is None:
                    continue  # deleted meanwhile
                now = _changed_order(ticket)
                if now == place:
                    yield ticket
                else:  # changed since: the next run's
                    left_at = min(now, left_at or now)

    def _places_in_order(self, since: datetime | None) -> Iterator[list[Place]]:
        """The places of the tickets changed at or after `since`, in order, a page at a time,
        window by window: what is held is a window, about a page."""
        for start, end, one_second in self._windows(since):
            listed = self._places(start, end)
            yield from _pages(listed if one_second else sorted(listed), self.client.page_size)

    def _windows(
        self, start: datetime | None
    ) -> Iterator[tuple[datetime | None, datetime | None, bool]]:
        """[start, end) windows from `start` on, each holding fewer than a page of tickets, or
        one second (`True`: its tickets come in id order, however many); the last has no end."""
        size = self.client.page_size
        while True:
            ordered = self._by_change(updated_between(start, None))
            ahead = list(islice((p for p in ordered if start is None or p[0] >= start), size))
            if len(ahead) < size:
                yield start, None, False
                return
            first, last = ahead[0][0], ahead[-1][0]
            if last > first:
                yield start, last, False
                start = last
                continue
            if start is None or start < last:
                # Empty, unless a change slid the ordered pages past a ticket before that second.
                yield start, last, False
            yield last, last + ONE_SECOND, True
            start = last + ONE_SECOND

    def _places(self, start: datetime | None, end: datetime | None) -> Iterator[Place]:
        """The places in [start, end), listed by ids (RT's bounds are widened: kept by time)."""
        for ticket in self._search(updated_between(start, end), ["LastUpdated"]):
            place = _changed_order(ticket)
            if (start is None or place[0] >= start) and (end is None or place[0] < end):
                yield place

    def _by_change(self, ticketsql: str) -> Iterator[Place]:
        try:
            for ticket in self.client.tickets_by_change(ticketsql):
                yield _changed_order(ticket)
        except RtError as error:
            raise _read_failed(error) from error

    def batches(
        self, since: datetime | None, batch_size: int, within: object | None = None
    ) -> Iterator[pd.DataFrame]:
        if within is not None:
            raise ValueError("RT tickets are not read by partition")
        yield from _frames(self._in_changed_order(since), batch_size)

    def in_window(self, column: str, start: datetime, end: datetime) -> object:
        raise ValueError("RT tickets are not read by partition")

    def rows_with_keys(self, keys: Sequence[object], batch_size: int) -> Iterator[pd.DataFrame]:
        ids = sorted({int(key) for key in keys})
        step = min(batch_size, PAGE)  # the query travels in the URL
        for start in range(0, len(ids), step):
            yield from _frames(self._search(_ids_query(ids[start : start + step])), batch_size)

    def deleted_keys(self, since: datetime | None, within: object | None = None) -> list[object]:
        return []  # REST2 never shows deleted tickets (see the module docstring)

    def high_water_mark(self) -> datetime | None:
        try:
            return self.client.newest_ticket_update()
        except RtError as error:
            raise _read_failed(error) from error

    def change_counter(self, high_water_mark: datetime) -> int | None:
        """RT's newest ticket transaction: it moves with a change made within the second of the
        newest LastUpdated, which the high-water mark does not."""
        try:
            return self.client.newest_ticket_change()
        except RtError as error:
            raise _read_failed(error) from error
