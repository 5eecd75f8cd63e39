"""helpdesk/users against a real RT5: first sync, a rerun that RT does not notice, exactly the
changed customers, soft deletes as disabled users, and an RT outage mid-sync."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from datetime import UTC, datetime

import dagster as dg
import pandas as pd
import sqlalchemy as sa

from assets.factory import flow_asset
from assets.helpdesk_users import HELPDESK_USERS
from definitions import resources
from integrations.cli import main
from integrations.engine.spec import ErrorBudget
from integrations.engine.state import utcnow
from integrations.erp.changes import move_customers, soft_delete_customers
from integrations.erp.schema import customers
from integrations.helpdesk.client import RtClient
from integrations.helpdesk.destination import RtUsers
from integrations.helpdesk.local_rt import RT_LIB
from integrations.helpdesk.support_tier import TIER_FIELD, TIER_WINDOW, TIERS, support_tier
from integrations.sql.connect import create_engine
from resources.helpdesk import HelpdeskResource
from tests.dagster_runs import failed_once
from tests.expectations import assert_one_per_valid_customer
from tests.rt_gateway import RtGateway

TIER = f"CF.{{{TIER_FIELD}}}"


def materialize(instance: dg.DagsterInstance) -> dict[str, object]:
    result = dg.materialize([flow_asset(HELPDESK_USERS)], resources=resources(), instance=instance)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


def rt_users(client: RtClient) -> dict[str, dict[str, object]]:
    """Users handoff manages (they carry a tier), enabled or not, by name."""
    destination = RtUsers(client)
    names = [name for name, _, _ in destination.snapshot([TIER])]
    disabled = [f"C{n:07d}" for n in range(1, 200)]
    every = client.users_by_name(sorted(set(names) | set(disabled)), ["EmailAddress", "City"])
    return {name: user for name, user in every.items() if name.startswith("C")}


def histories(client: RtClient, names) -> dict[str, int]:
    return {name: len(client.user_history(name)) for name in names}


def expected_tiers(erp_url: str) -> dict[str, str]:
    """customer_number → tier, from the ERP's paid invoices, computed apart from the engine."""
    today = datetime.now(UTC).date()
    since = (datetime.now(UTC) - TIER_WINDOW).date()
    engine = create_engine(erp_url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT c.customer_number, i.amount, i.invoice_date FROM customers c "
                "JOIN invoices i ON i.customer_id = c.customer_id "
                "WHERE i.status = 'paid' AND i.currency = 'EUR' AND i.deleted_at IS NULL"
            )
        ).all()
        numbers = connection.execute(sa.text("SELECT customer_number FROM customers")).scalars()
        paid = dict.fromkeys(numbers, 0.0)
    engine.dispose()
    for number, amount, day in rows:
        if since <= pd.Timestamp(day).date() <= today:
            paid[number] += float(amount)
    series = pd.Series(paid)
    return support_tier(series).to_dict()


def test_users_sync_once_then_only_the_changed_ones(helpdesk_world, rt_client):
    erp = create_engine(helpdesk_world.erp_url)
    with dg.instance_for_test() as instance:
        first = materialize(instance)
        users = rt_users(rt_client)
        assert first["inserted"] == len(users) > 100
        assert_one_per_valid_customer(helpdesk_world.erp_url, list(users))
        tiers = {name: flat[TIER] for name, _, flat in RtUsers(rt_client).snapshot([TIER])}
        expected = expected_tiers(helpdesk_world.erp_url)
        assert tiers == {name: expected[name] for name in tiers}
        assert len(set(tiers.values())) > 1, "the seed should give more than one tier"
        assert set(tiers.values()) <= set(TIERS)

        before = histories(rt_client, users)
        second = materialize(instance)
        assert second["written"] == 0 and second["all_unchanged"] is True
        assert histories(rt_client, users) == before, "the rerun made transactions in RT"

        numbers = sorted(users)[:13]
        moved, deleted = numbers[:10], numbers[10:13]
        move_customers(erp, [int(n[1:]) for n in moved], seed=3)
        soft_delete_customers(erp, [int(n[1:]) for n in deleted])
        third = materialize(instance)
        assert (third["inserted"], third["updated"], third["archived"]) == (0, 10, 3)
        after = histories(rt_client, users)
        changed = sorted(name for name in users if after[name] != before[name])
        assert changed == sorted(moved + deleted)
        now = rt_users(rt_client)
        assert {now[name]["Disabled"] for name in deleted} == {"1"}, "disabled, not deleted"
        assert {now[name]["Disabled"] for name in moved} == {"0"}
    erp.dispose()


