"""Unique values ignoring case (a company's domain, a person's email and phone): who holds one,
as records move, clear, repeat and let go of it, across batches and within one. Real SQLite ERP
and state, the CRM sandbox, and a SQLite table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandera.pandas as pa
import sqlalchemy as sa
from pandera.typing import Series

from assets.crm_companies import CRM_COMPANIES
from integrations.contracts import Contract
from integrations.crm.destination import CrmObjects
from integrations.engine.reconcile import reconcile
from integrations.engine.spec import FlowSpec, SourceTable, Target
from integrations.engine.state import StateStore
from integrations.engine.sync import Sync, SyncResult
from integrations.sql.connect import create_engine
from integrations.sql.destination import SqlTable
from integrations.sql.source import SqlSource


def sync(erp, crm_client, state, run: str) -> SyncResult:
    destination = CrmObjects(crm_client, "companies", "erp_organisation_id")
    source = SqlSource(erp, CRM_COMPANIES.source)
    return Sync(
        CRM_COMPANIES, source, destination, state, run_id=run, actor="test", why="test"
    ).run()


def set_domains(erp, domains: dict[int, str | None]) -> None:
    with erp.begin() as connection:
        for organisation, domain in domains.items():
            connection.execute(
                sa.text(
                    "UPDATE organisations SET domain = :domain, updated_at = :now "
                    "WHERE organisation_id = :id"
                ),
                {
                    "domain": domain,
                    "id": organisation,
                    "now": datetime.now(UTC).replace(tzinfo=None),
                },
            )


def two_synced(erp) -> list[int]:
    with erp.connect() as connection:
        return list(
            connection.execute(
                sa.text(
                    "SELECT organisation_id FROM organisations WHERE country IS NOT NULL "
                    "AND deleted_at IS NULL ORDER BY organisation_id LIMIT 2"
                )
            ).scalars()
        )


def domains_in_crm(crm_client) -> dict[str, str | None]:
    companies = crm_client.list_objects("companies", ["erp_organisation_id", "domain"])
    return {
        c["properties"]["erp_organisation_id"]: c["properties"].get("domain") for c in companies
    }


def clashes(state) -> list[str]:
    return [d.reason for d in state.list_dead_letters(limit=10_000) if "already used" in d.reason]


def test_a_value_moved_on_within_one_batch_is_free_for_another(world, erp, crm_client, state):
    sync(erp, crm_client, state, "run-1")
    x, y = two_synced(erp)
    set_domains(erp, {x: "moved-on.example.com", y: "first-home.example.com"})
    sync(erp, crm_client, state, "run-2")
    set_domains(erp, {x: "next-home.example.com", y: "moved-on.example.com"})  # one batch
    result = sync(erp, crm_client, state, "run-3")
    assert result.written == 2 and not clashes(state)


def test_a_cleared_value_is_let_go(world, erp, crm_client, state):
    sync(erp, crm_client, state, "run-1")
    x, y = two_synced(erp)
    set_domains(erp, {x: "kept-once.example.com"})
    sync(erp, crm_client, state, "run-2")
    set_domains(erp, {x: None})
    sync(erp, crm_client, state, "run-3")
    set_domains(erp, {y: "kept-once.example.com"})
    result = sync(erp, crm_client, state, "run-4")
    assert result.written == 1 and not clashes(state)


def test_one_value_twice_in_a_batch_goes_to_the_first_and_the_flow_goes_on(
    world, erp, crm_client, state
):
    """The ERP does not keep domains unique: two organisations with one domain in one batch.
    The first keeps it, the second is dead-lettered, and the commit lands."""
    sync(erp, crm_client, state, "run-1")
    x, y = two_synced(erp)
    set_domains(erp, {x: "shared.example.com", y: "shared.example.com"})
    result = sync(erp, crm_client, state, "run-2")
    assert result.written == 1
    assert len(clashes(state)) == 1
    holders = [
        key for key, domain in domains_in_crm(crm_client).items() if domain == "shared.example.com"
    ]
    assert len(holders) == 1
    assert sync(erp, crm_client, state, "run-3").written == 0


# --- the same rules into a SQL table, on values of two fields -----------------------------------


class PersonV1(pa.DataFrameModel):
    id: Series[int]
    email: Series[str] = pa.Field(nullable=True)
    phone: Series[str] = pa.Field(nullable=True)


PEOPLE = FlowSpec(
    name="test_people",
    source=SourceTable(table="people", key="id"),
    source_contract=Contract("test.person", 1, PersonV1),
    target=Target(
        system="books",
        dataset="people_out",
        id_property="id",
        unique_ignoring_case=("email", "phone"),
    ),
    target_contract=Contract("test.person", 1, PersonV1),
    mapping=lambda rows: rows[["id", "email", "phone"]],
)
START = datetime(2025, 1, 1)


def people(tmp_path, rows: list[tuple[int, str, str]]) -> sa.Table:
    engine = create_engine(f"sqlite:///{tmp_path / 'people.sqlite'}")
    table = sa.Table(
        "people",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(100)),
        sa.Column("phone", sa.String(100)),
        sa.Column("updated_at", sa.DateTime),
        sa.Column("deleted_at", sa.DateTime, nullable=True),
    )
    table.create(engine)
    add_people(table, engine, rows)
    return table, engine


def add_people(table, engine, rows, at: datetime = START) -> None:
    with engine.begin() as connection:
        connection.execute(
            table.insert(),
            [
                {"id": n, "email": email, "phone": phone, "updated_at": at + timedelta(minutes=n)}
                for n, email, phone in rows
            ],
        )


def sync_people(engine, store: StateStore) -> SyncResult:
    writer = SqlTable(engine, PEOPLE.target, create_missing=True)
    return Sync(
        PEOPLE, SqlSource(engine, PEOPLE.source), writer, store, run_id="r", actor="t", why="t"
    ).run()


def test_a_value_an_archived_record_let_go_goes_to_one_record(tmp_path, own_state):
    """Record 1 is archived in the batch where 2 and 3 both take its email: both took it, the
    commit failed on the claims' key, and so did every rerun."""
    table, engine = people(tmp_path, [(1, "x@example.com", None)])
    assert sync_people(engine, own_state).written == 1
    later = START + timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            table.update().where(table.c.id == 1).values(deleted_at=later, updated_at=later)
        )
    add_people(table, engine, [(2, "X@example.com", None), (3, "x@EXAMPLE.com", None)], at=later)
    result = sync_people(engine, own_state)
    assert (result.counts["inserted"], result.counts["archived"], result.counts["rejected"]) == (
        1,
        1,
        1,
    )
    (letter,) = own_state.list_dead_letters(flow=PEOPLE.name)
    assert letter.record_key == "3" and "email is already used by record 2" in letter.reason
    assert sync_people(engine, own_state).written == 0
    engine.dispose()


