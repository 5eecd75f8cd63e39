"""Benchmark: contacts into a CRM that allows 10 requests/s, alone and two syncs at once.

One command: `.venv/bin/python -m bench.crm_rate_limit` (`--rows 10000 --limit 10`). The CRM
sandbox runs in its own process with `--rate-limit 10` (429 + Retry-After above it); each sync
runs in its own process through the engine, its client limited to 10 requests/s by the token
bucket in the state store. Prints, per case: duration, requests, the rate the sandbox let
through against the limit, its busiest second, and the share of requests answered 429.

Cases: one sync of 10k customers; two syncs at once (two ERPs, two flows, one state store and
so one shared bucket) into the same CRM; and the same two with a bucket each (what happens when
the limit is not shared: the control that shows the sharing is what keeps them under it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parents[1]


def step_sync(env: dict[str, str]) -> dict[str, object]:
    """One sync in this process: the contacts flow (renamed per ERP), rate-limited."""
    from assets.crm_contacts import CRM_CONTACTS
    from integrations.crm.client import CrmClient, shared_bucket
    from integrations.crm.destination import CrmObjects
    from integrations.engine.errors import SyncError
    from integrations.engine.state import StateStore
    from integrations.engine.sync import Sync
    from integrations.http import ApiLimits
    from integrations.sql.connect import create_engine
    from integrations.sql.source import SqlSource

    spec = dataclasses.replace(CRM_CONTACTS, name=env["BENCH_FLOW"])
    limits = ApiLimits(requests_per_second=float(env["BENCH_LIMIT"]), burst=int(env["BENCH_BURST"]))
    bucket = shared_bucket(env["BENCH_BUCKET_URL"], env["CRM_BASE_URL"], limits)
    client = CrmClient(env["CRM_BASE_URL"], env["CRM_ACCESS_TOKEN"], limits, bucket=bucket)
    state = StateStore(env["HANDOFF_STATE_URL"], dlq_key=env["HANDOFF_DLQ_KEY"])
    started = time.perf_counter()
    sync = Sync(
        spec,
        SqlSource(create_engine(env["ERP_DATABASE_URL"]), spec.source),
        CrmObjects(client, "contacts", "erp_customer_id"),
        state,
        run_id=uuid.uuid4().hex,
        actor="bench",
        why="benchmark",
    )
    try:
        written, failure = sync.run().written, ""
    except SyncError as error:
        written, failure = 0, error.what
    stats = client.api.stats()
    return {
        "seconds": time.perf_counter() - started,
        "written": written,
        "failure": failure,
        "attempts": stats["attempts"],
        "answered_429": stats["answered_429"],
        "waited": stats["rate_limit_wait_seconds"],
    }


def seed(url: str, rows: int, seed_value: int, second: bool) -> None:
    """An ERP; the `second` has customer numbers from C5000001 and emails of its own."""
    import sqlalchemy as sa

    from integrations.erp.seed import seed_erp
    from integrations.sql.connect import create_engine

    seed_erp(url, rows=rows, seed=seed_value)
    if second:
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE customers SET customer_number = 'C5' || substr(customer_number, 3), "
                    "email = 'second.' || email"
                )
            )
        engine.dispose()


def sandbox(env: dict[str, str], home: Path, limit: float) -> tuple[subprocess.Popen, str]:
    home.mkdir(parents=True, exist_ok=True)
    port = 20000 + secrets.randbelow(20000)
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "integrations.cli", "crm-sandbox", "--port", str(port)),
            *("--rate-limit", str(limit)),
        ],
        cwd=ROOT,
        env={**env, "HANDOFF_HOME": str(home)},
        stdout=subprocess.PIPE,
        text=True,
    )
    process.stdout.readline()
    return process, f"http://127.0.0.1:{port}"


def syncs_at_once(envs: list[dict[str, str]]) -> list[dict[str, object]]:
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.crm_rate_limit", "--step"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]
    figures = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a sync failed:\n{err[-3000:]}")
        figures.append(json.loads(out.strip().splitlines()[-1]))
    return figures


def traffic(base_url: str, token: str) -> dict:
    answer = requests.get(
        f"{base_url}/_sandbox/traffic", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    return answer.json()


def main() -> None:
    from integrations.engine.state import StateStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--limit", type=float, default=10.0, help="the CRM's requests/s")
    parser.add_argument(
        "--burst",
        type=int,
        default=3,
        help="the client's burst, well under the sandbox's (one second's worth): a sync that "
        "paused to read and validate a batch catches up without a 429",
    )
    parser.add_argument("--step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step_sync(dict(os.environ))))
        return

    home = Path(tempfile.mkdtemp(prefix="handoff-bench-rate-"))
    token = secrets.token_urlsafe(16)
    base = {
        **os.environ,
        "CRM_ACCESS_TOKEN": token,
        "BENCH_LIMIT": str(args.limit),
        "BENCH_BURST": str(args.burst),
        "HANDOFF_DLQ_KEY": Fernet.generate_key().decode(),
    }
    erps = {}
    for name, seed_value in (("a", 1), ("b", 2)):
        erps[name] = f"sqlite:///{home / f'erp_{name}.sqlite'}"
        seed(erps[name], args.rows, seed_value, second=name == "b")

    cases = [
        ("one sync", ["a"], True),
        ("two syncs at once, shared bucket", ["a", "b"], True),
        ("two syncs at once, a bucket each", ["a", "b"], False),
    ]
    rows = []
    for label, erp_names, shared in cases:
        case_home = home / label.replace(" ", "_").replace(",", "")
        process, url = sandbox(base, case_home / "crm", args.limit)
        try:
            state_url = f"sqlite:///{case_home / 'state.sqlite'}"
            envs = [
                {
                    **base,
                    "HANDOFF_HOME": str(case_home),
                    "CRM_BASE_URL": url,
                    "ERP_DATABASE_URL": erps[name],
                    "HANDOFF_STATE_URL": state_url,
                    "BENCH_FLOW": f"erp_{name}_customers_to_crm_contacts",
                    "BENCH_BUCKET_URL": state_url
                    if shared
                    else f"sqlite:///{case_home / f'bucket_{name}.sqlite'}",
                }
                for name in erp_names
            ]
            StateStore(state_url).dispose()  # made once, before the processes race to make it
            started = time.perf_counter()
            figures = syncs_at_once(envs)
            wall = time.perf_counter() - started
            seen = traffic(url, token)
        finally:
            process.terminate()
            process.wait()
        throttled = seen["counts"].get("throttled_429", 0)
        requests_total = len(seen["served_at"]) + throttled
        rows.append(
            (
                label,
                max(figure["seconds"] for figure in figures),
                wall,
                sum(figure["written"] for figure in figures),
                [figure["failure"] for figure in figures if figure["failure"]],
                requests_total,
                seen["served_per_second"],
                seen["busiest_second"],
                throttled / requests_total,
            )
        )

    print(
        f"\n{args.rows:,} ERP customers per sync, CRM sandbox limited to {args.limit:g} requests/s"
    )
    print(
        f"{'case':<36}{'sync s':>8}{'wall s':>8}{'written':>9}{'requests':>10}"
        f"{'req/s':>8}{'of limit':>10}{'busiest 1 s':>13}{'429 share':>11}"
    )
    for label, seconds, wall, written, failures, total, rate, busiest, share in rows:
        print(
            f"{label:<36}{seconds:>8.1f}{wall:>8.1f}{written:>9}{total:>10}"
            f"{rate:>8.2f}{rate / args.limit:>10.0%}{busiest:>13}{share:>11.1%}"
        )
        for failure in failures:
            print(f"    a sync failed: {failure}")
    allowed = 2 * max(1, round(args.limit))
    print(
        f"req/s: requests the sandbox let through, first to last; busiest 1 s: most let through "
        f"in any one second (its bucket allows up to {allowed}: a full second's worth, then the "
        "refill); 429 share: of all requests"
    )
    one = rows[0]
    print(
        f"\nA record-per-request client would need {one[3]:,} requests for the same "
        f"{one[3]:,} contacts: at least {one[3] / args.limit:,.0f} s at this limit."
    )


if __name__ == "__main__":
    main()
