"""A client for Request Tracker 5's REST2 API: users by name, ticket searches, ticket writes.

Authentication is basic (RT_USER/RT_PASSWORD) or an RT auth token (RT_TOKEN, from the
RT::Authen::Token extension, sent as `Authorization: token …`). Searches follow REST2's paging
(`page`/`per_page`, at most 100 a page). Transport (timeouts, retries honouring Retry-After,
the shared rate limit, the circuit breaker) is the shared `integrations.http.ApiClient`, under
the system name "RT". Errors name RT and the request, never the credentials.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests

from integrations.engine.masking import mask_emails
from integrations.http import ApiClient, ApiLimits, ApiUnavailable, SharedTokenBucket

PAGE = 100  # REST2's largest page
NEWEST_CHANGES = 20  # a page of the newest ticket transactions, for one the user may see
TICKET_READS = ("/tickets", "/transactions")  # searches (a ticket is written at /ticket)


class RtError(Exception):
    """Base of the RT client's errors; messages carry no credentials."""


class RtUnavailable(RtError):
    """RT could not be reached, or kept answering 429/5xx after every retry."""


class RtRefused(RtError):
    """RT answered, and refused: waiting and rerunning get the same answer. `what` is RT's
    answer, `todo` what cures it (without "then rerun")."""

    def __init__(self, what: str, todo: str):
        self.what, self.todo = what, todo
        super().__init__(f"{what}; {todo}")


class RtAuthError(RtRefused):
    """RT refused the credentials (401), or a write for want of the user's rights (403)."""


class RtReadRefused(RtRefused):
    """RT answered a read of tickets with a 4xx other than 401 (the credentials') and 429 (a
    limit: retried, then unavailable): a TicketSQL it cannot parse (400), a user without the
    right to read them, or a proxy refusing (403), a path it does not have (404); or with a page
    that is not REST2's JSON (its login page: RT_BASE_URL names another path). Not an outage:
    a rerun gets the same answer. RT's message has the credentials and email addresses masked."""

    def __init__(self, where: str, status: int, message: str):
        self.status = status
        super().__init__(f"RT {where}: refused the read: {status} {message}", _what_cures(status))


