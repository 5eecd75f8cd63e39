"""The state store: ledger, cursors, dead-letter queue and audit trail (SQLite or PostgreSQL).

Everything a batch changes in the state store is committed in one transaction, after the
destination accepted the batch: a crash before the commit means the batch is sent again
(upserts make that harmless), never that a record is forgotten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from integrations.sql.connect import create_engine, upsert_statement

metadata = sa.MetaData()

ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("flow", sa.String(120), primary_key=True),
    sa.Column("record_key", sa.String(255), primary_key=True),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("destination_id", sa.String(255), nullable=True),
    sa.Column("archived", sa.Boolean, nullable=False, default=False),
    sa.Column("synced_at", sa.DateTime, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
)

cursors = sa.Table(
    "cursors",
    metadata,
    sa.Column("flow", sa.String(120), primary_key=True),
    sa.Column("watermark_at", sa.DateTime, nullable=False),
    sa.Column("watermark_key", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(120), nullable=False),
    sa.Column("record_key", sa.String(255), nullable=False),
    sa.Column("reason_kind", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=True),
    sa.Column("first_seen", sa.DateTime, nullable=False),
    sa.Column("last_seen", sa.DateTime, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("resolved_at", sa.DateTime, nullable=True),
    sa.Column("resolution", sa.String(32), nullable=True),
    sa.Index("ix_dead_letters_flow_key", "flow", "record_key"),
)

# Who holds each unique value (as a digest of its lower-cased text: no PII in the clear).
unique_claims = sa.Table(
    "unique_claims",
    metadata,
    sa.Column("flow", sa.String(120), primary_key=True),
    sa.Column("field", sa.String(120), primary_key=True),
    sa.Column("value_digest", sa.String(64), primary_key=True),
    sa.Column("record_key", sa.String(255), nullable=False),
    sa.Index("ix_unique_claims_key", "flow", "record_key"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("flow", sa.String(120), nullable=True),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("why", sa.Text, nullable=False),
    # A hash chain: each entry seals the one before it, so an edit or a removal shows.
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("entry_hash", sa.String(64), nullable=False, unique=True),
)

GENESIS = "0" * 64

# The audit trail is append-only: the database itself refuses to change or remove an entry.
_APPEND_ONLY = {
    "sqlite": [
        f"CREATE TRIGGER IF NOT EXISTS audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
        for verb in ("UPDATE", "DELETE")
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$",
        "DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log",
        "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    ],
}

_IN_CHUNK = 500  # keys per IN (...) list, well under every dialect's parameter limit


def utcnow() -> datetime:
    """Naive UTC, the convention of every timestamp handoff stores."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Watermark:
    """How far a flow has synced: the last (cursor value, key) written or dead-lettered."""

    updated_at: datetime
    key: object

    def as_dict(self) -> dict[str, object]:
        return {"updated_at": self.updated_at.isoformat(), "key": self.key}


@dataclass(frozen=True)
class LedgerEntry:
    content_hash: str
    destination_id: str | None
    archived: bool


@dataclass(frozen=True)
class DeadLetter:
    flow: str
    record_key: str
    reason_kind: str
    reason: str
    payload: dict[str, object]
    content_hash: str | None = None
    id: int | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    attempts: int = 1
    resolved_at: datetime | None = None


