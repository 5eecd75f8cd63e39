"""A client for the HubSpot CRM v3 objects API: batch upsert, search, list, batch archive; and
v4 associations (made, listed, removed).

Transport (timeouts, retries, the shared rate limit, the circuit breaker) is the shared
`integrations.http.ApiClient`. Upserts by natural key, archives, reads and searches are
idempotent, so they are retried freely, and so are removals of associations; making one is not
naturally idempotent and carries an `Idempotency-Key`, and so does each batch upsert, for its
answer (see `batch_upsert`). Errors never carry request headers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import requests

from integrations.engine.masking import mask_emails
from integrations.http import ApiClient, ApiLimits, ApiUnavailable, SharedTokenBucket

MAX_BATCH = 100  # HubSpot's limit for batch endpoints
SEARCH_PAGE = 100
SEARCH_WINDOW = 10_000  # HubSpot's search stops paging here (offsets page one instant only)


class CrmError(Exception):
    """Base of the CRM client's errors; messages carry no credentials."""


class CrmUnavailable(CrmError):
    """Could not reach the CRM, or it kept answering 429/5xx after every retry."""


class CrmRefused(CrmError):
    """The CRM answered, and refused: waiting and rerunning get the same answer. `todo` says
    what cures it (without "then rerun")."""

    todo = "fix what the CRM says"


class CrmAuthError(CrmRefused):
    """The CRM refused the access token (401), or a request the token has no scope for (403, a
    write without the object type's write scope): every record of it alike, so not the records'
    fault, and a rerun gets the same answer. Its text is the CRM's status, category and message
    (the token and any email address in it masked); `todo` is what to check for that status."""

    todo = "check CRM_ACCESS_TOKEN: the CRM refused the token (revoked, expired, another account's)"

    def __init__(
        self, where: str, status: int, category: str, message: str, write_of: str | None = None
    ):
        self.status, self.category, self.message = status, category, message
        refused = "the access token" if status == 401 else "the write" if write_of else "the call"
        if status != 401:
            self.todo = _what_cures(status, write_of, "write")
        super().__init__(f"{where}: the CRM refused {refused}: {status} {category}: {message}")


class CrmReadRefused(CrmRefused):
    """The CRM answered a read (a search, a list, a batch read) with a 4xx other than 429: a token
    without the object type's read scope, a property or object type the CRM does not have. Not an
    outage: a rerun gets the same answer. Its text is the CRM's status, category and message
    (the token and any email address in it masked); `todo` is what to check for that status."""

    def __init__(self, where: str, status: int, category: str, message: str, object_type: str):
        self.status, self.category, self.message = status, category, message
        self.todo = _what_cures(status, object_type, "read")
        super().__init__(f"{where}: the CRM refused the read: {status} {category}: {message}")


class CrmEndpointNotFound(CrmRefused):
    """The CRM answered 404 for the endpoint itself, naming no object of the request: a
    CRM_BASE_URL with a wrong path, an API version or an object type the CRM does not have. Every
    record alike, every rerun: a misconfiguration, not the records' fault (a 404 for objects the
    request names, which HubSpot lists in its `context`, stays theirs)."""

    def __init__(self, where: str, category: str, message: str, object_type: str, base_url: str):
        self.status, self.category, self.message = 404, category, message
        self.todo = f"{_what_cures(404, object_type, 'write')}; CRM_BASE_URL is now {base_url}"
        super().__init__(f"{where}: the CRM has no such endpoint: 404 {category}: {message}")


class CrmSearchWindowFull(CrmRefused):
    """So many objects share one modification instant that HubSpot's search cannot page past
    them (a bulk import or update stamps them together): every run's search from there reads
    them again and stops at the same place, so a rerun cannot help; `todo` says what can."""

    def __init__(self, where: str, object_type: str, instant: datetime):
        self.todo = (
            f"this flow reads CRM {object_type} only by that search, and so do a full refresh "
            "(full_refresh) and a repair (its reconciliation reads the source by the same "
            f"search): in the CRM, edit a property of some of the {object_type} last modified at "
            f"that instant (in groups of fewer than {SEARCH_WINDOW:,}) so that fewer than "
            f"{SEARCH_WINDOW:,} share it"
        )
        super().__init__(
            f"{where}: {SEARCH_WINDOW:,} or more {object_type} share the modification instant "
            f"{instant.isoformat(timespec='milliseconds')}, and HubSpot's search pages no further "
            f"than {SEARCH_WINDOW:,} results"
        )


class CrmRequestRejected(CrmError):
    """The CRM refused the request's content (4xx): the body's message and category are kept."""

    def __init__(self, status: int, category: str, message: str):
        self.status, self.category = status, category
        super().__init__(f"{status} {category}: {message}")


