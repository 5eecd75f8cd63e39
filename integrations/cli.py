"""`handoff`: the operators' command line (seed, crm-sandbox, webhooks, rt, dlq, budget, audit,
simulate)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa

from integrations import settings
from integrations.engine.destination import DestinationMismatch, DestinationUnavailable
from integrations.engine.errors import SyncError
from integrations.engine.masking import mask_record
from integrations.engine.source import SourceReadFailed, SourceUnavailable
from integrations.engine.spec import FlowSpec
from integrations.engine.state import (
    REASON_KINDS,
    AuditHead,
    DeadLetter,
    MissingSecret,
    StateStore,
    StateStoreUnavailable,
    utcnow,
)
from integrations.sql.connect import create_engine, driver_complaint, redacted, unreachable
from integrations.sql.source import SourceSchemaError

if TYPE_CHECKING:  # the engine is imported when a replay runs
    from integrations.engine.sync import SyncResult

# What stops one flow's replay (its systems cannot be opened, do not answer or do not fit); the
# other flows' replays go on.
REPLAY_STOPPERS = (
    SyncError,  # FlowNotOpened too
    SourceSchemaError,
    SourceReadFailed,
    SourceUnavailable,
    StateStoreUnavailable,
    DestinationMismatch,
    DestinationUnavailable,
    sa.exc.DBAPIError,  # a database that does not answer, or refuses (a value, a limit, a check)
)

# What stops any command with one line, not a traceback (whose driver text may quote a value).
DATABASE_ERRORS = (sa.exc.DBAPIError, StateStoreUnavailable)
STATE_URL_VARIABLE = "HANDOFF_STATE_URL"


def _flows() -> dict[str, FlowSpec]:
    """The declared flows by name (their modules are framework-free)."""
    from assets import CRM_TO_ERP_FLOWS, FLOWS, HELPDESK_FLOWS

    return {spec.name: spec for spec in FLOWS + CRM_TO_ERP_FLOWS + HELPDESK_FLOWS}


def _masked_fields(flow: str, fields: Iterable[str]) -> frozenset[str]:
    """Which of a payload's fields to mask (FlowSpec.masked_fields); every flow's when the flow
    is unknown (mask more, never less)."""
    specs = _flows()
    chosen = [specs[flow]] if flow in specs else list(specs.values())
    pii = frozenset().union(*(spec.pii_fields for spec in chosen))
    if not pii:
        return pii
    return pii | (frozenset(fields) - frozenset().union(*(s.declared_fields for s in chosen)))


def _store() -> StateStore:
    return StateStore(settings.state_url(), dlq_key=settings.dlq_key())


def _actor(command: str) -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} via handoff {command}"


def _age(text: str) -> timedelta:
    """`90s`, `30m`, `2h`, `7d`."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdecimal():
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 90s, 30m, 2h or 7d")
    try:
        age = timedelta(**{units[text[-1]]: int(text[:-1])})
        utcnow() - age  # a time before year 1 was an OverflowError's traceback
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is older than any dead letter") from None
    return age


def _letter_id(text: str) -> int:
    """A dead letter's id: a whole number the state store can hold (SQLite's INTEGER failed on
    a larger one with an OverflowError's traceback)."""
    if not text.isdecimal() or int(text) >= 2**63:
        raise argparse.ArgumentTypeError(f"{text} is no dead letter's id (see `handoff dlq list`)")
    return int(text)


def _at_least_one(text: str) -> int:
    """A count, 1 or more: a limit of 0 showed nothing (as if none matched), a negative one
    failed or cut; 0 rows to seed was a traceback."""
    if not text.lstrip("-").isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number, 1 or more")
    return int(text)


def _audit_head(text: str) -> AuditHead:
    """`ID:HASH`, as a materialization's `audit_head` shows it."""
    try:
        return AuditHead.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_seed(args: argparse.Namespace) -> int:
    from integrations.erp.seed import seed_erp

    url = settings.erp_database_url()
    started = time.perf_counter()
    counts = seed_erp(url, rows=args.rows, seed=args.seed)
    seconds = time.perf_counter() - started
    print(
        f"seeded {redacted(url)} in {seconds:.1f} s: "
        + ", ".join(f"{n} {t}" for t, n in counts.items())
    )
    return 0


