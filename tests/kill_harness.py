"""SIGKILL a sync at seeded points, rerun it, and check the destination against the source.

Each point names a phase and an occurrence: the harness forks a child process that runs the
flow through the real engine, real databases and the real destination, and kills itself with
SIGKILL when the point is reached. The phases:

- `extract`: after the n-th batch read from the source has arrived (mid-extract);
- `mid-load`: before the n-th write call to the destination (earlier chunks of the batch are
  in the destination, not in the ledger);
- `after-load`: after the n-th write call returned (the destination has it, the ledger not);
- `mid-commit`: the n-th state transaction, written whole (ledger, dead letters, audit) but not
  yet committed;
- `mid-cursor`: in the state transaction, as the watermark is written.

After each kill the flow runs again to completion in this process, and the check asks: is
anything lost (missing or differing in the destination), duplicated (one key, several
destination records), or is the ledger out of step with the destination?
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import sqlalchemy as sa

from integrations.engine.destination import Destination
from integrations.engine.reconcile import reconcile
from integrations.engine.spec import FlowSpec
from integrations.engine.state import StateStore
from integrations.engine.sync import Sync
from integrations.sql.source import SqlSource

PHASES = ("extract", "mid-load", "after-load", "mid-commit", "mid-cursor")

# Opens the flow's source, destination and state store afresh (in the child after the fork).
Opener = Callable[[], AbstractContextManager[tuple[SqlSource, Destination, StateStore]]]


@dataclass(frozen=True)
class KillPoint:
    phase: str
    nth: int

    def __str__(self) -> str:
        return f"{self.phase}#{self.nth}"


@dataclass
class Outcome:
    point: KillPoint
    killed: bool
    lost: int
    duplicated: int
    ledger_off: int


@dataclass
class Report:
    flow: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return all(o.killed and not (o.lost or o.duplicated or o.ledger_off) for o in self.outcomes)

    def summary(self) -> str:
        killed = sum(o.killed for o in self.outcomes)
        phases = Counter(o.point.phase for o in self.outcomes if o.killed)
        return (
            f"kill harness {self.flow}: {len(self.outcomes)} seeded points, {killed} killed "
            f"({', '.join(f'{p} {n}' for p, n in sorted(phases.items()))}): "
            f"{sum(o.lost for o in self.outcomes)} lost, "
            f"{sum(o.duplicated for o in self.outcomes)} duplicated, "
            f"{sum(o.ledger_off for o in self.outcomes)} ledger mismatches"
        )


def seeded_points(seed: int, count: int, most: dict[str, int]) -> list[KillPoint]:
    """`count` points cycling through the phases, each at a seeded occurrence ≤ `most[phase]`."""
    rng = random.Random(seed)
    return [
        KillPoint(phase, rng.randint(1, most.get(phase, 1)))
        for phase in (PHASES[i % len(PHASES)] for i in range(count))
    ]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: KillPoint, source, destination, state) -> None:
    """Make the point kill this process (instrumenting real components, nothing replaced)."""
    seen = Counter()

    def count(phase: str) -> bool:
        seen[phase] += 1
        return phase == point.phase and seen[phase] == point.nth

    if point.phase == "extract":
        batches = source.batches

        def extracting(*args, **kwargs):
            for batch in batches(*args, **kwargs):
                if count("extract"):
                    _die()
                yield batch

        source.batches = extracting

    if point.phase in ("mid-load", "after-load"):
        upsert = destination.upsert

        def instrumented(records):
            if count("mid-load"):
                _die()
            written = upsert(records)
            if count("after-load"):
                _die()
            return written

        destination.upsert = instrumented

    if point.phase == "mid-commit":

        @sa.event.listens_for(state.engine, "commit")
        def _(conn):
            if count("mid-commit"):
                _die()

    if point.phase == "mid-cursor":

        @sa.event.listens_for(state.engine, "before_cursor_execute")
        def _(conn, cursor, statement, *args):
            words = statement.split()
            writes_cursor = words[:3] == ["INSERT", "INTO", "cursors"] or words[:2] == [
                "UPDATE",
                "cursors",
            ]
            if writes_cursor and count("mid-cursor"):
                _die()


def _run_in_child(spec: FlowSpec, opener: Opener, point: KillPoint, run_id: str) -> bool:
    """Fork; the child syncs with the point armed. True when the child died by SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: fresh connections, never the parent's
        code = 0
        try:
            with opener() as (source, destination, state):
                _arm(point, source, destination, state)
                Sync(
                    spec, source, destination, state, run_id=run_id, actor="kill", why="test"
                ).run()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _check(spec: FlowSpec, opener: Opener) -> tuple[int, int, int]:
    with opener() as (source, destination, state):
        drift = reconcile(spec, source, destination, state)
        ids = Counter(
            id_value.lower() for id_value, _, _ in destination.snapshot([spec.target.id_property])
        )
        live = {destination_id for _, destination_id, _ in destination.snapshot([])}
        with state.engine.connect() as connection:
            ledger = connection.execute(
                sa.text("SELECT destination_id FROM ledger WHERE flow = :flow AND NOT archived"),
                {"flow": spec.name},
            ).scalars()
            ledger_ids = set(ledger)
    duplicated = sum(n - 1 for n in ids.values() if n > 1)
    return len(drift.missing) + len(drift.differing), duplicated, len(ledger_ids ^ live)


def run_harness(
    spec: FlowSpec,
    opener: Opener,
    points: list[KillPoint],
    change: Callable[[int], None],
) -> Report:
    """For each point: change the source (`change(i)`), kill a sync there, rerun, check."""
    report = Report(spec.name)
    for i, point in enumerate(points):
        change(i)
        killed = _run_in_child(spec, opener, point, run_id=f"kill-{i}")
        with opener() as (source, destination, state):
            Sync(
                spec, source, destination, state, run_id=f"rerun-{i}", actor="kill", why="test"
            ).run()
        lost, duplicated, ledger_off = _check(spec, opener)
        report.outcomes.append(Outcome(point, killed, lost, duplicated, ledger_off))
    return report
