"""What every benchmark shares: each step runs in a fresh process, so its peak RSS is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def calibration_seconds() -> float:
    """A fixed pure-Python loop: how fast this machine runs Python at the moment. Machines of one
    kind differ, and one machine drifts by half within minutes: figures of two runs compare
    once each is divided by its run's calibration."""
    started = time.perf_counter()
    total = 0
    for number in range(10_000_000):
        total += number
    return time.perf_counter() - started


_SERVERS = (b"postgres", b"mariadbd", b"mysqld")


def server_cpu_seconds() -> float | None:
    """CPU time used so far by the local database servers' processes (PostgreSQL, MariaDB),
    including backends that have exited (reaped, their time is their parent's); None when no
    server process is visible (another host, another user's /proc)."""
    total, seen = 0, False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().split(b"\0")[0].endswith(_SERVERS):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        seen = True
        total += sum(int(ticks) for ticks in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK") if seen else None


def run_step(module: str, name: str, env: dict[str, str]) -> dict[str, object]:
    """`python -m <module> --step <name>` in a fresh process; its last stdout line is JSON, to
    which this adds the CPU seconds the step's process used (`client_cpu`) and, when the database
    servers run on this machine, theirs meanwhile (`server_cpu`)."""
    server_before = server_cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-m", module, "--step", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = server_cpu_seconds()
    if done.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["client_cpu"] = (
        children.ru_utime + children.ru_stime - children_before.ru_utime - children_before.ru_stime
    )
    both = server is not None and server_before is not None
    figures["server_cpu"] = server - server_before if both else None
    return figures


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
        "timings": result.stage_timings(),
    }


def stage_line(figures: dict[str, object]) -> str:
    """A sync step's busy seconds per stage, which overlap: the busiest is the limit."""
    stages = figures.get("timings") or {}
    return f"{figures['seconds']:.2f} s in all; busy per stage: " + "; ".join(
        f"{stage} {phases['total']:.2f} ("
        + ", ".join(
            f"{phase} {seconds:.2f}" for phase, seconds in phases.items() if phase != "total"
        )
        + ")"
        for stage, phases in stages.items()
    )


def change_one_percent(env: dict[str, str]) -> dict[str, object]:
    """Every hundredth live ERP customer moves (new city and phone, `updated_at` = now)."""
    from integrations.erp.changes import live_customer_ids, move_customers
    from integrations.sql.connect import create_engine

    engine = create_engine(env["ERP_DATABASE_URL"])
    chosen = live_customer_ids(engine)[::100]
    move_customers(engine, chosen)
    return {"seconds": 0.0, "rows": len(chosen), "written": len(chosen)}
