"""Benchmark: ERP customers into a SQL table through handoff, against the raw database path and dlt.

One command: `.venv/bin/python -m bench.sql_sync` runs PostgreSQL at 100k and 1M customers and
SQLite and MariaDB at 100k (`--db postgres --rows 100000` for one case; dlt needs
`pip install -e '.[bench]'`). Each step runs in a fresh process so its peak RSS is its own.

Steps, on the same seeded ERP `customers` (9 columns) into a fresh destination database:
- raw load: every source row into an empty table (PostgreSQL: COPY out of the source, COPY in;
  SQLite/MariaDB: a streamed SELECT and executemany INSERT in batches);
- raw upsert: the same rows into a keyed table through the dialect's upsert (PostgreSQL: COPY into
  a temporary table, then one `INSERT … ON CONFLICT … DO UPDATE … WHERE … IS DISTINCT FROM`);
- handoff full: the first sync (extract, validate both contracts, diff, load, ledger, audit);
- handoff incremental: after 1% of customers changed; handoff rerun: nothing changed;
- dlt merge (PostgreSQL): `sql_table` into PostgreSQL with write_disposition `merge` on the
  key, first load and the reload after the same 1% change.

Beside each step's time: the CPU seconds of its process (client) and of the local database
servers meanwhile (server; blank when they run elsewhere), and a calibration loop's time for the
whole run: the machine's speed drifts, so compare runs after dividing by it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandera.pandas as pa
from pandera.typing import Series

from bench.steps import (
    calibration_seconds,
    change_one_percent,
    peak_rss_mb,
    stage_line,
    sync_figures,
)
from bench.steps import run_step as bench_step
from integrations.contracts import Contract
from integrations.contracts.erp_customer import ERP_CUSTOMER
from integrations.contracts.rules import CUSTOMER_NUMBER
from integrations.engine.spec import FlowSpec, SourceTable, Target

COLUMNS = [
    "customer_number",
    "first_name",
    "last_name",
    "email",
    "phone",
    "company_name",
    "city",
    "country",
    "updated_at",
]
POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
MARIADB_ADMIN = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


class ReportingCustomerV1(pa.DataFrameModel):
    customer_number: Series[str] = pa.Field(str_matches=CUSTOMER_NUMBER, unique=True)
    first_name: Series[str]
    last_name: Series[str]
    email: Series[str]
    phone: Series[str] = pa.Field(nullable=True)
    company_name: Series[str] = pa.Field(nullable=True)
    city: Series[str] = pa.Field(nullable=True)
    country: Series[str] = pa.Field(str_length=2)
    updated_at: Series[pa.DateTime]

    class Config:
        coerce = True
        strict = True


BENCH_CUSTOMERS = FlowSpec(
    name="bench_customers",
    source=SourceTable(table="customers", key="customer_id"),
    source_contract=ERP_CUSTOMER,
    target=Target(system="reporting", dataset="customers", id_property="customer_number"),
    target_contract=Contract("bench.reporting_customer", 1, ReportingCustomerV1),
    mapping=lambda rows: rows[COLUMNS],
    batch_size=25_000,  # three batches are in flight at once (read, load, commit)
)


# --- steps (each in its own process) ---------------------------------------------------------


def step_seed(env: dict[str, str]) -> dict[str, object]:
    from integrations.erp.seed import seed_erp

    started = time.perf_counter()
    counts = seed_erp(env["ERP_DATABASE_URL"], rows=int(env["BENCH_ROWS"]), seed=1)
    return {"seconds": time.perf_counter() - started, "rows": counts["customers"], "written": 0}


def step_sync(env: dict[str, str]) -> dict[str, object]:
    from integrations.engine.state import StateStore
    from integrations.sql.connect import create_engine
    from integrations.sql.destination import SqlTable
    from integrations.sql.source import SqlSource

    source = create_engine(env["ERP_DATABASE_URL"])
    destination = create_engine(env["BENCH_DESTINATION_URL"])
    state = StateStore(env["HANDOFF_STATE_URL"], dlq_key=env["HANDOFF_DLQ_KEY"])
    return sync_figures(
        BENCH_CUSTOMERS,
        SqlSource(source, BENCH_CUSTOMERS.source),
        SqlTable(destination, BENCH_CUSTOMERS.target, create_missing=True),
        state,
    )


def _raw_table(engine, name: str, keyed: bool):
    """The raw paths' table: the same columns, nothing NOT NULL (raw loads judge nothing)."""
    import sqlalchemy as sa

    columns = [
        sa.Column("customer_number", sa.String(255), primary_key=keyed),
        *(sa.Column(name, sa.Text) for name in COLUMNS[1:-1]),
        sa.Column("updated_at", sa.DateTime),
    ]
    table = sa.Table(name, sa.MetaData(), *columns)
    table.create(engine)
    return table


