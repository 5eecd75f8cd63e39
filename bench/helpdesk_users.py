"""Benchmark: ERP customers → RT users through handoff, against a real local RT5.

One command: `.venv/bin/python -m bench.helpdesk_users --rows 1000` (as root the first time: it
installs RT when absent). Prints one row per step: seconds, rows/s, records written, requests
sent to RT, peak RSS. RT has no batch endpoint for users, so requests per record bound the rate.

Steps: full = first sync (one create per user); incremental = after 1% of customers moved;
rerun = nothing changed (no request writes; the engine's diff sends nothing).
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

from cryptography.fernet import Fernet

from assets.helpdesk_users import HELPDESK_USERS
from bench.steps import peak_rss_mb
from integrations.engine.state import StateStore
from integrations.engine.sync import Sync
from integrations.erp.changes import live_customer_ids, move_customers
from integrations.erp.seed import seed_erp
from integrations.helpdesk.client import RtClient
from integrations.helpdesk.destination import RtUsers
from integrations.helpdesk.local_rt import LocalRt
from integrations.sql.connect import create_engine
from integrations.sql.source import SqlSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="ERP customers")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="handoff-bench-rt-"))
    rt = LocalRt(home / "rt")
    rt.start()
    erp_url = f"sqlite:///{home / 'erp.sqlite'}"
    seed_erp(erp_url, rows=args.rows, seed=1)
    erp = create_engine(erp_url)
    state = StateStore(f"sqlite:///{home / 'state.sqlite'}", dlq_key=Fernet.generate_key().decode())
    try:
        for label, change in [
            ("handoff full sync", False),
            ("handoff incremental (1% changed)", True),
            ("handoff rerun (nothing changed)", False),
        ]:
            if change:
                move_customers(erp, live_customer_ids(erp)[::100])
            client = RtClient(rt.base_url, user=rt.user, password=rt.password)
            result = Sync(
                HELPDESK_USERS,
                SqlSource(erp, HELPDESK_USERS.source),
                RtUsers(client),
                state,
                run_id=uuid.uuid4().hex,
                actor="bench",
                why="benchmark",
            ).run()
            requests = client.api.stats()["attempts"]
            client.close()
            print(
                f"{label}: {result.seconds:.1f} s, {result.rows_per_second:.0f} rows/s, "
                f"{result.written} written, {requests} RT requests, "
                f"peak RSS {peak_rss_mb():.0f} MB"
            )
    finally:
        rt.stop()
        state.dispose()
        erp.dispose()


if __name__ == "__main__":
    main()
