"""The fault suite: crm/contacts through real Dagster against the sandbox, over real HTTP, under
(a) a 10 requests/s limit, (b) 30% of requests answered 5xx, (c) 10% of batch inputs refused,
(d) the CRM down in the middle of a run. Each ends with the CRM holding exactly the valid ERP
set (less what the CRM refused, which is in the DLQ with the CRM's reason). Figures go to the
run's summary; `--outage-seconds 30` runs (d) with the issue's 30 s outage. (e) a read the CRM
refuses (4xx) stops a CRM-sourced flow at once, saying what the CRM answered and what to fix;
(f) so does a write the CRM refuses for the token (401) or its scope (403), no record of it
dead-lettered; (g) and a search that cannot page past the contacts sharing one instant; (h) a
CRM_BASE_URL the CRM has no endpoint under fails the run once, no record dead-lettered.
"""

from __future__ import annotations

import dataclasses
import time

import dagster as dg
import pytest
import requests

from assets.crm_contacts import CRM_CONTACTS
from assets.erp_crm_contact_updates import ERP_CRM_CONTACT_UPDATES
from assets.factory import flow_asset
from definitions import resources
from integrations.crm.source import CrmObjectsSource
from integrations.engine.source import SourceReadFailed, SourceUnavailable
from integrations.engine.spec import ErrorBudget
from integrations.engine.state import StateStore
from resources import CrmResource
from tests.conftest import DLQ_KEY
from tests.dagster_runs import failed_once
from tests.expectations import assert_crm_matches_erp
from tests.sandbox_faults import set_faults, traffic

FLOW = CRM_CONTACTS.name


def crm_resource(world, **settings) -> CrmResource:
    return CrmResource(
        base_url=world.crm.base_url,
        access_token=dg.EnvVar("CRM_ACCESS_TOKEN"),
        rate_limit_url=world.state_url,
        **settings,
    )


def materialize(instance, crm: CrmResource, spec=CRM_CONTACTS):
    return dg.materialize(
        [flow_asset(spec)],
        resources={**resources(), "crm": crm},
        instance=instance,
        raise_on_error=False,
    )


def metadata(result) -> dict[str, object]:
    (event,) = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


def refused_by_crm(world) -> list:
    store = StateStore(world.state_url, dlq_key=DLQ_KEY)
    try:
        letters = store.list_dead_letters(flow=FLOW, limit=100_000)
    finally:
        store.dispose()
    return [letter for letter in letters if letter.reason_kind == "destination-rejected"]


def test_a_a_10_per_second_limit_is_kept_not_discovered_by_429s(world, crm_client, figures):
    set_faults(world.crm, world.token, rate_limit=10)
    crm = crm_resource(world, requests_per_second=10)
    with dg.instance_for_test() as instance:
        started = time.monotonic()
        result = materialize(instance, crm)
        seconds = time.monotonic() - started
    assert result.success
    seen = traffic(world.crm, world.token)
    set_faults(world.crm, world.token)
    api = metadata(result)["crm_api"]
    share_429 = api["answered_429"] / api["attempts"]
    rate, busiest = seen["served_per_second"], seen["busiest_second"]
    assert share_429 <= 0.01
    assert busiest <= 10 + crm.burst, "never more than the limit and the client's burst"
    assert_crm_matches_erp(world.erp_url, crm_client)
    assert not refused_by_crm(world)
    figures.append(
        f"CRM fault (a) 10 req/s: {metadata(result)['inserted']} contacts in {api['attempts']} requests, "
        f"run {seconds:.1f} s; {rate:.1f} req/s achieved between first and last request, "
        f"busiest second {busiest}; 429s {api['answered_429']} ({share_429:.1%}); waited "
        f"{api['rate_limit_wait_seconds']:.1f} s for the bucket"
    )


