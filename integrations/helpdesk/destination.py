"""RT users as a sync destination: upsert by user name with minimal writes; archive = disable.

RT has no batch endpoint for users, so a chunk costs one search for what RT holds, then one
request per user that is new or differs, sending only the fields that differ (RT records a
transaction per changed field, so an unchanged field is never sent). A second search checks
that RT stored what was sent: REST2 answers 201 even when it drops a custom-field value it
refuses, and a 2xx is never taken as success wholesale. A user RT refuses (an address another
user has) is reported on its own; the others of the chunk are written. RT answers an update with
a message per field, a refused one's saying why: the refusal carries those words.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

from integrations.engine.destination import (
    DestinationRefused,
    DestinationUnavailable,
    OutboundRecord,
    RecordsRejected,
    Refusal,
    Upserted,
    Written,
)
from integrations.engine.masking import scrub
from integrations.helpdesk.client import (
    RtAuthError,
    RtClient,
    RtRequestRejected,
    RtUnavailable,
)

CUSTOM_FIELD = re.compile(r"^CF\.\{(.+)\}$")  # how TicketSQL names a custom field
MAX_BATCH = 50
# RT's words for a field it changed, where they are not the field's name.
_SAID_AS = {"Disabled": ("enabled", "disabled")}
_WHAT_TO_DO = (
    "What to do: correct the value in the ERP, or in RT what refuses it (another RT user holding "
    "the address, the custom field's values, the API user's rights), then replay the letter"
)


def _text(value: object) -> str:
    """A value as RT stores and returns it: text, empty for none."""
    return "" if value is None else str(value)


def _flatten(user: Mapping[str, object]) -> dict[str, str]:
    """A REST2 user as flat fields, custom fields as `CF.{Name}` (single values)."""
    flat = {name: _text(value) for name, value in user.items() if name != "CustomFields"}
    for field in user.get("CustomFields") or []:
        values = field.get("values") or []
        flat[f"CF.{{{field['name']}}}"] = _text(values[0] if values else None)
    return flat


class RtUsers:
    """RT users keyed by `Name`; the records' `CF.{…}` properties are custom fields."""

    max_batch = MAX_BATCH
    ids_ignore_case = True  # its unique properties compare without case
    null_is_empty = True  # a field without a value reads back as ""
    name = "RT users"

    def __init__(self, client: RtClient, id_property: str = "Name"):
        self.client, self.id_property = client, id_property

    def prepare(self, spec) -> None:
        """Nothing to check up front: RT answers user by user (the verify step reads back)."""

    def upsert(self, records: Sequence[OutboundRecord]) -> Upserted:
        wanted = {self._name(record): self._wanted(record) for record in records}
        written: list[Written] = []
        refused: list[Refusal] = []
        answers: dict[str, list[str]] = {}
        try:
            held = self._held(list(wanted), wanted)
            for record in records:
                name = self._name(record)
                try:
                    created, answers[name] = self._write(name, wanted[name], held.get(name))
                except RtRequestRejected as error:
                    refused.append(Refusal(record.key, f"{error}. {_WHAT_TO_DO}"))
                    continue
                written.append(Written(record.key, name, created=created))
            wrong = self._not_stored(
                {item.destination_id: wanted[item.destination_id] for item in written}
            )
            wrong = self._ask_why(wrong, wanted, answers)
        except RtUnavailable as error:
            raise DestinationUnavailable(str(error)) from error
        except RtAuthError as error:  # the credentials or rights, not the records: refused alike
            raise DestinationRefused(str(error), error.todo) from error
        refused += [
            Refusal(
                item.key,
                _not_stored_reason(
                    wrong[name], wanted[name], answers.get(name, []), held.get(name) or {}
                ),
            )
            for item in written
            if (name := item.destination_id) in wrong
        ]
        return Upserted([item for item in written if item.destination_id not in wrong], refused)

    def health(self) -> dict[str, object]:
        return self.client.api.stats()

    def archive(self, destination_ids: Sequence[str]) -> None:
        """Disable the users (RT keeps their tickets and history); already disabled is fine."""
        try:
            held = self.client.users_by_name(list(destination_ids), [])
            for name, user in held.items():
                if user["Disabled"] != "1":
                    self.client.update_user(name, {"Disabled": 1})
        except RtRequestRejected as error:
            raise RecordsRejected(str(error)) from error
        except RtUnavailable as error:
            raise DestinationUnavailable(str(error)) from error
        except RtAuthError as error:  # the credentials or rights, not the records: refused alike
            raise DestinationRefused(str(error), error.todo) from error

    def snapshot(self, fields: Sequence[str]) -> Iterator[tuple[str, str, dict[str, object]]]:
        """Every enabled user that carries one of the synced custom fields (RT's own users and
        users RT made for unknown requestors are not handoff's)."""
        plain = [name for name in fields if not CUSTOM_FIELD.match(name)]
        custom = [name for name in fields if CUSTOM_FIELD.match(name)]
        try:
            for user in self.client.all_users([*plain, "CustomFields"]):
                flat = _flatten(user)
                if any(flat.get(name) for name in custom):
                    yield flat["Name"], flat["Name"], dict(flat)
        except RtUnavailable as error:
            raise DestinationUnavailable(str(error)) from error
        except RtAuthError as error:  # the credentials or rights, not the records: refused alike
            raise DestinationRefused(str(error), error.todo) from error

    # --- internals ---------------------------------------------------------------------------

    def _name(self, record: OutboundRecord) -> str:
        return str(record.properties[self.id_property])

    def _wanted(self, record: OutboundRecord) -> dict[str, str]:
        """The record as RT would hold it, enabled (a customer back from deletion is enabled)."""
        fields = {k: _text(v) for k, v in record.properties.items() if k != self.id_property}
        return {**fields, "Disabled": "0"}

    def _write(
        self, name: str, want: Mapping[str, str], current: dict | None
    ) -> tuple[bool, list[str]]:
        """Create the user, or send the fields RT holds otherwise; whether it was created
        (RT did not hold it when the chunk was read), and RT's messages on the update."""
        created = current is None
        if current is None:
            try:
                self.client.create_user(self._body({**want, "Name": name}))
                return created, []
            except RtRequestRejected:
                # A create resent after its answer was lost (a gateway timing out while RT went
                # on) is refused, the name in use: the first one made the user; finish it.
                current = self._held([name], {name: want}).get(name)
                if current is None:
                    raise
        changes = {k: v for k, v in want.items() if current.get(k) != v}
        if not changes:
            return created, []
        return created, self.client.update_user(name, self._body(changes))

    def _ask_why(
        self,
        wrong: Mapping[str, list[str]],
        wanted: Mapping[str, Mapping[str, str]],
        answers: dict[str, list[str]],
    ) -> dict[str, list[str]]:
        """Send the fields RT did not store without a word (REST2 answers a create 201 and drops
        a custom-field value it refuses) again as an update, whose answer says why; the users
        still holding them otherwise, as `_not_stored` tells them."""
        silent = {name: fields for name, fields in wrong.items() if not answers.get(name)}
        for name, fields in silent.items():
            try:
                body = self._body({field: wanted[name][field] for field in fields})
                answers[name] = self.client.update_user(name, body)
            except RtRequestRejected as error:
                answers[name] = [str(error)]
        still = self._not_stored({name: wanted[name] for name in silent})
        return {name: f for name, f in wrong.items() if name not in silent} | still

    def _held(self, names: list[str], wanted: Mapping[str, Mapping[str, str]]) -> dict[str, dict]:
        fields = sorted({k for want in wanted.values() for k in want} - {"Disabled"})
        plain = [name for name in fields if not CUSTOM_FIELD.match(name)]
        return {
            name: _flatten(user)
            for name, user in self.client.users_by_name(names, [*plain, "CustomFields"]).items()
        }

    @staticmethod
    def _body(fields: Mapping[str, str]) -> dict[str, object]:
        """Flat fields as REST2 takes them: custom fields in `CustomFields`, Disabled a number."""
        body: dict[str, object] = {}
        custom: dict[str, str] = {}
        for name, value in fields.items():
            match = CUSTOM_FIELD.match(name)
            if match:
                custom[match.group(1)] = value
            else:
                body[name] = int(value) if name == "Disabled" else value
        if custom:
            body["CustomFields"] = custom
        return body

    def _not_stored(self, wanted: Mapping[str, Mapping[str, str]]) -> dict[str, list[str]]:
        """Users whose fields RT holds otherwise than sent, with those fields' names."""
        if not wanted:
            return {}
        held = self._held(list(wanted), wanted)
        wrong = {}
        for name, want in wanted.items():
            stored = held.get(name, {})
            differing = sorted(k for k, v in want.items() if stored.get(k) != v)
            if differing:
                wrong[name] = differing
        return wrong


def _not_stored_reason(
    fields: Sequence[str],
    want: Mapping[str, str],
    answer: Sequence[str],
    before: Mapping[str, str],
) -> str:
    """Why RT kept these fields as they were, in its words: its messages on the update, less
    those reporting a field it stored (they quote the value it replaced, which the engine
    cannot mask: it knows only the record's values, so the values RT held are masked here)."""
    stored = [name for name in want if name not in fields]
    said = [message for message in answer if not any(_reports(message, f) for f in stored)]
    words = "; ".join(f"'{message}'" for message in said) or "nothing about it"
    reason = f"RT did not store {', '.join(fields)}; RT said {words}. {_WHAT_TO_DO}"
    return scrub(reason, [before.get(name) for name in want])


def _reports(message: str, field: str) -> bool:
    """Whether RT's message is about this field: it names a custom field by its name, and says
    "User enabled"/"User disabled" for Disabled."""
    match = CUSTOM_FIELD.match(field)
    labels = (match.group(1),) if match else _SAID_AS.get(field, (field,))
    return any(re.search(rf"\b{re.escape(label)}\b", message) for label in labels)