def stop_rt_after_the_first_batch(world, flow: str) -> None:
    """RT goes down once the run committed its first batch (the next one takes seconds)."""
    state = world.state()
    deadline = time.monotonic() + 120
    while state.count_synced(flow) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    world.rt.stop(graceful=False)
    state.dispose()


def test_an_rt_outage_mid_run_fails_naming_rt_and_the_next_run_loses_nothing(helpdesk_world):
    rt = helpdesk_world.rt
    spec = dataclasses.replace(HELPDESK_USERS, batch_size=40, run_retries=0)
    quick = HelpdeskResource(
        base_url=rt.base_url,
        user=rt.user,
        password=rt.password,
        max_retries=4,
        backoff_seconds=0.01,
        circuit_failures=3,
        circuit_open_seconds=0.2,
    )
    wired = {**resources(), "helpdesk": quick}
    threading.Thread(
        target=stop_rt_after_the_first_batch, args=(helpdesk_world, spec.name), daemon=True
    ).start()
    with dg.instance_for_test() as instance:
        failed = dg.materialize(
            [flow_asset(spec)], resources=wired, instance=instance, raise_on_error=False
        )
        assert not failed.success
        (failure,) = failed.get_step_failure_events()
        data = failure.step_failure_data.user_failure_data
        assert "RT users is unavailable: RT circuit open after 3 consecutive" in data.description
        assert data.metadata["circuit"].value == "open"
        assert rt.password not in data.description
        state = helpdesk_world.state()
        assert 0 < state.count_synced(spec.name) < 100, "committed batches stay committed"

        rt.start()
        time.sleep(0.3)  # the circuit lets a probe through again
        client = RtClient(rt.base_url, user=rt.user, password=rt.password)
        already = sorted(rt_users(client))
        before = histories(client, already)
        again = dg.materialize([flow_asset(spec)], resources=wired, instance=instance)
        assert again.success
        assert_one_per_valid_customer(helpdesk_world.erp_url, list(rt_users(client)))
        assert histories(client, already) == before, "the rerun rewrote what RT already held"
        assert state.count_synced(spec.name) == len(rt_users(client))
        state.dispose()


def test_a_user_created_whose_answer_was_lost_is_not_dead_lettered(
    helpdesk_world, rt_client, monkeypatch
):
    lost = []

    def gateway_times_out_on_the_first_create(method: str, path: str) -> int | None:
        if (method, path) == ("POST", "/REST/2.0/user") and not lost:
            lost.append(path)
            return 504  # RT goes on and creates the user; the client is told the gateway gave up
        return None

    gateway = RtGateway(helpdesk_world.rt.base_url, gateway_times_out_on_the_first_create)
    monkeypatch.setenv("RT_BASE_URL", gateway.url)
    try:
        with dg.instance_for_test() as instance:
            counts = materialize(instance)
    finally:
        gateway.close()
    assert lost, "a create's answer was lost"
    refused = counts["dead_letters_open_by_kind"].get("destination-rejected", 0)
    assert refused == 0, "RT holds that user: its resent create's 'Name in use' is no refusal"
    users = rt_users(rt_client)
    assert counts["inserted"] == len(users)
    assert_one_per_valid_customer(helpdesk_world.erp_url, list(users))


def refused_by_rt(world) -> list:
    state = world.state()
    try:
        letters = state.list_dead_letters(flow=HELPDESK_USERS.name, limit=100_000)
    finally:
        state.dispose()
    return [letter for letter in letters if letter.reason_kind == "destination-rejected"]


def edit_customer(erp_url: str, number: str, **values) -> None:
    engine = create_engine(erp_url)
    with engine.begin() as connection:
        connection.execute(
            sa.update(customers)
            .where(customers.c.customer_number == number)
            .values(**values, updated_at=utcnow())
        )
    engine.dispose()


def test_a_field_rt_refuses_in_an_update_is_dead_lettered_with_rts_own_words(
    helpdesk_world, rt_client
):
    with dg.instance_for_test() as instance:
        materialize(instance)
        number = sorted(rt_users(rt_client))[0]
        before = rt_client.users_by_name([number], ["RealName"])[number]["RealName"]
        # RT made a user for mail from an address nobody knew; the customer now uses it.
        rt_client.create_user(
            {"Name": "walk.in@example.org", "EmailAddress": "walk.in@example.org"}
        )
        edit_customer(
            helpdesk_world.erp_url, number, email="walk.in@example.org", first_name="Renamed"
        )
        materialize(instance)
    (letter,) = refused_by_rt(helpdesk_world)
    assert letter.payload["customer_number"] == number
    assert "RT did not store EmailAddress" in letter.reason
    assert "Email address in use" in letter.reason, "RT's own word for the refused field"
    assert "What to do:" in letter.reason
    assert "walk.in@example.org" not in letter.reason
    assert before not in letter.reason, "RT's word on a field it stored names its old value"
    assert rt_client.users_by_name([number], ["RealName"])[number]["RealName"].startswith("Renamed")