def step_raw(env: dict[str, str], keyed: bool) -> dict[str, object]:
    from integrations.sql.connect import create_engine

    source = create_engine(env["ERP_DATABASE_URL"])
    destination = create_engine(env["BENCH_DESTINATION_URL"])
    name = "raw_upsert" if keyed else "raw_load"
    table = _raw_table(destination, name, keyed)
    started = time.perf_counter()
    if source.dialect.name == "postgresql":
        rows = _raw_postgresql(source, destination, name, keyed)
    else:
        rows = _raw_executemany(source, destination, table, keyed)
    return {"seconds": time.perf_counter() - started, "rows": rows, "written": rows}


def _raw_postgresql(source, destination, name: str, keyed: bool) -> int:
    columns = ", ".join(COLUMNS)
    reader, writer = source.raw_connection(), destination.raw_connection()
    try:
        with writer.driver_connection.cursor() as target:
            into = name
            if keyed:
                target.execute(
                    f"CREATE TEMPORARY TABLE batch ON COMMIT DROP AS "
                    f"SELECT {columns} FROM {name} WITH NO DATA"
                )
                into = "batch"
            with (
                reader.driver_connection.cursor() as origin,
                origin.copy(f"COPY (SELECT {columns} FROM customers) TO STDOUT") as out,
                target.copy(f"COPY {into} ({columns}) FROM STDIN") as copy,
            ):
                for block in out:
                    copy.write(block)
            if keyed:
                others = [c for c in COLUMNS if c != "customer_number"]
                target.execute(
                    f"INSERT INTO {name} ({columns}) SELECT {columns} FROM batch "
                    f"ON CONFLICT (customer_number) DO UPDATE SET "
                    + ", ".join(f"{c} = EXCLUDED.{c}" for c in others)
                    + f" WHERE ({', '.join(f'{name}.{c}' for c in others)}) IS DISTINCT FROM "
                    f"({', '.join(f'EXCLUDED.{c}' for c in others)})"
                )
            target.execute(f"SELECT count(*) FROM {name}")
            count = target.fetchone()[0]
        writer.driver_connection.commit()
    finally:
        reader.close()
        writer.close()
    return count


def _raw_executemany(source, destination, table, keyed: bool) -> int:
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql, sqlite

    statement = sa.insert(table)
    if keyed and destination.dialect.name == "sqlite":
        insert = sqlite.insert(table)
        statement = insert.on_conflict_do_update(
            index_elements=["customer_number"],
            set_={c: insert.excluded[c] for c in COLUMNS if c != "customer_number"},
        )
    elif keyed:
        insert = mysql.insert(table)
        statement = insert.on_duplicate_key_update(
            {c: insert.inserted[c] for c in COLUMNS if c != "customer_number"}
        )
    customers = sa.Table("customers", sa.MetaData(), autoload_with=source)
    count = 0
    with source.connect() as reading:
        result = reading.execution_options(stream_results=True, yield_per=50_000).execute(
            sa.select(*(customers.c[name] for name in COLUMNS))
        )
        for rows in result.partitions(50_000):
            with destination.begin() as writing:
                writing.execute(statement, [dict(zip(COLUMNS, row, strict=True)) for row in rows])
            count += len(rows)
    return count


def step_dlt(env: dict[str, str]) -> dict[str, object]:
    import dlt
    from dlt.sources.sql_database import sql_table

    from integrations.sql.connect import normalise_url

    source = normalise_url(env["ERP_DATABASE_URL"])
    pipeline = dlt.pipeline(
        pipeline_name="bench_customers",
        pipelines_dir=env["BENCH_DLT_DIR"],
        # dlt insists on a password; the bench server trusts local connections, so any will do.
        destination=dlt.destinations.postgres(
            credentials=env["BENCH_DESTINATION_URL"].replace("postgres@", "postgres:trust@")
        ),
        dataset_name="dlt_customers",
    )
    resource = sql_table(
        credentials=source,
        table="customers",
        included_columns=COLUMNS,
        backend="pyarrow",
        chunk_size=50_000,
    )
    resource.apply_hints(primary_key="customer_number", write_disposition="merge")
    started = time.perf_counter()
    info = pipeline.run(resource)
    seconds = time.perf_counter() - started
    info.raise_on_failed_jobs()
    rows = pipeline.last_trace.last_normalize_info.row_counts.get("customers", 0)
    return {"seconds": seconds, "rows": rows, "written": rows}


STEPS = {
    "seed": step_seed,
    "change": change_one_percent,
    "sync": step_sync,
    "raw_load": lambda env: step_raw(env, keyed=False),
    "raw_upsert": lambda env: step_raw(env, keyed=True),
    "dlt": step_dlt,
}


def run_step(name: str, env: dict[str, str]) -> dict[str, object]:
    return bench_step("bench.sql_sync", name, env)


# --- databases --------------------------------------------------------------------------------


