"""The webhook inbox: accepted CRM events in the state store, until a sensor requests their run.

A delivery and its events are stored in one transaction. The delivery id (Standard Webhooks'
`webhook-id`, or a digest of HubSpot's signed timestamp and signature) is an idempotency key:
a delivery sent again with the same events (a Standard Webhooks sender's retry after a lost
answer keeps its id) is acknowledged, its events counted as duplicates and stored once; the same
id with other events is refused. An event already stored under another delivery (HubSpot's
retry, signed anew) is counted as a duplicate and not stored again.
Events keep no property values (they can be PII): the flow reads the record from the CRM.
Delivery ids are forgotten once a replay would be stale, and events a week after their run was
requested: the inbox does not grow with time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa

from integrations.engine.state import utcnow
from integrations.sql.connect import create_engine
from integrations.sql.evolve import create_or_evolve
from integrations.webhooks.events import CrmEvent
from integrations.webhooks.signatures import TOLERANCE_SECONDS

# A replay older than this carries a timestamp the signature check refuses as stale anyway.
REPLAY_MEMORY = timedelta(seconds=2 * TOLERANCE_SECONDS)
# Events whose run was requested this long ago are dropped: the run read the records from the
# CRM, and a sender's retry of one of them after that is stored again and syncs nothing new.
EVENT_MEMORY = timedelta(days=7)
FORGET_EVERY = 500  # deliveries accepted between two clean-ups of old delivery ids and events

metadata = sa.MetaData()

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("delivery_id", sa.String(255), primary_key=True),
    sa.Column("scheme", sa.String(32), nullable=False),
    sa.Column("received_at", sa.DateTime, nullable=False),
    sa.Column("events", sa.Integer, nullable=False),
)

webhook_inbox = sa.Table(
    "webhook_inbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_key", sa.String(120), nullable=False, unique=True),
    sa.Column("delivery_id", sa.String(255), nullable=False),
    sa.Column("subscription_type", sa.String(64), nullable=False),
    sa.Column("object_type", sa.String(32), nullable=False),
    sa.Column("object_id", sa.BigInteger, nullable=False),
    sa.Column("property_name", sa.String(100), nullable=True),
    sa.Column("occurred_at", sa.DateTime, nullable=False),
    sa.Column("received_at", sa.DateTime, nullable=False),
    # Set once the run covering the event was requested (the sensor's committed cursor passed it).
    sa.Column("consumed_at", sa.DateTime, nullable=True),
    sa.Column("run_key", sa.String(120), nullable=True),
    sa.Index("ix_webhook_inbox_unconsumed", "consumed_at", "id"),
)


class ReplayRefused(Exception):
    """This delivery id was received before, with other events."""


@dataclass(frozen=True)
class Accepted:
    stored: int
    duplicates: int


@dataclass(frozen=True)
class InboxEvent:
    id: int
    subscription_type: str
    object_type: str
    object_id: int


# Held by each delivery's transaction on PostgreSQL until it commits, so inbox ids are committed
# in order: a later id committed first had the sensor's cursor pass an earlier one, never seen.
# (SQLite's single writer lock does the same.)
_IN_ID_ORDER = sa.text("SELECT pg_advisory_xact_lock(hashtext('handoff webhook_inbox'))")


def _insert_ignoring_duplicates(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(webhook_inbox).on_conflict_do_nothing(index_elements=["event_key"])
    return statement.returning(webhook_inbox.c.id)


class WebhookInbox:
    """The inbox tables in the state store's database (SQLite or PostgreSQL), at `url`."""

    def __init__(self, url: str):
        self.engine = create_engine(url)
        create_or_evolve(self.engine, metadata, "the webhook inbox")
        self._insert = _insert_ignoring_duplicates(self.engine.dialect.name)
        self._postgres = self.engine.dialect.name == "postgresql"
        self._accepted = itertools.count(1)

    def dispose(self) -> None:
        self.engine.dispose()

    def accept(self, delivery_id: str, scheme: str, events: Sequence[CrmEvent]) -> Accepted:
        """Store a verified, valid delivery; a resend of one stored before stores nothing again,
        and `ReplayRefused` if its id came before with other events."""
        now = utcnow()
        stored = 0
        try:
            with self.engine.begin() as connection:
                if self._postgres:
                    connection.execute(_IN_ID_ORDER)
                connection.execute(
                    webhook_deliveries.insert().values(
                        delivery_id=delivery_id, scheme=scheme, received_at=now, events=len(events)
                    )
                )
                for event in events:
                    inserted = connection.execute(
                        self._insert.values(
                            event_key=event.event_key,
                            delivery_id=delivery_id,
                            subscription_type=event.subscription_type,
                            object_type=event.object_type,
                            object_id=event.object_id,
                            property_name=event.property_name,
                            occurred_at=event.occurred_at,
                            received_at=now,
                        )
                    ).first()
                    stored += inserted is not None  # nothing returned: already stored
        except sa.exc.IntegrityError:
            if not self._all_stored(events):
                raise ReplayRefused(
                    f"delivery {delivery_id} was received before, with other events"
                ) from None
            return Accepted(stored=0, duplicates=len(events))  # a resend: already stored
        if next(self._accepted) % FORGET_EVERY == 0:
            self.forget_deliveries(before=now - REPLAY_MEMORY)
            self.forget_consumed(before=now - EVENT_MEMORY)
        return Accepted(stored=stored, duplicates=len(events) - stored)

    def _all_stored(self, events: Sequence[CrmEvent]) -> bool:
        keys = {event.event_key for event in events}
        with self.engine.connect() as connection:
            found = connection.execute(
                sa.select(sa.func.count())
                .select_from(webhook_inbox)
                .where(webhook_inbox.c.event_key.in_(keys))
            ).scalar_one()
        return found == len(keys)

    def forget_deliveries(self, before) -> int:
        """Drop delivery ids received before `before`: their replays are stale by now."""
        with self.engine.begin() as connection:
            return connection.execute(
                webhook_deliveries.delete().where(webhook_deliveries.c.received_at < before)
            ).rowcount

    def forget_consumed(self, before) -> int:
        """Drop events whose run was requested before `before`. The newest event stays whatever
        its age: SQLite hands the highest id out again once it is deleted, and an event under an
        id the sensor's cursor has passed would never be seen."""
        newest = sa.select(sa.func.max(webhook_inbox.c.id)).scalar_subquery()
        with self.engine.begin() as connection:
            return connection.execute(
                webhook_inbox.delete().where(
                    webhook_inbox.c.consumed_at < before, webhook_inbox.c.id < newest
                )
            ).rowcount

    def after(self, last_id: int, limit: int) -> list[InboxEvent]:
        """Events stored after inbox id `last_id`, oldest first (the sensor's cursor)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(
                    webhook_inbox.c.id,
                    webhook_inbox.c.subscription_type,
                    webhook_inbox.c.object_type,
                    webhook_inbox.c.object_id,
                )
                .where(webhook_inbox.c.id > last_id)
                .order_by(webhook_inbox.c.id)
                .limit(limit)
            ).all()
        return [InboxEvent(*row) for row in rows]

    def mark_consumed(self, up_to_id: int, run_key: str) -> int:
        """Events up to `up_to_id` not yet consumed are now covered by the run `run_key`."""
        with self.engine.begin() as connection:
            return connection.execute(
                webhook_inbox.update()
                .where(webhook_inbox.c.id <= up_to_id, webhook_inbox.c.consumed_at.is_(None))
                .values(consumed_at=utcnow(), run_key=run_key)
            ).rowcount

    def counts(self) -> dict[str, int]:
        """Deliveries, stored events, and events still waiting for a run."""
        with self.engine.connect() as connection:
            deliveries = connection.execute(
                sa.select(sa.func.count()).select_from(webhook_deliveries)
            ).scalar_one()
            events, waiting = connection.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.count().filter(webhook_inbox.c.consumed_at.is_(None)),
                ).select_from(webhook_inbox)
            ).one()
        return {"deliveries": deliveries, "events": events, "waiting": waiting}