@dataclass
class BatchCommit:
    """What one batch changes in the state store, written in a single transaction."""

    flow: str
    run_id: str
    synced: list[dict[str, object]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    watermark: Watermark | None = None
    # (field, value digest, record key) now held by written records; archived keys release theirs.
    claims: list[tuple[str, str, str]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


class StateStore:
    """handoff's own bookkeeping, in the database at `url`."""

    def __init__(self, url: str):
        self.url = url
        self.engine = create_engine(url)
        metadata.create_all(self.engine)
        with self.engine.begin() as connection:
            for statement in _APPEND_ONLY.get(self.engine.dialect.name, []):
                connection.exec_driver_sql(statement)
        self._upsert_ledger = upsert_statement(
            self.engine.dialect.name,
            ledger,
            ["flow", "record_key"],
            ["content_hash", "destination_id", "archived", "synced_at", "run_id"],
        )
        self._upsert_cursor = upsert_statement(
            self.engine.dialect.name,
            cursors,
            ["flow"],
            ["watermark_at", "watermark_key", "updated_at", "run_id"],
        )

    def dispose(self) -> None:
        self.engine.dispose()

    # --- reads -------------------------------------------------------------------------------

    def watermark(self, flow: str) -> Watermark | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(cursors.c.watermark_at, cursors.c.watermark_key).where(
                    cursors.c.flow == flow
                )
            ).first()
        return Watermark(row.watermark_at, json.loads(row.watermark_key)) if row else None

    def ledger_entries(self, flow: str, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        found: dict[str, LedgerEntry] = {}
        with self.engine.connect() as connection:
            for chunk in _chunks(keys):
                rows = connection.execute(
                    sa.select(
                        ledger.c.record_key,
                        ledger.c.content_hash,
                        ledger.c.destination_id,
                        ledger.c.archived,
                    ).where(ledger.c.flow == flow, ledger.c.record_key.in_(chunk))
                )
                for row in rows:
                    found[row.record_key] = LedgerEntry(
                        row.content_hash, row.destination_id, row.archived
                    )
        return found

    def count_synced(self, flow: str) -> int:
        """Records the flow holds live (not archived) in the destination."""
        with self.engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).where(
                    ledger.c.flow == flow, ledger.c.archived.is_(False)
                )
            ).scalar_one()

    def open_dead_letter_hashes(self, flow: str, keys: Sequence[str]) -> dict[str, str | None]:
        """Content hash of each key's unresolved dead letter, for keys that have one."""
        found: dict[str, str | None] = {}
        with self.engine.connect() as connection:
            for chunk in _chunks(keys):
                rows = connection.execute(
                    sa.select(dead_letters.c.record_key, dead_letters.c.content_hash).where(
                        dead_letters.c.flow == flow,
                        dead_letters.c.record_key.in_(chunk),
                        dead_letters.c.resolved_at.is_(None),
                    )
                )
                found.update({row.record_key: row.content_hash for row in rows})
        return found

    def unique_owners(self, flow: str, field_name: str, digests: Sequence[str]) -> dict[str, str]:
        """value digest → the record key that holds it, for digests already claimed."""
        found: dict[str, str] = {}
        with self.engine.connect() as connection:
            for chunk in _chunks(digests):
                rows = connection.execute(
                    sa.select(unique_claims.c.value_digest, unique_claims.c.record_key).where(
                        unique_claims.c.flow == flow,
                        unique_claims.c.field == field_name,
                        unique_claims.c.value_digest.in_(chunk),
                    )
                )
                found.update({row.value_digest: row.record_key for row in rows})
        return found

    def list_dead_letters(
        self, flow: str | None = None, include_resolved: bool = False, limit: int = 100
    ) -> list[DeadLetter]:
        query = sa.select(dead_letters).order_by(dead_letters.c.id).limit(limit)
        if flow:
            query = query.where(dead_letters.c.flow == flow)
        if not include_resolved:
            query = query.where(dead_letters.c.resolved_at.is_(None))
        with self.engine.connect() as connection:
            return [_dead_letter(row) for row in connection.execute(query)]

    def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(dead_letters).where(dead_letters.c.id == dead_letter_id)
            ).first()
        return _dead_letter(row) if row else None

    def old_dead_letters(
        self, flow: str, seen_before: datetime, after_id: int = 0
    ) -> tuple[int, datetime | None, int]:
        """Open dead letters first seen before `seen_before` with id > `after_id`:
        (how many, the oldest first_seen, the highest id)."""
        query = sa.select(
            sa.func.count(), sa.func.min(dead_letters.c.first_seen), sa.func.max(dead_letters.c.id)
        ).where(
            dead_letters.c.flow == flow,
            dead_letters.c.resolved_at.is_(None),
            dead_letters.c.first_seen < seen_before,
            dead_letters.c.id > after_id,
        )
        with self.engine.connect() as connection:
            count, oldest, highest = connection.execute(query).one()
        return count, oldest, highest or after_id

    def count_open_dead_letters(self, flow: str | None = None) -> int:
        query = sa.select(sa.func.count()).where(dead_letters.c.resolved_at.is_(None))
        if flow:
            query = query.where(dead_letters.c.flow == flow)
        with self.engine.connect() as connection:
            return connection.execute(query).scalar_one()

    def audit_entries(self, flow: str | None = None) -> list[dict[str, object]]:
        query = sa.select(audit_log).order_by(audit_log.c.id)
        if flow:
            query = query.where(audit_log.c.flow == flow)
        with self.engine.connect() as connection:
            return [
                {**row._asdict(), "detail": json.loads(row.detail)}
                for row in connection.execute(query)
            ]

    def verify_audit(self) -> AuditVerdict:
        """Walk the hash chain from the first entry; report the first broken link."""
        previous, count = GENESIS, 0
        with self.engine.connect() as connection:
            for position, row in enumerate(
                connection.execute(sa.select(audit_log).order_by(audit_log.c.id)), start=1
            ):
                entry = row._asdict()
                if entry["prev_hash"] != previous:
                    return AuditVerdict(
                        False,
                        count,
                        entry["id"],
                        position,
                        "the entry before it was removed or replaced",
                    )
                if _seal(entry) != entry["entry_hash"]:
                    return AuditVerdict(
                        False,
                        count,
                        entry["id"],
                        position,
                        "its content was changed after it was written",
                    )
                previous, count = entry["entry_hash"], position
        return AuditVerdict(True, count, None, None, "intact", head=previous)

    # --- writes ------------------------------------------------------------------------------

    def commit_batch(self, batch: BatchCommit, audit: dict[str, object] | None = None) -> None:
        """Ledger, dead letters, resolutions, watermark and audit entry, all or nothing."""
        now = utcnow()
        with self.engine.begin() as connection:
            if batch.synced:
                connection.execute(
                    self._upsert_ledger,
                    [
                        {**row, "flow": batch.flow, "synced_at": now, "run_id": batch.run_id}
                        for row in batch.synced
                    ],
                )
                self._resolve(
                    connection, batch.flow, [str(row["record_key"]) for row in batch.synced], now
                )
            if batch.claims or batch.released:
                self._claim(connection, batch)
            if batch.dead_letters:
                self._put_dead_letters(connection, batch.run_id, batch.dead_letters, now)
            if batch.watermark is not None:
                connection.execute(
                    self._upsert_cursor,
                    {
                        "flow": batch.flow,
                        "watermark_at": batch.watermark.updated_at,
                        "watermark_key": json.dumps(batch.watermark.key),
                        "updated_at": now,
                        "run_id": batch.run_id,
                    },
                )
            if audit is not None:
                self._append_audit(
                    connection, now=now, run_id=batch.run_id, flow=batch.flow, **audit
                )

    @staticmethod
    def _append_audit(
        connection, *, now, actor, action, why, detail, run_id=None, flow=None
    ) -> None:
        # Writers take turns at the chain's head: no two entries may seal the same predecessor.
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")
        else:
            connection.exec_driver_sql(
                "UPDATE cursors SET flow = flow WHERE 0"
            )  # takes the write lock
        head = connection.execute(
            sa.select(audit_log.c.entry_hash).order_by(audit_log.c.id.desc()).limit(1)
        ).scalar()
        entry = {
            "at": now,
            "actor": actor,
            "run_id": run_id,
            "flow": flow,
            "action": action,
            "detail": json.dumps(detail, sort_keys=True, default=str),
            "why": why,
            "prev_hash": head or GENESIS,
        }
        connection.execute(sa.insert(audit_log).values(**entry, entry_hash=_seal(entry)))

    @staticmethod
    def _claim(connection, batch: BatchCommit) -> None:
        holders = sorted({key for _, _, key in batch.claims} | set(batch.released))
        for chunk in _chunks(holders):
            connection.execute(
                sa.delete(unique_claims).where(
                    unique_claims.c.flow == batch.flow, unique_claims.c.record_key.in_(chunk)
                )
            )
        if batch.claims:
            connection.execute(
                sa.insert(unique_claims),
                [
                    {"flow": batch.flow, "field": name, "value_digest": digest, "record_key": key}
                    for name, digest, key in batch.claims
                ],
            )

    @staticmethod
    def _resolve(connection, flow: str, keys: Sequence[str], now: datetime) -> None:
        for chunk in _chunks(keys):
            connection.execute(
                sa.update(dead_letters)
                .where(
                    dead_letters.c.flow == flow,
                    dead_letters.c.record_key.in_(chunk),
                    dead_letters.c.resolved_at.is_(None),
                )
                .values(resolved_at=now, resolution="synced")
            )

    @staticmethod
    def _put_dead_letters(
        connection, run_id: str, letters: Iterable[DeadLetter], now: datetime
    ) -> None:
        letters = list(letters)
        flow_keys = {(letter.flow, letter.record_key) for letter in letters}
        existing: dict[tuple[str, str], int] = {}
        for flow in {flow for flow, _ in flow_keys}:
            keys = [key for f, key in flow_keys if f == flow]
            for chunk in _chunks(keys):
                rows = connection.execute(
                    sa.select(dead_letters.c.id, dead_letters.c.record_key).where(
                        dead_letters.c.flow == flow,
                        dead_letters.c.record_key.in_(chunk),
                        dead_letters.c.resolved_at.is_(None),
                    )
                )
                existing.update({(flow, row.record_key): row.id for row in rows})
        inserts = []
        for letter in letters:
            values = {
                "reason_kind": letter.reason_kind,
                "reason": letter.reason,
                "payload": json.dumps(letter.payload, sort_keys=True, default=str),
                "content_hash": letter.content_hash,
                "last_seen": now,
                "run_id": run_id,
            }
            known = existing.get((letter.flow, letter.record_key))
            if known is None:
                inserts.append(
                    {
                        **values,
                        "flow": letter.flow,
                        "record_key": letter.record_key,
                        "first_seen": now,
                        "attempts": 1,
                    }
                )
            else:
                connection.execute(
                    sa.update(dead_letters)
                    .where(dead_letters.c.id == known)
                    .values(**values, attempts=dead_letters.c.attempts + 1)
                )
        if inserts:
            connection.execute(sa.insert(dead_letters), inserts)


@dataclass(frozen=True)
class AuditVerdict:
    intact: bool
    entries: int  # entries verified before the first broken link (all of them when intact)
    broken_id: int | None
    broken_position: int | None
    problem: str
    head: str | None = None


def _seal(entry: dict[str, object]) -> str:
    """sha256 over the entry's fields and its predecessor's hash, canonically encoded."""
    fields = [
        entry[name]
        for name in ("prev_hash", "at", "actor", "run_id", "flow", "action", "detail", "why")
    ]
    fields[1] = fields[1].isoformat(timespec="microseconds")
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def _dead_letter(row) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        flow=row.flow,
        record_key=row.record_key,
        reason_kind=row.reason_kind,
        reason=row.reason,
        payload=json.loads(row.payload),
        content_hash=row.content_hash,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        attempts=row.attempts,
        resolved_at=row.resolved_at,
    )
