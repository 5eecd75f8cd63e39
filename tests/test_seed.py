"""`handoff seed`: deterministic, realistic, messy in the ways contracts must catch."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa

from integrations.cli import main
from integrations.erp import schema
from integrations.erp.seed import seed_erp
from integrations.sql.connect import create_engine


def rows(url: str, query: str) -> list[tuple]:
    engine = create_engine(url)
    with engine.connect() as connection:
        result = [tuple(row) for row in connection.execute(sa.text(query))]
    engine.dispose()
    return result


def test_the_same_seed_gives_the_same_data(tmp_path):
    a, b, c = (f"sqlite:///{tmp_path / name}.sqlite" for name in "abc")
    seed_erp(a, rows=500, seed=1)
    seed_erp(b, rows=500, seed=1)
    seed_erp(c, rows=500, seed=2)
    query = "SELECT * FROM customers ORDER BY customer_id"
    assert rows(a, query) == rows(b, query) != rows(c, query)
    invoices = "SELECT * FROM invoices ORDER BY invoice_id"
    assert rows(a, invoices) == rows(b, invoices)


def test_customers_are_messy_in_realistic_proportions(tmp_path):
    url = f"sqlite:///{tmp_path / 'erp.sqlite'}"
    seed_erp(url, rows=20_000, seed=3)
    customers = rows(url, "SELECT email, country, deleted_at FROM customers")
    n = len(customers)
    malformed = sum(
        not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s.]+", email) for email, _, _ in customers
    )
    no_country = sum(country is None for _, country, _ in customers)
    lowered = [email.lower() for email, _, _ in customers]
    case_duplicates = n - len(set(lowered))
    deleted = sum(deleted_at is not None for _, _, deleted_at in customers)
    assert 0.01 * n < malformed < 0.04 * n
    assert 0.01 * n < no_country < 0.04 * n
    assert 0.005 * n < case_duplicates < 0.02 * n
    assert len({email for email, _, _ in customers}) == n, "duplicates differ only in case"
    assert 0.005 * n < deleted < 0.02 * n


def test_every_table_has_updated_at_and_deleted_at():
    for table in schema.TABLES_IN_LOAD_ORDER:
        assert {"updated_at", "deleted_at"} <= set(table.c.keys()), table.name


def test_the_cli_seeds_under_handoff_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))
    monkeypatch.delenv("ERP_DATABASE_URL", raising=False)
    assert main(["seed", "--rows", "300", "--seed", "5"]) == 0
    assert "300 customers" in capsys.readouterr().out
    assert rows(f"sqlite:///{tmp_path / 'erp.sqlite'}", "SELECT count(*) FROM customers") == [
        (300,)
    ]


@pytest.mark.parametrize("count", ["0", "-3"])
def test_a_row_count_below_one_is_refused_in_one_line(tmp_path, monkeypatch, capsys, count):
    """`handoff seed --rows 0` ended in seed_erp's traceback."""
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))
    monkeypatch.delenv("ERP_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as refused:
        main(["seed", "--rows", count])
    assert refused.value.code == 2
    assert f"--rows: {count} is not a whole number, 1 or more" in capsys.readouterr().err


def test_seeding_postgresql_uses_the_same_data(postgres_database, tmp_path):
    url = postgres_database()
    seed_erp(url, rows=400, seed=9)
    sqlite = f"sqlite:///{tmp_path / 'erp.sqlite'}"
    seed_erp(sqlite, rows=400, seed=9)
    query = "SELECT customer_number, email, country FROM customers ORDER BY customer_id"
    assert rows(url, query) == rows(sqlite, query)


def test_simulate_changes_a_few_customers_per_round(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))
    monkeypatch.delenv("ERP_DATABASE_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'erp.sqlite'}"
    seed_erp(url, rows=200, seed=1)
    newest = "SELECT count(*) FROM customers WHERE updated_at > '2026-07-01'"
    assert rows(url, newest) == [(0,)]
    assert main(["simulate", "--rounds", "2", "--every", "0", "--changes", "3"]) == 0
    assert "round 2" in capsys.readouterr().out
    assert rows(url, newest) == [(6,)]