def test_a_value_longer_than_rt_keeps_is_refused_naming_the_field_and_its_limit(
    helpdesk_world, rt_client, capsys
):
    """RT keeps WorkPhone in 30 bytes and RealName in 120 and cuts a longer value without a word:
    the letter said only "RT did not store WorkPhone", which no replay could clear. The limit is
    in bytes: 86 letters of accented name are 172."""
    with dg.instance_for_test() as instance:
        materialize(instance)
        number = sorted(rt_users(rt_client))[0]
        before = rt_client.users_by_name([number], ["RealName", "WorkPhone"])[number]
        edit_customer(
            helpdesk_world.erp_url,
            number,
            first_name="Ñ" * 45,
            last_name="é" * 40,
            phone="+49 30 1234567-890 ext. 4711 (HQ)",  # 33 characters: the ERP keeps 40
        )
        counts = materialize(instance)
    assert "destination-rejected" not in counts["dead_letters_open_by_kind"]
    state = helpdesk_world.state()
    try:
        letters = state.list_dead_letters(flow=HELPDESK_USERS.name, limit=100)
    finally:
        state.dispose()
    (letter,) = [x for x in letters if x.payload["customer_number"] == number]
    assert letter.reason_kind == "contract"
    assert "WorkPhone is longer than the 30 bytes of UTF-8 RT keeps" in letter.reason
    assert "RealName is longer than the 120 bytes of UTF-8 RT keeps" in letter.reason
    assert "shorten it in the ERP, then replay the letter" in letter.reason
    assert "é" not in letter.reason and "4711" not in letter.reason, "no personal value"
    held = rt_client.users_by_name([number], ["RealName", "WorkPhone"])[number]
    assert held == before, "RT holds the user as it was, not cut"

    # 19 × 2 + 1 + 40 × 2 = 119 bytes: RT keeps it whole.
    edit_customer(helpdesk_world.erp_url, number, first_name="Ñ" * 19, phone="+49 30 1234567")
    assert main(["dlq", "replay", "--id", str(letter.id)]) == 0
    assert "1 left the DLQ" in capsys.readouterr().out
    held = rt_client.users_by_name([number], ["RealName", "WorkPhone"])[number]
    assert (held["RealName"], held["WorkPhone"]) == ("Ñ" * 19 + " " + "é" * 40, "+49 30 1234567")


def test_a_user_whose_name_rt_holds_in_another_case_is_that_user(helpdesk_world, rt_client):
    engine = create_engine(helpdesk_world.erp_url)
    with engine.connect() as connection:
        number = connection.execute(
            sa.select(customers.c.customer_number)
            .where(customers.c.deleted_at.is_(None))
            .order_by(customers.c.customer_id)
        ).scalar()
    engine.dispose()
    # An agent made the customer's user by hand before handoff did: RT names compare without
    # case, so RT holds the customer's user (it refuses a second one "Name in use").
    rt_client.create_user({"Name": number.lower(), "EmailAddress": "typed.by.hand@example.org"})
    with dg.instance_for_test() as instance:
        first = materialize(instance)
        again = materialize(instance)
    assert refused_by_rt(helpdesk_world) == [], "RT holds that user: no refusal"
    held = rt_client.users_by_name([number], ["EmailAddress", "CustomFields"])[number]
    assert held["Name"] == number.lower() and held["EmailAddress"] != "typed.by.hand@example.org"
    assert held["CustomFields"][0]["values"], "the tier reached the user RT holds"
    assert first["updated"] >= 1 and again["written"] == 0


