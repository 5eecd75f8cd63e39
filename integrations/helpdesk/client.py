"""A client for Request Tracker 5's REST2 API: users by name, ticket searches, ticket writes.

Authentication is basic (RT_USER/RT_PASSWORD) or an RT auth token (RT_TOKEN, from the
RT::Authen::Token extension, sent as `Authorization: token …`). Searches follow REST2's paging
(`page`/`per_page`, at most 100 a page). Transport faults – 429 with Retry-After, 5xx, dropped
connections – are handled in `_transport` alone, so the shared HTTP module can replace it.
Errors name RT and the request, never the credentials.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

PAGE = 100  # REST2's largest page
RETRYABLE = (429, 500, 502, 503, 504)


class RtError(Exception):
    """Base of the RT client's errors; messages carry no credentials."""


class RtUnavailable(RtError):
    """RT could not be reached, or kept answering 429/5xx after every retry."""


class RtAuthError(RtError):
    """RT refused the credentials."""


class RtRequestRejected(RtError):
    """RT refused the request's content (4xx): its message is kept."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"RT answered {status}: {message}")


def rt_time(value: str | None) -> datetime | None:
    """REST2's `2026-11-26T01:56:44Z` as a naive UTC datetime (the engine's convention)."""
    if not value or value.startswith("1970-01-01"):  # RT's "never"
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).replace(tzinfo=None)


def ticketsql_time(moment: datetime) -> str:
    """A naive UTC datetime as TicketSQL reads it (RT compares in UTC, to the second)."""
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _transport(retries: int, backoff: float, backoff_max: float) -> requests.Session:
    """The one place that decides how requests travel: retries, backoff and Retry-After."""
    session = requests.Session()
    retry = Retry(
        total=retries,
        backoff_factor=backoff,
        backoff_max=backoff_max,
        backoff_jitter=backoff,
        status_forcelist=RETRYABLE,
        # GET, PUT and searches are idempotent; a create (POST /user, /ticket) is retried only
        # when RT never answered, and the caller re-reads before creating again.
        allowed_methods=None,
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


class RtClient:
    def __init__(
        self,
        base_url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 6,
        backoff: float = 0.5,
        backoff_max: float = 30.0,
        page_size: int = PAGE,
    ):
        if not token and not (user and password):
            raise RtAuthError("set RT_TOKEN, or RT_USER and RT_PASSWORD, to reach RT")
        self.base_url = base_url.rstrip("/")
        self.api = f"{self.base_url}/REST/2.0"
        self.timeout = timeout
        self.page_size = min(page_size, PAGE)
        self.session = _transport(retries, backoff, backoff_max)
        self.session.headers["Accept"] = "application/json"
        if token:
            self.session.headers["Authorization"] = f"token {token}"
        else:
            self.session.auth = (user or "", password or "")

    def close(self) -> None:
        self.session.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        params: Sequence[tuple[str, object]] | None = None,
    ) -> object:
        where = f"{method} {path}"
        try:
            response = self.session.request(
                method,
                f"{self.api}{path}",
                data=None if body is None else json.dumps(body),
                headers={"Content-Type": "application/json"} if body is not None else None,
                params=params,
                timeout=self.timeout,
            )
        except requests.RequestException as error:
            raise RtUnavailable(
                f"RT {where}: {type(error).__name__} talking to {self.base_url}"
            ) from None
        if response.status_code in RETRYABLE:
            raise RtUnavailable(f"RT {where}: answered {response.status_code} after every retry")
        if response.status_code in (401, 403):
            raise RtAuthError(
                f"RT {where}: refused the credentials ({response.status_code}); check RT_USER/"
                "RT_PASSWORD or RT_TOKEN and the user's rights"
            )
        body_json = _json_or_none(response)
        if response.status_code >= 400:
            message = body_json.get("message") if isinstance(body_json, dict) else None
            raise RtRequestRejected(response.status_code, str(message or response.reason))
        return body_json

    def _search(
        self, path: str, params: Sequence[tuple[str, object]] = (), body: object = None
    ) -> Iterator[dict]:
        """Every item of a collection, page by page (`body`: a JSON search, POSTed)."""
        method = "GET" if body is None else "POST"
        page = 1
        while True:
            query = [*params, ("page", page), ("per_page", self.page_size)]
            answer = self._request(method, path, body=body, params=query)
            if not isinstance(answer, dict):
                raise RtError(f"RT {path}: expected a search result, got {type(answer).__name__}")
            yield from answer.get("items", [])
            if page >= int(answer.get("pages") or 0) or not answer.get("items"):
                return
            page += 1

    # --- system -------------------------------------------------------------------------------

    def ping(self) -> dict:
        """RT's version and plugins; also proves the credentials."""
        answer = self._request("GET", "/rt")
        return answer if isinstance(answer, dict) else {}

    # --- users --------------------------------------------------------------------------------

    def users_by_name(self, names: Sequence[str], fields: Sequence[str]) -> dict[str, dict]:
        """The users with these names (enabled or disabled), each with `fields` and `Disabled`
        as "0"/"1" (REST2 leaves it empty in searches, so enabled users are asked for apart)."""
        found: dict[str, dict] = {}
        for start in range(0, len(names), self.page_size):
            chunk = [
                {"field": "Name", "value": name} for name in names[start : start + self.page_size]
            ]
            shown = ",".join(["Name", *fields])
            every = self._search("/users", [("fields", shown), ("find_disabled_rows", 1)], chunk)
            enabled = {item["Name"] for item in self._search("/users", [("fields", "Name")], chunk)}
            for item in every:
                found[item["Name"]] = {**item, "Disabled": "0" if item["Name"] in enabled else "1"}
        return found

    def all_users(self, fields: Sequence[str]) -> Iterator[dict]:
        """Every enabled user with `fields`."""
        everyone = [{"field": "id", "operator": ">", "value": 0}]
        yield from self._search("/users", [("fields", ",".join(["Name", *fields]))], everyone)

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

    def search_tickets(
        self, ticketsql: str, fields: Sequence[str], order_by: Sequence[str] = ("id",)
    ) -> Iterator[dict]:
        """Tickets matching TicketSQL, with `fields` (and the requestors' Name and
        EmailAddress), ascending by `order_by`."""
        params: list[tuple[str, object]] = [
            ("query", ticketsql),
            ("fields", ",".join(fields)),
            ("fields[Requestor]", "Name,EmailAddress"),
            ("fields[Queue]", "Name"),
        ]
        params += [("orderby", name) for name in order_by]
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

    def create_ticket(self, fields: Mapping[str, object]) -> int:
        answer = self._request("POST", "/ticket", body=dict(fields))
        return int(answer["id"]) if isinstance(answer, dict) else 0

    def update_ticket(self, ticket_id: int, fields: Mapping[str, object]) -> list[str]:
        answer = self._request("PUT", f"/ticket/{int(ticket_id)}", body=dict(fields))
        return [str(message) for message in answer] if isinstance(answer, list) else []


def _segment(name: str) -> str:
    return requests.utils.quote(name, safe="")


def _json_or_none(response: requests.Response) -> object:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None