def test_a_record_clashing_on_two_values_is_one_rejected_record(tmp_path, own_state):
    """Its email and its phone are both record 1's: one letter with both reasons, counted once
    (it was two letters, counted twice against the error budget); and the phone it was refused
    with is no claim of its own, so record 4 takes record 3's number."""
    rows = [(n, f"p{n}@example.com", f"+100{n}") for n in range(1, 4)]
    rows += [(4, "P1@example.com", "+1001"), (5, "p5@example.com", "+1004")]
    _, engine = people(tmp_path, rows)
    result = sync_people(engine, own_state)
    assert (result.written, result.counts["rejected"]) == (4, 1)
    (letter,) = own_state.list_dead_letters(flow=PEOPLE.name)
    assert letter.record_key == "4"
    assert "email is already used by record 1" in letter.reason
    assert "phone is already used by record 1" in letter.reason
    engine.dispose()


def test_a_value_passed_on_in_one_batch_is_written_in_the_sources_order(tmp_path, own_state):
    """Record 2 lets go of an email that record 1 then takes, in one batch, into a table where
    email is unique: record 2 is written first, as the source ordered them (written in key order,
    record 1 was refused by the table, then held in the DLQ)."""
    table, engine = people(tmp_path, [(1, "a@example.com", None), (2, "b@example.com", None)])
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE people_out (id INTEGER PRIMARY KEY, "
                                   "email VARCHAR(100) UNIQUE, phone VARCHAR(100), archived_at DATETIME)")  # fmt: skip
    assert sync_people(engine, own_state).written == 2
    later = START + timedelta(hours=1)
    with engine.begin() as connection:
        for n, email in ((2, "c@example.com"), (1, "b@example.com")):
            connection.execute(
                table.update()
                .where(table.c.id == n)
                .values(email=email, updated_at=later + timedelta(minutes=3 - n))
            )
    result = sync_people(engine, own_state)
    assert (result.written, result.counts["rejected"]) == (2, 0)
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT id, email FROM people_out ORDER BY id")).all()
    assert stored == [(1, "b@example.com"), (2, "c@example.com")]
    engine.dispose()