@dataclass(frozen=True)
class BatchAnswer:
    results: list[dict]
    errors: list[dict]


def last_modified_property(object_type: str) -> str:
    """HubSpot names it differently for contacts than for every other object."""
    return "lastmodifieddate" if object_type == "contacts" else "hs_lastmodifieddate"


def shared_bucket(state_url: str, base_url: str, limits: ApiLimits) -> SharedTokenBucket | None:
    """The token bucket every run and process writing to this CRM shares (in the state store),
    or None when no request limit is configured."""
    if not limits.requests_per_second:
        return None
    return SharedTokenBucket(state_url, f"crm {base_url}", limits)  # as resources/api.py names it


class CrmClient:
    def __init__(
        self,
        base_url: str,
        access_token: str,
        limits: ApiLimits | None = None,
        *,
        bucket: SharedTokenBucket | None = None,
        log=None,
    ):
        self.api = ApiClient(
            "crm",
            base_url,
            {"Authorization": f"Bearer {access_token}", "Content-Type": "application/json"},
            limits or ApiLimits(),
            bucket=bucket,
            log=log,
        )
        self.base_url = self.api.base_url
        self._token = access_token  # masked out of the CRM's messages, should one quote it

    def close(self) -> None:
        self.api.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: dict | None = None,
        idempotency_key: str | None = None,
        read_of: str | None = None,
        write_of: str | None = None,
        lookup_of: str | None = None,
    ) -> dict:
        """The answer's JSON; `read_of` (an object type) marks a read, whose 4xx (but 401 and
        429) is CrmReadRefused, not a refusal of the request's records. A 401 or 403 is
        CrmAuthError, of the token or of its scope for `write_of` (the object type written). A
        404 naming no object of a write or of a lookup (`lookup_of`: a read whose other 4xx is
        its records') is CrmEndpointNotFound: the endpoint is missing, not the records."""
        where = f"{method} {path}"
        try:
            response = self.api.request(
                method,
                path,
                json=json,
                params=params,
                idempotent=True,  # upserts by natural key, archives, reads, searches; or keyed
                idempotency_key=idempotency_key,
            )
        except ApiUnavailable as error:
            raise CrmUnavailable(str(error)) from None
        status = response.status_code
        if read_of is not None and status != 401 and 400 <= status < 500:  # 401: the token's
            raise self._read_refused(where, response, read_of)
        endpoint_of = write_of or lookup_of
        if status == 404 and endpoint_of is not None and not _names_objects(response):
            category, text = self._refusal(response)
            raise CrmEndpointNotFound(where, category, text, endpoint_of, self.base_url)
        if status in (401, 403):
            category, text = self._refusal(response)
            raise CrmAuthError(where, status, category, text, write_of)
        if response.status_code >= 400:
            body = _json_or_empty(response)
            raise CrmRequestRejected(
                response.status_code,
                str(body.get("category", "ERROR")),
                str(body.get("message", response.reason)),
            )
        return _json_or_empty(response)

    def _read_refused(
        self, where: str, response: requests.Response, object_type: str
    ) -> CrmReadRefused:
        category, text = self._refusal(response)
        return CrmReadRefused(where, response.status_code, category, text, object_type)

    def _refusal(self, response: requests.Response) -> tuple[str, str]:
        """The CRM's category and own words for a refusal: its message, what its `errors` add
        (HubSpot names a missing scope there), the token and email addresses masked, cut short."""
        body = _json_or_empty(response)
        details = [str(body.get("message") or response.reason)]
        for error in body.get("errors") or []:
            if not isinstance(error, dict):
                continue
            context = error.get("context") if isinstance(error.get("context"), dict) else {}
            scopes = context.get("requiredGranularScopes") or context.get("requiredScopes")
            details.append(str(error.get("message", "")))
            if isinstance(scopes, list):
                details.append(f"required scopes: {', '.join(map(str, scopes))}")
        text = " ".join(detail for detail in details if detail)
        text = mask_emails(text, [self._token])
        return str(body.get("category", "ERROR"))[:60], text[:400]

    def batch_upsert(
        self, object_type: str, id_property: str, inputs: Sequence[dict[str, object]]
    ) -> BatchAnswer:
        """Upsert up to 100 objects keyed by `id_property`: the API's results and, for a
        half-accepted batch (207), its per-input errors.

        Each input is `{"id": <id_property value>, "properties": {...}, "objectWriteTraceId": ...}`;
        an error names the inputs it is about by their `objectWriteTraceId` in its `context`.

        The call's retries carry one `Idempotency-Key`: an answer lost after the CRM wrote is
        replayed to the retry, which would otherwise find the objects there, each `new: false`
        (an object this call created audited as updated), where the CRM honours the key. A key
        of this call only, never of the inputs: a later call with the same inputs (a rerun, the
        run's end retrying a refusal) must be served anew, not handed an old answer.
        """
        if len(inputs) > MAX_BATCH:
            raise ValueError(f"batch upsert takes at most {MAX_BATCH} inputs, got {len(inputs)}")
        body = {"inputs": [{**item, "idProperty": id_property} for item in inputs]}
        answer = self._request(
            "POST",
            f"/crm/v3/objects/{object_type}/batch/upsert",
            json=body,
            params={"idProperty": id_property},
            idempotency_key=f"batch-upsert-{uuid.uuid4()}",
            write_of=object_type,
        )
        return BatchAnswer(list(answer.get("results", [])), list(answer.get("errors", [])))

    def batch_read_ids(
        self, object_type: str, id_property: str, values: Sequence[str]
    ) -> dict[str, str]:
        """Object ids by `id_property` value (lower-cased), for the values the CRM knows."""
        if len(values) > MAX_BATCH:
            raise ValueError(f"batch read takes at most {MAX_BATCH} ids, got {len(values)}")
        answer = self._request(
            "POST",
            f"/crm/v3/objects/{object_type}/batch/read",
            json={
                "idProperty": id_property,
                "properties": [id_property],
                "inputs": [{"id": value} for value in values],
            },
            lookup_of=object_type,
        )
        return {
            str(item["properties"].get(id_property, "")).lower(): str(item["id"])
            for item in answer.get("results", [])
        }

    def associate(
        self,
        from_type: str,
        to_type: str,
        pairs: Sequence[tuple[str, str]],
        idempotency_key: str,
    ) -> None:
        """Default (unlabelled) associations, e.g. deal → contact. Not idempotent by nature: the
        key lets a retry after a lost answer be replayed by the CRM instead of acting twice."""
        if len(pairs) > MAX_BATCH:
            raise ValueError(f"batch associate takes at most {MAX_BATCH} pairs, got {len(pairs)}")
        self._request(
            "POST",
            f"/crm/v4/associations/{from_type}/{to_type}/batch/associate/default",
            json={"inputs": [{"from": {"id": f}, "to": {"id": t}} for f, t in pairs]},
            idempotency_key=idempotency_key,
            write_of=from_type,
        )

    def dissociate(self, from_type: str, to_type: str, pairs: Sequence[tuple[str, str]]) -> None:
        """Remove the associations between each pair (every label of it). Idempotent by nature:
        a pair no longer associated is no error, so a retry needs no key."""
        if len(pairs) > MAX_BATCH:
            raise ValueError(f"batch archive takes at most {MAX_BATCH} pairs, got {len(pairs)}")
        self._request(
            "POST",
            f"/crm/v4/associations/{from_type}/{to_type}/batch/archive",
            json={"inputs": [{"from": {"id": f}, "to": [{"id": t}]} for f, t in pairs]},
            write_of=from_type,
        )

    def associated_ids(self, from_type: str, object_id: str, to_type: str) -> list[str]:
        answer = self._request(
            "GET",
            f"/crm/v4/objects/{from_type}/{object_id}/associations/{to_type}",
            read_of=from_type,
        )
        return [str(item["toObjectId"]) for item in answer.get("results", [])]

    def batch_archive(self, object_type: str, ids: Sequence[str]) -> None:
        if len(ids) > MAX_BATCH:
            raise ValueError(f"batch archive takes at most {MAX_BATCH} ids, got {len(ids)}")
        self._request(
            "POST",
            f"/crm/v3/objects/{object_type}/batch/archive",
            json={"inputs": [{"id": str(object_id)} for object_id in ids]},
            write_of=object_type,
        )

    def search_modified_since(
        self, object_type: str, since: datetime, properties: Sequence[str] = ()
    ) -> Iterator[dict]:
        """Objects modified at or after `since` (UTC), oldest first, across every page.

        Each page is a new search from the newest instant served so far, skipping the objects
        already served at that instant: an object modified while the pages are read moves to
        the end, and with offsets every later object would slide back past the offset, never
        served. Offsets page only through objects that share one instant. An object modified
        after it was served is served again, as it is now.
        """
        modified = last_modified_property(object_type)
        floor_ms = _naive_utc_ms(since) if since.tzinfo is None else int(since.timestamp() * 1000)
        served_at_floor: set[str] = set()
        after = None
        while True:
            page = self._request(
                "POST",
                f"/crm/v3/objects/{object_type}/search",
                json=_search_from(modified, floor_ms, properties, after),
                read_of=object_type,
            )
            last_ms, at_last = floor_ms, set(served_at_floor)
            for item in page.get("results", []):
                moment = _iso_ms(item["properties"].get(modified)) or last_ms
                if moment == floor_ms and item["id"] in served_at_floor:
                    continue
                if moment != last_ms:
                    last_ms, at_last = moment, set()
                at_last.add(item["id"])
                yield item
            next_after = page.get("paging", {}).get("next", {}).get("after")
            if not next_after:
                return
            if last_ms > floor_ms:
                floor_ms, served_at_floor, after = last_ms, at_last, None
            elif int(next_after) < SEARCH_WINDOW:
                served_at_floor, after = at_last, next_after
            else:  # HubSpot's search stops paging at 10,000 results
                raise CrmSearchWindowFull(
                    f"POST /crm/v3/objects/{object_type}/search",
                    object_type,
                    datetime.fromtimestamp(floor_ms / 1000, UTC),
                )

    def batch_read(
        self, object_type: str, ids: Sequence[str], properties: Sequence[str] = ()
    ) -> list[dict]:
        """The live objects with these CRM ids (unknown or archived ids are left out)."""
        if len(ids) > MAX_BATCH:
            raise ValueError(f"batch read takes at most {MAX_BATCH} ids, got {len(ids)}")
        answer = self._request(
            "POST",
            f"/crm/v3/objects/{object_type}/batch/read",
            json={"properties": list(properties), "inputs": [{"id": str(i)} for i in ids]},
            read_of=object_type,
        )
        return list(answer.get("results", []))

    def newest_modification(self, object_type: str) -> datetime | None:
        """When the most recently modified object of this type changed (UTC), if any."""
        modified = last_modified_property(object_type)
        answer = self._request(
            "POST",
            f"/crm/v3/objects/{object_type}/search",
            json={
                "sorts": [{"propertyName": modified, "direction": "DESCENDING"}],
                "properties": [modified],
                "limit": 1,
            },
            read_of=object_type,
        )
        results = answer.get("results") or []
        moment = _iso_ms(results[0]["properties"].get(modified)) if results else None
        return None if moment is None else datetime.fromtimestamp(moment / 1000, UTC)

    def list_objects(
        self, object_type: str, properties: Sequence[str] = (), archived: bool = False
    ) -> Iterator[dict]:
        """Every object of a type (or every archived one), following `after` paging."""
        params: dict[str, object] = {"limit": 100, "archived": str(archived).lower()}
        if properties:
            params["properties"] = ",".join(properties)
        while True:
            page = self._request(
                "GET", f"/crm/v3/objects/{object_type}", params=params, read_of=object_type
            )
            yield from page.get("results", [])
            after = page.get("paging", {}).get("next", {}).get("after")
            if not after:
                return
            params["after"] = after