def test_b_30_percent_5xx_are_retried_to_the_same_end_state(world, crm_client, figures):
    set_faults(world.crm, world.token, error_rate=0.3, seed=11)
    with dg.instance_for_test() as instance:
        started = time.monotonic()
        result = materialize(instance, crm_resource(world, backoff_seconds=0.05))
        seconds = time.monotonic() - started
    set_faults(world.crm, world.token)
    assert result.success
    api = metadata(result)["crm_api"]
    assert api["answered_5xx"] > 0 and api["retries"] == api["answered_5xx"]
    assert metadata(result)["circuit"] == "closed"
    assert_crm_matches_erp(world.erp_url, crm_client)
    assert not refused_by_crm(world)
    figures.append(
        f"CRM fault (b) 30% 5xx: {api['attempts']} requests, {api['answered_5xx']} answered 5xx "
        f"({api['answered_5xx'] / api['attempts']:.0%}), {api['retries']} retries, circuit "
        f"{api['circuit']['state']}; run {seconds:.1f} s; CRM = valid ERP set, no duplicates"
    )


def test_c_refused_batch_inputs_alone_go_to_the_dlq_with_the_crms_reason(
    world, crm_client, figures
):
    set_faults(world.crm, world.token, reject_rate=0.1, seed=5)
    # Contract rejections of the seed and the CRM's 10% together pass the default 10% budget.
    spec = dataclasses.replace(CRM_CONTACTS, error_budget=ErrorBudget(max_share=0.3))
    with dg.instance_for_test() as instance:
        result = materialize(instance, crm_resource(world), spec)
        assert result.success
        again = materialize(instance, crm_resource(world), spec)
    set_faults(world.crm, world.token)
    letters = refused_by_crm(world)

    sent = metadata(result)["inserted"] + len(letters)
    assert 0.05 < len(letters) / sent < 0.15
    assert all(
        letter.reason.startswith("CRM contacts refused the record: VALIDATION_ERROR: inputs[")
        and "Property values were not valid" in letter.reason
        for letter in letters
    ), "the CRM's own message"
    refused = {letter.payload["customer_number"] for letter in letters}
    assert_crm_matches_erp(world.erp_url, crm_client, refused=refused)
    assert metadata(again)["written"] == 0 and metadata(again)["rejected"] == 0
    requests_made = metadata(result)["crm_api"]["attempts"]
    figures.append(
        f"CRM fault (c) 10% refused: {len(letters)} of {sent} records refused ({len(letters) / sent:.1%}) "
        f"in {requests_made} requests (no bisection); each in the DLQ with the CRM's message; "
        f"the other {metadata(result)['inserted']} in the CRM once"
    )


def test_d_an_outage_mid_run_fails_fast_with_the_circuit_open_then_completes(
    world, crm_client, figures, request
):
    outage = request.config.getoption("--outage-seconds")
    set_faults(world.crm, world.token, outage_seconds=outage, outage_after_requests=8)
    long = outage >= 15
    with dg.instance_for_test() as instance:
        started = time.monotonic()
        if long:  # production settings: the breaker, then Dagster's retry policy
            first = materialize(instance, crm_resource(world))
        else:  # quick settings for CI: a failed run, then the next one
            crm = crm_resource(
                world, backoff_seconds=0.1, circuit_failures=3, circuit_open_seconds=1
            )
            first = materialize(instance, crm, dataclasses.replace(CRM_CONTACTS, run_retries=0))
        failed_after = time.monotonic() - started
        if long:
            assert first.success, "finished after the outage"
            retried = [
                event for event in first.all_events if event.event_type_value == "STEP_UP_FOR_RETRY"
            ]
            messages = [str(event.event_specific_data) for event in retried]
            assert messages and all("circuit open" in message for message in messages)
            outcome = f"run finished after the outage in {failed_after:.0f} s, " + (
                f"{len(retried)} step attempt(s) failed fast with the circuit open"
            )
        else:
            assert not first.success
            (failure,) = first.get_step_failure_events()
            data = failure.step_failure_data.user_failure_data
            assert "crm circuit open after 3 consecutive failures" in data.description
            assert data.metadata["circuit"].value == "open"
            while requests.get(f"{world.crm.base_url}/crm/v3/objects/contacts").status_code == 503:
                time.sleep(0.2)  # the outage is still on (the token is not needed to see it)
            second = materialize(instance, crm)
            assert second.success
            outcome = (
                f"run 1 failed after {failed_after:.1f} s with the circuit open; run 2 "
                f"completed ({metadata(second)['inserted']} more contacts, circuit "
                f"{metadata(second)['circuit']})"
            )
    set_faults(world.crm, world.token)
    assert_crm_matches_erp(world.erp_url, crm_client)
    assert not refused_by_crm(world)
    figures.append(
        f"CRM fault (d) {outage:g} s outage after 8 requests: {outcome}; CRM = valid ERP set"
    )