class Databases:
    """Throwaway source, destination and state databases of one dialect, dropped afterwards."""

    def __init__(self, db: str, home: Path):
        self.db, self.home, self.names = db, home, []

    def __enter__(self) -> dict[str, str]:
        if self.db == "sqlite":
            urls = [f"sqlite:///{self.home / f'{n}.sqlite'}" for n in ("erp", "dest", "state")]
        else:
            self.names = [f"handoff_bench_{uuid.uuid4().hex[:8]}" for _ in range(3)]
            for name in self.names:
                self._admin(f"CREATE DATABASE {self._quoted(name)}")
            urls = [self._url(name) for name in self.names]
        if self.db == "mariadb":  # the state store runs on SQLite or PostgreSQL
            urls[2] = f"sqlite:///{self.home / 'state.sqlite'}"
        return dict(
            zip(
                ["ERP_DATABASE_URL", "BENCH_DESTINATION_URL", "HANDOFF_STATE_URL"],
                urls,
                strict=True,
            )
        )

    def __exit__(self, *_exc) -> None:
        for name in self.names:
            self._admin(
                f"DROP DATABASE IF EXISTS {self._quoted(name)}"
                + (" WITH (FORCE)" if self.db == "postgres" else "")
            )

    def _quoted(self, name: str) -> str:
        return f"`{name}`" if self.db == "mariadb" else f'"{name}"'

    def _url(self, name: str) -> str:
        if self.db == "postgres":
            return f"postgresql://postgres@127.0.0.1:5432/{name}"
        return f"mariadb://root@127.0.0.1:3306/{name}"

    def _admin(self, sql: str) -> None:
        if self.db == "postgres":
            import psycopg

            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
                connection.execute(sql)
        else:
            import pymysql

            connection = pymysql.connect(**MARIADB_ADMIN, autocommit=True)
            with connection.cursor() as cursor:
                cursor.execute(sql)
            connection.close()


def dlt_installed() -> bool:
    try:
        import dlt  # noqa: F401
    except ImportError:
        return False
    return True


def bench(db: str, rows: int) -> list[tuple]:
    from cryptography.fernet import Fernet

    home = Path(tempfile.mkdtemp(prefix="handoff-bench-sql-"))
    with Databases(db, home) as urls:
        env = {
            **os.environ,
            **urls,
            "HANDOFF_HOME": str(home),
            "HANDOFF_DLQ_KEY": Fernet.generate_key().decode(),
            "BENCH_ROWS": str(rows),
            "BENCH_DLT_DIR": str(home / "dlt"),
        }
        run_step("seed", env)
        with_dlt = db == "postgres" and dlt_installed()
        plan = [
            ("raw load into an empty table", ["raw_load"]),
            ("raw upsert into a keyed table", ["raw_upsert"]),
            *([("dlt merge, first load", ["dlt"])] if with_dlt else []),
            ("handoff full sync", ["sync"]),
            ("handoff incremental (1% changed)", ["change", "sync"]),
            ("handoff rerun (nothing changed)", ["sync"]),
            *([("dlt merge, reload (1% changed)", ["dlt"])] if with_dlt else []),
        ]
        table = []
        for label, steps in plan:
            figures = [run_step(step, env) for step in steps][-1]
            rate = figures["rows"] / figures["seconds"] if figures["seconds"] else 0.0
            if figures.get("timings"):
                print(f"{db} {rows:,} {label}: {stage_line(figures)}", file=sys.stderr)
            rss = figures["peak_rss_mb"] if label.startswith("handoff") else None
            # SQLite runs inside the step's process: no server to measure.
            cpu = (figures["client_cpu"], None if db == "sqlite" else figures["server_cpu"])
            table.append((db, rows, label, figures["seconds"], rate, figures["written"], rss, *cpu))
            print(f"{table[-1]}", file=sys.stderr)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["postgres", "sqlite", "mariadb"])
    parser.add_argument("--rows", type=int)
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        figures = STEPS[args.step](dict(os.environ))
        figures["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(figures))
        return

    cases = [
        ("postgres", 100_000),
        ("postgres", 1_000_000),
        ("sqlite", 100_000),
        ("mariadb", 100_000),
    ]
    if args.db or args.rows:
        cases = [(args.db or "postgres", args.rows or 100_000)]
    calibration = calibration_seconds()
    table = [row for db, rows in cases for row in bench(db, rows)]
    calibration = (calibration + calibration_seconds()) / 2

    print(f"\ncalibration (a fixed Python loop, before and after): {calibration:.2f} s")
    print(
        f"{'db':<10}{'rows':>10}  {'step':<36}{'seconds':>9}{'rows/s':>10}{'written':>10}"
        f"{'peak RSS MB':>13}{'client CPU s':>14}{'server CPU s':>14}"
    )
    for db, rows, label, seconds, rate, written, rss, client, server in table:
        memory = f"{rss:>13.0f}" if rss is not None else f"{'':>13}"
        used = f"{client:>14.2f}" + (f"{server:>14.2f}" if server is not None else f"{'':>14}")
        print(
            f"{db:<10}{rows:>10,}  {label:<36}{seconds:>9.2f}{rate:>10.0f}{written:>10}{memory}{used}"
        )


if __name__ == "__main__":
    main()
