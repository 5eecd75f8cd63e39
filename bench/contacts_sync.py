"""Benchmark: ERP customers → CRM contacts through handoff, against the raw client path.

One command: `.venv/bin/python -m bench.contacts_sync --rows 100000` (add `--erp postgres` for
PostgreSQL ERP and state). The CRM sandbox runs in its own process, as in production. Each step
runs in a fresh process so its peak RSS is its own. Prints one row per step: seconds, rows/s,
records written, peak RSS.

Steps: raw = a plain SELECT streamed and POSTed in batches of 100 with the same client (no
contracts, no diff, no ledger: the floor a hand-written script would reach); full = handoff's
first sync; incremental = after 1% of customers changed; rerun = nothing changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cryptography.fernet import Fernet

from bench.steps import ROOT, change_one_percent, peak_rss_mb, stage_line, sync_figures
from bench.steps import run_step as bench_step


def step_raw(env: dict[str, str]) -> dict[str, object]:
    import sqlalchemy as sa

    from integrations.contracts.rules import EMAIL_PATTERN
    from integrations.crm.client import CrmClient
    from integrations.sql.connect import create_engine

    client = CrmClient(env["CRM_BASE_URL"], env["CRM_ACCESS_TOKEN"])
    engine = create_engine(env["ERP_DATABASE_URL"])
    sent = 0
    started = time.perf_counter()
    with engine.connect().execution_options(stream_results=True, yield_per=1000) as connection:
        result = connection.execute(
            sa.text(
                "SELECT customer_number, email, first_name, last_name, phone, company_name, city, "
                "country FROM customers WHERE deleted_at IS NULL AND country IS NOT NULL"
            )
        )
        seen: set[str] = set()
        for rows in result.partitions(100):
            inputs = []
            for number, email, first, last, phone, company, city, country in rows:
                email = (email or "").strip().lower()
                if not re.fullmatch(EMAIL_PATTERN, email) or email in seen:
                    continue  # what the CRM would refuse: skipped, or the whole batch is lost
                seen.add(email)
                inputs.append(
                    {
                        "id": number,
                        "properties": {
                            "email": email,
                            "firstname": first,
                            "lastname": last,
                            "phone": phone,
                            "company": company,
                            "city": city,
                            "country": country,
                        },
                    }
                )
            client.batch_upsert("contacts", "erp_customer_id", inputs)
            sent += len(inputs)
    return {"seconds": time.perf_counter() - started, "rows": sent, "written": sent}


def step_sync(env: dict[str, str]) -> dict[str, object]:
    from assets.crm_contacts import CRM_CONTACTS
    from integrations.crm.client import CrmClient
    from integrations.crm.destination import CrmObjects
    from integrations.engine.state import StateStore
    from integrations.sql.connect import create_engine
    from integrations.sql.source import SqlSource

    engine = create_engine(env["ERP_DATABASE_URL"])
    state = StateStore(env["HANDOFF_STATE_URL"], dlq_key=Fernet.generate_key().decode())
    client = CrmClient(env["CRM_BASE_URL"], env["CRM_ACCESS_TOKEN"])
    return sync_figures(
        CRM_CONTACTS,
        SqlSource(engine, CRM_CONTACTS.source),
        CrmObjects(client, "contacts", "erp_customer_id"),
        state,
    )


STEPS = {"raw": step_raw, "sync": step_sync, "change": change_one_percent}


def run_step(name: str, env: dict[str, str]) -> dict[str, object]:
    return bench_step("bench.contacts_sync", name, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--erp", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        figures = STEPS[args.step](dict(os.environ))
        figures["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(figures))
        return

    from integrations.erp.seed import seed_erp

    home = Path(tempfile.mkdtemp(prefix="handoff-bench-"))
    token = secrets.token_urlsafe(16)
    env = {**os.environ, "HANDOFF_HOME": str(home), "CRM_ACCESS_TOKEN": token}
    if args.erp == "postgres":
        import psycopg

        names = [f"handoff_bench_{uuid.uuid4().hex[:8]}" for _ in range(2)]
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
            for name in names:
                c.execute(f'CREATE DATABASE "{name}"')
        env["ERP_DATABASE_URL"], env["HANDOFF_STATE_URL"] = (
            f"postgresql://postgres@127.0.0.1:5432/{name}" for name in names
        )
    else:
        env["ERP_DATABASE_URL"] = f"sqlite:///{home / 'erp.sqlite'}"
        env["HANDOFF_STATE_URL"] = f"sqlite:///{home / 'state.sqlite'}"
    seed_erp(env["ERP_DATABASE_URL"], rows=args.rows, seed=1)

    rows = []
    for label, steps in [
        ("raw client path", ["raw"]),
        ("handoff full sync", ["sync"]),
        ("handoff incremental (1% changed)", ["change", "sync"]),
        ("handoff rerun (nothing changed)", ["sync"]),
    ]:
        sandbox_home = home / ("raw" if label.startswith("raw") else "crm")
        sandbox_home.mkdir(exist_ok=True)
        port = 20000 + secrets.randbelow(20000)
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "integrations.cli", "crm-sandbox", "--port", str(port)],
            cwd=ROOT,
            env={**env, "HANDOFF_HOME": str(sandbox_home)},
            stdout=subprocess.PIPE,
            text=True,
        )
        sandbox.stdout.readline()
        try:
            step_env = {**env, "CRM_BASE_URL": f"http://127.0.0.1:{port}"}
            figures = [run_step(step, step_env) for step in steps][-1]
        finally:
            sandbox.terminate()
            sandbox.wait()
        rate = figures["rows"] / figures["seconds"] if figures["seconds"] else 0.0
        print(f"{label}: {stage_line(figures)}", file=sys.stderr)
        rows.append((label, figures["seconds"], rate, figures["written"], figures["peak_rss_mb"]))

    if args.erp == "postgres":
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
            for name in names:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(f"\n{args.rows:,} customers, ERP and state on {args.erp}, CRM sandbox in its own process")
    print(f"{'step':<36}{'seconds':>9}{'rows/s':>10}{'written':>10}{'peak RSS MB':>13}")
    for label, seconds, rate, written, rss in rows:
        print(f"{label:<36}{seconds:>9.2f}{rate:>10.0f}{written:>10}{rss:>13.0f}")


if __name__ == "__main__":
    main()
