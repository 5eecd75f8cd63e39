"""`handoff`: the operators' command line (seed, crm-sandbox, dlq, simulate)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import fields

import numpy as np

from integrations import settings
from integrations.engine.masking import mask_record
from integrations.engine.state import StateStore
from integrations.sql.connect import create_engine, redacted


def _pii_fields() -> frozenset[str]:
    from integrations.contracts.crm_contact import CRM_CONTACT
    from integrations.contracts.erp_customer import ERP_CUSTOMER

    return ERP_CUSTOMER.pii_fields | CRM_CONTACT.pii_fields


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

    faults = Faults(**{f.name: getattr(args, f.name) for f in fields(Faults)})
    server = SandboxServer(
        settings.crm_sandbox_path(),
        token,
        host=args.host,
        port=args.port,
        verbose=args.verbose,
        faults=faults,
    )
    print(f"CRM sandbox serving {server.base_url} from {settings.crm_sandbox_path()}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _fault_arguments(group) -> None:
    """One flag per fault setting, e.g. `--rate-limit 10 --error-rate 0.3`; all off by default."""
    from integrations.crm.faults import Faults

    for setting in fields(Faults):
        kind = int if setting.name in ("rate_burst", "outage_after_requests", "seed") else float
        group.add_argument(
            f"--{setting.name.replace('_', '-')}", type=kind, default=setting.default
        )


def _dlq_row(letter, pii: frozenset[str]) -> dict[str, object]:
    return {
        "id": letter.id,
        "flow": letter.flow,
        "key": letter.record_key,
        "kind": letter.reason_kind,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "first_seen": letter.first_seen.isoformat(timespec="seconds")
        if letter.first_seen
        else None,
        "last_seen": letter.last_seen.isoformat(timespec="seconds") if letter.last_seen else None,
        "email": mask_record({"email": letter.payload.get("email")}, pii)["email"],
    }


def cmd_dlq_list(args: argparse.Namespace) -> int:
    store = StateStore(settings.state_url())
    letters = store.list_dead_letters(flow=args.flow, include_resolved=args.all, limit=args.limit)
    pii = _pii_fields()
    rows = [_dlq_row(letter, pii) for letter in letters]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("the dead-letter queue is empty" + (f" for {args.flow}" if args.flow else ""))
        return 0
    print(f"{'id':>6}  {'flow':<32} {'key':<10} {'email':<22} {'att':>3}  reason")
    for row in rows:
        print(
            f"{row['id']:>6}  {row['flow']:<32} {row['key']:<10} {row['email'] or '-':<22} "
            f"{row['attempts']:>3}  {row['reason']}"
        )
    total = store.count_open_dead_letters(args.flow)
    if not args.all and total > len(rows):
        print(f"(showing {len(rows)} of {total} open; --limit N shows more)")
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    store = StateStore(settings.state_url())
    letter = store.get_dead_letter(args.id)
    if letter is None:
        print(
            f"handoff dlq show: no dead letter with id {args.id}; `handoff dlq list` shows the ids",
            file=sys.stderr,
        )
        return 1
    shown = _dlq_row(letter, _pii_fields())
    shown.pop("email")
    shown["payload (PII masked)"] = mask_record(letter.payload, _pii_fields())
    shown["resolved_at"] = (
        letter.resolved_at.isoformat(timespec="seconds") if letter.resolved_at else None
    )
    print(json.dumps(shown, indent=2, default=str))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    verdict = StateStore(settings.state_url()).verify_audit()
    if verdict.intact:
        print(f"audit trail intact: {verdict.entries} entries, head {(verdict.head or '')[:16]}")
        return 0
    print(
        f"audit trail broken at entry {verdict.broken_id} (position {verdict.broken_position}): "
        f"{verdict.problem}; the {verdict.entries} entries before it verify. What to do: treat "
        "the trail from there on as untrusted and investigate who changed the state database",
        file=sys.stderr,
    )
    return 1


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
    commands = root.add_subparsers(dest="command", required=True)

    seed = commands.add_parser(
        "seed", help="fill the ERP (ERP_DATABASE_URL, or SQLite under HANDOFF_HOME)"
    )
    seed.add_argument(
        "--rows", type=int, default=10_000, help="number of customers (default 10000)"
    )
    seed.add_argument(
        "--seed", type=int, default=42, help="random seed: the same seed gives the same data"
    )
    seed.set_defaults(run=cmd_seed)

    sandbox = commands.add_parser("crm-sandbox", help="serve the local HubSpot-compatible CRM")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--verbose", action="store_true", help="log every request")
    _fault_arguments(sandbox.add_argument_group("faults (see integrations/crm/faults.py)"))
    sandbox.set_defaults(run=cmd_crm_sandbox)

    dlq = commands.add_parser("dlq", help="the dead-letter queue").add_subparsers(
        dest="dlq", required=True
    )
    listing = dlq.add_parser("list", help="open dead letters, PII masked")
    listing.add_argument("--flow")
    listing.add_argument("--all", action="store_true", help="include resolved ones")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_dlq_list)
    show = dlq.add_parser("show", help="one dead letter with its payload, PII masked")
    show.add_argument("id", type=int)
    show.set_defaults(run=cmd_dlq_show)

    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit", required=True
    )
    verify = audit.add_parser("verify", help="walk the hash chain; report the first broken link")
    verify.set_defaults(run=cmd_audit_verify)

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
    simulate.set_defaults(run=cmd_simulate)
    return root


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