def cmd_crm_sandbox(args: argparse.Namespace) -> int:
    from integrations.crm.sandbox import SandboxServer

    token = os.environ.get("CRM_ACCESS_TOKEN")
    if not token:
        print(
            "handoff crm-sandbox: set CRM_ACCESS_TOKEN to the token clients must present",
            file=sys.stderr,
        )
        return 2
    from integrations.crm.faults import Faults
    from integrations.webhooks.signatures import parse_secrets

    try:
        faults = Faults(**{f.name: getattr(args, f.name) for f in fields(Faults)})
        server = SandboxServer(
            settings.crm_sandbox_path(),
            token,
            host=args.host,
            port=args.port,
            verbose=args.verbose,
            faults=faults,
            webhook_secrets=parse_secrets(os.environ.get("CRM_WEBHOOK_SECRET")),
            webhook_url=args.webhook_url,
            webhook_scheme=args.webhook_scheme,
        )
    except ValueError as error:
        print(f"handoff crm-sandbox: {error}", file=sys.stderr)
        return 2
    print(f"CRM sandbox serving {server.base_url} from {settings.crm_sandbox_path()}", flush=True)
    return _serve_until_interrupted(server)


def _serve_until_interrupted(server, *closing) -> int:
    """Serve until Ctrl-C, then close the server and whatever it used (`dispose()`)."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for resource in closing:
            resource.dispose()
    return 0


def cmd_webhooks_serve(args: argparse.Namespace) -> int:
    from integrations.webhooks.inbox import WebhookInbox
    from integrations.webhooks.server import WebhookServer
    from integrations.webhooks.signatures import parse_secrets

    secrets = parse_secrets(os.environ.get("CRM_WEBHOOK_SECRET"))
    if not secrets:
        print(
            "handoff webhooks serve: set CRM_WEBHOOK_SECRET to the CRM's signing secret "
            "(several, space-separated, while rotating)",
            file=sys.stderr,
        )
        return 2
    inbox = WebhookInbox(settings.state_url())
    server = WebhookServer(
        inbox,
        secrets,
        host=args.host,
        port=args.port,
        public_url=args.public_url,
        max_body=args.max_body,
    )
    print(
        f"CRM webhooks: POST to {server.url}, inbox in {redacted(settings.state_url())}", flush=True
    )
    return _serve_until_interrupted(server, inbox)


def cmd_webhooks_status(args: argparse.Namespace) -> int:
    from integrations.webhooks.inbox import WebhookInbox

    inbox = WebhookInbox(settings.state_url())
    try:
        print(json.dumps(inbox.counts()))
    finally:
        inbox.dispose()
    return 0


def cmd_rt(args: argparse.Namespace) -> int:
    from integrations.helpdesk.local_rt import LocalRt, LocalRtError

    rt = LocalRt(Path(args.home) if args.home else settings.local_rt_home())
    try:
        if args.action == "stop":
            rt.stop()
            return 0
        started = time.perf_counter()
        url = rt.reset() if args.action == "reset" else rt.start()
    except LocalRtError as error:
        print(f"handoff rt {args.action}: {error}", file=sys.stderr)
        return 1
    print(url)
    print(
        f"RT ready in {time.perf_counter() - started:.1f} s: user {rt.user}, password in "
        f"{rt.home / 'password'}, log {rt.home / 'rt-server.log'}",
        file=sys.stderr,
    )
    return 0


def _fault_arguments(group) -> None:
    """One flag per fault setting, e.g. `--rate-limit 10 --error-rate 0.3`; all off by default."""
    from integrations.crm.faults import Faults

    for setting in fields(Faults):
        whole = ("rate_burst", "outage_after_requests", "refuse_reads", "refuse_writes", "seed")
        kind = int if setting.name in whole else float
        group.add_argument(
            f"--{setting.name.replace('_', '-')}", type=kind, default=setting.default
        )


def _dlq_row(letter: DeadLetter) -> dict[str, object]:
    return {
        "id": letter.id,
        "flow": letter.flow,
        "key": letter.record_key,
        "kind": letter.reason_kind,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "first_seen": _when(letter.first_seen),
        "last_seen": _when(letter.last_seen),
        "correlation_id": letter.correlation_id,
        "resolution": letter.resolution,  # None while open: replayed, discarded, synced, ...
        "resolved_at": _when(letter.resolved_at),
    }


def _when(moment) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


def _shown_url(url: str) -> str:
    """A database URL as a person may see it: its password hidden."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _flow_named(value: str | None) -> str | None:
    """A flow's name, also when given as its asset's key (`crm/contacts`, as the UI shows it)."""
    by_asset = {
        f"{spec.target.system}/{spec.target.dataset}": name for name, spec in _flows().items()
    }
    return by_asset.get(value, value) if value else value