class RtRequestRejected(RtError):
    """RT refused the request's content (4xx): its message is kept."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"RT answered {status}: {message}")


CHECK_CREDENTIALS = (
    "check RT_USER and RT_PASSWORD, or RT_TOKEN: RT refused them (a wrong password, a disabled "
    "user, a revoked or expired token)"
)
CHECK_RIGHTS = (
    "check the rights of the RT user handoff acts as (RT_USER, or RT_TOKEN's owner): the README "
    "lists them"
)
CHECK_BASE_URL = (
    "check RT_BASE_URL: RT's web address including its path (https://rt.example.com or "
    "https://example.com/rt), without /REST/2.0, of an RT 5 (REST2 is built in)"
)
_PERL_PLACE = re.compile(r"\s+at /\S+ line \d+\.?\s*$")  # where in RT's code it died


def _what_cures(status: int) -> str:
    """What to check when RT refuses a read of tickets with `status`."""
    if status == 403:
        return (
            "give the RT user handoff reads as (RT_USER, or RT_TOKEN's owner) the rights SeeQueue "
            "and ShowTicket on the queues whose tickets the ERP should see (Admin, Queues, the "
            "queue, User Rights), or use a user that has them; or let the proxy in front of RT "
            "pass REST2's GET /tickets"
        )
    if status == 400:
        return (
            "check that RT_BASE_URL is an RT 5 (its REST2 parses the flow's TicketSQL on id and "
            "LastUpdated) and what RT says about the query"
        )
    if status == 404 or status < 400:
        return CHECK_BASE_URL
    return "fix what RT says about the request (RT_BASE_URL, the user's rights in RT)"


def rt_time(value: str | None) -> datetime | None:
    """REST2's `2026-11-26T01:56:44Z` as a naive UTC datetime (the engine's convention)."""
    if not value or value.startswith("1970-01-01"):  # RT's "never"
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).replace(tzinfo=None)


class RtClient:
    def __init__(
        self,
        base_url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        limits: ApiLimits | None = None,
        bucket: SharedTokenBucket | None = None,
        log=None,
        page_size: int = PAGE,
    ):
        if token:
            authorization = f"token {token}"
        elif user and password:
            authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        else:
            raise RtAuthError("RT: no credentials", "set RT_TOKEN, or RT_USER and RT_PASSWORD")
        self.api = ApiClient(
            "RT",
            base_url,
            {"Authorization": authorization, "Accept": "application/json"},
            limits or ApiLimits(),
            bucket=bucket,
            log=log,
        )
        self.base_url = self.api.base_url
        self._secrets = (password, token)  # masked out of RT's messages, should one quote them
        self.page_size = min(page_size, PAGE)

    def close(self) -> None:
        self.api.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        params: Sequence[tuple[str, object]] | None = None,
        idempotent: bool = True,
    ) -> object:
        """One call through the shared transport. Every POST here is a search, or a user
        create that a resend cannot double (RT refuses a second user of the same name; the
        users destination then finds the one the first send made). A read of tickets that RT
        refuses is RtReadRefused (see it), not a refusal of what was sent."""
        where = f"{method} {path}"
        try:
            response = self.api.request(
                method, f"/REST/2.0{path}", json=body, params=params, idempotent=idempotent
            )
        except ApiUnavailable as error:
            raise RtUnavailable(str(error)) from None
        status = response.status_code
        body_json = _json_or_none(response)
        tickets_read = path in TICKET_READS
        if status == 401 or (status == 403 and not tickets_read):
            said = self._said(response, body_json)
            raise RtAuthError(
                f"RT {where}: refused the credentials: {status} {said}",
                CHECK_CREDENTIALS if status == 401 else CHECK_RIGHTS,
            )
        not_rest2 = status < 300 and not isinstance(body_json, dict)
        if tickets_read and (400 <= status < 500 or not_rest2):
            raise RtReadRefused(where, status, self._said(response, body_json))
        if status >= 400:
            message = body_json.get("message") if isinstance(body_json, dict) else None
            raise RtRequestRejected(status, str(message or response.reason))
        return body_json

    def _said(self, response: requests.Response, body_json: object) -> str:
        """RT's message for an answer, short, without the credentials or email addresses (a
        TicketSQL it quotes may hold one), or what the answer was when it is not REST2's JSON."""
        message = body_json.get("message") if isinstance(body_json, dict) else None
        if message:
            text = _PERL_PLACE.sub("", str(message))
        elif response.status_code < 300:
            kind = response.headers.get("Content-Type", "no content type").split(";")[0]
            redirected = (
                f", redirected to {urlsplit(response.url).path}" if response.history else ""
            )
            text = f"an answer that is not REST2's JSON ({kind}{redirected})"
        else:
            text = str(response.reason)
        return mask_emails(text, self._secrets)[:400]

    def _search(
        self, path: str, params: Sequence[tuple[str, object]] = (), body: object = None
    ) -> Iterator[dict]:
        """Every item of a collection, page by page (`body`: a JSON search, POSTed)."""
        method = "GET" if body is None else "POST"
        page = 1
        while True:
            query = [*params, ("page", page), ("per_page", self.page_size)]
            answer = self._collection(method, path, query, body)
            yield from answer.get("items", [])
            if not _more_pages(answer, page):
                return
            page += 1

    def _collection(
        self, method: str, path: str, params: Sequence[tuple[str, object]], body: object = None
    ) -> dict:
        """One page of a collection."""
        answer = self._request(method, path, body=body, params=params)
        if not isinstance(answer, dict):
            raise RtError(f"RT {path}: expected a search result, got {type(answer).__name__}")
        return answer

    # --- system -------------------------------------------------------------------------------

    def ping(self) -> dict:
        """RT's version and plugins; also proves the credentials."""
        answer = self._request("GET", "/rt")
        return answer if isinstance(answer, dict) else {}

    # --- users --------------------------------------------------------------------------------

    def users_by_name(self, names: Sequence[str], fields: Sequence[str]) -> dict[str, dict]:
        """The users with these names (enabled or disabled), each with `fields` and `Disabled`
        as "0"/"1" (REST2 leaves it empty in searches, so enabled users are asked for apart).
        Keyed by the name as asked: RT compares names without case ("c0000001" is the user
        "C0000001", and refuses to make another), and answers with the name as it holds it."""
        found: dict[str, dict] = {}
        for start in range(0, len(names), self.page_size):
            asked = {name.lower(): name for name in names[start : start + self.page_size]}
            chunk = [{"field": "Name", "value": name} for name in asked.values()]
            shown = ",".join(["Name", *fields])
            every = self._search("/users", [("fields", shown), ("find_disabled_rows", 1)], chunk)
            enabled = {item["Name"] for item in self._search("/users", [("fields", "Name")], chunk)}
            for item in every:
                disabled = "0" if item["Name"] in enabled else "1"
                found[asked.get(item["Name"].lower(), item["Name"])] = {
                    **item,
                    "Disabled": disabled,
                }
        return found

    def all_users(self, fields: Sequence[str]) -> Iterator[dict]:
        """Every enabled user with `fields`, by name. Each page is a new search for the names
        after the last one served, not an offset: a user disabled meanwhile (gone from the
        results) would slide the next one back past the offset, never served, and one created
        before the offset would push one into the next page, served twice. The comparison is
        RT's case-sensitive one, which orders as its ORDER BY does (a case-blind one compares
        lower(Name) on SQLite and PostgreSQL while the order is Name's)."""
        params = [
            ("fields", ",".join(["Name", *fields])),
            ("orderby", "Name"),
            ("per_page", self.page_size),
        ]
        after: list[dict] = []  # no condition: every user
        while True:
            answer = self._collection("POST", "/users", params, after)
            items = answer.get("items", [])
            yield from items
            if not _more_pages(answer, 1):
                return
            last = items[-1]["Name"]
            after = [{"field": "Name", "operator": ">", "value": last, "case_sensitive": 1}]

    def create_user(self, fields: Mapping[str, object]) -> None:
        self._request("POST", "/user", body=dict(fields))

    def update_user(self, name: str, fields: Mapping[str, object]) -> list[str]:
        """Set these fields; RT answers one message per change (and records a transaction)."""
        answer = self._request("PUT", f"/user/{_segment(name)}", body=dict(fields))
        return [str(message) for message in answer] if isinstance(answer, list) else []

    def user_history(self, name: str) -> list[dict]:
        fields = [("fields", "Type,Field,OldValue,NewValue,Created")]
        return list(self._search(f"/user/{_segment(name)}/history", fields))

    # --- tickets ------------------------------------------------------------------------------

    def search_tickets(self, ticketsql: str, fields: Sequence[str]) -> Iterator[dict]:
        """Tickets matching TicketSQL, ascending by id, with `fields` (and the requestors' Name
        and EmailAddress). Each page is a new search for the ids after the last one served, not
        an offset: a ticket leaving the results meanwhile (deleted, merged, moved to a queue out
        of sight) would slide the next one back past the offset, never served."""
        params: list[tuple[str, object]] = [
            ("fields", ",".join(fields)),
            ("fields[Requestor]", "Name,EmailAddress"),
            ("fields[Queue]", "Name"),
            ("orderby", "id"),
            ("per_page", self.page_size),
        ]
        after = 0
        while True:
            query = ("query", f"({ticketsql}) AND id > {after}")
            answer = self._collection("GET", "/tickets", [query, *params])
            items = answer.get("items", [])
            yield from items
            if not _more_pages(answer, 1):
                return
            after = int(items[-1]["id"])

    def tickets_by_change(self, ticketsql: str) -> Iterator[dict]:
        """Tickets matching TicketSQL, oldest change first (then by id), with their LastUpdated.
        The pages are offsets: a ticket changed while they are read moves to the end and slides
        the next one back past the offset, never served here. So this tells where the changes
        lie, never which tickets to read (the ticket source walks by it, see its docstring)."""
        params = [
            ("query", ticketsql),
            ("fields", "LastUpdated"),
            ("orderby", "LastUpdated"),
            ("order", "ASC"),
            ("orderby", "id"),
            ("order", "ASC"),
        ]
        yield from self._search("/tickets", params)

    def newest_ticket_update(self) -> datetime | None:
        """The newest LastUpdated of any ticket: the sensor's cheap 'did anything change?'."""
        answer = self._request(
            "GET",
            "/tickets",
            params=[
                ("query", "id > 0"),
                ("fields", "LastUpdated"),
                ("orderby", "LastUpdated"),
                ("order", "DESC"),
                ("per_page", 1),
            ],
        )
        items = answer.get("items", []) if isinstance(answer, dict) else []
        return rt_time(items[0].get("LastUpdated")) if items else None

    def newest_ticket_change(self) -> int | None:
        """The id of the newest transaction on a ticket: RT records one for every change, its ids
        only grow, and two changes within a second (LastUpdated keeps seconds) have two. Of a
        page of the newest, the newest the user may see: a comment is hidden from a user without
        ShowTicketComments, and RT leaves it out of the page, not out of the count."""
        answer = self._request(
            "GET",
            "/transactions",
            params=[
                ("query", "ObjectType = 'RT::Ticket'"),
                ("orderby", "id"),
                ("order", "DESC"),
                ("per_page", NEWEST_CHANGES),
            ],
        )
        items = answer.get("items", []) if isinstance(answer, dict) else []
        return max((int(item["id"]) for item in items), default=None)

    def create_ticket(self, fields: Mapping[str, object]) -> int:
        """Not resent once it may have reached RT: a second ticket would be a duplicate."""
        answer = self._request("POST", "/ticket", body=dict(fields), idempotent=False)
        return int(answer["id"]) if isinstance(answer, dict) else 0

    def update_ticket(self, ticket_id: int, fields: Mapping[str, object]) -> list[str]:
        answer = self._request("PUT", f"/ticket/{int(ticket_id)}", body=dict(fields))
        return [str(message) for message in answer] if isinstance(answer, list) else []


def _more_pages(answer: dict, page: int) -> bool:
    """Whether pages follow this one. RT leaves the page count out when it does not count what
    the user may not see (users for an unprivileged user, tickets without SQL ACL checks): then
    only an empty page ends the search."""
    pages = answer.get("pages")
    return bool(answer.get("items")) and (pages is None or page < int(pages))


def _segment(name: str) -> str:
    return requests.utils.quote(name, safe="")


def _json_or_none(response: requests.Response) -> object:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None