def test_e_a_read_the_crm_refuses_fails_the_run_saying_what_to_fix_not_to_rerun(world):
    """A token without the contacts read scope: the CRM answers every search 403. The run said
    "unavailable ... rerun when the source answers" and Dagster retried it three times, each
    refused alike; it now fails once, with the CRM's answer and what to fix."""
    set_faults(world.crm, world.token, refuse_reads=403)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [flow_asset(ERP_CRM_CONTACT_UPDATES)],
            resources=resources(),
            instance=instance,
            raise_on_error=False,
        )
    set_faults(world.crm, world.token)
    description = failed_once(result)
    assert description.startswith(
        f"flow {ERP_CRM_CONTACT_UPDATES.name}: CRM contacts: POST /crm/v3/objects/contacts/search: "
        "the CRM refused the read: 403 MISSING_SCOPES: This app hasn't been granted"
    )
    assert "required scopes: crm.objects.contacts.read" in description
    assert (
        "What to do: a rerun alone will not cure it: give the CRM token (CRM_ACCESS_TOKEN, its "
        "app) the scope the CRM names, e.g. crm.objects.contacts.read"
    ) in description
    assert "unavailable" not in description and world.token not in description


def test_e_a_refused_read_is_its_own_kind_while_an_outage_stays_unavailable(world, crm_client):
    """The sensor's look at the CRM (its high-water mark): a 4xx is SourceReadFailed with what
    to fix; a CRM that keeps answering 503 is still SourceUnavailable, to rerun."""
    source = CrmObjectsSource(crm_client, ERP_CRM_CONTACT_UPDATES.source)
    set_faults(world.crm, world.token, refuse_reads=400)
    with pytest.raises(SourceReadFailed, match="400 VALIDATION_ERROR") as refused:
        source.high_water_mark()
    assert "properties the flow reads, filters and sorts on exist for contacts" in (
        refused.value.todo
    )
    set_faults(world.crm, world.token, outage_seconds=30)
    with pytest.raises(SourceUnavailable, match="503"):
        source.high_water_mark()
    set_faults(world.crm, world.token)


def test_f_a_write_the_crm_refuses_for_the_token_scope_fails_the_run_once_saying_what_to_fix(
    world, crm_client
):
    """A token without the contacts write scope: the CRM answers every upsert 403. The run said
    "CRM contacts is unavailable ... rerun when CRM contacts answers again" and Dagster retried
    it three times, each refused alike; it now fails once, with the CRM's answer and what to fix,
    and its records are not the CRM's refusals of them: none is dead-lettered, the rerun sends
    them."""
    set_faults(world.crm, world.token, refuse_writes=403)
    with dg.instance_for_test() as instance:
        result = materialize(instance, crm_resource(world))
        set_faults(world.crm, world.token)
        description = failed_once(result)
        assert description.startswith(
            f"flow {FLOW}: CRM contacts: POST /crm/v3/objects/contacts/batch/upsert: the CRM "
            "refused the write: 403 MISSING_SCOPES: This app hasn't been granted"
        )
        assert "required scopes: crm.objects.contacts.write" in description
        assert (
            "What to do: a rerun alone will not cure it: give the CRM token (CRM_ACCESS_TOKEN, "
            "its app) the scope the CRM names, e.g. crm.objects.contacts.write"
        ) in description
        assert "unavailable" not in description and world.token not in description
        assert not refused_by_crm(world), "the token's refusal is no record's"
        again = materialize(instance, crm_resource(world))
    assert again.success
    assert_crm_matches_erp(world.erp_url, crm_client)