def _unknown(flow: str | None) -> str:
    """What to add when `--flow` names no flow (empty otherwise): the flows there are."""
    flows = _flows()
    if not flow or flow in flows:
        return ""
    return f" (no flow is named so; the flows: {', '.join(sorted(flows))})"


def _selected(store: StateStore, args: argparse.Namespace, limit: int | None) -> list[DeadLetter]:
    args.flow = _flow_named(args.flow)
    older = getattr(args, "older_than", None)
    return store.list_dead_letters(
        flow=args.flow,
        include_resolved=getattr(args, "all", False),
        limit=limit,
        reason_kind=args.kind,
        seen_before=utcnow() - older if older else None,
        ids=args.id or (),
        keys=getattr(args, "key", None) or (),
    )


def cmd_dlq_list(args: argparse.Namespace) -> int:
    store = _store()
    found = _selected(store, args, args.limit + 1)  # one more: are there others?
    rows = [_dlq_row(letter) for letter in found[: args.limit]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(
            "no dead letters match"
            + (f" in {args.flow}" if args.flow else "")
            + _unknown(args.flow)
        )
        if _nothing_synced(store):  # not even an audit entry: likely the wrong store
            print(_which_store("an empty state store"), file=sys.stderr)
        return 0
    state = f"{'state':<30}  " if args.all else ""  # open, or how and when it closed
    print(f"{'id':>6}  {'flow':<32} {'key':<12} {'kind':<20} {'att':>3}  {state}reason")
    for row in rows:
        state = f"{_letter_state(row):<30}  " if args.all else ""
        print(
            f"{row['id']:>6}  {row['flow']:<32} {row['key']:<12} {row['kind']:<20} "
            f"{row['attempts']:>3}  {state}{row['reason']}"
        )
    if len(found) > len(rows):  # the count of open letters ignored the filters
        print(f"(showing the first {len(rows)} that match; --limit N shows more)")
    return 0


def _which_store(what: str) -> str:
    """Said when a store holds nothing at all: it may be one just made, not the flows' own."""
    return (
        f"({what}: is {_shown_url(settings.state_url())} the flows' state store? "
        "HANDOFF_HOME is relative to the current directory, HANDOFF_STATE_URL names another store)"
    )


def _nothing_synced(store: StateStore) -> bool:
    return store.audit_head() is None


def _letter_state(row: dict[str, object]) -> str:
    return f"{row['resolution']} {row['resolved_at']}" if row["resolution"] else "open"


def cmd_dlq_show(args: argparse.Namespace) -> int:
    letter = _store().get_dead_letter(args.id)
    if letter is None:
        print(
            f"handoff dlq show: no dead letter with id {args.id}; `handoff dlq list` shows the ids",
            file=sys.stderr,
        )
        return 1
    shown = _dlq_row(letter)
    if letter.payload is None:
        shown["payload"] = "(encrypted: set HANDOFF_DLQ_KEY to the key the flows run with)"
    else:
        rows = letter.payload.get("rows", [letter.payload])  # a repeated key's rows, or one
        masked = _masked_fields(letter.flow, {name for row in rows for name in row})
        shown_rows = [mask_record(row, masked) for row in rows]
        shown["payload (PII masked)"] = shown_rows if "rows" in letter.payload else shown_rows[0]
    print(json.dumps(shown, indent=2, default=str))
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Sync open dead letters again, flow by flow, through the engine. A flow that cannot be
    opened or stops is reported with what to do, and the other flows go on."""
    store = _store()
    letters = _selected(store, args, limit=None)
    if not letters:
        print("no open dead letters match; nothing to replay")
        return 0
    if settings.dlq_key() is None:  # checked before any record is sent: a replay letters again
        raise MissingSecret(
            "HANDOFF_DLQ_KEY is not set: a replay reads the letters' payloads and dead-letters "
            "what fails again, encrypted with it. Set it to the key the flows run with (the "
            "demo keeps it in $HANDOFF_HOME/dlq_key); nothing was replayed"
        )
    specs, failed, stopped = _flows(), False, []
    run_id = f"replay-{uuid.uuid4().hex[:12]}"
    for flow in sorted({letter.flow for letter in letters}):
        chosen = [letter for letter in letters if letter.flow == flow]
        if flow not in specs:
            print(f"{flow}: no such flow is declared; {len(chosen)} letters left as they are")
            failed = True
            continue
        try:
            result = _replay_flow(specs[flow], chosen, run_id)
        except REPLAY_STOPPERS as error:
            print(f"handoff dlq replay: {_replay_stopped(specs[flow], error)}", file=sys.stderr)
            stopped.append(flow)
            continue
        still = store.list_dead_letters(flow=flow, ids=[letter.id for letter in chosen], limit=None)
        print(
            f"{flow}: replayed {len(chosen)} (run {run_id}): {result.written} written, "
            f"{len(chosen) - len(still)} left the DLQ, {len(still)} still failing"
        )
        if result.counts["unkeyed_held"]:
            print(_unkeyed_held(flow, result.counts["unkeyed_held"]))
        failed = failed or bool(still)
    if stopped:
        print(
            f"handoff dlq replay: {len(stopped)} flows not replayed, their letters left as they "
            f"are: {', '.join(stopped)}",
            file=sys.stderr,
        )
    return 1 if failed or stopped else 0


def _unkeyed_held(flow: str, held: int) -> str:
    """What to do about letters whose rows the source still holds without a usable key."""
    return (
        f"{flow}: {held} of them hold a source row that is still without a usable key (the "
        "source holds it as it was): no replay can send a row without its key. What to do: "
        f"give each row its key in the source (`handoff dlq list --flow {flow}` and `handoff "
        "dlq show ID` show which row and why); the next run syncs a fixed row whose change "
        f"time moved, and `handoff dlq replay --flow {flow}` syncs it in any case and closes "
        "its letter. A row not to be synced: `handoff dlq discard --id ID`"
    )


def _replay_flow(spec: FlowSpec, letters: list[DeadLetter], run_id: str) -> SyncResult:
    """Replay one flow's letters through its own systems."""
    from integrations.connections import open_flow
    from integrations.engine.sync import Sync

    with open_flow(spec) as (source, destination, state):
        sync = Sync(
            spec,
            source,
            destination,
            state,
            run_id=run_id,
            actor=_actor("dlq replay"),
            why="replay",
        )
        return sync.replay(letters)


def _replay_stopped(spec: FlowSpec, error: Exception) -> str:
    """What stopped a flow's replay, naming the flow, and what to do (the driver's first line at
    most, the values it quotes masked: no SQL, no values)."""
    if isinstance(error, SyncError):  # FlowNotOpened too
        return str(error)  # names the flow and what to do
    again = f"rerun `handoff dlq replay --flow {spec.name}`"
    if isinstance(error, DestinationMismatch):  # names the flow, and what to do with the table
        return f"flow {spec.name}: {str(error).removeprefix(f'flow {spec.name}: ')}; then {again}"
    if isinstance(error, SourceSchemaError):
        what = f"the source does not fit: {error}"
        todo = (
            f"check {settings.database_url_variable(spec.source.system)} and that "
            f"{spec.source.system} is seeded or migrated, then {again}"
        )
    elif isinstance(error, SourceReadFailed):
        what = str(error)
        todo = f"{error.todo}, then {again}"
    elif isinstance(error, sa.exc.DBAPIError):  # no connector words it
        what, todo = _database_failed(error, "the replay", "its URL", again)
    else:  # unavailable: nothing was marked synced that was not written
        what, todo = str(error), f"{again} when it answers"
    return f"flow {spec.name}: {what}. What to do: {todo}"


def _database_failed(error: sa.exc.DBAPIError, task: str, url: str, again: str) -> tuple[str, str]:
    """What a database error says (the driver's first line, the values it quotes masked) and
    what to do: a database that does not answer is looked for at its `url`; a refusal is not
    cured by waiting, but by fixing what the database names."""
    complaint = driver_complaint(error.orig)
    if unreachable(error):
        return (
            f"a database did not answer: {complaint}",
            f"check {url} in this shell's environment; {again} when it answers",
        )
    return (
        f"a database refused {task}: {complaint}",
        f"fix what the database names (a value, a limit, a check on the table), then {again}",
    )


def cmd_dlq_discard(args: argparse.Namespace) -> int:
    if not (args.id or args.flow):
        print("handoff dlq discard: name the letters with --id or --flow", file=sys.stderr)
        return 2
    store = _store()
    letters = _selected(store, args, limit=None)
    if not letters:
        print("no open dead letters match; nothing discarded")
        return 0
    discarded = store.discard_dead_letters(
        letters,
        actor=_actor("dlq discard"),
        why=args.reason,
        run_id=f"discard-{uuid.uuid4().hex[:12]}",
    )
    print(f"discarded {len(discarded.letters)} dead letters (audited, reason: {args.reason})")
    if len(discarded.letters) < len(letters):  # a replay or a run closed them meanwhile
        closed = sorted({letter.id for letter in letters} - {d.id for d in discarded.letters})
        print(
            f"{len(closed)} closed meanwhile (by a replay, a run or another discard), left as "
            f"they are: ids {', '.join(map(str, closed))} (`handoff dlq show ID` tells how)"
        )
    for trip in discarded.settled:
        print(
            f"{trip.flow}: none of the dead letters of the error budget's trip of run "
            f"{trip.run_id} is open any more: the trip is cleared, runs go on"
        )
    return 0


def cmd_dlq_keygen(args: argparse.Namespace) -> int:
    from cryptography.fernet import Fernet

    print(Fernet.generate_key().decode())
    return 0


def cmd_budget_list(args: argparse.Namespace) -> int:
    store = _store()
    flow = _flow_named(args.flow)
    trips = store.standing_budget_trips(flow)
    if not trips:
        print("no error-budget trip stands" + (f" for {flow}" if flow else "") + _unknown(flow))
        return 0
    for trip in trips:
        # The flow's runs it stopped (a partition's, an unpartitioned flow's sync), requested
        # again once it clears.
        windows = len(store.list_stopped_windows(trip.flow))
        print(
            f"{trip.flow}: tripped by run {trip.run_id} at {_when(trip.tripped_at)} UTC: "
            f"{trip.failed} of {trip.seen} rows ({trip.share:.1%}) failed, above "
            f"{trip.max_share:.0%}; {trip.open_letters} of its {trip.letters} dead letters open"
            + (f"; {windows} stopped windows wait for it to clear" if windows else "")
        )
    return 0


def cmd_budget_clear(args: argparse.Namespace) -> int:
    """Approve going on despite a flow's error-budget trip: its letters stay in the DLQ."""
    args.flow = _flow_named(args.flow)
    if args.flow not in _flows():
        print(f"handoff budget clear: no flow {args.flow} is declared", file=sys.stderr)
        return 2
    trip = _store().clear_budget_trip(
        args.flow,
        actor=_actor("budget clear"),
        why=args.why,
        run_id=f"budget-clear-{uuid.uuid4().hex[:12]}",
    )
    if trip is None:
        print(f"{args.flow}: no error-budget trip stands; nothing cleared")
        return 0
    print(
        f"{args.flow}: cleared the error budget's trip of run {trip.run_id} (audited, why: "
        f"{args.why}); its {trip.open_letters} open dead letters stay in the DLQ; runs go on"
    )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Walk the chain; with `--head`, the trail must still hold that entry as recorded."""
    verdict = _store().verify_audit(head=args.head)
    if verdict.intact:
        held = f"; it holds entry {args.head.id} as recorded" if args.head else ""
        print(f"audit trail intact: {verdict.entries} entries, head {verdict.head or 'none'}{held}")
        if not verdict.entries:  # a store just made, maybe not the flows' one
            print(_which_store("an empty trail"), file=sys.stderr)
        return 0
    if verdict.broken_position is None:  # no broken link: the chain holds, but not its head
        found = f"audit trail broken: {verdict.problem}; the {verdict.entries} entries left verify"
    else:
        found = (
            f"audit trail broken at entry {verdict.broken_id} (position "
            f"{verdict.broken_position}): {verdict.problem}; the {verdict.entries} entries "
            "before it verify"
        )
    print(
        f"{found}. What to do: treat the trail from there on as untrusted and investigate who "
        "changed the state database",
        file=sys.stderr,
    )
    return 1


def cmd_audit_show(args: argparse.Namespace) -> int:
    """A record's story: where it stands in each flow, every audited action, its dead letters."""
    store = _store()
    args.flow = _flow_named(args.flow)
    story = {
        "key": args.key,
        "ledger": [
            {**row, "synced_at": _when(row["synced_at"])}
            for row in store.ledger_rows(args.key)
            if not args.flow or row["flow"] == args.flow
        ],
        "history": [
            {**entry, "at": _when(entry["at"])}
            for entry in store.record_history(args.key, flow=args.flow)
        ],
        "dead_letters": [
            _dlq_row(letter)
            for letter in store.list_dead_letters(
                flow=args.flow, include_resolved=True, limit=None, keys=[args.key]
            )
        ],
    }
    if args.json:
        print(json.dumps(story, indent=2, default=str))
        return 0 if story["history"] or story["ledger"] else 1
    if not story["history"] and not story["ledger"]:
        print(f"no record {args.key!r} in the audit trail", file=sys.stderr)
        if _nothing_synced(store):
            print(_which_store("an empty state store"), file=sys.stderr)
        return 1
    for row in story["ledger"]:
        state = "archived" if row["archived"] else "live"
        print(
            f"{row['flow']}: {state} as {row['destination_id']}, last synced {row['synced_at']} "
            f"by run {row['run_id']}"
        )
    for entry in story["history"]:
        # A Dagster run's actor is the run itself: named once.
        by = "" if entry["actor"] == f"dagster run {entry['run_id']}" else f"; {entry['actor']}"
        print(
            f"{entry['at']}  {entry['flow']}  {entry['action']:<11} run {entry['run_id']} "
            f"({entry['trigger']}{by})  {json.dumps(entry['diff'], default=str)}"
        )
    for letter in story["dead_letters"]:
        print(
            f"dead letter {letter['id']} ({letter['flow']}, {letter['kind']}): {letter['reason']}"
            f" [{letter['resolution'] or 'open'}]"
        )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from integrations.erp.changes import live_customer_ids, move_customers, soft_delete_customers

    engine = create_engine(settings.erp_database_url())
    rng = np.random.default_rng(args.seed)
    rounds = 0
    print(
        f"changing {args.changes} ERP customers every {args.every} s in {redacted(str(engine.url))}; Ctrl-C stops"
    )
    try:
        while args.rounds == 0 or rounds < args.rounds:
            ids = live_customer_ids(engine)
            chosen = [
                int(i) for i in rng.choice(ids, size=min(args.changes, len(ids)), replace=False)
            ]
            deleted = chosen[:1] if rng.random() < args.delete_share else []
            move_customers(engine, chosen[len(deleted) :], seed=int(rng.integers(1 << 30)))
            soft_delete_customers(engine, deleted)
            rounds += 1
            print(
                f"round {rounds}: moved {len(chosen) - len(deleted)}, soft-deleted {len(deleted)}",
                flush=True,
            )
            time.sleep(args.every)
    except KeyboardInterrupt:
        pass
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="handoff", description=__doc__)
    # The variable naming the database a command works on, for what to do when it fails.
    root.set_defaults(database_url=STATE_URL_VARIABLE)
    commands = root.add_subparsers(dest="command", required=True)

    seed = commands.add_parser(
        "seed", help="fill the ERP (ERP_DATABASE_URL, or SQLite under HANDOFF_HOME)"
    )
    seed.add_argument(
        "--rows", type=_at_least_one, default=10_000, help="number of customers (default 10000)"
    )
    seed.add_argument(
        "--seed", type=int, default=42, help="random seed: the same seed gives the same data"
    )
    seed.set_defaults(run=cmd_seed, database_url=settings.database_url_variable("erp"))

    sandbox = commands.add_parser("crm-sandbox", help="serve the local HubSpot-compatible CRM")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--verbose", action="store_true", help="log every request")
    _fault_arguments(sandbox.add_argument_group("faults (see integrations/crm/faults.py)"))
    hooks = sandbox.add_argument_group("webhooks (signed with CRM_WEBHOOK_SECRET)")
    hooks.add_argument("--webhook-url", help="POST every change here (or POST /_sandbox/webhooks)")
    hooks.add_argument("--webhook-scheme", choices=["hubspot", "standard"], default="hubspot")
    sandbox.set_defaults(run=cmd_crm_sandbox)

    webhooks = commands.add_parser(
        "webhooks",
        help="receive CRM webhooks into the inbox that the crm_webhooks sensor reads",
        description="The CRM → ERP flows run when CRM webhooks arrive: `serve` verifies each "
        "request's signature (HubSpot v3 or Standard Webhooks, secrets from CRM_WEBHOOK_SECRET, "
        "several space-separated while rotating), refuses stale, replayed, oversized and "
        "malformed ones with a 4xx, and stores the events in the state store's inbox.",
    ).add_subparsers(dest="webhooks", required=True)
    serve = webhooks.add_parser("serve", help="serve the webhook receiver on POST /webhooks/crm")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument(
        "--public-url",
        help="the receiver's base URL as the CRM calls it, behind a proxy (HubSpot signs it)",
    )
    serve.add_argument("--max-body", type=int, default=256 * 1024, help="bytes (default 256 KiB)")
    serve.set_defaults(run=cmd_webhooks_serve)
    status = webhooks.add_parser("status", help="deliveries, events and events waiting for a run")
    status.set_defaults(run=cmd_webhooks_status)

    rt = commands.add_parser(
        "rt", help="a throwaway local Request Tracker 5 (installs the Debian packages as root)"
    )
    rt.add_argument("action", choices=["start", "stop", "reset"])
    rt.add_argument("--home", help="its folder (default: RT_HOME or $HANDOFF_HOME/rt)")
    rt.set_defaults(run=cmd_rt)

    dlq = commands.add_parser("dlq", help="the dead-letter queue").add_subparsers(
        dest="dlq", required=True
    )

    def letters(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument("--flow", help="only this flow's letters")
        command.add_argument("--kind", choices=REASON_KINDS, help="only this kind of reason")
        command.add_argument("--older-than", type=_age, help="first seen at least this long ago")
        command.add_argument(
            "--id", type=_letter_id, action="append", help="this letter (repeatable)"
        )
        command.add_argument("--key", action="append", help="this record key (repeatable)")
        return command

    listing = letters(dlq.add_parser("list", help="dead letters, PII masked"))
    listing.add_argument("--all", action="store_true", help="include resolved ones")
    listing.add_argument(
        "--limit",
        type=_at_least_one,
        default=100,
        help="show at most this many, 1 or more (default 100; says when more match)",
    )
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_dlq_list)
    show = dlq.add_parser("show", help="one dead letter with its payload, PII masked")
    show.add_argument("id", type=_letter_id)
    show.set_defaults(run=cmd_dlq_show)
    replay = letters(
        dlq.add_parser("replay", help="sync open letters again from the source (or payload)")
    )
    replay.set_defaults(run=cmd_dlq_replay)
    discard = letters(dlq.add_parser("discard", help="close letters without syncing (audited)"))
    discard.add_argument("--reason", required=True, help="why: kept in the audit trail")
    discard.set_defaults(run=cmd_dlq_discard)
    keygen = dlq.add_parser("keygen", help="print a new key for HANDOFF_DLQ_KEY")
    keygen.set_defaults(run=cmd_dlq_keygen)

    budget = commands.add_parser(
        "budget",
        help="error-budget trips: a flow whose run the budget stopped runs no more until its "
        "dead letters are replayed or discarded, or going on is approved",
    ).add_subparsers(dest="budget", required=True)
    trips = budget.add_parser("list", help="the trips that stand, with their open dead letters")
    trips.add_argument("--flow", help="only this flow's")
    trips.set_defaults(run=cmd_budget_list)
    clear = budget.add_parser(
        "clear", help="approve going on with the trip's letters left in the DLQ (audited)"
    )
    clear.add_argument("--flow", required=True)
    clear.add_argument("--why", required=True, help="kept in the audit trail")
    clear.set_defaults(run=cmd_budget_clear)

    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit", required=True
    )
    verify = audit.add_parser("verify", help="walk the hash chain; report the first broken link")
    verify.add_argument(
        "--head",
        type=_audit_head,
        metavar="ID:HASH",
        help="the head recorded elsewhere (a materialization's audit_head): the trail must still "
        "hold that entry, else it was cut after it",
    )
    verify.set_defaults(run=cmd_audit_verify)
    story = audit.add_parser("show", help="one record's story across runs and flows")
    story.add_argument("--key", required=True, help="the record key (the source's key)")
    story.add_argument("--flow", help="only this flow")
    story.add_argument("--json", action="store_true")
    story.set_defaults(run=cmd_audit_show)

    simulate = commands.add_parser("simulate", help="change a few ERP customers every few seconds")
    simulate.add_argument("--every", type=float, default=5.0, help="seconds between rounds")
    simulate.add_argument("--changes", type=int, default=5, help="customers changed per round")
    simulate.add_argument(
        "--delete-share", type=float, default=0.2, help="chance a round soft-deletes one"
    )
    simulate.add_argument(
        "--rounds", type=int, default=0, help="stop after N rounds (0: run until Ctrl-C)"
    )
    simulate.add_argument("--seed", type=int, default=7)
    simulate.set_defaults(run=cmd_simulate, database_url=settings.database_url_variable("erp"))
    return root


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # inside the try: a reader gone (`| head`) is seen here
        return code
    except BrokenPipeError:
        # `handoff dlq list | head`: the reader took what it wanted and left. Not an error
        # worth a traceback; stdout goes to /dev/null so the exit's flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    except DATABASE_ERRORS as error:
        print(f"handoff {_command(args)}: {_command_failed(args, error)}", file=sys.stderr)
        return 1
    except MissingSecret as error:  # its text names the variable, and what to do
        print(f"handoff {_command(args)}: {error}", file=sys.stderr)
        return 1


def _command(args: argparse.Namespace) -> str:
    """The command as typed, e.g. `dlq list`: a group's subcommand is kept under its name."""
    chosen = getattr(args, args.command, None)
    return f"{args.command} {chosen}" if isinstance(chosen, str) else args.command


def _command_failed(args: argparse.Namespace, error: Exception) -> str:
    """What stopped a command at its database, and what to do, in one line."""
    again = "rerun the command"
    if isinstance(error, StateStoreUnavailable):  # names the store's URL, without its password
        what = str(error)
        todo = f"check {STATE_URL_VARIABLE} in this shell's environment; {again} when it answers"
    else:
        what, todo = _database_failed(error, "the command", args.database_url, again)
    return f"{what}. What to do: {todo}"


if __name__ == "__main__":
    sys.exit(main())
