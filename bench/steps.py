"""What every benchmark shares: each step runs in a fresh process, so its peak RSS is its own."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_step(module: str, name: str, env: dict[str, str]) -> dict[str, object]:
    """`python -m <module> --step <name>` in a fresh process; its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--step", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sync_figures(spec, source, destination, state) -> dict[str, object]:
    """One handoff sync of `spec`, as a benchmark step reports it."""
    from integrations.engine.sync import Sync

    result = Sync(
        spec, source, destination, state, run_id=uuid.uuid4().hex, actor="bench", why="benchmark"
    ).run()
    return {
        "seconds": result.seconds,
        "rows": result.counts["read"],
        "written": result.written,
        "timings": {k: round(v, 2) for k, v in result.timings.items()},
    }


def change_one_percent(env: dict[str, str]) -> dict[str, object]:
    """Every hundredth live ERP customer moves (new city and phone, `updated_at` = now)."""
    from integrations.erp.changes import live_customer_ids, move_customers
    from integrations.sql.connect import create_engine

    engine = create_engine(env["ERP_DATABASE_URL"])
    chosen = live_customer_ids(engine)[::100]
    move_customers(engine, chosen)
    return {"seconds": 0.0, "rows": len(chosen), "written": len(chosen)}