def test_the_snapshot_serves_every_user_though_one_is_disabled_while_it_pages(
    helpdesk_world, rt_client
):
    names = [f"C{n:07d}" for n in range(1, 9)]
    for name in names:
        rt_client.create_user({"Name": name, "CustomFields": {TIER_FIELD: "gold"}})
    pages = []

    def an_agent_disables_a_user_of_the_first_page(method: str, path: str) -> None:
        if path.startswith("/REST/2.0/users"):
            pages.append(path)
            if len(pages) == 2:
                rt_client.update_user(names[0], {"Disabled": 1})

    rt = helpdesk_world.rt
    gateway = RtGateway(rt.base_url, an_agent_disables_a_user_of_the_first_page)
    paging = RtClient(gateway.url, user=rt.user, password=rt.password, page_size=3)
    try:
        served = [name for name, _, _ in RtUsers(paging).snapshot([TIER])]
    finally:
        paging.close()
        gateway.close()
    assert len(pages) > 2, "the snapshot read more than one page"
    assert sorted(set(served) - {names[0]}) == names[1:], "a user the pages skipped"
    assert len(served) == len(set(served)), "a user served twice"


def test_a_new_customer_whose_address_an_rt_user_has_is_dead_lettered_with_what_to_do(
    helpdesk_world, rt_client
):
    engine = create_engine(helpdesk_world.erp_url)
    with engine.connect() as connection:
        number, email = connection.execute(
            sa.select(customers.c.customer_number, customers.c.email)
            .where(customers.c.deleted_at.is_(None), customers.c.country.is_not(None))
            .order_by(customers.c.customer_id)
        ).first()
    engine.dispose()
    # The customer mailed the helpdesk before handoff ran: RT made a user named by the address.
    rt_client.create_user({"Name": email.lower(), "EmailAddress": email.lower()})
    with dg.instance_for_test() as instance:
        materialize(instance)
    (letter,) = refused_by_rt(helpdesk_world)
    assert letter.payload["customer_number"] == number
    assert "Email address in use" in letter.reason, "RT's own words"
    assert "What to do:" in letter.reason
    assert email.lower() not in letter.reason.lower()


# An RT whose tier field lacks a value handoff sends (set up by hand, `basic` forgotten).
_WITHOUT_BASIC = r"""
use strict; use warnings; use RT; RT::LoadConfig(); RT::Init();
my $cf = RT::CustomField->new(RT->SystemUser);
$cf->LoadByName(Name => $ENV{TIER_FIELD}, LookupType => RT::User->CustomFieldLookupType);
my $values = $cf->Values;
while (my $value = $values->Next) {
    next unless $value->Name eq 'basic';
    my ($ok, $msg) = $cf->DeleteValue($value->id); die "$msg\n" unless $ok;
}
"""


def test_a_new_users_tier_rt_refuses_is_dead_lettered_with_rts_own_words(helpdesk_world):
    rt = helpdesk_world.rt
    environment = {
        **os.environ,
        "RT_SITE_CONFIG": str(rt.home / "RT_SiteConfig.pm"),
        "RT_SITE_CONFIG_DIR": str(rt.home / "RT_SiteConfig.d"),
        "TIER_FIELD": TIER_FIELD,
    }
    subprocess.run(["perl", f"-I{RT_LIB}", "-e", _WITHOUT_BASIC], env=environment, check=True)
    spec = dataclasses.replace(HELPDESK_USERS, error_budget=ErrorBudget(max_share=1.0))
    with dg.instance_for_test() as instance:
        dg.materialize([flow_asset(spec)], resources=resources(), instance=instance)
    letters = refused_by_rt(helpdesk_world)
    assert letters, "the basic customers' tier is refused"
    for letter in letters:
        assert f"RT did not store {TIER}" in letter.reason
        # REST2 answers a create 201 and drops the value without a word; an update says why.
        assert "Invalid value for custom field" in letter.reason, "RT's own words"


def test_rt_refusing_the_credentials_fails_the_run_once_saying_what_to_fix(
    helpdesk_world, monkeypatch
):
    """A wrong password (RT answers 401) failed the run as "RT users is unavailable ... rerun
    when it answers again", and Dagster retried it to the same answer: it now fails once,
    quoting RT and saying what to check, the password masked, no record dead-lettered."""
    monkeypatch.setenv("RT_PASSWORD", "not-the-password")
    with dg.instance_for_test() as instance:
        run = dg.materialize(
            [flow_asset(HELPDESK_USERS)],
            resources=resources(),
            instance=instance,
            raise_on_error=False,
        )
    description = failed_once(run)
    assert "refused the credentials: 401" in description, description
    assert "check RT_USER and RT_PASSWORD, or RT_TOKEN" in description
    assert "unavailable" not in description and "not-the-password" not in description
    state = helpdesk_world.state()
    assert state.dead_letter_kinds(HELPDESK_USERS.name) == {}
    state.dispose()
