"""PII masking that keeps a recognisable shape: `jane.doe@example.com` → `j***@e***.com`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

MASK = "***"
_EMAIL = re.compile(r"[^@\s\"'<>(),;:]+@[^@\s\"'<>(),;:]+")


def mask_email(value: str) -> str:
    local, _, domain = value.rpartition("@")
    if not local:
        return mask_text(value)
    host, dot, tld = domain.rpartition(".")
    masked_domain = f"{host[:1]}{MASK}{dot}{tld}" if host else f"{domain[:1]}{MASK}"
    return f"{local[:1]}{MASK}@{masked_domain}"


def mask_emails(text: str, secrets: Iterable[str | None] = ()) -> str:
    """An API's message with every email address in it masked, and these secrets (its token,
    its password) too, should the API quote them."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return _EMAIL.sub(lambda found: mask_email(found[0]), text)


def mask_text(value: str) -> str:
    return f"{value[:1]}{MASK}" if value else value


def mask_value(value: object) -> object:
    """Mask one PII value; emails keep their shape, other text keeps its first character."""
    if value is None or (isinstance(value, float) and value != value):
        return value
    text = str(value)
    return mask_email(text) if "@" in text else mask_text(text)


def mask_record(record: Mapping[str, object], pii_fields: Iterable[str]) -> dict[str, object]:
    pii = set(pii_fields)
    return {name: mask_value(value) if name in pii else value for name, value in record.items()}


def scrub(text: str, values: Iterable[object]) -> str:
    """`text` (an API's error message, an exception) with each of these PII values masked: as
    they are, and in any case where no letter adjoins them, for a trigger may say upper(name)
    ("JANE DOE", "STRASSE" for "Straße"), but "Tim" is no part of "timestamp"."""
    for value in sorted(
        {str(v) for v in values if v is not None and str(v)}, key=len, reverse=True
    ):
        if len(value) >= 3:
            text = text.replace(value, str(mask_value(value)))
            for form in {value, value.upper()}:  # in another case: not within other letters
                text = re.sub(
                    rf"{_NO_LETTER_BEFORE}{re.escape(form)}{_NO_LETTER_AFTER}",
                    _masked,
                    text,
                    flags=re.I,
                )
    return text


# Not next to a letter (a digit or an underscore is no letter: "jane_doe", "JANE2" are masked).
_NO_LETTER_BEFORE = r"(?<![^\W\d_])"
_NO_LETTER_AFTER = r"(?![^\W\d_])"


def _masked(found: re.Match) -> str:
    return str(mask_value(found[0]))
