"""The CRM sandbox speaks the HubSpot v3 subset: auth, upsert, list, search, archive, errors."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import requests

from integrations.crm import sandbox
from integrations.crm.client import CrmAuthError, CrmClient, CrmRequestRejected
from integrations.crm.destination import CrmObjects
from integrations.engine.destination import DestinationMismatch


def contact(number: int, email: str | None = None, **extra: str) -> dict:
    return {
        "id": f"C{number:07d}",
        "properties": {
            "email": email or f"person.{number}@example.com",
            "firstname": "Ada",
            **extra,
        },
    }


def test_requests_without_the_token_get_a_hubspot_error_body(crm_sandbox):
    answer = requests.get(f"{crm_sandbox.base_url}/crm/v3/objects/contacts", timeout=5)
    assert answer.status_code == 401
    body = answer.json()
    assert body["status"] == "error" and body["category"] == "INVALID_AUTHENTICATION"
    assert body["correlationId"] and "Bearer" in body["message"]
    with pytest.raises(CrmAuthError, match="401 INVALID_AUTHENTICATION") as caught:
        list(CrmClient(crm_sandbox.base_url, "wrong-token").list_objects("contacts"))
    assert "wrong-token" not in str(caught.value) and "CRM_ACCESS_TOKEN" in caught.value.todo
    # Reconciliation's read of the CRM: not an outage to wait out, the token to check.
    contacts = CrmObjects(CrmClient(crm_sandbox.base_url, "wrong-token"), "contacts", "email")
    with pytest.raises(DestinationMismatch, match="What to do: check CRM_ACCESS_TOKEN"):
        list(contacts.snapshot(["email"]))


def test_upsert_creates_then_updates_and_keeps_updated_at_when_nothing_changed(crm_client):
    created = crm_client.batch_upsert(
        "contacts", "erp_customer_id", [contact(1), contact(2)]
    ).results
    assert [r["new"] for r in created] == [True, True]
    assert all(r["createdAt"] == r["updatedAt"] for r in created)
    time.sleep(0.01)
    same = crm_client.batch_upsert("contacts", "erp_customer_id", [contact(1)]).results
    assert same[0]["new"] is False and same[0]["updatedAt"] == created[0]["updatedAt"]
    time.sleep(0.01)
    moved = crm_client.batch_upsert(
        "contacts", "erp_customer_id", [contact(1, city="Oslo")]
    ).results
    assert moved[0]["id"] == created[0]["id"] and moved[0]["updatedAt"] > created[0]["updatedAt"]
    assert moved[0]["properties"]["city"] == "Oslo"


def test_emails_are_unique_ignoring_case_and_invalid_ones_are_refused(crm_client):
    crm_client.batch_upsert("contacts", "erp_customer_id", [contact(1, "ada@example.com")])
    with pytest.raises(CrmRequestRejected) as conflict:
        crm_client.batch_upsert("contacts", "erp_customer_id", [contact(2, "ADA@Example.com")])
    assert conflict.value.status == 409 and conflict.value.category == "CONFLICT"
    with pytest.raises(CrmRequestRejected) as invalid:
        crm_client.batch_upsert("contacts", "erp_customer_id", [contact(3, "not-an-email")])
    assert invalid.value.status == 400 and "email" in str(invalid.value)
    assert [c["properties"]["erp_customer_id"] for c in crm_client.list_objects("contacts")] == [
        "C0000001"
    ], "a refused batch changes nothing"


def test_batches_over_100_and_bad_json_are_validation_errors(crm_sandbox, crm_token):
    headers = {"Authorization": f"Bearer {crm_token}"}
    url = f"{crm_sandbox.base_url}/crm/v3/objects/contacts/batch/upsert?idProperty=erp_customer_id"
    too_many = requests.post(
        url, json={"inputs": [contact(i) for i in range(101)]}, headers=headers, timeout=5
    )
    assert too_many.status_code == 400 and too_many.json()["category"] == "VALIDATION_ERROR"
    broken = requests.post(url, data=b"{not json", headers=headers, timeout=5)
    assert broken.status_code == 400 and "JSON" in broken.json()["message"]


def test_listing_pages_with_after_and_shows_archived_objects_apart(crm_client):
    for start in range(0, 250, 100):
        crm_client.batch_upsert(
            "contacts", "erp_customer_id", [contact(n) for n in range(start, min(start + 100, 250))]
        )
    listed = list(crm_client.list_objects("contacts", ["erp_customer_id"]))
    assert len(listed) == 250 and len({c["id"] for c in listed}) == 250
    crm_client.batch_archive("contacts", [listed[0]["id"], listed[1]["id"]])
    archived = list(crm_client.list_objects("contacts", archived=True))
    assert {c["id"] for c in archived} == {listed[0]["id"], listed[1]["id"]}
    assert all(c["archived"] and c["archivedAt"] for c in archived)
    assert len(list(crm_client.list_objects("contacts"))) == 248


def test_search_on_the_last_modified_date_pages_through_everything_changed(crm_client):
    crm_client.batch_upsert("contacts", "erp_customer_id", [contact(n) for n in range(100)])
    time.sleep(0.02)
    since = datetime.now(UTC)
    time.sleep(0.02)
    changed = [contact(n, city="Porto") for n in range(0, 100, 2)]
    crm_client.batch_upsert("contacts", "erp_customer_id", changed)
    found = list(crm_client.search_modified_since("contacts", since, ["erp_customer_id", "city"]))
    assert sorted(c["properties"]["erp_customer_id"] for c in found) == sorted(
        c["id"] for c in changed
    )
    assert all(c["properties"]["city"] == "Porto" for c in found)


def test_a_contact_edited_while_a_search_is_paged_costs_no_other_contact(crm_client):
    for start in range(0, 250, 100):
        crm_client.batch_upsert(
            "contacts", "erp_customer_id", [contact(n) for n in range(start, min(start + 100, 250))]
        )
        time.sleep(0.002)  # three instants, as three imports would be
    since = datetime(2000, 1, 1)
    served = []
    for item in crm_client.search_modified_since("contacts", since, ["erp_customer_id", "city"]):
        served.append((item["properties"]["erp_customer_id"], item["properties"]["city"]))
        if len(served) == 50:  # a salesperson edits a contact the search has served
            crm_client.batch_upsert("contacts", "erp_customer_id", [contact(10, city="Lyon")])
    assert {number for number, _ in served} == {contact(n)["id"] for n in range(250)}, (
        "the contacts after the edited one slid back past the next page's offset"
    )
    assert served[-1] == (contact(10)["id"], "Lyon"), "served again, as it is now"
    assert len(served) == 251


def test_a_half_accepted_batch_answers_207_naming_each_refused_input(crm_sandbox, crm_token):
    headers = {"Authorization": f"Bearer {crm_token}"}
    faults = requests.post(
        f"{crm_sandbox.base_url}/_sandbox/faults",
        json={"reject_rate": 0.5, "seed": 1},
        headers=headers,
        timeout=5,
    )
    assert faults.json()["reject_rate"] == 0.5
    inputs = [{**contact(n), "objectWriteTraceId": f"trace-{n}"} for n in range(20)]
    url = f"{crm_sandbox.base_url}/crm/v3/objects/contacts/batch/upsert?idProperty=erp_customer_id"
    answer = requests.post(url, json={"inputs": inputs}, headers=headers, timeout=5)
    assert answer.status_code == 207
    body = answer.json()
    accepted = {r["properties"]["erp_customer_id"] for r in body["results"]}
    refused = {e["context"]["id"][0]: e for e in body["errors"]}
    assert body["numErrors"] == len(refused) and 0 < len(refused) < 20
    assert accepted | set(refused) == {item["id"] for item in inputs}
    assert not accepted & set(refused)
    for number, error in refused.items():
        assert error["context"]["objectWriteTraceId"] == [f"trace-{int(number[1:])}"]
        assert error["category"] == "VALIDATION_ERROR" and "not valid" in error["message"]
    again = requests.post(url, json={"inputs": inputs}, headers=headers, timeout=5).json()
    assert {e["context"]["id"][0] for e in again["errors"]} == set(refused), (
        "same inputs, same fate"
    )


def test_fault_settings_are_checked(crm_sandbox, crm_token):
    answer = requests.post(
        f"{crm_sandbox.base_url}/_sandbox/faults",
        json={"error_rat": 0.3},
        headers={"Authorization": f"Bearer {crm_token}"},
        timeout=5,
    )
    assert answer.status_code == 400 and "error_rat" in answer.json()["message"]
    unauthorised = requests.get(f"{crm_sandbox.base_url}/_sandbox/faults", timeout=5)
    assert unauthorised.status_code == 401


def test_idempotency_keys_are_kept_24_hours_then_forgotten(crm_sandbox, crm_token, monkeypatch):
    """Every batch upsert carries an Idempotency-Key, and the sandbox kept every answer forever:
    a long-running sandbox's file grew with each batch. A key is kept 24 hours, as Stripe keeps
    it: a retry within them is replayed, an older key acts as a new one, and expired keys are
    deleted (once a minute at most) as new ones come."""
    url = f"{crm_sandbox.base_url}/crm/v3/objects/contacts/batch/upsert?idProperty=erp_customer_id"
    store = crm_sandbox.store

    def upsert(key: str, number: int) -> requests.Response:
        headers = {"Authorization": f"Bearer {crm_token}", "Idempotency-Key": key}
        answer = requests.post(url, json={"inputs": [contact(number)]}, headers=headers, timeout=5)
        assert answer.status_code == 200
        return answer

    def back_date(key: str, hours: float) -> None:
        with store.lock:
            store.connection.execute(
                "UPDATE idempotency_keys SET created_ms = created_ms - ? WHERE key = ?",
                (int(hours * 3600 * 1000), key),
            )

    def keys() -> set[str]:
        with store.lock:
            return {key for (key,) in store.connection.execute("SELECT key FROM idempotency_keys")}

    def replayed(answer: requests.Response) -> bool:
        return answer.headers.get("Idempotent-Replayed") == "true"

    assert not replayed(upsert("k-1", 1))
    back_date("k-1", hours=23.9)
    assert replayed(upsert("k-1", 1)), "a retry within 24 hours"
    back_date("k-1", hours=0.2)
    sent = store.stats()["upsert_inputs"]
    assert not replayed(upsert("k-1", 1)), "a key past 24 hours is a new key"
    assert store.stats()["upsert_inputs"] == sent + 1
    assert replayed(upsert("k-1", 1)), "its new answer is kept for 24 hours more"

    upsert("k-2", 2)
    back_date("k-1", hours=25)
    back_date("k-2", hours=25)
    upsert("k-3", 3)
    assert keys() == {"k-1", "k-2", "k-3"}, "deleted a minute after the last deletion, not before"
    later = sandbox._now_ms() + sandbox.IDEMPOTENCY_SWEEP_EVERY_MS
    monkeypatch.setattr(sandbox, "_now_ms", lambda: later)
    upsert("k-4", 4)
    assert keys() == {"k-3", "k-4"}


def test_a_person_changes_one_contact_by_its_id_as_in_hubspot(crm_sandbox, crm_client, crm_token):
    """`PATCH /crm/v3/objects/contacts/{id}` (what a person in the CRM does, and how the README
    plays one): it changes that contact alone, tells the webhooks, and handoff's next upsert by
    `erp_customer_id` still finds it."""
    changes = []
    crm_sandbox.store.on_change = changes.extend
    created = crm_client.batch_upsert("contacts", "erp_customer_id", [contact(1), contact(2)])
    first, second = (result["id"] for result in created.results)
    changes.clear()
    headers = {"Authorization": f"Bearer {crm_token}"}
    url = f"{crm_sandbox.base_url}/crm/v3/objects/contacts"
    time.sleep(0.01)
    patched = requests.patch(
        f"{url}/{first}", json={"properties": {"city": "Gothenburg"}}, headers=headers, timeout=5
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["id"] == first and body["properties"]["city"] == "Gothenburg"
    assert body["updatedAt"] > created.results[0]["updatedAt"] and "new" not in body
    assert [(c.object_id, c.action, c.properties) for c in changes] == [
        (int(first), "propertyChange", {"city": "Gothenburg"})
    ]
    again = crm_client.batch_upsert("contacts", "erp_customer_id", [contact(1, city="Oslo")])
    assert again.results[0]["id"] == first and again.results[0]["new"] is False
    clash = requests.patch(
        f"{url}/{second}",
        json={"properties": {"email": "PERSON.1@example.com"}},
        headers=headers,
        timeout=5,
    )
    assert clash.status_code == 409 and clash.json()["category"] == "CONFLICT"
    missing = requests.patch(f"{url}/999", json={"properties": {}}, headers=headers, timeout=5)
    assert missing.status_code == 404 and missing.json()["category"] == "OBJECT_NOT_FOUND"