def _what_cures(status: int, object_type: str | None, access: str) -> str:
    """What to check when the CRM refuses a read or a write (`access`) of `object_type` (None:
    a call the client does not tie to one) with `status`."""
    if status == 403:
        example = f", e.g. crm.objects.{object_type}.{access}" if object_type else ""
        return (
            f"give the CRM token (CRM_ACCESS_TOKEN, its app) the scope the CRM names{example}, "
            "or use a token that has it"
        )
    if status == 400:
        return (
            f"check that the properties the flow reads, filters and sorts on exist for "
            f"{object_type} in the CRM (its property settings), and their names"
        )
    if status == 404:
        return (
            f"check that CRM_BASE_URL is the CRM's API root and that the CRM has {object_type} "
            "(an object type or a path it does not know)"
        )
    return "fix what the CRM says about the request"


def _names_objects(response: requests.Response) -> bool:
    """Whether a 404 is about objects the request names (HubSpot lists their ids in its
    `context`, or in the context of each of its `errors`), not about the endpoint."""
    body = _json_or_empty(response)
    contexts = [body.get("context")] + [
        error.get("context") for error in body.get("errors") or [] if isinstance(error, dict)
    ]
    return any(isinstance(context, dict) and context.get("ids") for context in contexts)


def _json_or_empty(response: requests.Response) -> dict:
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _search_from(
    modified: str, floor_ms: int, properties: Sequence[str], after: str | None
) -> dict[str, object]:
    """A search body: objects modified at or after `floor_ms`, oldest first, from `after`."""
    return {
        "filterGroups": [
            {"filters": [{"propertyName": modified, "operator": "GTE", "value": str(floor_ms)}]}
        ],
        "sorts": [{"propertyName": modified, "direction": "ASCENDING"}],
        "properties": [*properties, modified],
        "limit": SEARCH_PAGE,
        **({"after": after} if after else {}),
    }


def _naive_utc_ms(moment: datetime) -> int:
    return int(moment.replace(tzinfo=UTC).timestamp() * 1000)


def _iso_ms(value: object) -> int | None:
    if not value:
        return None
    text = str(value)
    if text.isdecimal():
        return int(text)
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