def test_blank_text_is_no_ones_value(tmp_path, own_state):
    """An ERP keeps "" for "no phone": within a batch the second such record was refused as
    holding a value already used (across batches it passed, as no claim was kept for it)."""
    rows = [(n, f"p{n}@example.com", phone) for n, phone in ((1, ""), (2, ""), (3, " "), (4, " "))]
    _, engine = people(tmp_path, rows)
    result = sync_people(engine, own_state)
    assert (result.written, result.counts["rejected"]) == (4, 0)
    engine.dispose()


def test_a_holder_whose_move_is_refused_keeps_its_value(tmp_path, own_state):
    """Record 2 holds b@ and, in one batch, moves to record 1's a@ (refused), while record 3
    takes b@: record 3 had it, as record 2 was moving away, and two records held b@ (the
    claims table lost record 2's). Record 2 keeps b@; record 3 is refused."""
    table, engine = people(tmp_path, [(1, "a@example.com", None), (2, "b@example.com", None)])
    assert sync_people(engine, own_state).written == 2
    later = START + timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            table.update().where(table.c.id == 2).values(email="A@example.com", updated_at=later)
        )
    add_people(table, engine, [(3, "b@example.com", None)], at=later)
    result = sync_people(engine, own_state)
    assert (result.written, result.counts["rejected"]) == (0, 2)
    reasons = {d.record_key: d.reason for d in own_state.list_dead_letters(flow=PEOPLE.name)}
    assert "email is already used by record 1" in reasons["2"]
    assert "email is already used by record 2" in reasons["3"]
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT id, email FROM people_out ORDER BY id")).all()
    assert stored == [(1, "a@example.com"), (2, "b@example.com")]
    engine.dispose()


def test_a_holder_whose_move_lands_after_all_lets_go_of_its_value(tmp_path, own_state):
    """X moves off u and takes +1555, first refused for it (Y took it), then accepted once Y is
    refused (Y took Z's z1, and Z's own move is refused): X still counted as holding u, and W,
    taking u, was refused."""
    table, engine = people(
        tmp_path, [(1, "z2@x.com", None), (2, "z1@x.com", None), (3, "u@x.com", None)]
    )
    assert sync_people(engine, own_state).written == 3
    at = datetime(2025, 2, 1)
    with engine.begin() as connection:
        connection.execute(
            table.insert(), [{"id": 4, "email": "z1@x.com", "phone": "+1555", "updated_at": at}]
        )
        connection.execute(
            table.update()
            .where(table.c.id == 3)
            .values(email="x2@x.com", phone="+1555", updated_at=at + timedelta(seconds=1))
        )
        connection.execute(
            table.insert(),
            [{"id": 5, "email": "u@x.com", "phone": None, "updated_at": at + timedelta(seconds=2)}],
        )
        connection.execute(
            table.update()
            .where(table.c.id == 2)
            .values(email="z2@x.com", updated_at=at + timedelta(seconds=3))
        )
    sync_people(engine, own_state)
    refused = sorted(d.record_key for d in own_state.list_dead_letters(flow=PEOPLE.name))
    assert refused == ["2", "4"]
    with engine.connect() as connection:
        stored = dict(connection.execute(sa.text("SELECT id, email FROM people_out")).all())
    assert stored == {1: "z2@x.com", 2: "z1@x.com", 3: "x2@x.com", 5: "u@x.com"}
    engine.dispose()