def test_g_contacts_sharing_one_instant_past_the_search_window_fail_the_run_once_saying_why(
    world,
):
    """A bulk update stamps 10,050 CRM contacts with one modification instant: HubSpot's search
    pages no further than 10,000 of them, so every run stopped at the same place. It failed as
    "unavailable ... rerun when the source answers" and Dagster retried it to the same end; it
    now fails once, saying why no rerun helps and what does."""
    numbers = [f"C{n:07d}" for n in range(10_050)]
    for start in range(0, len(numbers), 100):
        inputs = [
            {"id": n, "properties": {"email": f"{n}@example.com"}} for n in numbers[start:][:100]
        ]
        world.crm.store.batch_upsert("contacts", {"inputs": inputs}, "erp_customer_id")
    store = world.crm.store
    with store.lock:  # what the bulk update left: one instant for all
        store.connection.execute("UPDATE objects SET updated_ms = ?", (1_767_225_600_000,))
        store.connection.commit()
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [flow_asset(ERP_CRM_CONTACT_UPDATES)],
            resources=resources(),
            instance=instance,
            raise_on_error=False,
        )
    description = failed_once(result)
    assert description.startswith(
        f"flow {ERP_CRM_CONTACT_UPDATES.name}: CRM contacts: POST /crm/v3/objects/contacts/search: "
        "10,000 or more contacts share the modification instant 2026-01-01T00:00:00.000+00:00, "
        "and HubSpot's search pages no further than 10,000 results. What to do: a rerun alone "
        "will not cure it: this flow reads CRM contacts only by that search, and so do a full "
        "refresh (full_refresh) and a repair"
    )
    assert "edit a property of some of the contacts last modified at that instant" in description
    assert "unavailable" not in description


def test_h_a_crm_base_url_with_a_wrong_path_fails_the_run_once_dead_lettering_nothing(
    world, crm_client
):
    """CRM_BASE_URL with a path the CRM has no API under: every batch upsert answered 404. Each
    batch was taken as refused for its records, split to single records, and every contact of
    the run dead-lettered as "the CRM refused it", each to replay; the run now fails once, saying
    what the CRM answered and to check CRM_BASE_URL, nothing dead-lettered: the rerun with the
    right URL sends them all."""
    wrong = f"{world.crm.base_url}/v9"
    with dg.instance_for_test() as instance:
        result = materialize(
            instance,
            CrmResource(
                base_url=wrong,
                access_token=dg.EnvVar("CRM_ACCESS_TOKEN"),
                rate_limit_url=world.state_url,
            ),
        )
        description = failed_once(result)
        assert description.startswith(
            f"flow {FLOW}: CRM contacts: POST /crm/v3/objects/contacts/batch/upsert: the CRM has "
            "no such endpoint: 404 OBJECT_NOT_FOUND: no route for POST /v9/crm/v3/objects/"
        ), description
        assert (
            "What to do: a rerun alone will not cure it: check that CRM_BASE_URL is the CRM's API "
            f"root and that the CRM has contacts (an object type or a path it does not know); "
            f"CRM_BASE_URL is now {wrong}"
        ) in description
        assert "unavailable" not in description and world.token not in description
        assert not refused_by_crm(world), "the URL's 404 is no record's"
        assert not list(crm_client.list_objects("contacts"))
        again = materialize(instance, crm_resource(world))
    assert again.success
    assert_crm_matches_erp(world.erp_url, crm_client)