def test_a_record_a_repair_archives_lets_go_of_its_values(tmp_path, own_state):
    """A person deleted outright, archived by a repair: the claim on their email stayed, and a
    new person with that email was refused on every run."""
    table, engine = people(tmp_path, [(1, "x@example.com", None), (2, "y@example.com", None)])
    sync_people(engine, own_state)
    with engine.begin() as connection:
        connection.execute(table.delete().where(table.c.id == 1))
    writer = SqlTable(engine, PEOPLE.target)
    sync = Sync(
        PEOPLE,
        SqlSource(engine, PEOPLE.source),
        writer,
        own_state,
        run_id="fix",
        actor="t",
        why="t",
    )
    drift = reconcile(PEOPLE, sync.source, writer, own_state)
    assert sync.archive_extras(drift.extra_ids) == 1
    add_people(table, engine, [(3, "X@example.com", None)], at=START + timedelta(hours=1))
    result = sync_people(engine, own_state)
    assert (result.counts["inserted"], result.counts["rejected"]) == (1, 0)
    engine.dispose()


def test_refusals_for_values_other_records_hold_count_as_one_reason(tmp_path, own_state):
    """Each refusal named its holder ("email is already used by record 3884"), so the run's
    counted reasons (the materialization's top five, the check's top ten, an error budget
    trip's) held one reason per holder, and undercounted the rule by far."""
    rows = [(n, f"p{n}@example.com", f"+100{n}") for n in range(1, 4)]
    rows += [(n + 10, f"P{n}@example.com", f"+200{n}") for n in range(1, 4)]
    _, engine = people(tmp_path, rows)
    result = sync_people(engine, own_state)
    assert result.counts["rejected"] == 3
    assert dict(result.reasons) == {
        "test.person@v1: email is already used by another record (ignoring case)": 3
    }
    letters = own_state.list_dead_letters(flow=PEOPLE.name)
    assert {letter.reason[-40:] for letter in letters} == {
        f"email is already used by record {n} (ignoring case)"[-40:] for n in range(1, 4)
    }, "each letter still names its holder"
    engine.dispose()


class PersonByEmailV1(pa.DataFrameModel):
    email: Series[str] = pa.Field(metadata={"pii": True})
    phone: Series[str] = pa.Field(nullable=True)


def test_a_holder_keyed_by_a_personal_field_is_named_masked(tmp_path, own_state):
    """A flow keyed by an email: a record refused for a phone another holds named that other
    record's key, the email, in clear in its letter's reason and the run's log."""
    _, engine = people(tmp_path, [(1, "ada@example.com", "+1001"), (2, "bob@example.com", "+1001")])
    by_email = FlowSpec(
        name="test_people_by_email",
        source=SourceTable(table="people", key="email"),
        source_contract=Contract("test.person_by_email", 1, PersonByEmailV1),
        target=Target("books", "people_by_email", "email", unique_ignoring_case=("phone",)),
        target_contract=Contract("test.person_by_email", 1, PersonByEmailV1),
        mapping=lambda rows: rows[["email", "phone"]],
    )
    writer = SqlTable(engine, by_email.target, create_missing=True)
    result = Sync(
        by_email,
        SqlSource(engine, by_email.source),
        writer,
        own_state,
        run_id="r",
        actor="t",
        why="t",
    ).run()
    assert result.counts["rejected"] == 1
    (letter,) = own_state.list_dead_letters(flow=by_email.name)
    assert "phone is already used by record" in letter.reason
    assert "ada@example.com" not in letter.reason
    engine.dispose()
